"""Loading a run directory and predicting: the Python API (``mmfuse.load``) and the predict/evaluate verbs."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmfuse import binary, calibration, metrics, multilabel
from mmfuse.captioning.pipeline import fill_missing_captions
from mmfuse.config import DTYPES, RunConfig
from mmfuse.data.checks import CHARS_PER_TOKEN, clip_text, load_checked
from mmfuse.data.columns import Columns
from mmfuse.data.records import Record
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import FeatureCache, MultimodalDataset, PixelCache, batch_collate, build_dataset
from mmfuse.inference.inputs import as_list, check_image, check_text, open_input, row_record
from mmfuse.inference.report import write_errors
from mmfuse.inference.stream import (
    DEFAULT_CHUNK,
    check_chunk_size,
    predict_all,
    processes,
    rows_digest,
    run_identity,
    stream_predictions,
)
from mmfuse.inference.trained_on import warn_if_trained_on
from mmfuse.models.classifier import MultimodalClassifier
from mmfuse.models.compile import compile_model
from mmfuse.models.towers.onnx_engine import engine
from mmfuse.paths import mmfuse_home
from mmfuse.rundir.layout import ENSEMBLE_FILE, RUN_FILES, check_run, ensemble_members, is_run, temperature
from mmfuse.rundir.weights import load_models

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    labels: list[str]
    """The predicted class of each input; for a multi-label run, its set joined by | (empty when no label reaches
    its threshold)."""
    probs: np.ndarray
    """(N, classes) softmax probabilities (calibrated, for a run trained with --calibrate), in ``classes`` order; for
    a multi-label run, one sigmoid probability per label."""
    classes: list[str]
    sets: list[list[str]] | None = None
    """A multi-label run's predicted set of each input, in label order; None for a single-label run."""

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)


