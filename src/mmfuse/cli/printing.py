"""The tables and summaries the verbs print: scores of runs, an evaluation report, a search's leaderboard."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


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
    if "bag" in result:
        title = f"trained {out}: {result['members_finished']} bagged members, out-of-fold validation"
        print_summary({"out-of-fold": result["val"]}, title)
        print(
            f"out-of-fold weighted F1 over all {result['n_out_of_fold']} rows; per fold "
            f"{result['fold_weighted_f1_mean']:.4f} ± {result['fold_weighted_f1_sd']:.4f}; predict uses "
            f"{'the refit model' if result['predict_uses'] == 'full' else 'the members averaged'}"
        )
    elif "val" in result:
        print_summary({"validation": result["val"]}, f"trained {out} (best epoch {result['best_epoch']})")
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


def print_leaderboard(rows: list[dict], title: str) -> None:
    table = Table(title=title, caption="* the default config")
    for col in ("trial", "state", "val F1", "val acc", "epoch", "s"):
        table.add_column(col, justify="left" if col == "state" else "right", no_wrap=True)
    table.add_column("parameters", overflow="fold")
    metrics = {"trial", "state", "default", "val_weighted_f1", "val_accuracy", "best_epoch", "seconds"}
    for r in rows:
        shown = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in metrics]
        f1, acc = r["val_weighted_f1"], r["val_accuracy"]
        table.add_row(
            f"{r['trial']}{'*' * r['default']}",
            r["state"],
            "" if f1 is None else f"{f1:.4f}",
            "" if acc is None else f"{acc:.4f}",
            str(r["best_epoch"] or ""),
            "" if r["seconds"] is None else f"{r['seconds']:.1f}",
            " ".join(shown),
        )
    Console().print(table)


def print_report(report: dict) -> None:
    table = Table(title=f"evaluation on {report['n']} rows")
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, r in report["per_class"].items():
        table.add_row(name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"]))
    table.add_section()
    for key in ("accuracy", "weighted_f1", "macro_f1"):
        table.add_row(key.replace("_", " "), "", "", f"{report[key]:.4f}", "")
    Console().print(table)
