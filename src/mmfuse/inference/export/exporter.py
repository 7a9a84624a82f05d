"""Exporting a run to one ONNX graph, checked against the torch model before anything may use it.

    mmfuse export runs/quickstart --out runs/quickstart/export             # synthetic rows for the parity gate
    mmfuse export runs/quickstart --out runs/quickstart/export --data val.csv   # real rows for it

The graph takes what the towers' preprocessing makes (token ids and attention mask, int64; pixels already resized
and normalised, float32 N x 3 x H x W) and gives ``logits`` and ``probs``, with dynamic batch and sequence axes.
Preprocessing stays outside it, written beside it as data (``export.json``, ``tokenizer/``): tokenizers and PIL do
it better than a graph would, and a deployment can batch and cache around it.

``present`` (bool, N x modalities) is an input only of two-modality models trained with modality dropout, the only
ones that learned what a missing text means; every other graph treats all modalities as present, as ``Predictor``
does (it refuses rows without text for such models).

A run with named columns has an input group per column and the tabular inputs, and always ``present`` (one per input:
an empty cell takes its column's placeholder); ``columns`` says which, and its gate runs on rows with empty cells.

The parity gate (``parity``) runs the graph in onnxruntime, through the preprocessing written beside it, against
``Predictor.predict`` on the same raw rows, and refuses the export when any probability differs by more than 1e-4 or
any top-1 differs. onnx and onnxruntime are the optional extra ``mmfuse[export]``, imported only when used.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from mmfuse import __version__
from mmfuse.data.columns import Columns
from mmfuse.data.tabular import TABULAR_FILE
from mmfuse.errors import MmfuseError
from mmfuse.inference.export.columns import (
    TOKEN_INPUTS,
    column_example,
    column_inputs,
    columns_readme,
    describe,
    readme_fields,
    sequence_axis,
    sequence_dims,
    slot_inputs,
)
from mmfuse.inference.export.parity import (
    PARITY_BATCHES,
    TOLERANCE,
    column_parity_gate,
    column_parity_rows,
    parity_gate,
    parity_rows,
)
from mmfuse.inference.export.runtime import OnnxPredictor, require_onnx, sha256
from mmfuse.inference.predictor import Predictor
from mmfuse.models.lora import merge_adapters
from mmfuse.rundir.layout import ENSEMBLE_FILE, is_run

log = logging.getLogger(__name__)

# What an export directory holds: replaced as a whole by the next export, nothing else in it is touched.
EXPORT_FILES = ("model.onnx", "model.onnx.data", "model.failed.onnx", "export.json", "README.md", TABULAR_FILE)
EXPORT_DIRS = ("tokenizer", "image_processor")
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class ExportWrapper(nn.Module):
    """The graph's signature over ``MultimodalClassifier.forward``: flat tensors in, logits and probabilities out.

    A calibrated run's temperature is baked in: the graph's logits are the model's divided by T, so its probabilities
    are the calibrated ones ``Predictor`` gives, and the parity gate compares like with like."""

    def __init__(self, model: nn.Module, names: Sequence[str], temperature: float = 1.0, multi_label: bool = False):
        super().__init__()
        self.model, self.names, self.temperature, self.multi_label = model, list(names), temperature, multi_label

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = dict(zip(self.names, tensors))
        image = {"pixel_values": x["pixel_values"]} if "pixel_values" in x else None
        text = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]} if "input_ids" in x else None
        return self.finish(self.model(image=image, text=text, present=x.get("present")))

    def finish(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's logits as the graph's outputs: divided by the temperature, and their probabilities."""
        if self.temperature != 1.0:  # no division in the graph of an uncalibrated run: its graph is as before
            logits = logits / self.temperature
        if self.multi_label:  # a probability per label, as Predictor gives them
            return logits, logits.float().sigmoid()
        return logits, logits.float().softmax(-1)


