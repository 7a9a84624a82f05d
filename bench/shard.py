"""One process against ``accelerate launch --num_processes 2`` for ``mmfuse caption`` and the embedding pass of
``mmfuse train --tune head``, on the built-in emoji data, with the same outputs checked byte for byte.

    python bench/shard.py --rows 300 --work /tmp/shard-bench             # both, on the CPU (gloo)
    python bench/shard.py --rows 300 --work /tmp/shard-bench --only embed

Caption runs the packaged imagenet-tags captioner over a folder of the first ROWS emoji images. The embedding pass
is a whole ``train --tune head --epochs 1`` with an empty feature cache (the packaged Lite0 and MiniLM towers),
start-up and the head's epoch included. One process runs twice, with torch's default threads (every core) and with
one thread; each of the two launched processes uses one (accelerate's default for CPU launches). Wall times include
Python start-up, so the ratios understate the embedding's own.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
LAUNCH = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
LAUNCH += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmfuse"]
# (name, command, OMP_NUM_THREADS): None leaves torch's default, a thread per core.
VARIANTS = [
    ("1 process", [PY, "-m", "mmfuse"], None),
    ("1 process 1 thread", [PY, "-m", "mmfuse"], 1),
    ("2 processes", LAUNCH, 1),
]


def run(cmd: list, home: Path, threads: int | None = None) -> float:
    env = {**os.environ, "MMFUSE_HOME": str(home), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def prepare(work: Path, rows: int) -> tuple[Path, Path]:
    """The first ``rows`` emoji of the training split as a manifest and as a folder of images."""
    data = work / "emoji"
    if not (data / "train.csv").exists():
        subprocess.run([PY, "-m", "mmfuse", "datasets", "emoji", "--out", data], check=True, capture_output=True)
    with open(data / "train.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        picked = [row for _, row in zip(range(rows), reader)]
    manifest = work / f"rows{rows}.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(picked[0]))
        w.writeheader()
        w.writerows({**r, "image": str((data / r["image"]).resolve())} for r in picked)
    folder = work / f"images{rows}"
    if not folder.is_dir():
        folder.mkdir()
        for r in picked:
            shutil.copy(data / r["image"], folder / Path(r["image"]).name)
    return manifest, folder


def summary(title: str, unit: str, rows: int, times: dict[str, float], outputs: dict) -> str:
    """Rate and time of each variant, each one's speed-up from the two processes, and whether outputs agree."""
    two = times["2 processes"]
    parts = [f"{name} {rows / t:.1f} {unit} ({t:.1f} s)" for name, t in times.items()]
    ratios = [f"{times[name] / two:.2f} over {name}" for name in times if name != "2 processes"]
    same = len({repr(o) for o in outputs.values()}) == 1
    return f"{title}: {', '.join(parts)}; 2 processes {', '.join(ratios)}; outputs {'identical' if same else 'DIFFER'}"


def feature_bytes(home: Path) -> list[tuple[str, bytes]]:
    return sorted((str(p.relative_to(home)), p.read_bytes()) for p in (home / "features").rglob("*.npy"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--work", type=Path, default=Path("/tmp/mmfuse-shard-bench"))
    p.add_argument("--only", choices=["caption", "embed"])
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    manifest, folder = prepare(args.work, args.rows)
    lines = [f"{datetime.date.today()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start"]
    if args.only != "embed":
        times, outs = {}, {}
        for name, cmd, threads in VARIANTS:
            out = args.work / f"captions-{name.replace(' ', '-')}.csv"
            out.unlink(missing_ok=True)
            caption = ["caption", folder, "--out", out, "--model", "imagenet-tags", "--batch-size", "32"]
            times[name] = run([*cmd, *caption], args.work / "home-caption", threads)
            outs[name] = sorted(out.read_text(encoding="utf-8").splitlines())
        lines.append(summary(f"caption, {args.rows} images", "img/s", args.rows, times, outs))
    if args.only != "caption":
        times, feats = {}, {}
        for name, cmd, threads in VARIANTS:
            home, out = args.work / f"home-embed-{name.replace(' ', '-')}", args.work / f"run-{name.replace(' ', '-')}"
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            train = ["train", manifest, "--out", out, "--tune", "head", "--epochs", "1"]
            times[name] = run([*cmd, *train], home, threads)
            feats[name] = feature_bytes(home)
        title = f"train --tune head --epochs 1 (embedding pass, empty cache; {len(feats['2 processes'])} features)"
        lines.append(summary(f"{title}, {args.rows} rows", "rows/s", args.rows, times, feats))
    lines.append(f"load average {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
