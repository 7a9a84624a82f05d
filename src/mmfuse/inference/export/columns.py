"""The ONNX graph of a run with named columns (``--image-columns``, ``--text-columns``, ``--tabular-columns``): its
inputs, one group per input slot of the fusion head (``MultimodalClassifier.slots``), and the rows that feed them.

    mmfuse export runs/shop --out runs/shop/export          # a run trained with columns: same command
    mmfuse predict runs/shop rows.csv --out preds.csv --backend onnx

Inputs, in slot order: ``<slot>_pixel_values`` per image column, ``<slot>_input_ids`` and ``<slot>_attention_mask``
per text column (one tower per modality, run once per column, as in torch), ``tabular_numeric`` (standardised numbers,
then their missing indicators) and ``tabular_codes`` (category indices) as ``data.tabular.TabularSpec.encode`` makes
them, and ``present`` (bool, batch x slots: False for an empty cell, which then takes the column's learned
placeholder). The tabular statistics are copied beside the graph (``tabular.json``) so rows encode as in training;
the export's README (``columns_readme``) shows mmfuse's runtime on a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmfuse.data.columns import Slot, column_records, has_cell
from mmfuse.data.records import Record
from mmfuse.data.tabular import TabularSpec

# An empty image cell still fills its place in the batch, as in torch (``features.sources.ImageFileSource``): the
# graph masks its features with the column's placeholder, so the pixels only need to be finite.
BLANK = Image.new("RGB", (32, 32))
TOKEN_INPUTS = ("input_ids", "attention_mask")


def column_inputs(slots: Sequence[Slot], tabular: TabularSpec | None) -> list[str]:
    """The graph's input names, in order. A tabular part with no numeric (or no categorical) columns has no such
    input: a zero-width one would only be an input every caller must make up."""
    names = []
    for s in slots:
        if s.modality == "image":
            names.append(f"{s.name}_pixel_values")
        elif s.modality == "text":
            names += [f"{s.name}_input_ids", f"{s.name}_attention_mask"]
        else:
            names += ["tabular_numeric"] * bool(tabular.numeric) + ["tabular_codes"] * bool(tabular.categorical)
    return [*names, "present"]


def slot_inputs(slots: Sequence[Slot], x: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The graph's named inputs ``x`` as ``MultimodalClassifier.forward`` takes them: each slot's by its name."""
    given = {}
    for s in slots:
        if s.modality == "image":
            given[s.name] = {"pixel_values": x[f"{s.name}_pixel_values"]}
        elif s.modality == "text":
            given[s.name] = {"input_ids": x[f"{s.name}_input_ids"], "attention_mask": x[f"{s.name}_attention_mask"]}
        else:
            rows = x["present"].shape[0]
            numeric = x.get("tabular_numeric", x["present"].new_zeros((rows, 0), dtype=torch.float32))
            codes = x.get("tabular_codes", x["present"].new_zeros((rows, 0), dtype=torch.long))
            given[s.name] = {"numeric": numeric, "codes": codes}
    return given


def sequence_axis(name: str) -> str:
    """The name of a token input's sequence axis: ``sequence``, or per text column ``sequence_<slot>``."""
    return "sequence" if name in TOKEN_INPUTS else f"sequence_{name.rsplit('_', 2)[0]}"


