"""How long `mmfuse train` (the default ensemble) takes on N rows, cold and warm, as a user runs it.

Cold: a new, empty MMFUSE_HOME, so the packaged towers are unpacked and every row is embedded. Warm: the same command
again in that home (--overwrite), the features read from its cache. Each is a real `mmfuse train` subprocess, timed
from start to exit.

    python bench/default_time.py --data /tmp/sets/breeze-small --rows 500
    python bench/default_time.py --rows 1000 --args "--preset fast"
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a folder holding all.csv, as bench/datasets/*.py write them (default: the emoji)")
    p.add_argument("--rows", type=int, default=1000, help="rows to train on, drawn at random (seed 0)")
    p.add_argument("--args", default="", help="extra train flags, e.g. '--preset fast'")
    args = p.parse_args(argv)
    mmfuse = [sys.executable, "-m", "mmfuse"]
    with tempfile.TemporaryDirectory(prefix="mmfuse-time-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "MMFUSE_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1"}
        data = Path(args.data) if args.data else root / "emoji"
        if not args.data:
            subprocess.run([*mmfuse, "datasets", "emoji", "--out", str(data)], env=env, check=True, capture_output=True)
        rows = []
        for name in ("all", "train", "val", "test"):
            if (data / f"{name}.csv").is_file():
                with open(data / f"{name}.csv", newline="", encoding="utf-8") as f:
                    rows += list(csv.DictReader(f))
                if name == "all":
                    break
        random.Random(0).shuffle(rows)
        n = min(args.rows, len(rows))
        manifest = root / "rows.csv"
        with open(manifest, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["image", "text", "label"], extrasaction="ignore")
            w.writeheader()
            for r in rows[:n]:
                w.writerow({**r, "image": str((data / r["image"]).resolve())})
        cmd = [*mmfuse, "train", str(manifest), "--out", str(root / "run"), *shlex.split(args.args)]
        print(f"{data.name}: {n} rows; {shlex.join(cmd[2:])}", flush=True)
        for label in ("cold (empty MMFUSE_HOME)", "warm (cached features)"):
            start = time.perf_counter()
            subprocess.run([*cmd, "--overwrite"], env=env, check=True, capture_output=True)
            seconds = time.perf_counter() - start
            load = os.getloadavg()[0]
            print(f"{label:<26} {seconds:6.1f} s  ({seconds * 1000 / n:.0f} s per 1,000 rows; load {load:.1f})")
            board = root / "run" / "leaderboard.csv"
            if board.is_file():  # where the time went, member by member (an ensemble run writes one)
                with open(board, newline="", encoding="utf-8") as f:
                    print("   " + ", ".join(f"{r['name']} {float(r['seconds']):.0f} s" for r in csv.DictReader(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