def check_device(device: str | torch.device, what: str = "device") -> torch.device:
    """A device torch can parse and this machine has: found before a model loads, not at its first batch."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise MmfuseError(f"{what} {device} is not a torch device; use e.g. cpu, cuda or cuda:1.") from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise MmfuseError(f"{what} {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return dev


class Predictor:
    """A trained model loaded from its run directory, with no network.

    Args:
        run_dir: what ``fit`` wrote; for a bagged run (``mmfuse train --bag K``), its members' probabilities are
            averaged (or its refit model used, when it has one); for an ensemble (``--preset ensemble``), its
            members' (each a bag, with its own towers and modalities) are summed with their weights.
        device: default: CUDA where available, else CPU.
        dtype: how the model computes. ``fp32``; ``autocast``: fp32 weights under bf16 autocast, which casts every
            weight again on every call; ``bf16``: the weights cast to bf16 once, the inputs cast to match,
            probabilities in fp32; ``auto``: ``autocast`` on a GPU with bf16, else ``fp32``.
        compile: torch.compile the model (``mmfuse.models.compile.compile_model``: each encoder layer of the towers) for
            repeated large batches on a GPU; the first batch pays the compile.
    """

    backend = "torch"

    def __init__(self, run_dir: str | Path, device: str | None = None, dtype: str = "auto", compile: bool = False):
        if dtype not in DTYPES:
            raise MmfuseError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.run_dir = Path(run_dir)
        self.device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.members: list[tuple[Predictor, float]] = []
        """An ensemble's members, each a predictor of its own, with their weights (empty for a run or a bag)."""
        self.temperature = temperature(self.run_dir)  # calibration.json's T, or 1.0: the model's own probabilities
        if (self.run_dir / ENSEMBLE_FILE).is_file():
            self._load_ensemble(dtype, compile)
            return
        self.models, self.cfg, self.classes = load_models(self.run_dir)
        self._read_decision(self.run_dir)
        if dtype == "auto":
            dtype = "autocast" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        self.dtype = dtype
        self.weight_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        for model in self.models:
            model.to(self.device)
            if dtype == "bf16":
                model.to(torch.bfloat16)  # a tower built later follows the model's dtype (build_tower)
        if compile:
            self.models = [compile_model(model) for model in self.models]

    def _read_decision(self, run: Path) -> None:
        """How probabilities become labels: a binary run's threshold (``decision``; None: the argmax), a multi-label
        run's per-label thresholds (``thresholds``; None for other runs)."""
        self.multi_label = self.cfg.data.multi_label
        self.decision = None if self.multi_label else binary.read_decision(run, self.classes)
        self.thresholds = multilabel.read_thresholds(run, self.classes) if self.multi_label else None

    def prediction(self, probs: np.ndarray) -> Prediction:
        """``probs`` with the labels they decide: the argmax, a binary run's threshold, or a multi-label run's sets."""
        if self.multi_label:
            sets = multilabel.label_sets(probs, self.classes, self.thresholds)
            return Prediction([multilabel.joined(s) for s in sets], probs, self.classes, sets)
        return Prediction(binary.labels(probs, self.classes, self.decision), probs, self.classes)

    def _load_ensemble(self, dtype: str, compile: bool) -> None:
        run = check_run(self.run_dir)
        self.cfg = RunConfig.from_yaml(run / "config.yaml")
        self.classes = json.loads((run / "labels.json").read_text())
        for name, folder, weight in ensemble_members(run):
            member = Predictor(folder, self.device, dtype, compile)
            if member.classes != self.classes:
                raise MmfuseError(f"{run}: the member {name} predicts other classes than the ensemble's labels.json")
            self.members.append((member, weight))
        self.models = [m for member, _ in self.members for m in member.models]
        for model in self.models:  # frozen towers built on demand, by fingerprint: one Lite0 or MiniLM for all
            model.shared_towers = self.models[0].shared_towers
        self.dtype, self.weight_dtype = self.members[0][0].dtype, self.members[0][0].weight_dtype
        used = {m for member, _ in self.members for m in member.model.modalities}
        self._inputs = EnsembleInputs([m for m in ("image", "text") if m in used])
        self._read_decision(run)

    @property
    def model(self) -> MultimodalClassifier | EnsembleInputs:
        """The (first) model: a bag's members share their towers' specs, so its inputs serve them all. For an
        ensemble, what its members need between them (``EnsembleInputs``)."""
        return self._inputs if self.members else self.models[0]

    @property
    def accepts_missing_text(self) -> bool:
        """Only a model trained with modality dropout has learned what to do when the text is absent."""
        if self.members:
            return all(member.accepts_missing_text for member, _ in self.members)
        # A model with named columns masks each empty cell with the placeholder it learned for that column.
        return "text" not in self.model.modalities or self.cfg.model.modality_dropout > 0 or self.cfg.model.columns

    @property
    def max_chars(self) -> int:
        """Texts are cut to this many characters before tokenizing (``data.clip_text``)."""
        return self.cfg.model.max_length * CHARS_PER_TOKEN

    def _clip(self, texts: list[str]) -> list[str]:
        long = sum(len(t) > self.max_chars for t in texts)
        if long:
            log.warning("%d text(s) over %d characters were cut to that length", long, self.max_chars)
        return [clip_text(t, self.max_chars) for t in texts]

    def _check_texts(self, texts: Sequence[str]) -> None:
        empty = [i for i, t in enumerate(texts) if not (t or "").strip()]
        if empty and "text" in self.model.modalities and not self.accepts_missing_text:
            raise MmfuseError(
                f"{len(empty)} input(s) have no text (first: #{empty[0]}), and this model was trained without "
                "--modality-dropout, so it cannot predict without text. Give every image its text, caption the "
                "images (mmfuse caption, or --caption-missing), or retrain with --modality-dropout 0.2."
            )

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[str | Path | Image.Image] | None = None,
        texts: Sequence[str] | None = None,
        batch_size: int = 32,
        *,
        rows: Sequence[dict] | None = None,
    ) -> Prediction:
        """Classifies image+text pairs, one result row per input, in input order.

        Args:
            images: a list (or any iterable) of file paths, PIL images or HxWx3 uint8 numpy arrays; None for a
                text-only model (whose images are not read).
            texts: one string per image; empty strings, None or NaN only for models trained with modality dropout.
            rows: for a model trained with named columns (--image-columns, --text-columns, --tabular-columns), in
                place of images and texts: one dict per input with a value for each column (a pandas DataFrame
                works too); an empty cell is None, "" or NaN.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            # 0 failed inside range(); a negative one predicted nothing and returned an empty result
            raise MmfuseError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if rows is not None or self.cfg.model.columns:
            return self._predict_rows(images, texts, rows, batch_size)
        if self.members:
            return self._predict_members(images, texts, batch_size)
        uses_images = "image" in self.model.modalities
        if images is None:
            # A text-only model reads no image: predict(None, texts) needs no files made up for it.
            if uses_images or texts is None:
                raise MmfuseError("images is None; give one image per input (only a text-only model needs none)")
            texts = as_list(texts, "texts", "text")
            images = [None] * len(texts)
        images = as_list(images, "images", "image")
        texts = as_list(texts, "texts", "text") if texts is not None else [""] * len(images)
        if len(texts) != len(images):
            raise MmfuseError(f"got {len(images)} images but {len(texts)} texts")
        texts = self._clip([check_text(t, i) for i, t in enumerate(texts)])
        self._check_texts(texts)
        if uses_images:
            images = [check_image(im, i) for i, im in enumerate(images)]
            # Missing files are found before any batch runs: a long call should not fail at its end for one bad path.
            missing = [
                f"#{i} {im}"
                for i, im in enumerate(images)
                if not isinstance(im, Image.Image) and not Path(im).is_file()
            ]
            if missing:
                raise MmfuseError(f"{len(missing)} image file(s) not found: {', '.join(missing[:5])}")
        # Inputs seen once go through every tower raw (no feature cache), on the one batch path below.
        records = [Record(im, t, None, i, str(i)) for i, (im, t) in enumerate(zip(images, texts))]
        ds = build_dataset(self.model, records, None, self.model.modalities, None, self.device, open_image=open_input)
        return self.prediction(self.predict_dataset(ds, batch_size))

    def _predict_rows(self, images, texts, rows, batch_size: int) -> Prediction:
        """``predict`` for a model with named columns: each row's cells by column name."""
        named = Columns.of(self.cfg.model)
        if named is None:
            raise MmfuseError(
                "predict(rows=...) is for a model trained with named columns; this model, trained without them, "
                "takes predict(images, texts)"
            )
        if rows is None or images is not None or texts is not None:
            raise MmfuseError(
                f"this model reads the columns {named.names}: call predict(rows=[{{column: value, ...}}, ...]) "
                "(or rows=a DataFrame), not predict(images, texts)"
            )
        if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
            rows = rows.to_dict("records")
        rows = as_list(rows, "rows", "row")
        if self.members:  # each member reads the columns it was trained on
            probs = sum(w * m._predict_rows(None, None, rows, batch_size).probs for m, w in self.members)
            return self.prediction(calibration.scaled(probs, self.temperature, self.multi_label))
        records = [row_record(row, i, named, self._clip) for i, row in enumerate(rows)]
        ds = build_dataset(self.model, records, None, self.model.modalities, None, self.device, open_image=open_input)
        return self.prediction(self.predict_dataset(ds, batch_size))

    def _predict_members(self, images, texts, batch_size: int) -> Prediction:
        """An ensemble's prediction: the members' probabilities summed with their weights, each member given the
        inputs it reads (a text-only one, the texts alone: no image file is opened for it)."""
        images = None if images is None else as_list(images, "images", "image")  # an iterable is read once
        texts = None if texts is None else as_list(texts, "texts", "text")
        parts = [
            (m.predict(images if "image" in m.model.modalities or texts is None else None, texts, batch_size), w)
            for m, w in self.members
        ]
        probs = sum(w * p.probs for p, w in parts)
        return self.prediction(calibration.scaled(probs, self.temperature, self.multi_label))

    def predict_dataset(self, ds: MultimodalDataset, batch_size: int) -> np.ndarray:
        """Probabilities (N, classes) for every row of ``ds``, in order: the batch path of the API, predict and
        evaluate alike."""
        loader = DataLoader(ds, batch_size, collate_fn=batch_collate, pin_memory=self.device.type == "cuda")
        out = [self.probs(batch) for batch in loader]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    @torch.inference_mode()
    def logits(self, batch: dict) -> torch.Tensor:
        """The (first) model's output for one batch of its inputs (tower inputs or cached features), on the device.

        Floating-point inputs are cast to the weights' dtype; bench/train_throughput.py checks that bf16 logits,
        either way, stay within 1e-2 of fp32.
        """
        return self._outputs(batch, self.models[:1])[0]

    @torch.inference_mode()
    def probs(self, batch: dict) -> np.ndarray:
        """Calibrated softmax probabilities (N, classes) for one batch, in fp32 on the host; a bag's members' are
        averaged first. A multi-label run's are a sigmoid per label (averaged over a bag's members, then calibrated
        as a whole: ``calibration.scale_sigmoids``). An ensemble's
        members take different inputs: use ``predict`` or ``predict_records``."""
        if self.members:
            raise MmfuseError("an ensemble's members take different inputs: use predict or predict_records")
        outs = [o.float() for o in self._outputs(batch, self.models)]
        if self.multi_label:  # one model: sigmoid(logits / T); a bag: its averaged sigmoids at T, as T was fitted
            if len(outs) == 1:
                return (outs[0] / self.temperature).sigmoid().cpu().numpy()
            mean = torch.stack([o.sigmoid() for o in outs]).mean(0).cpu().numpy()
            return calibration.scale_sigmoids(mean, self.temperature)
        if len(outs) == 1:  # softmax(logits / T): T = 1 leaves an uncalibrated run's bit for bit
            return (outs[0] / self.temperature).softmax(-1).cpu().numpy()
        return calibration.scale(torch.stack([o.softmax(-1) for o in outs]).mean(0).cpu().numpy(), self.temperature)

    def _outputs(self, batch: dict, models: list[MultimodalClassifier]) -> list[torch.Tensor]:
        batch, memo = {k: self._to_device(v) for k, v in batch.items()}, {}
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.dtype == "autocast"):
            return [model(**_encoded(model, batch, memo, self.cfg.tuned)) for model in models]

    def _to_device(self, v):
        if isinstance(v, dict):
            return {k: self._to_device(x) for k, x in v.items()}
        if isinstance(v, tuple):  # pooling.NormalisedTokens
            return type(v)(*(self._to_device(x) for x in v))
        v = v.to(self.device, non_blocking=True)  # then cast on the device, not on the host
        return v.to(self.weight_dtype) if v.is_floating_point() else v

    def predict_records(
        self, records: list[Record], batch_size: int | None = None, show: bool = True, cache: bool = False
    ) -> np.ndarray:
        """Probabilities for checked records, through the feature cache for the towers that were frozen.

        Fine-tuned towers read images decoded once by threads into the uint8 pixel cache (``sources.PixelSource``),
        so a GPU is not left waiting on one process decoding one file at a time. Both caches are read; what they
        miss is stored only with ``cache`` (one-off inputs would otherwise fill them).
        """
        self._check_texts([r.text for r in records])
        if self.members:
            probs = sum(w * m.predict_records(records, batch_size, show, cache) for m, w in self.members)
            return calibration.scaled(probs, self.temperature, self.multi_label)
        # Features from bf16 towers are kept apart: training on them would not be training on the fp32 features.
        root = mmfuse_home() / "features-bf16" if self.weight_dtype == torch.bfloat16 else None
        features = FeatureCache(root, write=cache)
        pixels = PixelCache(write=cache) if not self.cfg.data.decode_each_epoch else False
        ds = build_dataset(self.model, records, None, self.cfg.tuned, features, self.device, show, pixels)
        return self.predict_dataset(ds, batch_size or (256 if self.device.type == "cuda" else 64))

    def load_data(self, data, captions=None, need_label=False, skip_bad=False, skipped_csv=None) -> list[Record]:
        """Checked records of ``data`` for this run (``load_inputs``)."""
        return load_inputs(self, data, captions, need_label, skip_bad, skipped_csv)