class ColumnsWrapper(ExportWrapper):
    """The graph of a model with named columns: each input slot's tensors by name (``columns.column_inputs``)."""

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = dict(zip(self.names, tensors))
        return self.finish(self.model(present=x["present"], **slot_inputs(self.model.slots, x)))


def _multilabel_info(predictor) -> dict:
    """What export.json says of a multi-label graph: its probabilities are sigmoids, and the run's thresholds make
    the sets (a label is in a row's set when its probability reaches its threshold)."""
    return {
        "multi_label": True,
        "thresholds": dict(zip(predictor.classes, predictor.thresholds.values)),
        "outputs": {
            "logits": "float32 (batch, labels)",
            "probs": "float32 (batch, labels), a sigmoid of each logit: a label is in the set when its probability "
            "reaches its threshold (thresholds)",
        },
    }


def graph_inputs(modalities: Sequence[str], accepts_missing: bool) -> list[str]:
    """The graph's input names, in order: a text-only or image-only model has only its own."""
    names = ["input_ids", "attention_mask"] * ("text" in modalities) + ["pixel_values"] * ("image" in modalities)
    return names + ["present"] * (len(modalities) > 1 and accepts_missing)


def image_preprocess(tower) -> dict:
    """What turns an image into the graph's ``pixel_values``: the tower's resize and normalisation as numbers, or,
    for a Hugging Face processor that does more (crops, pads), its saved files."""
    spec = getattr(tower, "pixel_spec", None)
    if spec is None:
        return {"processor": "image_processor"}
    return {**spec.to_dict(), "resample_name": RESAMPLE_NAMES.get(spec.resample, str(spec.resample))}


