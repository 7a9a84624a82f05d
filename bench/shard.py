"""One process against ``accelerate launch --num_processes 2`` for ``mmfuse caption`` and the embedding pass of
``mmfuse train --tune head``, on the built-in emoji data, with the same outputs checked byte for byte.

    python bench/shard.py --rows 300 --work /tmp/shard-bench             # both, on the CPU (gloo)
    python bench/shard.py --rows 300 --work /tmp/shard-bench --only embed

Caption runs the packaged imagenet-tags captioner over a folder of the first ROWS emoji images. The embedding pass
is a whole ``train --tune head --epochs 1`` with an empty feature cache (the packaged Lite0 and MiniLM towers),
start-up and the head's epoch included. One process uses every core; each of the two uses one (accelerate's
default for CPU launches). Wall times include Python start-up, so the ratio understates the embedding's own.
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
        for n, cmd in ((1, [PY, "-m", "mmfuse"]), (2, LAUNCH)):
            out = args.work / f"captions{n}.csv"
            out.unlink(missing_ok=True)
            caption = ["caption", folder, "--out", out, "--model", "imagenet-tags", "--batch-size", "32"]
            times[n] = run([*cmd, *caption], args.work / "home-caption", threads=None if n == 1 else 1)
            outs[n] = sorted(out.read_text(encoding="utf-8").splitlines())
        same = "identical" if outs[1] == outs[2] else "DIFFERENT"
        lines.append(
            f"caption, {args.rows} images: 1 process {args.rows / times[1]:.1f} img/s ({times[1]:.1f} s), "
            f"2 processes {args.rows / times[2]:.1f} img/s ({times[2]:.1f} s), ratio {times[1] / times[2]:.2f}; "
            f"captions.csv {same} after sorting"
        )
    if args.only != "caption":
        times, feats = {}, {}
        for n, cmd in ((1, [PY, "-m", "mmfuse"]), (2, LAUNCH)):
            home, out = args.work / f"home-embed{n}", args.work / f"run{n}"
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            train = ["train", manifest, "--out", out, "--tune", "head", "--epochs", "1"]
            times[n] = run([*cmd, *train], home, threads=None if n == 1 else 1)
            feats[n] = feature_bytes(home)
        same = "identical" if feats[1] == feats[2] else "not byte-identical"
        lines.append(
            f"train --tune head --epochs 1 (embedding pass, empty cache), {args.rows} rows: 1 process "
            f"{args.rows / times[1]:.1f} rows/s ({times[1]:.1f} s), 2 processes {args.rows / times[2]:.1f} rows/s "
            f"({times[2]:.1f} s), ratio {times[1] / times[2]:.2f}; {len(feats[1])} feature files, {same}"
        )
    lines.append(f"load average {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
