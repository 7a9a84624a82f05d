"""The quickstart's targets: quality, cold and warm wall time, and peak memory, measured in one run.

    python bench/quickstart.py            # cold run (fresh $MMFUSE_HOME), then warm run (features cached)

Each run is a separate `mmfuse quickstart` process, so imports and model loading are counted, as a user sees them.
Targets (shared/PERF.md, issue 5): fusion weighted F1 >= 0.93 and above both single modalities; cold <= 180 s,
warm <= 20 s; peak RSS <= 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_quickstart(home: Path, out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one `mmfuse quickstart` process."""
    env = {**os.environ, "MMFUSE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mmfuse", "quickstart", "--out", str(out)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"mmfuse quickstart failed:\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB on Linux; a max over all children so far
    return wall, max(peak, before) / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--home", help="cache directory to use (default: a fresh temporary one, so the first run is cold)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "home"
        cold, cold_rss = run_quickstart(home, Path(tmp) / "cold")
        warm, warm_rss = run_quickstart(home, Path(tmp) / "warm")
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
        ("warm wall s", f"{warm:.1f}", "<= 20 " + ("met" if warm <= 20 else "NOT met")),
        # getrusage keeps the largest child so far, so the second figure covers both runs.
        (
            "peak RSS GB (cold; both)",
            f"{cold_rss:.2f}; {warm_rss:.2f}",
            "<= 3 " + ("met" if warm_rss <= 3 else "NOT met"),
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>12}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>12}  {target}")


if __name__ == "__main__":
    main()