def _encoded(model: MultimodalClassifier, batch: dict, memo: dict, tuned: Collection[str]) -> dict:
    """``batch`` with the features of its raw inputs, each tower module run once (``memo``; the frozen ones, not
    ``tuned``, where ``model.cfg.backend`` says: ``onnx_engine.engine``): a bag's models share their frozen towers, so
    its K models cost one tower pass a batch, not K. A pooling keeps the raw input's mask."""
    out = dict(batch)
    for s in model.slots:
        if s.modality in model.cards and batch.get(s.name) is not None and batch.get(f"{s.name}_feats") is None:
            tower = model.build_tower(s.modality)
            if (id(tower), s.name) not in memo:
                rows = len(next(iter(batch[s.name].values())))
                device = model.missing[s.name].device
                run = tower if s.modality in tuned else engine(tower, model.cfg.backend, device, rows)
                memo[id(tower), s.name] = run(**batch[s.name])
            out[f"{s.name}_feats"] = memo[id(tower), s.name]
    return out


@dataclass
class EnsembleInputs:
    """What an ensemble's ``Predictor.model`` says of its inputs: the modalities its members read between them."""

    modalities: list[str]


def load_inputs(
    run, data, captions=None, need_label: bool = False, skip_bad: bool = False, skipped_csv=None
) -> list[Record]:
    """Checked records of ``data`` as a run reads them for predict and evaluate, whichever backend then predicts:
    labels among the run's classes, texts cut to the run's length, missing texts captioned where the run was trained
    so.

    Args:
        run: the predictor (torch or ONNX), for its ``cfg`` (the run's config.yaml), ``classes``, ``run_dir`` (where
            captions made for missing texts are kept, captions.csv) and ``accepts_missing_text`` (whether the model
            takes rows without text: trained with modality dropout).
    """
    cfg, run_dir = run.cfg, run.run_dir
    multi = cfg.data.multi_label
    records = load_checked(
        data,
        captions=captions,
        labels=run.classes,
        need_label=need_label,
        need_text=not (run.accepts_missing_text or cfg.data.caption_missing),
        skip_bad=skip_bad,
        skipped_csv=skipped_csv,
        max_chars=cfg.model.max_length * CHARS_PER_TOKEN,
        named=Columns.of(cfg.model),
        no_text_reason="no text, and this model was trained without --modality-dropout so it needs text "
        "(give it text, caption the images, or retrain with --modality-dropout 0.2)",
        multi_label=multi,  # a single-label run reads one label a row, as it always did
        label_sep=cfg.data.label_sep if multi else None,
    )
    if cfg.data.caption_missing and any(not r.text.strip() for r in records):
        records = fill_missing_captions(records, cfg.data.caption_missing, Path(run_dir) / "captions.csv")
    return records


