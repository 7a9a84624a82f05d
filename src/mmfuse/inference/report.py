"""The misclassified rows of an evaluation, as a table (errors.csv) and as one page to look at (errors.html).

For a multi-label run a row is wrong when its predicted set differs from its true one: both files then list the true
and predicted sets and the labels missed and added, with their probabilities.

Pure functions over checked records, their probabilities and the class names; ``mmfuse evaluate`` writes both files
into its output folder. The page embeds everything it shows (thumbnails as small JPEGs, the confusion matrix as a
PNG), so it is one file that can be mailed or attached to an issue.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

import numpy as np

from mmfuse import multilabel
from mmfuse.binary import Decision, predicted
from mmfuse.data.images import load_image
from mmfuse.data.records import Record
from mmfuse.multilabel import Thresholds

MAX_HTML_ROWS = 500
"""Errors shown on the page (the most confident first); errors.csv lists them all. 500 thumbnails are ~2 MB."""
THUMB_PX = 96
SHOWN_CHARS = 1000  # a page of 500 scraped pages would not open; errors.csv keeps each text whole


def input_row(record: Record) -> int:
    """The 0-based position of a record's row in its input (a .jsonl's line number - 1), as predictions number it."""
    return record.row - 1


def misclassified(
    records: list[Record], probs: np.ndarray, classes: list[str], decision: Decision | None = None
) -> list[int]:
    """Indices of the records whose predicted class (the argmax, or a binary run's ``decision``) is not their label,
    the most confident mistakes first."""
    pred = predicted(probs, classes, decision)
    wrong = [i for i, r in enumerate(records) if r.label is not None and classes[pred[i]] != r.label]
    return sorted(wrong, key=lambda i: (-float(probs[i, pred[i]]), records[i].row))


def set_errors(
    records: list[Record], probs: np.ndarray, classes: list[str], thresholds: Thresholds
) -> list[tuple[int, list[int], list[int]]]:
    """A multi-label run's wrong rows: (index, labels missed, labels added), the most confident mistakes first (by
    how far the wrong labels' probabilities lie past their thresholds)."""
    called = multilabel.predicted(probs, thresholds)
    truth = multilabel.targets(records, classes).astype(bool)
    cut = np.asarray(thresholds.values)
    out = []
    for i in range(len(records)):
        if records[i].labels is None or (called[i] == truth[i]).all():
            continue
        missed, added = np.flatnonzero(truth[i] & ~called[i]), np.flatnonzero(called[i] & ~truth[i])
        out.append((i, missed.tolist(), added.tolist()))
    margin = np.abs(probs - cut)
    return sorted(out, key=lambda e: (-float(margin[e[0], e[1] + e[2]].max()), records[e[0]].row))


def _named(classes: list[str], idx: list[int], p: np.ndarray) -> str:
    return " ".join(f"{classes[j]} ({p[j]:.3f})" for j in idx)


def write_set_errors_csv(
    path: Path, records: list[Record], probs: np.ndarray, classes: list[str], thresholds: Thresholds
) -> int:
    """One row per wrong multi-label record (row, image, text, true_labels, predicted_labels, missed, added: each
    wrong label with its probability), the most confident first; returns how many."""
    wrong = set_errors(records, probs, classes, thresholds)
    sets = multilabel.label_sets(probs, classes, thresholds)
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        w = csv.writer(f)
        w.writerow(["row", "image", "text", "true_labels", "predicted_labels", "missed", "added"])
        for i, missed, added in wrong:
            r, p = records[i], probs[i]
            truth, guess = r.label or "", multilabel.joined(sets[i])
            w.writerow(
                [input_row(r), r.source, r.text, truth, guess, _named(classes, missed, p), _named(classes, added, p)]
            )
    return len(wrong)


def set_errors_html(
    records: list[Record],
    probs: np.ndarray,
    classes: list[str],
    thresholds: Thresholds,
    limit: int = MAX_HTML_ROWS,
    title: str = "rows with a wrong label set",
) -> str:
    """A multi-label run's page: one table row (``<tr class="error">``) per wrong record with its thumbnail, text,
    true and predicted sets, and the labels missed and added with their probabilities."""
    e = html.escape
    wrong = set_errors(records, probs, classes, thresholds)
    sets = multilabel.label_sets(probs, classes, thresholds)
    shown = wrong[:limit]
    parts = [
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_STYLE}</style>",
        f"</head><body><h1>{e(title)}</h1>",
        f"<p>{len(wrong)} of {len(records)} rows have a predicted set other than their own; the most confident "
        "mistakes first.",
    ]
    if len(wrong) > len(shown):
        parts.append(f" This page shows the first {len(shown)}; errors.csv lists all {len(wrong)}.")
    parts.append("</p>")
    parts.append(
        "<h2>errors</h2><table><tr><th>row</th><th>image</th><th>text</th><th>true</th><th>predicted</th>"
        "<th>missed</th><th>added</th></tr>"
    )
    for i, missed, added in shown:
        r, p = records[i], probs[i]
        thumb = thumbnail(r.image)
        picture = f"<img class='thumb' alt='' src='{thumb}'>" if thumb else "<span class='note'>(unreadable)</span>"
        text = r.text if len(r.text) <= SHOWN_CHARS else r.text[:SHOWN_CHARS] + " …"
        parts.append(
            f"<tr class='error'><td>{input_row(r)}</td><td>{picture}<br><span class='note'>{e(r.source)}</span></td>"
            f"<td class='text'>{e(text)}</td><td class='true'>{e(r.label or '')}</td>"
            f"<td class='pred'>{e(multilabel.joined(sets[i]))}</td>"
            f"<td class='true'>{e(_named(classes, missed, p))}</td>"
            f"<td class='pred'>{e(_named(classes, added, p))}</td></tr>"
        )
    parts.append("</table></body></html>\n")
    return "\n".join(parts)


