"""The quickstart's targets: quality, cold and warm wall time, and peak memory, measured in one run.

    python bench/quickstart.py            # cold run (fresh $MMFUSE_HOME), then warm runs (features cached)

The warm time is the median of --warm-runs timed runs (default 3), each without the memory sampler, which would
otherwise compete for the two cores; one more warm run measures memory. This VM's speed drifts by 15% or more
from run to run, so all warm times are printed.

Each run is a separate `mmfuse quickstart` process, so imports and model loading are counted, as a user sees them.
Targets (shared/PERF.md, issue 5): fusion weighted F1 >= 0.93 and above both single modalities; cold <= 180 s,
warm <= 20 s; peak RSS <= 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def run_quickstart(home: Path, out: Path, sample_memory: bool = True) -> tuple[float, float]:
    """Wall seconds and peak resident memory (GB) of one `mmfuse quickstart` process and its workers.

    The quickstart trains its three heads in forked worker processes, so memory is sampled every 0.5 s as the
    sum over the whole process tree of each process's PSS (proportional set size): a page the workers still share
    with their parent counts once in all, not once per process as summed RSS would count it.
    """
    import psutil

    env = {**os.environ, "MMFUSE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmfuse", "quickstart", "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak, stop = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_full_info().pss for p in tree))
            except psutil.Error:  # a worker ended between listing and reading it
                pass
            stop.wait(0.5)  # reading every process's page map is not free: sample gently

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    if sample_memory:
        sampler.join()
    if proc.returncode != 0:
        sys.exit(f"mmfuse quickstart failed:\n{stderr[-3000:]}")
    return wall, peak[0] / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--home", help="cache directory to use (default: a fresh temporary one, so the first run is cold)"
    )
    parser.add_argument("--warm-runs", type=int, default=3, help="timed warm runs; their median is reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "home"
        cold, cold_rss = run_quickstart(home, Path(tmp) / "cold")
        _, warm_rss = run_quickstart(home, Path(tmp) / "warm")
        warms = [run_quickstart(home, Path(tmp) / "warm", sample_memory=False)[0] for _ in range(args.warm_runs)]
        warm = statistics.median(warms)
        results = json.loads((Path(tmp) / "warm" / "ablation.json").read_text())
    fusion = results["fusion"]["weighted_f1"]
    best_single = max(results["image"]["weighted_f1"], results["text"]["weighted_f1"])
    rows = [
        ("image-only weighted F1 (test)", f"{results['image']['weighted_f1']:.4f}", ""),
        ("text-only weighted F1 (test)", f"{results['text']['weighted_f1']:.4f}", ""),
        ("fusion weighted F1 (test)", f"{fusion:.4f}", ">= 0.93 " + ("met" if fusion >= 0.93 else "NOT met")),
        (
            "fusion - best single modality",
            f"{fusion - best_single:+.4f}",
            "> 0 " + ("met" if fusion > best_single else "NOT met"),
        ),
        ("cold wall s", f"{cold:.1f}", "<= 180 " + ("met" if cold <= 180 else "NOT met")),
        (
            f"warm wall s, median of {len(warms)} ({', '.join(f'{w:.1f}' for w in warms)})",
            f"{warm:.1f}",
            "<= 20 " + ("met" if warm <= 20 else "NOT met"),
        ),
        (
            "peak memory GB, process tree PSS (cold; warm)",
            f"{cold_rss:.2f}; {warm_rss:.2f}",
            "<= 3 " + ("met" if max(cold_rss, warm_rss) <= 3 else "NOT met"),
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>12}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>12}  {target}")


if __name__ == "__main__":
    main()
