"""How mmfuse scales with the number of rows: the check pass, embedding + head training, predict, and the caches.

Generates N small JPEGs (64x64, a random shape in one of a few colours, a text naming shape and colour, the
colour as the label; deterministic per seed) into a temporary folder, then runs each stage in its own child process
so that its peak RSS is the child's own (``ru_maxrss`` of a fresh child):

- check: ``load_checked`` on the manifest, cold (empty ``$MMFUSE_HOME``) and warm (``files.sqlite`` filled);
- train: ``mmfuse train DATA --preset fast --epochs 2`` (frozen lite0 at 64 px + MiniLM, both packaged and offline):
  embedding every row, then the head;
- predict: ``mmfuse predict RUN DATA --chunk-size C`` (4096; give one below N to see memory stay flat);
- the cache under ``$MMFUSE_HOME``: megabytes and files.

at N rows and at 4N rows, and prints a markdown table with the 4N/N ratios against the targets (time <= 4.2x,
predict peak RSS <= 1.2x, cache files <= rows/500).

    python bench/scale.py                       # N = 20,000 (and 80,000): an hour or more on 2 CPU cores
    python bench/scale.py --rows 5000           # a smaller N
    python bench/scale.py --small               # N = 200: under a minute
    python bench/scale.py --processes 2         # also 2 processes (accelerate launch) vs 1, outputs compared

Nothing is written into the repository: data, runs and ``$MMFUSE_HOME`` live in a temporary folder (``--keep DIR``
keeps them in DIR instead).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 200), "yellow": (220, 200, 40)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("small", "large", "bright", "pale", "round", "sharp", "plain", "simple", "tiny", "bold")


def draw(rng: random.Random, colour: tuple[int, int, int], shape: str, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    fill = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in colour)
    x, y, r = rng.randint(16, size - 16), rng.randint(16, size - 16), rng.randint(8, 15)
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        d.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return img


def generate(root: Path, rows: int, seed: int = 0, per_folder: int = 1000) -> Path:
    """``rows`` JPEGs under ``root/images/NNN/`` and ``root/train.csv`` (image, text, label); the same files for the
    same seed. Returns the manifest's path."""
    rng = random.Random(seed)
    names = list(COLOURS)
    out = root / "train.csv"
    root.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "text", "label"])
        for i in range(rows):
            colour, shape = rng.choice(names), rng.choice(SHAPES)
            rel = f"images/{i // per_folder:03d}/{i:07d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            draw(rng, COLOURS[colour], shape).save(root / rel, quality=90)
            words = rng.sample(WORDS, 2)
            w.writerow([rel, f"a {words[0]} {colour} {shape}, {words[1]}", colour])
    return out


def age(root: Path, seconds: float = 60.0) -> None:
    """Backdates every file under ``root``: files modified in the last few seconds are not remembered in
    files.sqlite (filestats.RACY_SECONDS), which would make the warm check recheck the newest images."""
    past = time.time() - seconds
    for dirpath, _, names in os.walk(root):
        for name in names:
            os.utime(os.path.join(dirpath, name), (past, past))


def run(cmd: list[str], env: dict, log: Path) -> tuple[float, float, int]:
    """Runs ``cmd`` in a fresh child; returns (seconds, the child's peak RSS in MB, exit code). ``os.wait4`` gives
    that one child's peak, where ``RUSAGE_CHILDREN`` would give the largest of every child so far."""
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in kB on Linux, bytes on macOS; a launcher's peak is its own, not its workers'.
    mb = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return seconds, mb, proc.returncode


def cache_size(home: Path) -> tuple[float, int]:
    """Megabytes and files under ``$MMFUSE_HOME``."""
    size = files = 0
    for dirpath, _, names in os.walk(home):
        for name in names:
            try:
                size += os.path.getsize(os.path.join(dirpath, name))
                files += 1
            except OSError:
                pass
    return size / 1e6, files


# The check pass alone, timed inside the child too (argv[2] gets its seconds): at small N the wall time of a child is
# mostly Python starting and importing.
CHECK = (
    "import sys, time; from mmfuse.data.checks import load_checked; t = time.perf_counter(); "
    "load_checked(sys.argv[1], need_text=True); open(sys.argv[2], 'w').write(str(time.perf_counter() - t))"
)
TOWERS = ["--vision", "efficientnet-lite0", "--image-size", "64", "--text", "minilm"]


