"""The tables and summaries the verbs print: scores of runs, an evaluation report, a search's leaderboard."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

# How lines name the metrics (--metric's choices among them); mmfuse.metrics has the same titles, but importing it
# here would import numpy with every verb's --help.
TITLES = {"accuracy": "accuracy", "weighted_f1": "weighted F1", "macro_f1": "macro F1", "log_loss": "log loss"}
TITLES |= {"roc_auc": "ROC AUC", "pr_auc": "PR AUC", "micro_f1": "micro F1", "map": "mAP", "samples_f1": "samples F1"}


def metric_title(metric: str) -> str:
    return TITLES.get(metric, metric.replace("_", " "))


def print_summary(results: dict[str, dict], title: str) -> None:
    table = Table(title=title)
    for col in ("", "accuracy", "weighted F1", "macro F1"):
        table.add_column(col, justify="right" if col else "left")
    for name, r in results.items():
        table.add_row(name, f"{r['accuracy']:.4f}", f"{r['weighted_f1']:.4f}", f"{r['macro_f1']:.4f}")
    Console().print(table)


def print_training(result: dict, out: str) -> None:
    """The validation summary and how far to trust it: a bootstrap interval, or for a bag the out-of-fold rows and
    the spread over folds."""
    interval = result.get("val_interval")
    metric = result.get("metric")
    if "bag" in result:
        heading = f"trained {out}: {result['members_finished']} bagged members, out-of-fold validation"
        print_summary({"out-of-fold": result["val"]}, heading)
        uses = {"full": "the refit model", "ensemble": "the weighted ensemble"}.get(
            result["predict_uses"], "the members averaged"
        )
        if metric:  # the headline: what --metric chose by
            name = metric_title(metric["name"])
            score = f"{name} {metric['value']:.4f}"
            spread = f"{metric['fold_mean']:.4f} ± {metric['fold_sd']:.4f}"
        else:  # a bag written before --metric
            score, spread = (
                "weighted F1",
                f"{result['fold_weighted_f1_mean']:.4f} ± {result['fold_weighted_f1_sd']:.4f}",
            )
        print(f"out-of-fold {score} over all {result['n_out_of_fold']} rows; per fold {spread}; predict uses {uses}")
    elif "val" in result:
        print_summary({"validation": result["val"]}, f"trained {out} (best epoch {result['best_epoch']})")
        if metric and metric["name"] not in ("accuracy", "weighted_f1", "macro_f1"):  # not in the table above
            print(f"validation {metric_title(metric['name'])} {metric['value']:.4f} (--metric)")
    if interval:
        print(
            f"95% bootstrap interval of the weighted F1: {interval['weighted_f1_low']:.3f}-"
            f"{interval['weighted_f1_high']:.3f} over {interval['n']} validation rows"
        )
    calibration = result.get("calibration")
    if calibration:
        print(
            f"calibrated: temperature {calibration['temperature']:.3f}, fitted on the {calibration['n']} "
            f"{calibration['fitted_on']} rows; expected calibration error {calibration['ece_before']:.4f} -> "
            f"{calibration['ece_after']:.4f} (reliability.png); predict, evaluate and serve give the calibrated "
            "probabilities"
        )
    if "threshold" in result:
        print_binary(result["val"])
    if "thresholds" in result.get("val", {}):
        print_multilabel(result["val"])


def print_multilabel(scores: dict) -> None:
    """A multi-label run's line: its set scores at the per-label thresholds (chosen on the same rows)."""
    print(
        f"multi-label, {len(scores['thresholds'])} labels at their thresholds (thresholds.json): micro F1 "
        f"{scores['micro_f1']:.4f}, macro F1 {scores['macro_f1']:.4f}, samples F1 {scores['samples_f1']:.4f}, "
        f"mAP {scores['map']:.4f}"
    )


def print_binary(scores: dict) -> None:
    """A binary run's line: its positive class, the threshold on its probability, and the scores of that class."""
    print(
        f"positive class {scores['positive']}, predicted at probability >= {scores['threshold']:.4f}: F1 "
        f"{scores['positive_f1']:.4f}, ROC AUC {scores['roc_auc']:.4f}, PR AUC {scores['pr_auc']:.4f}"
    )


def print_leaderboard(rows: list[dict], title: str) -> None:
    table = Table(title=title, caption="* the default config")
    # The validation scores the rows hold: weighted F1, macro F1, accuracy and the objective if it is another.
    scores = [k for k in (rows[0] if rows else {}) if k.startswith("val_")]
    # Short headers: the parameters need what is left of 80 columns (a redirected log's width).
    short = {"val_weighted_f1": "val F1", "val_macro_f1": "macro", "val_accuracy": "acc"}
    for col in ("trial", "state", *(short.get(k, metric_title(k[4:])) for k in scores), "epoch", "s"):
        table.add_column(col, justify="left" if col == "state" else "right", no_wrap=True)
    table.add_column("parameters", overflow="fold")
    metrics = {"trial", "state", "default", *scores, "best_epoch", "seconds"}
    for r in rows:
        shown = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in metrics]
        table.add_row(
            f"{r['trial']}{'*' * r['default']}",
            r["state"],
            *("" if r[k] is None else f"{r[k]:.4f}" for k in scores),
            str(r["best_epoch"] or ""),
            "" if r["seconds"] is None else f"{r['seconds']:.1f}",
            " ".join(shown),
        )
    Console().print(table)


def print_report(report: dict) -> None:
    multi = "per_label" in report  # a multi-label run's: per label, at its threshold
    table = Table(title=f"evaluation on {report['n']} rows")
    for col in ("label" if multi else "class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col in ("class", "label") else "right")
    for name, r in report["per_label" if multi else "per_class"].items():
        table.add_row(name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"]))
    table.add_section()
    keys = ("micro_f1", "macro_f1", "weighted_f1", "samples_f1", "map", "accuracy") if multi else ()
    for key in keys or ("accuracy", "weighted_f1", "macro_f1"):
        name = "accuracy (whole set)" if multi and key == "accuracy" else metric_title(key)
        table.add_row(name, "", "", f"{report[key]:.4f}", "")
    Console().print(table)