def load(run_dir: str | Path, device: str | None = None, dtype: str = "auto", compile: bool = False) -> Predictor:
    """Loads a run directory for prediction: ``mmfuse.load(RUN).predict(images, texts)``; options as ``Predictor``."""
    return Predictor(run_dir, device, dtype, compile)


# Extensions of formats predict_file does not write (it writes CSV, whatever the name).
OTHER_FORMATS = {".parquet", ".jsonl", ".json", ".xlsx", ".xls", ".tsv", ".feather", ".arrow", ".pq"}


def predict_file(
    run_dir,
    data,
    out_csv,
    captions=None,
    skip_bad=False,
    dtype="auto",
    compile=False,
    chunk_size: int = DEFAULT_CHUNK,
    resume: bool = False,
    cache: bool = False,
    load: Callable | None = None,
) -> Path:
    """Writes one row per input image, in input order: row (the input's row, from 0), image, true_label and correct
    (when the input has labels), label, confidence, p_<class>...

    Rows are predicted and appended ``chunk_size`` at a time (``mmfuse.inference.stream``), so memory does not grow
    with the input; ``resume`` continues an interrupted prediction of the same input, run and options after its last
    whole chunk. Under ``accelerate launch`` each process predicts one contiguous shard, and the file is the same.

    ``load(device)`` gives the predictor to run (``inference.backends.loader``: torch, or the graph ``mmfuse export``
    wrote); default: ``Predictor(run_dir, device, dtype, compile)``. ``cache``: store the features (or decoded images)
    of inputs the caches miss, not only read their hits.
    """
    check_chunk_size(chunk_size)
    out_csv = Path(out_csv)
    if out_csv.is_dir():
        raise MmfuseError(
            f"--out {out_csv} is a directory; give the path of the CSV to write, e.g. {out_csv}/preds.csv"
        )
    if out_csv.exists() and Path(data).exists() and out_csv.resolve() == Path(data).resolve():
        raise MmfuseError(f"--out {out_csv} is the input data itself; writing there would overwrite it.")
    if is_run(out_csv.parent) and out_csv.name in RUN_FILES:  # this run's or another's
        raise MmfuseError(
            f"--out {out_csv} is one of the run's own files (the run in {out_csv.parent}); writing there would destroy "
            "the run."
        )
    if out_csv.suffix.lower() in OTHER_FORMATS:
        # It wrote CSV under any name: a preds.parquet that no parquet reader could open.
        raise MmfuseError(
            f"--out {out_csv}: predictions are written as CSV; give a path ending in .csv, e.g. "
            f"{out_csv.with_suffix('.csv')}"
        )
    if captions and out_csv.resolve() == Path(captions).resolve():
        raise MmfuseError(f"--out {out_csv} is the --captions file; writing there would overwrite it.")
    # Found now rather than after every row is predicted: a place for --out that cannot be made or written.
    folder = out_csv.absolute().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise MmfuseError(f"--out {out_csv}: {existing} is a file, so no folder can be made there.")
    if not os.access(existing, os.W_OK):
        raise MmfuseError(f"--out {out_csv}: the folder {existing} is not writable.")
    procs = processes()
    if load is None:
        predictor = Predictor(run_dir, device=procs.device, dtype=dtype, compile=compile)
    else:
        predictor = load(procs.device)
    backend = predictor.backend
    skipped = out_csv.with_name(out_csv.stem + ".skipped.csv")
    with procs.main_first():  # every process checks every row (the main one first, filling the check index)
        if procs.is_main:
            skipped.unlink(missing_ok=True)
        records = predictor.load_data(data, captions, skip_bad=skip_bad, skipped_csv=skipped if procs.is_main else None)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    identity = {
        "input": {"path": str(Path(data).resolve()), "rows_sha256": rows_digest(records), "rows": len(records)},
        "run": run_identity(run_dir),
        "options": {
            "backend": backend,
            "dtype": getattr(predictor, "dtype", None),  # as resolved: auto is fp32 on a CPU, autocast on a GPU
            "onnx": str(predictor.dir.resolve()) if backend == "onnx" else None,
        },
    }
    # The ONNX graph runs every tower on raw inputs: it has no cache to fill.
    options = {"cache": cache} if backend == "torch" else {}
    return stream_predictions(predictor, records, out_csv, identity, chunk_size, resume, procs, options)


