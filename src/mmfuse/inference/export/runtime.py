"""Running an ONNX export: what ``mmfuse predict --backend onnx`` needs, and the same code the parity gate checks.

    mmfuse predict runs/quickstart data.csv --out preds.csv --backend onnx

``OnnxPredictor`` runs the graph ``mmfuse export`` wrote in onnxruntime, with the preprocessing written beside it:
the tokenizer, and for images the tower's ``PixelSpec`` applied by the same function as in training and in torch
prediction (``towers.tower_pixels``), or a Hugging Face image processor that crops or pads. onnx and onnxruntime are
the optional extra ``mmfuse[export]``, imported only when used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mmfuse.binary import Decision, read_decision
from mmfuse.config import RunConfig
from mmfuse.data.checks import CHARS_PER_TOKEN, clip_text
from mmfuse.data.columns import Columns, Slot
from mmfuse.data.images import load_image
from mmfuse.data.records import Record
from mmfuse.data.tabular import TabularSpec
from mmfuse.errors import MmfuseError
from mmfuse.inference.export.columns import column_feeds
from mmfuse.inference.inputs import as_list, open_input, row_record
from mmfuse.inference.predictor import load_inputs
from mmfuse.models.towers.base import PixelSpec, tower_pixels
from mmfuse.multilabel import Thresholds, read_thresholds
from mmfuse.rundir.layout import check_run, temperature

INSTALL = "pip install 'mmfuse[export]'"


def require_onnx():
    """onnx and onnxruntime, or an error naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise MmfuseError(
            f"Exporting to ONNX and --backend onnx need onnx and onnxruntime ({e.name or e} is not installed): "
            f"{INSTALL}"
        ) from None
    return onnx, onnxruntime


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class OnnxPredictor:
    """An exported graph in onnxruntime, with the preprocessing written beside it: what ``predict_file`` runs for
    ``--backend onnx`` (``inference.backends``).

    Args:
        export_dir: what ``export_run`` wrote (``model.onnx``, ``export.json``, ``tokenizer/``).
        run_dir: the run it was exported from, for ``predict_records``' data checks (``load_data``); it must be the
            run whose weights were exported.
        threads: onnxruntime's intra-op threads (default: its own choice, one per physical core).
    """

    backend = "onnx"

    def __init__(self, export_dir: str | Path, run_dir: str | Path | None = None, threads: int | None = None):
        _, ort = require_onnx()
        self.dir = Path(export_dir)
        self.info = read_export(self.dir)
        self.classes: list[str] = self.info["classes"]
        self.modalities: list[str] = self.info["modalities"]
        self.input_names: list[str] = list(self.info["inputs"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # onnxruntime's threads otherwise spin for a while after each call, taking the cores from whatever runs next
        # (the next batch's decoding and tokenizing; torch in the benchmark): measured on 2 cores, torch beside a
        # spinning session ran 10x slower.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        pre = self.info["preprocess"]
        self.tokenizer = self.processor = self.pixel_spec = None
        if "text" in pre:
            from transformers import AutoTokenizer  # deferred: transformers costs a second to import

            self.tokenizer = AutoTokenizer.from_pretrained(self.dir / pre["text"]["tokenizer"])
            self.max_length = int(pre["text"]["max_length"])
        if "image" in pre and "processor" in pre["image"]:
            from transformers import AutoImageProcessor  # deferred: transformers costs a second to import

            self.processor = AutoImageProcessor.from_pretrained(self.dir / pre["image"]["processor"])
        elif "image" in pre:
            self.pixel_spec = PixelSpec.from_dict(pre["image"])
        # A run with named columns: which graph input reads which column, and the tabular statistics (tabular.json).
        self.columns: Columns | None = None
        self.slots: list[Slot] = []
        self.tabular: TabularSpec | None = None
        if "columns" in self.info:
            self.columns = Columns(**{k: tuple(v) for k, v in self.info["columns"].items()})
            self.slots = [Slot(**s) for s in self.info["slots"]]
        if "tabular" in pre:
            where = self.dir / pre["tabular"]["statistics"]
            try:
                self.tabular = TabularSpec.from_json(json.loads(where.read_text(encoding="utf-8")), str(where))
            except (OSError, ValueError) as e:
                raise MmfuseError(f"{where} cannot be read ({e}); export again.") from None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # The graph gives probabilities; a binary run's threshold makes the labels (the run's, else export.json's).
        self.decision = None
        if "threshold" in self.info:
            self.decision = Decision(str(self.info["positive"]), float(self.info["threshold"]))
        # A multi-label graph gives a sigmoid per label; the run's thresholds make the sets (export.json's without it).
        self.multi_label = bool(self.info.get("multi_label", False))
        self.thresholds = None
        if self.multi_label:
            self.thresholds = Thresholds(tuple(float(self.info["thresholds"][c]) for c in self.classes))
        if self.run_dir is not None:
            self._check_run()
            self.decision = None if self.multi_label else read_decision(self.run_dir, self.classes)
            self.thresholds = read_thresholds(self.run_dir, self.classes) if self.multi_label else None

    def _check_run(self) -> None:
        run = check_run(self.run_dir)
        # A run retrained after its export would be predicted by the old weights without a word.
        weights = run / "model.safetensors"
        if sha256(weights) != self.info.get("run_weights_sha256"):
            raise MmfuseError(
                f"The export in {self.dir} was made from other weights than {weights} (the run was trained again "
                f"since, or the export is of another run): export again with mmfuse export {self.run_dir} --out "
                f"{self.dir}."
            )
        # The graph holds the temperature it was exported with; the run's must still be that one.
        if temperature(run) != float(self.info.get("temperature", 1.0)):
            raise MmfuseError(
                f"The export in {self.dir} was made with another calibration (temperature) than {run} holds now: "
                f"export again with mmfuse export {self.run_dir} --out {self.dir}."
            )
        self.cfg = RunConfig.from_yaml(self.run_dir / "config.yaml")

    @property
    def accepts_missing_text(self) -> bool:
        return bool(self.info["accepts_missing_text"])

    @property
    def max_chars(self) -> int:
        return self.cfg.model.max_length * CHARS_PER_TOKEN

    def load_data(self, data, captions=None, need_label=False, skip_bad=False, skipped_csv=None) -> list[Record]:
        """Checked records, exactly as the torch backend reads them (``predictor.load_inputs``)."""
        if self.run_dir is None:
            raise MmfuseError("OnnxPredictor.load_data needs the run directory the graph was exported from")
        return load_inputs(self, data, captions, need_label, skip_bad, skipped_csv)

    def feeds(self, images: Sequence[Image.Image] | None, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The graph's inputs for RGB images and texts (an empty text: missing, where the model allows it)."""
        if self.columns is not None:
            raise MmfuseError(
                f"this graph reads the columns {self.columns.names}: build its inputs with row_feeds(rows), or "
                "predict(rows=[{column: value, ...}, ...])"
            )
        out = {}
        if "input_ids" in self.input_names:
            out |= self.tokenize(texts)
        if "pixel_values" in self.input_names:
            out["pixel_values"] = self.pixels(images)
        if "present" in self.input_names:
            has_text = np.array([bool(t.strip()) for t in texts])
            cols = [has_text if m == "text" else np.ones(len(texts), bool) for m in self.modalities]
            out["present"] = np.stack(cols, 1)
        return out

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask`` (int64) of texts, padded to the longest, cut at max_length."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }

    def row_feeds(self, rows) -> dict[str, np.ndarray]:
        """The inputs of a graph with columns for rows as ``Predictor.predict(rows=...)`` takes them: one dict per
        input with a value for each column (a DataFrame works too), each checked as torch checks it."""
        if self.columns is None:
            raise MmfuseError("rows=... is for a graph of a run with named columns; this one takes images and texts")
        if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
            rows = rows.to_dict("records")
        rows = as_list(rows, "rows", "row")
        limit = int(self.info["preprocess"]["text"]["max_length"]) * CHARS_PER_TOKEN if self.tokenizer else 0
        records = [
            row_record(row, i, self.columns, lambda t: [clip_text(x, limit) for x in t]) for i, row in enumerate(rows)
        ]
        return self.record_feeds(records)

    def record_feeds(self, records: list[Record]) -> dict[str, np.ndarray]:
        """The inputs of a graph with columns for checked rows with cells (``load_data``'s, or ``row_feeds``')."""
        return column_feeds(records, self.slots, self.tabular, self.tokenize, self.pixels, open_input, self.input_names)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's probabilities for its inputs."""
        return self.session.run(["probs"], feeds)[0]

    def pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 3, H, W) float32: the tower's pixels normalised, by the function training and torch prediction use."""
        if self.processor is not None:
            return np.asarray(self.processor(list(images), return_tensors="np")["pixel_values"], dtype=np.float32)
        return tower_pixels(images, self.pixel_spec, normalised=True).numpy()

    def predict(
        self, images: Sequence[Image.Image] | None = None, texts: Sequence[str] | None = None, *, rows=None
    ) -> np.ndarray:
        """Probabilities (N, classes) for one batch of RGB images and texts, columns in ``classes`` order; for a
        graph with columns, of ``rows`` (``row_feeds``) in their place."""
        if rows is not None or self.columns is not None:
            if images is not None or texts is not None or rows is None:
                raise MmfuseError(
                    "a graph of a run with named columns takes predict(rows=[{column: value, ...}, ...]); "
                    "a graph of one image and one text takes predict(images, texts)"
                )
            return self.run(self.row_feeds(rows))
        return self.run(self.feeds(images, texts))

    def predict_records(self, records: list[Record], batch_size: int | None = None, show: bool = True) -> np.ndarray:
        """Probabilities for checked records, as ``Predictor.predict_records`` gives them."""
        batch_size = batch_size or 64
        uses_images = "image" in self.modalities
        out = []
        for start in range(0, len(records), batch_size):
            rows = records[start : start + batch_size]
            if self.columns is not None:
                out.append(self.run(self.record_feeds(rows)))
                continue
            images = [load_image(r.image) for r in rows] if uses_images else None
            out.append(self.predict(images, [r.text for r in rows]))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)


def read_export(export_dir: Path) -> dict:
    """export.json of an export that passed its parity gate, or an error that says what to run."""
    info_path = export_dir / "export.json"
    if export_dir.is_file():
        raise MmfuseError(f"{export_dir} is a file; give the directory mmfuse export --out wrote.")
    if not info_path.is_file():
        raise MmfuseError(
            f"{export_dir} holds no ONNX export (no export.json); make one with mmfuse export RUN --out DIR."
        )
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MmfuseError(f"{info_path} is damaged ({e}); export again.") from None
    if info.get("status") != "passed":
        raise MmfuseError(
            f"The export in {export_dir} failed its parity gate ({info.get('error', 'see export.json')}) and must "
            "not be used; predict with --backend torch."
        )
    if not (export_dir / "model.onnx").is_file():
        raise MmfuseError(f"{export_dir}/model.onnx is missing; export again.")
    return info


def find_export(run_dir: str | Path, onnx_dir: str | Path | None = None) -> Path:
    """The export ``predict --backend onnx`` runs: ``onnx_dir``, or RUN/export."""
    where = Path(onnx_dir) if onnx_dir is not None else Path(run_dir) / "export"
    if not (where / "export.json").is_file() and not where.is_file():
        given = f"--onnx {where}" if onnx_dir is not None else f"{where} (the default place)"
        raise MmfuseError(
            f"--backend onnx needs an exported graph, and there is none in {given}: run "
            f"mmfuse export {run_dir} --out {where} first."
        )
    return where
