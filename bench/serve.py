"""Load and bad-request benchmark of ``mmfuse serve`` on a run directory, against local servers only (127.0.0.1).

    python bench/serve.py runs/quickstart             # 32 clients x 1,000 requests, batched and --max-batch 1
    python bench/serve.py runs/quickstart --small     # 32 clients x 10 requests: a check that it all works
    python bench/serve.py runs/quickstart --backends torch,onnx --requests 20   # 1, 8 and 32 clients per backend

For each of ``--max-batch 64`` (the default) and ``--max-batch 1`` it starts ``mmfuse serve RUN --port 0`` in a
subprocess, waits for /readyz, and has 32 concurrent clients send single-row multipart requests (image + text, the
rows of the run's validation data, or --data) over keep-alive connections. Every answer is checked against
``mmfuse.load(RUN).predict`` on the same row (same label, probabilities within 1e-4). Printed per server: requests/s,
p50/p99 latency, 5xx count, dropped connections (transport errors) and wrong answers; then the throughput ratio. The
batched server also gets the fixed bad-request list (truncated JPEG, 0-byte upload, 50 MB upload, 20k x 20k PNG,
non-UTF-8 text, missing fields, wrong JSON types): each must be a 4xx, and a correct answer must follow. Each server
is stopped with SIGTERM and must exit 0. Exit code 1 when any check fails.

With ``--backends``, it compares what runs the frozen towers instead (``mmfuse serve --backend``): for each backend,
alternating their order over ``--rounds``, one batched server takes 1, 8 and 32 clients (``--client-counts``) in
turn, with the same checks; printed per backend and client count: the median requests/s and p50/p99 over the rounds,
each client count's ratio of requests/s to the first backend's, and where the time went: the model thread's busy
share (from /metrics) and the CPU time per request of the server and of these clients (they share the cores). An
entry ``onnx=OTHER_RUN`` serves another run beside the first (the same recipe trained with ``--quantize int8``, say),
its answers checked against its own ``predict``; ``--tolerance`` sets how far a probability may be from it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


class Server:
    """``mmfuse serve`` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, run: Path, *args: str, timeout: float = 300):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "mmfuse", "serve", str(run), "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        for line in self.proc.stderr:
            self.log.append(line)
            if m := re.search(r"on http://127\.0\.0\.1:(\d+)/", line):
                self.url = f"http://127.0.0.1:{m.group(1)}"
                break
        else:
            raise SystemExit("the server did not start:\n" + "".join(self.log))
        # Drained on a thread, so a full pipe never blocks the server's logging.
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        end = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > end or self.proc.poll() is not None:
                self.proc.kill()
                raise SystemExit("the server never became ready:\n" + "".join(self.log))
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far, all its threads (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def model_seconds(self) -> float:
        """The model thread's time in batches so far, from /metrics."""
        text = httpx.get(self.url + "/metrics").text
        return float(re.search(r"^mmfuse_batch_seconds_sum (\S+)$", text, re.M).group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def rows_of(run: Path, data: str | None, limit: int) -> tuple[list[tuple[bytes, str, str]], np.ndarray, list[str]]:
    """(image bytes, file name, text) of up to ``limit`` rows, with the library's probabilities for each."""
    import mmfuse

    predictor = mmfuse.load(run)
    if data is None:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["data"]
        data = cfg.get("val") or cfg["train"]
    records = predictor.load_data(data)[:limit]
    expected = predictor.predict([r.image for r in records], [r.text for r in records]).probs
    return [(r.image.read_bytes(), r.image.name, r.text) for r in records], expected, predictor.classes


def clean(res: dict) -> bool:
    """No 5xx, no dropped connection, no wrong or off answer, no other status."""
    return res["5xx"] == res["dropped"] == res["wrong"] == res["off"] == 0 and not res["other"]


async def load(
    url: str, rows, expected, classes, clients: int, per_client: int, deadline: float, tolerance: float = 1e-4
) -> dict:
    """``clients`` concurrent clients, each sending ``per_client`` requests one after another. An answer is wrong when
    its label differs from ``predict``'s, and off when its label agrees but a probability differs by > tolerance."""
    latencies, statuses, dropped, wrong, off, worst = [], {}, [], 0, 0, 0.0

    async def client(k: int, http: httpx.AsyncClient) -> None:
        nonlocal wrong, off, worst
        for j in range(per_client):
            if time.monotonic() > deadline:
                dropped.append("the benchmark's time limit was reached")
                return
            i = (k * per_client + j) % len(rows)
            image, name, text = rows[i]
            start = time.perf_counter()
            try:
                r = await http.post("/v1/predict", files={"image": (name, image)}, data={"text": text})
            except httpx.TransportError as e:
                dropped.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - start)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                answer = r.json()
                probs = np.array(list(answer["probabilities"].values()))
                diff = float(np.abs(probs - expected[i]).max())
                worst = max(worst, diff)
                if answer["label"] != classes[int(expected[i].argmax())]:
                    wrong += 1
                elif diff > tolerance:
                    off += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        seconds = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "rps": len(latencies) / seconds,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "5xx": sum(n for s, n in statuses.items() if s >= 500),
        "other": {s: n for s, n in statuses.items() if s != 200},
        "dropped": len(dropped),
        "dropped_first": dropped[:3],
        "wrong": wrong,
        "off": off,
        "max_diff": worst,
    }


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height pixels, compressed row by row (never held decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, idat = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8), []
    for _ in range(height):
        idat.append(packer.compress(row))
    idat.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def bad_requests(image: bytes, text: str) -> dict[str, dict]:
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").save(jpeg, "JPEG")
    form = lambda data, t=text: {"files": {"image": ("x.png", data)}, "data": {"text": t}}  # noqa: E731
    json_ = {"content-type": "application/json"}
    b64 = base64.b64encode(image).decode()
    return {
        "truncated JPEG": form(jpeg.getvalue()[: len(jpeg.getvalue()) // 2]),
        "0-byte upload": form(b""),
        "50 MB upload": form(os.urandom(50 * 2**20)),
        "20k x 20k PNG": form(huge_png(20_000, 20_000)),
        "non-UTF-8 text": {"files": {"image": ("x.png", image)}, "data": {"text": "caf\xe9".encode("latin-1")}},
        "missing image": {"json": {"text": text}},
        "missing text": {"files": {"image": ("x.png", image)}},
        "empty JSON object": {"json": {}},
        "image a number": {"json": {"image": 5, "text": text}},
        "text a list": {"json": {"image": b64, "text": [text]}},
        "items an object": {"json": {"items": {"image": b64, "text": text}}},
        "malformed JSON": {"content": b'{"image": "', "headers": json_},
        "no body": {"content": b"", "headers": json_},
        "wrong content type": {"content": text.encode(), "headers": {"content-type": "text/plain"}},
    }


def check_bad_requests(url: str, rows, expected, classes) -> bool:
    image, name, text = rows[0]
    ok = True
    print("\nbad requests (each must be a 4xx with a JSON error):")
    with httpx.Client(base_url=url, timeout=120) as http:
        for what, kwargs in bad_requests(image, text).items():
            try:
                r = http.post("/v1/predict", **kwargs)
                status, error = r.status_code, r.json().get("error")
            except (httpx.TransportError, ValueError) as e:
                status, error = None, f"{type(e).__name__}: {e}"
            good = status is not None and 400 <= status < 500
            ok &= good
            print(f"  {'ok  ' if good else 'FAIL'} {what:20s} {status} {error}")
        r = http.post("/v1/predict", files={"image": (name, image)}, data={"text": text})
        right = r.status_code == 200 and r.json()["label"] == classes[int(expected[0].argmax())]
        probs = np.array(list(r.json()["probabilities"].values())) if r.status_code == 200 else None
        right &= probs is not None and np.abs(probs - expected[0]).max() <= 1e-4
    print(f"  {'ok  ' if right else 'FAIL'} a correct answer after them: {r.status_code}")
    return ok and right


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run directory made by mmfuse train (e.g. runs/quickstart)")
    p.add_argument("--requests", type=int, default=1000, help="requests per client")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--small", action="store_true", help="10 requests per client: a quick check")
    p.add_argument("--data", help="manifest whose rows are sent (default: the run's validation data)")
    p.add_argument("--rows", type=int, default=256, help="distinct rows to cycle through")
    p.add_argument("--max-batch", type=int, default=64, help="--max-batch of the batched server")
    p.add_argument("--time-limit", type=float, default=3600, help="seconds each load phase may take at most")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest difference from predict's probabilities that counts as the same answer (int8 runs' answers "
        "depend slightly on their batch mates)",
    )
    p.add_argument(
        "--backends",
        help="compare these --backend values (e.g. torch,onnx) at --client-counts; onnx=OTHER_RUN serves another run "
        "(the same recipe trained with --quantize int8, say) beside them",
    )
    p.add_argument("--client-counts", default="1,8,32", help="with --backends: the numbers of concurrent clients")
    p.add_argument("--rounds", type=int, default=2, help="with --backends: rounds, the backends' order alternating")
    args = p.parse_args(argv)
    per_client = 10 if args.small else args.requests
    if args.backends:
        return compare_backends(args, per_client)

    rows, expected, classes = rows_of(args.run, args.data, args.rows)
    print(f"{len(rows)} rows of {args.run}, {args.clients} clients x {per_client} requests, {os.cpu_count()} CPUs")
    results, ok = {}, True
    for max_batch in (args.max_batch, 1):
        server = Server(args.run, "--max-batch", str(max_batch))
        try:
            deadline = time.monotonic() + args.time_limit
            r = asyncio.run(
                load(server.url, rows, expected, classes, args.clients, per_client, deadline, args.tolerance)
            )
            results[max_batch] = r
            if max_batch == args.max_batch:
                ok &= check_bad_requests(server.url, rows, expected, classes)
        finally:
            code = server.stop()
        r["exit"] = code
        ok &= clean(r) and code == 0
        if r["dropped_first"]:
            print("  dropped:", *r["dropped_first"], sep="\n    ")
    print(
        "\n| --max-batch | requests | requests/s | p50 ms | p99 ms | 5xx | dropped | wrong label | off "
        "| other status | exit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for max_batch, r in results.items():
        print(
            f"| {max_batch} | {r['requests']:,} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['5xx']} | "
            f"{r['dropped']} | {r['wrong']} | {r['off']} | {r['other'] or '-'} | {r['exit']} |"
        )
    if len(results) == 2:
        ratio = results[args.max_batch]["rps"] / results[1]["rps"]
        print(f"\nmicro-batching: {ratio:.2f}x the requests/s of --max-batch 1")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


def compare_backends(args, per_client: int) -> int:
    """Requests/s and latency of one batched server per ``--backend``, at each client count. An entry
    ``BACKEND=RUN`` serves another run (e.g. the same recipe trained with ``--quantize int8``), its answers checked
    against that run's own ``predict``."""
    backends = args.backends.split(",")
    counts = [int(c) for c in args.client_counts.split(",")]
    # backend entry -> (the --backend flag, the run it serves)
    served = {b: (b.split("=", 1)[0], Path(b.split("=", 1)[1]) if "=" in b else args.run) for b in backends}
    answers = {run: rows_of(run, args.data, args.rows) for _, run in served.values()}
    rows = answers[served[backends[0]][1]][0]
    load_avg = os.getloadavg()
    print(
        f"{len(rows)} rows of {args.run}, {per_client} requests per client, {os.cpu_count()} CPUs, "
        f"load {load_avg[0]:.2f}"
    )
    got: dict[tuple[str, int], list[dict]] = {}
    ok = True
    for r in range(args.rounds):
        for backend in backends if r % 2 == 0 else backends[::-1]:
            flag, run = served[backend]
            rows, expected, classes = answers[run]
            server = Server(run, "--max-batch", str(args.max_batch), "--backend", flag)
            try:
                asyncio.run(load(server.url, rows, expected, classes, 1, 2, time.monotonic() + 300))  # warm-up
                for clients in counts:
                    deadline = time.monotonic() + args.time_limit
                    before = server.cpu_seconds(), server.model_seconds(), time.process_time()
                    res = asyncio.run(
                        load(server.url, rows, expected, classes, clients, per_client, deadline, args.tolerance)
                    )
                    # Where a request's time goes: the model thread's share of the wall time, and the CPU the
                    # server and this client (on the same cores) spent per request.
                    n = max(res["requests"], 1)
                    res["model_share"] = (server.model_seconds() - before[1]) / res["seconds"]
                    res["server_ms"] = (server.cpu_seconds() - before[0]) / n * 1000
                    res["client_ms"] = (time.process_time() - before[2]) / n * 1000
                    got.setdefault((backend, clients), []).append(res)
                    ok &= clean(res)
                    print(f"round {r + 1} {backend} {clients} clients: {res['rps']:.1f} requests/s", flush=True)
            finally:
                ok &= server.stop() == 0
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(
        "\n| backend | clients | requests | requests/s (median) | p50 ms | p99 ms | wrong label | off (largest) "
        "| / first backend "
        "| model thread busy | server CPU ms/request | client CPU ms/request |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for clients in counts:
        base = np.median([x["rps"] for x in got[(backends[0], clients)]])
        for backend in backends:
            runs = got[(backend, clients)]

            def med(key: str, runs=runs) -> float:
                return float(np.median([x[key] for x in runs]))

            rps = med("rps")
            print(
                f"| {backend} | {clients} | {sum(x['requests'] for x in runs):,} | {rps:.1f} | "
                f"{med('p50'):.0f} | {med('p99'):.0f} | "
                f"{sum(x['wrong'] for x in runs)} | {sum(x['off'] for x in runs)} "
                f"({max(x['max_diff'] for x in runs):.0e}) | {rps / base:.2f}x | "
                f"{med('model_share'):.0%} | {med('server_ms'):.1f} | {med('client_ms'):.1f} |"
            )
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
