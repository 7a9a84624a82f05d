"""The parity gate of ``mmfuse export``: the graph in onnxruntime, through the preprocessing written beside it
(``runtime.OnnxPredictor``), against ``Predictor.predict`` on the same raw rows (batch sizes 1, 2 and 7; short texts
and texts at max_length tokens; images of several sizes; for a run with named columns, rows with empty cells). Any
probability off by more than ``TOLERANCE``, or any top-1 (a multi-label set) that differs, fails the export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mmfuse import multilabel
from mmfuse.data.checks import load_checked
from mmfuse.data.columns import Columns
from mmfuse.data.images import load_image
from mmfuse.errors import MmfuseError
from mmfuse.inference.export.runtime import OnnxPredictor

TOLERANCE = 1e-4
"""Largest absolute difference in any probability the parity gate accepts."""
PARITY_BATCHES = (1, 2, 7)
PARITY_SEED = 0
# Odd shapes on purpose: the resize to the tower's size must agree for any input, not only square ones.
SYNTHETIC_SIZES = [(64, 64), (37, 23), (300, 200), (20, 500), (128, 96), (33, 33), (640, 480)]


def synthetic_rows(tokenizer, n: int, seed: int = PARITY_SEED) -> tuple[list[Image.Image], list[str]]:
    """Deterministic rows for the parity gate when no data is given: random images of several sizes, and texts of
    random words from the tokenizer's vocabulary."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        w, h = SYNTHETIC_SIZES[i % len(SYNTHETIC_SIZES)]
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    texts = [" ".join(_words(tokenizer, rng, int(rng.integers(3, 9)))) for _ in range(n)]
    return images, texts


def _words(tokenizer, rng: np.random.Generator, n: int) -> list[str]:
    if tokenizer is None:
        return ["word"] * n
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(tokenizer.vocab_size, 30000)) if i not in special]
    words = [tokenizer.decode([int(i)]).strip() for i in rng.choice(vocab, size=n * 2)]
    words = [w for w in words if w.isalpha()] or ["word"]
    return (words * n)[:n]


def long_text(tokenizer, text: str, max_length: int) -> str:
    """``text`` repeated until it is past ``max_length`` tokens: the tokenizer then cuts it to exactly that."""
    base = text.strip() or "word"
    long = base
    while len(tokenizer(long, truncation=False)["input_ids"]) <= max_length:
        long = f"{long} {base}"
    return long


def parity_rows(predictor, data: str | Path | None, n: int) -> tuple[list[Image.Image], list[str], str]:
    """``n`` rows for the parity gate, from ``data`` (cycled if shorter) or made up; and where they came from."""
    tokenizer = predictor.model.text.tokenizer if "text" in predictor.model.modalities else None
    if data is None:
        images, texts = synthetic_rows(tokenizer, n)
        source = f"synthetic: {n} random images of sizes {SYNTHETIC_SIZES[:n]}, random vocabulary words (seed 0)"
    else:
        records = load_checked(data, need_label=False, need_text=False, max_chars=predictor.max_chars)[:n]
        if not records:
            raise MmfuseError(f"--data {data} has no rows to check the export on.")
        images = [load_image(r.image) if "image" in predictor.model.modalities else None for r in records]
        made, fill = synthetic_rows(tokenizer, n)
        # Rows without text are filled in for a model that cannot take them (predict would refuse them too).
        texts = [r.text if r.text.strip() or predictor.accepts_missing_text else fill[i] for i, r in enumerate(records)]
        images, texts = (images * n)[:n], (texts * n)[:n]
        source = f"{data}: the first {len(records)} row(s)" + (", cycled" if len(records) < n else "")
    if predictor.accepts_missing_text and len(predictor.model.modalities) > 1:
        texts[-1] = ""  # a missing text takes the learned placeholder: the graph's present input must do the same
    if "image" not in predictor.model.modalities:
        images = None
    return images, texts, source


def parity_gate(predictor, onnx_predictor: OnnxPredictor, images, texts) -> dict:
    """Torch (``Predictor.predict`` on raw rows) against the graph (through the written preprocessing), at every
    batch size of ``PARITY_BATCHES`` with the rows' texts and with texts at max_length tokens."""
    tokenizer = predictor.model.text.tokenizer if "text" in predictor.model.modalities else None
    max_length = predictor.model.text.max_length if tokenizer is not None else None
    variants = {"short": texts}
    if tokenizer is not None:
        variants["long"] = [long_text(tokenizer, t, max_length) if t else t for t in texts]
    cases = []
    for kind, these in variants.items():
        for b in PARITY_BATCHES:
            ims = images[:b] if images is not None else None
            ref = predictor.predict(ims, these[:b], batch_size=b).probs
            got = onnx_predictor.predict(ims, these[:b])
            tokens = int(onnx_predictor.feeds(ims, these[:b])["attention_mask"].sum(1).max()) if tokenizer else None
            cases.append({"batch": b, "texts": kind, "tokens": tokens, **_differences(predictor, ref, got)})
    return _verdict(cases, list(variants))