def _check_out(run_dir: Path, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MmfuseError(f"--out {out} is a file; give a directory for the export (e.g. {run_dir / 'export'}).")
    if out.resolve() == run_dir.resolve():
        raise MmfuseError(
            f"--out {out} is the run directory itself; give a folder of its own, e.g. {run_dir / 'export'}."
        )
    if is_run(out):
        raise MmfuseError(f"--out {out} holds a trained run; give a new directory for the export.")
    if out.is_dir() and not (out / "export.json").exists() and any(out.iterdir()):
        # An earlier export (its export.json) is replaced; anyone else's files are not ours to mix a graph into.
        raise MmfuseError(f"--out {out} already holds other files; give a new or empty directory for the export.")


def _clear(out: Path) -> None:
    # export.json first: a crash part-way must not leave an old export.json vouching for a new, unchecked graph.
    for name in ("export.json", *EXPORT_FILES):
        (out / name).unlink(missing_ok=True)
    for name in EXPORT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def _not_torchvision_skip(record: logging.LogRecord) -> bool:
    """False for torch's "torchvision is not installed. Skipping torchvision::nms" (one per torchvision op, on every
    export): the dynamo exporter registers translations for torchvision's detection ops, which no mmfuse graph uses,
    so skipping them is harmless, and the line only alarms. Every other record passes."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not (
        record.msg == "torchvision is not installed. Skipping %s" and args and str(args[0]).startswith("torchvision::")
    )


def quiet_exporter() -> None:
    """Keeps the ONNX exporter's INFO steps and its harmless torchvision notice out of the CLI's output."""
    # The exporter's graph passes log each step at INFO, which the CLI would print as if they were mmfuse's.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # A filter on the logger that emits it (propagation skips ancestors' filters); addFilter adds it only once.
    logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_not_torchvision_skip)


def export_graph(wrapper: ExportWrapper, example: dict[str, torch.Tensor], path: Path, max_length: int | None) -> dict:
    """Writes ``wrapper`` as ONNX to ``path``; returns which exporter did and why.

    The dynamo exporter (``torch.export`` then onnxscript) is tried first: it is torch's maintained path, and on
    torch 2.13 it exports both the packaged towers (EfficientNet-Lite, MiniLM) and Hugging Face ViT/RoBERTa with
    dynamic batch and sequence axes. The TorchScript exporter is kept as a fallback for towers ``torch.export``
    cannot trace (data-dependent control flow in remote code), and the reason is recorded.
    """
    names = list(example)
    batch = torch.export.Dim("batch", min=1)
    dims = {"input_ids": {0: batch}, "attention_mask": {0: batch}, "pixel_values": {0: batch}, "present": {0: batch}}
    if "input_ids" in example:
        seq = torch.export.Dim("sequence", min=1, max=max(2, max_length or 512))
        dims["input_ids"] = dims["attention_mask"] = {0: batch, 1: seq}
    dims.update(sequence_dims([n for n in names if n not in dims], batch, max_length))  # a model with columns
    # Under 2 GB the weights stay inside model.onnx: one file to copy, as the README shows it.
    small = sum(p.numel() * p.element_size() for p in wrapper.parameters()) < 1.8e9
    quiet_exporter()

    def export(**options) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                tuple(example.values()),
                str(path),
                input_names=names,
                output_names=["logits", "probs"],
                **options,
            )

    try:
        # dynamic_shapes has one entry: forward(*tensors).
        export(dynamo=True, dynamic_shapes=(tuple(dims[n] for n in names),), external_data=not small, verbose=False)
        return {"name": "dynamo", "why": "torch.onnx.export(dynamo=True) with dynamic_shapes: torch's maintained path"}
    except Exception as e:  # any failure of torch.export's tracing; the classic exporter may still manage
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        log.warning("the dynamo exporter failed (%s); using the TorchScript exporter", reason)
    dynamic = {n: {0: "batch", 1: sequence_axis(n)} if n.endswith(TOKEN_INPUTS) else {0: "batch"} for n in names}
    export(dynamo=False, dynamic_axes={**dynamic, "logits": {0: "batch"}, "probs": {0: "batch"}}, opset_version=17)
    return {"name": "torchscript", "why": f"the dynamo exporter failed: {reason}"}


def export_run(run_dir: str | Path, out: str | Path, data: str | Path | None = None, fmt: str = "onnx") -> dict:
    """Exports a run to ``out`` and checks the graph against the torch model.

    Args:
        run_dir: what ``mmfuse train`` wrote.
        out: the export directory (replaced if it holds an earlier export).
        data: a manifest or folder whose first rows the parity gate uses; default: deterministic synthetic rows.
        fmt: only ``onnx``.

    Returns:
        What ``out/export.json`` holds.

    Raises:
        MmfuseError: bad arguments, onnx missing, or the graph failing its parity gate (the export is then marked
            failed: ``status: failed`` in export.json, the graph renamed model.failed.onnx).
    """
    if fmt != "onnx":
        raise MmfuseError(f"--format {fmt}: only onnx is supported")
    run_dir, out = Path(run_dir), Path(out)
    if (run_dir / ENSEMBLE_FILE).is_file():  # one graph holds one model; a graph of weighted members is not built yet
        members = sorted(p.name for p in (run_dir / "members").iterdir() if p.is_dir())
        raise MmfuseError(
            f"{run_dir} is an ensemble of weighted members, and an export holds one model: export a member, "
            f"mmfuse export {run_dir}/members/NAME (its members: {', '.join(members)}; ensemble.json has the weights)."
        )
    onnx, ort = require_onnx()
    _check_out(run_dir, out)
    predictor = Predictor(run_dir, device="cpu", dtype="fp32")  # errors for a directory that is not a run
    if predictor.cfg.model.quantize != "none":  # the graph holds the towers as torch runs them, in float32
        raise MmfuseError(
            f"{run_dir} was trained on int8 text features (--quantize {predictor.cfg.model.quantize}), and an export "
            "holds float32 towers, whose features its head was not trained on: predict or serve the run itself "
            "(both run the int8 tower), or train without --quantize to export."
        )
    named = Columns.of(predictor.cfg.model)  # a model with columns: one input group per column
    if len(predictor.models) > 1:  # one graph holds one model: the members' average is not that
        raise MmfuseError(
            f"{run_dir} is a bag of {len(predictor.models)} models, and an export holds one: export one of its "
            f"members ({run_dir}/members/0), or train it with --refit-full and export the bag (its refit is used)."
        )
    model = predictor.model
    for m in model.cards:  # frozen packaged towers are built only when needed: the graph needs them all
        model.build_tower(m)
    model.eval()
    if getattr(model.text, "lora", None):  # the adapters folded into the weights: a graph as fast as full tuning's
        merge_adapters(model.text)
    if named is None:
        images, texts, source = parity_rows(predictor, data, max(PARITY_BATCHES))
    else:
        rows, source = column_parity_rows(predictor, named, data, max(PARITY_BATCHES))

    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    accepts_missing = bool(predictor.accepts_missing_text)
    if named is None:
        names = graph_inputs(model.modalities, accepts_missing)
    else:
        names = column_inputs(model.slots, model.tabular_spec)
    preprocess = {}
    if "text" in model.modalities:
        model.text.tokenizer.save_pretrained(out / "tokenizer")
        preprocess["text"] = {
            "tokenizer": "tokenizer",
            "max_length": model.text.max_length,
            "padding": "longest in the batch",
            "truncation": True,
        }
    if "image" in model.modalities:
        preprocess["image"] = image_preprocess(model.vision)
        if "processor" in preprocess["image"]:
            model.vision.processor.save_pretrained(out / "image_processor")

    if "tabular" in model.modalities:  # the training statistics that encode new rows, beside the graph
        (out / TABULAR_FILE).write_text(json.dumps(model.tabular_spec.to_json(), indent=2), encoding="utf-8")
        preprocess["tabular"] = {"statistics": TABULAR_FILE, "columns": list(named.tabular)}
    if named is None:
        example = _example(model, names, preprocess)
        wrapper = ExportWrapper(model, names, predictor.temperature, predictor.multi_label).eval()
    else:
        example = column_example(model, names, _pixel_size(model) if "image" in model.modalities else None)
        wrapper = ColumnsWrapper(model, names, predictor.temperature, predictor.multi_label).eval()
    with torch.inference_mode(False), torch.no_grad():
        exporter = export_graph(wrapper, example, out / "model.onnx", preprocess.get("text", {}).get("max_length"))
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    exporter["opset"] = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    calibrated = predictor.temperature != 1.0
    info = {
        "format": "onnx",
        "status": "checking",
        "model": "model.onnx",
        "run": str(run_dir.resolve()),
        "run_weights_sha256": sha256(run_dir / "model.safetensors"),
        "classes": predictor.classes,
        "modalities": model.modalities,
        "inputs": {
            n: _describe(n, preprocess, len(model.modalities))
            if named is None
            else describe(n, model.slots, preprocess, model.tabular_spec)
            for n in names
        },
        **(_columns_info(model, named) if named is not None else {}),
        "outputs": {
            "logits": "float32 (batch, classes)"
            + (f", the model's divided by its temperature {predictor.temperature:.6g}" if calibrated else ""),
            "probs": "float32 (batch, classes), softmax of logits" + (" (calibrated)" if calibrated else ""),
        },
        **(_multilabel_info(predictor) if predictor.multi_label else {}),
        # A binary run's labels: the positive class where its probability reaches the threshold (threshold.json).
        **(
            {"positive": predictor.decision.positive, "threshold": predictor.decision.threshold}
            if predictor.decision is not None
            else {}
        ),
        "temperature": predictor.temperature,
        "accepts_missing_text": accepts_missing,
        "present": _present_words(names, named),
        "preprocess": preprocess,
        "exporter": exporter,
        "versions": {
            "mmfuse": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    # The gate reads the graph and the preprocessing back from the files, exactly as a user of the export will.
    (out / "export.json").write_text(json.dumps({**info, "status": "passed"}, indent=2), encoding="utf-8")
    try:
        if named is None:
            report = parity_gate(predictor, OnnxPredictor(out), images, texts)
        else:
            report = column_parity_gate(predictor, OnnxPredictor(out), rows)
    except BaseException:
        (out / "export.json").unlink(missing_ok=True)
        raise
    info["parity"] = {"rows": source, **report}
    if not report["passed"]:
        info["status"] = "failed"
        info["error"] = (
            f"max |probability difference| {report['max_abs_diff']:.2e} (limit {TOLERANCE:.0e}), "
            f"top-1 differs on {report['top1_differs']} of {report['rows_checked']} rows"
        )
        (out / "model.onnx").rename(out / "model.failed.onnx")
        (out / "export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        raise MmfuseError(
            f"The exported graph does not match the torch model: {info['error']}. It is kept for inspection as "
            f"{out / 'model.failed.onnx'}, marked failed in {out / 'export.json'}, and --backend onnx refuses it."
        )
    info["status"] = "passed"
    (out / "README.md").write_text(export_readme(out, info), encoding="utf-8")
    (out / "export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


def _example(model, names: list[str], preprocess: dict) -> dict[str, torch.Tensor]:
    """Inputs to trace with. Batch 2 and 7 tokens: torch.export specialises sizes 0 and 1, and equal sizes can be
    taken for the same dimension."""
    b, t = 2, min(7, max(2, preprocess.get("text", {}).get("max_length", 7)))
    out = {}
    if "input_ids" in names:
        tok = model.text.tokenizer
        ids = torch.full((b, t), tok.unk_token_id if tok.unk_token_id is not None else 1, dtype=torch.long)
        out["input_ids"], out["attention_mask"] = ids, torch.ones(b, t, dtype=torch.long)
    if "pixel_values" in names:
        out["pixel_values"] = torch.zeros(b, 3, *_pixel_size(model))
    if "present" in names:
        out["present"] = torch.ones(b, len(model.modalities), dtype=torch.bool)
    return out


def _pixel_size(model) -> tuple[int, int]:
    spec = model.vision.pixel_spec
    return (spec.height, spec.width) if spec is not None else _processor_size(model.vision.processor)


def _columns_info(model, named: Columns) -> dict:
    """What export.json says of a graph with columns: the columns, and which graph input reads which."""
    slots = [{"name": s.name, "modality": s.modality, "column": s.column} for s in model.slots]
    return {"columns": {k: list(v) for k, v in vars(named).items()}, "slots": slots}


def _present_words(names: list[str], named: Columns | None) -> str:
    if named is not None:
        return "an input: one column per slot (see slots), False marks an empty cell"
    if "present" in names:
        return "an input: False marks a missing text"
    return "not an input: every modality is taken as present (the model was not trained with modality dropout)"


def _processor_size(processor) -> tuple[int, int]:
    blank = Image.new("RGB", (64, 64))
    shape = processor([blank], return_tensors="np")["pixel_values"].shape
    return int(shape[-2]), int(shape[-1])


def _describe(name: str, preprocess: dict, n_modalities: int) -> str:
    if name in ("input_ids", "attention_mask"):
        return f"int64 (batch, sequence), sequence <= {preprocess['text']['max_length']}; tokenizer/ pads and truncates"
    if name == "present":
        return f"bool (batch, {n_modalities}), columns in modalities order; False: that input is missing"
    image = preprocess["image"]
    if "processor" in image:
        return "float32 (batch, 3, H, W) from image_processor/ (transformers AutoImageProcessor)"
    return (
        f"float32 (batch, 3, {image['height']}, {image['width']}): RGB resized ({image['resample_name']}), "
        "then x * scale - mean) / std per channel"
    )


README = """# ONNX export of {run}

`model.onnx` is the whole classifier (both towers and the fusion head), exported by `mmfuse export` with the
{exporter} exporter (opset {opset}) and checked against the torch model before it was written as passed: largest
probability difference {diff}, no top-1 different, over {rows} rows at batch sizes {batches} (see `export.json`).

Inputs: {inputs}. Outputs: `logits` and `probs` (softmax), columns in the order of `classes` in `export.json`.
{calibrated}Preprocessing is not in the graph; it is written here: `tokenizer/` (padding to the longest text,
truncation at `max_length`), the image size, resample filter, scale, mean and std under `preprocess` in `export.json`.

```python
import json
import numpy as np
import onnxruntime as ort
from PIL import Image
from transformers import AutoTokenizer

d = "{out}"
info = json.load(open(f"{{d}}/export.json"))
session = ort.InferenceSession(f"{{d}}/model.onnx", providers=["CPUExecutionProvider"])
images, texts = [Image.open("{image}").convert("RGB")], ["{text}"]
feeds = {{}}
{body}probs = session.run(["probs"], feeds)[0]
print([info["classes"][i] for i in probs.argmax(1)], probs.max(1))
```
"""

TEXT_FEEDS = """tok = AutoTokenizer.from_pretrained(f"{d}/tokenizer")
n = info["preprocess"]["text"]["max_length"]
enc = tok(texts, padding=True, truncation=True, max_length=n, return_tensors="np")
feeds["input_ids"] = enc["input_ids"].astype(np.int64)
feeds["attention_mask"] = enc["attention_mask"].astype(np.int64)
"""
# mmfuse's own pixels (towers.tower_pixels) written out in numpy, operation for operation: x / 255 rather than
# x * (1/255), so a deployment without mmfuse feeds the graph the very floats the parity gate checked.
IMAGE_FEEDS = """p = info["preprocess"]["image"]
x = np.stack([np.asarray(im.resize((p["width"], p["height"]), p["resample"]), np.float32) for im in images])
x = (x / np.float32(1 / p["scale"]) - np.float32(p["mean"])) / np.float32(p["std"])
feeds["pixel_values"] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
"""
PROCESSOR_FEEDS = """from transformers import AutoImageProcessor
processor = AutoImageProcessor.from_pretrained(f"{d}/image_processor")
feeds["pixel_values"] = processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
"""
PRESENT_FEEDS = """has_text = np.array([bool(t.strip()) for t in texts])  # False: missing, the learned placeholder
feeds["present"] = np.stack([has_text if m == "text" else has_text | True for m in info["modalities"]], 1)
"""


def export_readme(out: Path, info: dict, image: str = "cat.png", text: str = "a grinning cat face") -> str:
    """The export's README: what it holds, how it was checked, and a complete onnxruntime example for this graph's
    inputs."""
    if "columns" in info:
        return columns_readme(out, info)
    body = ""
    if "input_ids" in info["inputs"]:
        body += TEXT_FEEDS
    if "pixel_values" in info["inputs"]:
        body += PROCESSOR_FEEDS if "processor" in info["preprocess"]["image"] else IMAGE_FEEDS
    if "present" in info["inputs"]:
        body += PRESENT_FEEDS
    readme = README.format(**readme_fields(out, info), image=image, text=text, body=body)
    if info.get("multi_label"):  # a set per row: each label's sigmoid against its threshold
        readme = readme.replace("no top-1 different", "no label set different").replace(
            "`probs` (softmax)", "`probs` (a sigmoid per label: in the set when it reaches its entry in `thresholds`)"
        )
        readme = readme.replace(
            'print([info["classes"][i] for i in probs.argmax(1)], probs.max(1))',
            'print([[c for c, p in zip(info["classes"], row) if p >= info["thresholds"][c]] for row in probs])',
        )
    if "threshold" in info:  # a binary run: the positive class at its threshold, not the argmax
        readme = readme.replace(
            'print([info["classes"][i] for i in probs.argmax(1)], probs.max(1))',
            'pos = info["classes"].index(info["positive"])\n'
            'print([info["classes"][pos if p[pos] >= info["threshold"] else 1 - pos] for p in probs], probs[:, pos])',
        )
    return readme