def measure(n: int, work: Path, env: dict, epochs: int, chunk: int) -> dict:
    """Every stage at ``n`` rows, in fresh children, against an empty cache; each stage's seconds, peak RSS (MB)."""
    root = work / f"rows{n}"
    t = time.perf_counter()
    data = generate(root / "data", n)
    age(root / "data")
    print(f"[{n} rows] generated in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    env = {**env, "MMFUSE_HOME": str(root / "home")}
    log, py, out = root / "log.txt", [sys.executable], {"rows": n}
    train = [*py, "-m", "mmfuse", "train", str(data), "--out", str(root / "run"), "--preset", "fast"]
    train += [*TOWERS, "--epochs", str(epochs), "--num-workers", "0"]
    predict = [*py, "-m", "mmfuse", "predict", str(root / "run"), str(data), "--out", str(root / "preds.csv")]
    predict += ["--chunk-size", str(chunk)]
    stages = [
        ("check (cold)", [*py, "-c", CHECK, str(data), str(root / "check-cold.txt")]),
        ("check (warm)", [*py, "-c", CHECK, str(data), str(root / "check-warm.txt")]),
        ("train (embed + head)", train),
        ("train (cached features: head)", [*train, "--overwrite"]),
        ("predict", predict),
    ]
    for name, cmd in stages:
        seconds, mb, rc = run(cmd, env, log)
        if rc:
            raise SystemExit(f"{name} failed (exit {rc}); see {log}")
        out[name] = (seconds, mb)
        print(f"[{n} rows] {name}: {seconds:.1f} s, {n / seconds:,.0f} rows/s, peak {mb:.0f} MB", file=sys.stderr)
    for when in ("cold", "warm"):
        out[f"check ({when}), in the process"] = (float((root / f"check-{when}.txt").read_text()), None)
    embed = out["train (embed + head)"][0] - out["train (cached features: head)"][0]
    out["embedding (difference)"] = (max(embed, 1e-9), None)
    out["cache"] = cache_size(root / "home")
    return out


def table(small: dict, big: dict) -> str:
    ratio = big["rows"] / small["rows"]
    lines = [
        f"| stage | {small['rows']:,} rows: rows/s | peak RSS MB | {big['rows']:,} rows: rows/s | peak RSS MB "
        f"| time x | RSS x | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (s1, m1) in ((k, v) for k, v in small.items() if k not in ("rows", "cache")):
        s2, m2 = big[name]
        grow = s2 / s1
        target = f"time <= {1.05 * ratio:.1f}x: {'met' if grow <= 1.05 * ratio else 'MISSED'}"
        if name == "predict":
            target += f"; RSS <= 1.2x: {'met' if m2 / m1 <= 1.2 else 'MISSED'}"
        mem = (f"{m1:.0f}", f"{m2:.0f}", f"{m2 / m1:.2f}x") if m1 else ("", "", "")
        row = f"| {name} | {small['rows'] / s1:,.0f} | {mem[0]} | {big['rows'] / s2:,.0f} | {mem[1]} | {grow:.2f}x"
        lines.append(f"{row} | {mem[2]} | {target} |")
    (mb1, f1), (mb2, f2) = small["cache"], big["cache"]
    limit = big["rows"] / 500
    lines.append(
        f"| cache under $MMFUSE_HOME | {mb1:.1f} MB | {f1} files | {mb2:.1f} MB | {f2} files | {mb2 / mb1:.2f}x "
        f"| {f2 / f1:.2f}x | files <= rows/500 = {limit:.0f}: {'met' if f2 <= limit else 'MISSED'} |"
    )
    return "\n".join(lines)


def launch(processes: int, args: list[str]) -> list[str]:
    """``mmfuse ARGS`` in one plain process, or under ``accelerate launch`` with ``processes`` CPU processes (gloo)."""
    if processes == 1:
        return [sys.executable, "-m", "mmfuse", *args]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    return [
        *accelerate,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "mmfuse",
    ] + args


def same_sorted(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and sorted(a.read_bytes().splitlines()) == sorted(b.read_bytes().splitlines())


def compare_processes(n: int, work: Path, env: dict, processes: int, epochs: int) -> list[str]:
    """Embedding (a cold ``train``), ``predict`` and ``caption`` under 1 and ``processes`` processes: the speed
    ratio, and whether the outputs are the same lines."""
    root = work / f"procs{n}"
    data = generate(root / "data", n)
    age(root / "data")
    log, rows = root / "log.txt", []
    many_env = {**env, "OMP_NUM_THREADS": "1"}  # one thread a process: the cores are the processes'
    times: dict[tuple[str, int], float] = {}
    for p in (1, processes):
        home = str(root / f"home{p}")
        args = ["train", str(data), "--out", str(root / f"run{p}"), "--preset", "fast", *TOWERS]
        args += ["--epochs", str(epochs), "--num-workers", "0"]
        seconds, _, rc = run(launch(p, args), {**(env if p == 1 else many_env), "MMFUSE_HOME": home}, log)
        times["embed", p] = seconds if rc == 0 else float("nan")
    # The one-process run's model over each launch's feature cache: the same predictions iff the same features.
    for p in (1, processes):
        args = ["predict", str(root / "run1"), str(data), "--out", str(root / f"features{p}.csv")]
        run(launch(1, args), {**env, "MMFUSE_HOME": str(root / f"home{p}")}, log)
    same = same_sorted(root / "features1.csv", root / f"features{processes}.csv")
    rows.append(_ratio_row("embedding + head (train)", times["embed", 1], times["embed", processes], same))
    for verb, args in (
        ("predict", ["predict", str(root / "run1"), str(data), "--out"]),
        ("caption", ["caption", str(data), "--model", "imagenet-tags", "--out"]),
    ):
        for p in (1, processes):
            # predict reads the features the one-process train cached; each caption run starts from an empty cache
            home = str(root / ("home1" if verb == "predict" else f"home-caption{p}"))
            cmd = launch(p, [*args, str(root / f"{verb}{p}.csv")])
            seconds, _, rc = run(cmd, {**(env if p == 1 else many_env), "MMFUSE_HOME": home}, log)
            times[verb, p] = seconds if rc == 0 else float("nan")
        same = same_sorted(root / f"{verb}1.csv", root / f"{verb}{processes}.csv")
        rows.append(_ratio_row(verb, times[verb, 1], times[verb, processes], same))
    head = f"| {n:,} rows | 1 process (s) | {processes} processes (s) | speed-up | outputs |"
    return [head, "|---|---|---|---|---|", *rows]


def _ratio_row(name: str, one: float, many: float, same: bool) -> str:
    verdict = "same lines" if same else "DIFFER (or a launch failed: see the log)"
    return f"| {name} | {one:.1f} | {many:.1f} | {one / many:.2f}x | {verdict} |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help="N: the smaller size (the larger is --times N)")
    ap.add_argument("--times", type=int, default=4, help="the larger size as a multiple of N")
    ap.add_argument("--small", action="store_true", help="N = 200, 1 epoch: under a minute on a CPU")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--processes", type=int, default=0, help="also compare this many processes against one")
    ap.add_argument("--chunk-size", type=int, default=4096, help="predict's --chunk-size (below N to see it stream)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    rows, epochs = (200, 1) if args.small else (args.rows, args.epochs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    chunk = args.chunk_size
    work = args.keep or Path(tempfile.mkdtemp(prefix="mmfuse-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        small = measure(rows, work, env, epochs, chunk)
        big = measure(rows * args.times, work, env, epochs, chunk)
        compared = compare_processes(rows, work, env, args.processes, epochs) if args.processes > 1 else []
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# bench/scale.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{when}, {platform.node()}: {os.cpu_count()} CPU(s), {platform.python_version()}, {epochs} epoch(s)")
    print(f"predict with --chunk-size {chunk}\n")
    print(table(small, big))
    if compared:
        print("\n" + "\n".join(compared))
    print("\n" + json.dumps({"small": small, "big": big}, default=str))


if __name__ == "__main__":
    main()