def evaluate_file(
    run_dir,
    data,
    out_dir=None,
    captions=None,
    skip_bad=False,
    dtype="auto",
    compile=False,
    chunk_size: int = DEFAULT_CHUNK,
    cache: bool = True,
    tower_backend: str = "auto",
) -> dict:
    """Scores a run on labelled data; writes metrics.json, the confusion matrix (CSV, PNG) and the misclassified rows
    (errors.csv, errors.html) to ``out_dir``.

    Rows are predicted ``chunk_size`` at a time. Under ``accelerate launch`` each process predicts one contiguous
    shard of whole chunks; the main process scores all rows, each once, and writes the reports one process writes.
    ``cache``: store what the feature caches miss (the default: a test set is scored again for every run trained,
    unlike predict's one-off inputs). ``tower_backend``: what runs its frozen towers (``ModelConfig.backend``).
    """
    check_chunk_size(chunk_size)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise MmfuseError(f"--out {out_dir} is a file; evaluate writes a directory of reports there.")
    if out_dir is not None and Path(out_dir).resolve() == Path(run_dir).resolve():
        raise MmfuseError(f"--out {out_dir} is the run directory itself; its metrics.json would be overwritten.")
    if out_dir is not None and is_run(out_dir):
        # Its metrics.json (and skipped.csv) would be replaced by this evaluation's: a run's record, lost.
        raise MmfuseError(f"--out {out_dir} holds a trained run; give a new directory for the reports.")
    if out_dir is not None and Path(data).is_dir() and Path(out_dir).resolve().is_relative_to(Path(data).resolve()):
        # Its confusion_matrix.png would be read as an image of a class named after the folder next time.
        raise MmfuseError(f"--out {out_dir} is inside the data folder {data}; put the reports elsewhere.")
    procs = processes()
    predictor = Predictor(run_dir, device=procs.device, dtype=dtype, compile=compile)
    for model in predictor.models:  # how this process runs its frozen towers, not how the run was trained
        model.cfg = replace(model.cfg, backend=tower_backend)
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "eval"
    skipped = out_dir / "skipped.csv"
    with procs.main_first():
        if procs.is_main:
            skipped.unlink(missing_ok=True)
        records = predictor.load_data(
            data, captions, need_label=True, skip_bad=skip_bad, skipped_csv=skipped if procs.is_main else None
        )
    if procs.is_main:
        warn_if_trained_on(predictor.cfg.data, Path(run_dir), data, records, Columns.of(predictor.cfg.model))
    probs = predict_all(predictor, records, chunk_size, procs, {"cache": cache})
    if getattr(predictor, "multi_label", False):
        y = multilabel.targets(records, predictor.classes)
        report = multilabel.report(y, probs, predictor.classes, predictor.thresholds)
        report["log_loss"] = metrics.log_loss(y, probs)
        report |= {"ece": metrics.expected_calibration_error(probs, y), "temperature": predictor.temperature}
        if procs.is_main:
            metrics.write_multilabel_report(report, out_dir)
            write_errors(out_dir, records, probs, predictor.classes, thresholds=predictor.thresholds)
        procs.barrier()
        return report
    index = {c: i for i, c in enumerate(predictor.classes)}
    y = np.array([index[r.label] for r in records])
    report = metrics.full_report(y, binary.predicted(probs, predictor.classes, predictor.decision), predictor.classes)
    report |= {"ece": metrics.expected_calibration_error(probs, y), "temperature": predictor.temperature}
    report |= binary.evaluate(y, probs, predictor.classes, predictor.decision, out_dir if procs.is_main else None)
    if procs.is_main:
        metrics.write_report(report, out_dir)
        write_errors(out_dir, records, probs, predictor.classes, decision=predictor.decision)
    procs.barrier()  # the reports exist when any process returns
    return report