def write_errors_csv(
    path: Path, records: list[Record], probs: np.ndarray, classes: list[str], decision: Decision | None = None
) -> int:
    """One row per misclassified record (row, image, text, true_label, predicted_label, confidence), the most
    confident first; returns how many."""
    wrong = misclassified(records, probs, classes, decision)
    pred = predicted(probs, classes, decision)
    # A file name that is not UTF-8 (kept as surrogates) is written escaped rather than failing the report.
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        w = csv.writer(f)
        w.writerow(["row", "image", "text", "true_label", "predicted_label", "confidence"])
        for i in wrong:
            r, k = records[i], int(pred[i])
            w.writerow([input_row(r), r.source, r.text, r.label, classes[k], f"{probs[i, k]:.6f}"])
    return len(wrong)


def thumbnail(path: Path, size: int = THUMB_PX) -> str | None:
    """A data: URI of the image shrunk to fit ``size`` pixels a side, or None if it cannot be read now."""
    try:
        img = load_image(path, at_least=size)
    except (OSError, ValueError):
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { border-bottom: 1px solid #ddd; padding: 6px 8px; vertical-align: top; text-align: left; }
td.text { max-width: 40em; white-space: pre-wrap; overflow-wrap: anywhere; }
.true { color: #1a7f37; } .pred { color: #c62828; }
img.thumb { width: 96px; height: 96px; object-fit: contain; background: #f4f4f4; }
.note { color: #666; }
"""


def errors_html(
    records: list[Record],
    probs: np.ndarray,
    classes: list[str],
    confusion_png: Path | None = None,
    limit: int = MAX_HTML_ROWS,
    title: str = "misclassified rows",
    decision: Decision | None = None,
    curves: dict[str, Path] | None = None,
) -> str:
    """A self-contained page: the confusion matrix (and a binary run's ``curves``, title: PNG, where they exist),
    then one table row (``<tr class="error">``) per misclassified record with its thumbnail, text, true and predicted
    labels and top-3 probabilities."""
    e = html.escape
    wrong = misclassified(records, probs, classes, decision)
    pred = predicted(probs, classes, decision)
    shown = wrong[:limit]
    parts = [
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_STYLE}</style>",
        f"</head><body><h1>{e(title)}</h1>",
        f"<p>{len(wrong)} of {len(records)} rows misclassified; the most confident mistakes first.",
    ]
    if len(wrong) > len(shown):
        parts.append(f" This page shows the first {len(shown)}; errors.csv lists all {len(wrong)}.")
    parts.append("</p>")
    matrix = _png(confusion_png)
    if matrix:
        parts.append(f"<h2>confusion matrix</h2><img alt='confusion matrix' src='{matrix}'>")
    if decision is not None:
        parts.append(
            f"<p>positive class {e(decision.positive)}, predicted at probability >= {decision.threshold:.4f}</p>"
        )
    for name, png in (curves or {}).items():
        if uri := _png(png):
            parts.append(f"<h2>{e(name)}</h2><img alt='{e(name)}' src='{uri}'>")
    parts.append(
        "<h2>errors</h2><table><tr><th>row</th><th>image</th><th>text</th><th>true</th><th>predicted</th>"
        "<th>top 3</th></tr>"
    )
    for i in shown:
        r, p = records[i], probs[i]
        thumb = thumbnail(r.image)
        picture = f"<img class='thumb' alt='' src='{thumb}'>" if thumb else "<span class='note'>(unreadable)</span>"
        text = r.text if len(r.text) <= SHOWN_CHARS else r.text[:SHOWN_CHARS] + " …"
        top = " <br>".join(f"{e(classes[k])}: {p[k]:.3f}" for k in np.argsort(-p)[:3])
        parts.append(
            f"<tr class='error'><td>{input_row(r)}</td><td>{picture}<br><span class='note'>{e(r.source)}</span></td>"
            f"<td class='text'>{e(text)}</td><td class='true'>{e(r.label or '')}</td>"
            f"<td class='pred'>{e(classes[int(pred[i])])}</td><td>{top}</td></tr>"
        )
    parts.append("</table></body></html>\n")
    return "\n".join(parts)


def write_errors(
    out_dir: Path,
    records: list[Record],
    probs: np.ndarray,
    classes: list[str],
    limit: int = MAX_HTML_ROWS,
    decision: Decision | None = None,
    thresholds: Thresholds | None = None,
) -> int:
    """errors.csv and errors.html in ``out_dir`` (beside the confusion_matrix.png, and a binary run's roc.png and
    pr.png, they embed); with a multi-label run's ``thresholds``, the rows whose set is wrong. Returns the count."""
    out_dir = Path(out_dir)
    if thresholds is not None:
        n = write_set_errors_csv(out_dir / "errors.csv", records, probs, classes, thresholds)
        page = set_errors_html(records, probs, classes, thresholds, limit)
        (out_dir / "errors.html").write_text(page, encoding="utf-8", errors="backslashreplace")
        return n
    n = write_errors_csv(out_dir / "errors.csv", records, probs, classes, decision)
    curves = {"ROC curve": out_dir / "roc.png", "precision-recall curve": out_dir / "pr.png"}
    page = errors_html(
        records, probs, classes, out_dir / "confusion_matrix.png", limit, decision=decision, curves=curves
    )
    (out_dir / "errors.html").write_text(page, encoding="utf-8", errors="backslashreplace")
    return n