def column_example(model, names: list[str], pixel_size: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """Inputs to trace with: batch 2, and each text column a sequence length of its own (5, 6...), so that none is
    taken for another or for the batch (torch.export specialises sizes 0 and 1)."""
    b, out = 2, {}
    tok = model.text.tokenizer if "text" in model.cards else None
    text_slots = [s.name for s in model.slots if s.modality == "text"]
    for name in names:
        if name.endswith("_pixel_values"):
            out[name] = torch.zeros(b, 3, *pixel_size)
        elif name.endswith("_input_ids"):
            t = min(5 + text_slots.index(name.removesuffix("_input_ids")), max(3, model.text.max_length))
            unk = tok.unk_token_id if tok.unk_token_id is not None else 1
            out[name] = torch.full((b, t), unk, dtype=torch.long)
            out[name.replace("_input_ids", "_attention_mask")] = torch.ones(b, t, dtype=torch.long)
        elif name == "tabular_numeric":
            out[name] = torch.zeros(b, 2 * len(model.tabular_spec.numeric))
        elif name == "tabular_codes":
            out[name] = torch.zeros(b, len(model.tabular_spec.categorical), dtype=torch.long)
        elif name == "present":
            out[name] = torch.ones(b, len(model.slots), dtype=torch.bool)
    return out


def sequence_dims(names: Sequence[str], batch, max_length: int | None) -> dict[str, dict]:
    """torch.export's dynamic shapes of the inputs: the batch everywhere, and a sequence axis per text column."""
    dims = {}
    for name in names:
        dims.setdefault(name, {0: batch})
        if name.endswith("_input_ids"):
            slot = name.removesuffix("_input_ids")
            seq = torch.export.Dim(sequence_axis(name), min=1, max=max(2, max_length or 512))
            dims[name] = dims[f"{slot}_attention_mask"] = {0: batch, 1: seq}
    return dims


def describe(name: str, slots: Sequence[Slot], preprocess: dict, tabular: TabularSpec | None) -> str:
    """export.json's words for one input of a graph with columns."""
    if name == "present":
        order = ", ".join(s.column or "tabular" for s in slots)
        return f"bool (batch, {len(slots)}), one per input in this order: {order}; False: that cell is empty"
    if name == "tabular_numeric":
        cols = [c.name for c in tabular.numeric]
        return (
            f"float32 (batch, {2 * len(cols)}): the numbers of {cols} standardised by the training mean and sd "
            "(tabular.json), then 1.0 where each is missing (read as 0)"
        )
    if name == "tabular_codes":
        cols = [c.name for c in tabular.categorical]
        return f"int64 (batch, {len(cols)}): each of {cols} as its index in tabular.json (0: empty or unseen)"
    slot = next(s for s in slots if name.startswith(f"{s.name}_"))
    if slot.modality == "text":
        n = preprocess["text"]["max_length"]
        return f"int64 (batch, sequence), sequence <= {n}: the column {slot.column} through tokenizer/"
    return f"float32 (batch, 3, H, W): the column {slot.column}'s images, preprocessed as preprocess.image says"


def column_feeds(
    records: list[Record],
    slots: Sequence[Slot],
    tabular: TabularSpec | None,
    tokenize: Callable[[list[str]], dict[str, np.ndarray]],
    pixels: Callable[[list[Image.Image]], np.ndarray],
    open_image: Callable[[object, int], Image.Image],
    names: Sequence[str],
) -> dict[str, np.ndarray]:
    """The graph's inputs for checked rows with cells (``Record.cells``): each image column's images opened (a blank
    one for an empty cell), each text column tokenized, the tabular columns encoded with the training statistics;
    ``present`` as ``features.sources.present_mask`` makes it for torch."""
    out = {}
    for s in slots:
        if s.modality == "tabular":
            numeric, codes = tabular.encode(records)
            if "tabular_numeric" in names:
                out["tabular_numeric"] = numeric
            if "tabular_codes" in names:
                out["tabular_codes"] = codes
            continue
        rows = column_records(records, s.modality, s.column)
        if s.modality == "image":
            images = [open_image(r.image, r.row) if r.image is not None else BLANK for r in rows]
            out[f"{s.name}_pixel_values"] = pixels(images)
        else:
            enc = tokenize([r.text for r in rows])
            out[f"{s.name}_input_ids"], out[f"{s.name}_attention_mask"] = enc["input_ids"], enc["attention_mask"]
    present = [[s.modality == "tabular" or has_cell(r, s.modality, s.column) for s in slots] for r in records]
    out["present"] = np.array(present, dtype=bool).reshape(len(records), len(slots))
    return out


COLUMNS_README = """# ONNX export of {run}

`model.onnx` is the whole classifier (its towers, each run once per column, and the fusion head) of a run with named
columns, exported by `mmfuse export` with the {exporter} exporter (opset {opset}) and checked against the torch model
before it was written as passed: largest probability difference {diff}, no top-1 different, over {rows} rows (some
cells empty) at batch sizes {batches} (see `export.json`).

Columns: {columns}. Inputs: {inputs}; `export.json` says what each holds. Outputs: `logits` and `probs`, columns in
the order of `classes` in `export.json`.
{calibrated}Preprocessing is not in the graph; it is written here: `tokenizer/`, the image preprocessing under
`preprocess` in `export.json`, and the tabular columns' training statistics in `tabular.json`. mmfuse's runtime
applies them to rows of cells (an empty cell: None or ""):

```python
from mmfuse.inference.export import OnnxPredictor

onnx = OnnxPredictor("{out}")
probs = onnx.predict(rows=[{row}])
print([onnx.classes[i] for i in probs.argmax(1)], probs.max(1))
```
"""


def readme_fields(out: Path, info: dict) -> dict:
    """What every export README says of its graph: the run, the exporter, the parity gate's figures, the inputs."""
    parity = info["parity"]
    t = info.get("temperature", 1.0)
    return {
        "run": Path(info["run"]).name,
        "exporter": info["exporter"]["name"],
        "opset": info["exporter"]["opset"],
        "diff": f"{parity['max_abs_diff']:.1e}",
        "rows": parity["rows_checked"],
        "batches": ", ".join(map(str, parity["batch_sizes"])),
        "inputs": ", ".join(f"`{n}`" for n in info["inputs"]),
        "out": out.as_posix(),
        "calibrated": f"The logits are the model's divided by its temperature {t:.4g} (`--calibrate`).\n"
        if t != 1.0
        else "",
    }


def columns_readme(out: Path, info: dict) -> str:
    """The README of a graph with columns: what it holds, how it was checked, and mmfuse's runtime on a row."""
    cols = info["columns"]
    example = {
        **{c: "front.png" for c in cols["image"]},
        **{c: "a grinning cat face" for c in cols["text"]},
        **dict.fromkeys(cols["tabular"]),
    }
    readme = COLUMNS_README.format(
        **readme_fields(out, info),
        columns=", ".join(f"`{c}` ({kind})" for kind, names in cols.items() for c in names),
        row=repr(example),
    )
    if info.get("multi_label"):  # a set per row: each label's sigmoid against its threshold
        readme = readme.replace("no top-1 different", "no label set different").replace(
            "`probs`,", "`probs` (a sigmoid per label: in the set when it reaches its entry in `thresholds`),"
        )
    return readme