def column_parity_rows(predictor, named: Columns, data: str | Path | None, n: int) -> tuple[list[dict], str]:
    """``n`` rows of a model with columns for the parity gate, from ``data`` (cycled if shorter) or made up (random
    images and words, numbers about the training mean, categories from the training vocabulary and one unseen); then
    each column's cell emptied in one row (a different row for each), as rows come with empty cells."""
    model = predictor.model
    tokenizer = model.text.tokenizer if "text" in model.modalities else None
    if data is None:
        rng = np.random.default_rng(PARITY_SEED)
        made = [synthetic_rows(tokenizer, n, PARITY_SEED + k) for k in range(max(len(named.image), len(named.text)))]
        rows = [
            {
                **{c: made[k][0][i] for k, c in enumerate(named.image)},
                **{c: made[k][1][i] for k, c in enumerate(named.text)},
            }
            for i in range(n)
        ]
        for c in model.tabular_spec.columns if model.tabular_spec is not None else []:
            for row in rows:
                choices = [*c.vocab, "never seen in training"]
                row[c.name] = f"{c.mean + c.sd * rng.normal():.4f}" if c.kind == "num" else str(rng.choice(choices))
        source = f"synthetic: {n} rows of random images, vocabulary words, numbers and categories (seed 0)"
    else:
        records = load_checked(data, need_label=False, need_text=False, max_chars=predictor.max_chars, named=named)
        if not records:
            raise MmfuseError(f"--data {data} has no rows to check the export on.")
        rows = [dict(r.cells) for r in records[:n]]
        source = f"{data}: the first {len(rows)} row(s)" + (", cycled" if len(rows) < n else "")
        rows = [dict(r) for r in (rows * n)[:n]]
    for k, c in enumerate(named.names):  # row 0 keeps every cell: the batch of 1 checks a full row
        rows[1 + k % (n - 1)][c] = None
    return rows, source


def column_parity_gate(predictor, onnx_predictor: OnnxPredictor, rows: list[dict]) -> dict:
    """``parity_gate`` for a model with columns: ``Predictor.predict(rows=...)`` against the graph on the same rows
    (through ``OnnxPredictor.predict(rows=...)``), with the rows' texts and with every text at max_length tokens."""
    model = predictor.model
    named = Columns.of(predictor.cfg.model)
    variants = {"short": rows}
    if named.text:
        tok, n = model.text.tokenizer, model.text.max_length
        variants["long"] = [{**r, **{c: long_text(tok, r[c], n) if r[c] else r[c] for c in named.text}} for r in rows]
    cases = []
    for kind, these in variants.items():
        for b in PARITY_BATCHES:
            ref = predictor.predict(rows=these[:b], batch_size=b).probs
            feeds = onnx_predictor.row_feeds(these[:b])
            got = onnx_predictor.run(feeds)
            masks = [v for k, v in feeds.items() if k.endswith("_attention_mask")]
            tokens = max(int(m.sum(1).max()) for m in masks) if masks else None
            cases.append({"batch": b, "texts": kind, "tokens": tokens, **_differences(predictor, ref, got)})
    return _verdict(cases, list(variants))


def _differences(predictor, ref: np.ndarray, got: np.ndarray) -> dict:
    """The largest probability difference and the rows whose decision differs (top-1, or a multi-label set)."""
    if predictor.multi_label:
        sets = multilabel.predicted(ref, predictor.thresholds), multilabel.predicted(got, predictor.thresholds)
        top1 = int((sets[0] != sets[1]).any(1).sum())
    else:
        top1 = int((ref.argmax(1) != got.argmax(1)).sum())
    return {"max_abs_diff": float(np.abs(ref - got).max()), "top1_differs": top1}


def _verdict(cases: list[dict], texts: list[str]) -> dict:
    worst = max(c["max_abs_diff"] for c in cases)
    mismatched = sum(c["top1_differs"] for c in cases)
    return {
        "max_abs_diff": worst,
        "top1_differs": mismatched,
        "rows_checked": sum(c["batch"] for c in cases),
        "tolerance": TOLERANCE,
        "batch_sizes": list(PARITY_BATCHES),
        "texts": texts,
        "passed": worst <= TOLERANCE and mismatched == 0,
        "cases": cases,
    }
