"""mmfuse serve: every endpoint through FastAPI's TestClient, a real server under concurrent load and SIGTERM, and the
page in a real browser (Debian's chromium through Selenium)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import chrome, read_csv, submit_page
from fastapi.testclient import TestClient
from PIL import Image

import mmfuse
from mmfuse.cli import main
from mmfuse.inference.serve.app import create_app
from mmfuse.inference.serve.batching import Batcher, Metrics
from mmfuse.inference.serve.requests import RequestError

SRC = Path(mmfuse.__file__).resolve().parents[1]
UPLOAD_LIMIT = 2 * 2**20


@pytest.fixture(scope="module")
def home(module_home):
    """The module's runs train in the shared warm home."""
    return module_home


@pytest.fixture(scope="module")
def toy(toy_data):
    return toy_data


def train(toy, out, *extra) -> Path:
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(out)]
    assert main([*args, "--tune", "head", "--epochs", "2", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def run(head_run):
    return head_run  # shared: nothing here writes into it


@pytest.fixture(scope="module")
def dropout_run(toy, home, tmp_path_factory):
    """A model trained with modality dropout: it may be asked without text."""
    return train(toy, tmp_path_factory.mktemp("serve-runs") / "run-md", "--modality-dropout", "0.3")


@pytest.fixture(scope="module")
def predictor(run, home):
    return mmfuse.load(run)


@pytest.fixture(scope="module")
def rows(toy):
    return [{**r, "path": toy / r["image"]} for r in read_csv(toy / "test.csv")]


def wait_ready(client, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < end, "the app never became ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(run, home):
    app = create_app(run, max_upload_bytes=UPLOAD_LIMIT, max_text_chars=1000, max_items=16)
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def multipart(path: Path, text: str | None) -> dict:
    files = {"image": (path.name, path.read_bytes(), "image/png")}
    return {"files": files, "data": {} if text is None else {"text": text}}


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def assert_same(answer: dict, probs: np.ndarray, classes: list[str]) -> None:
    """The server's answer is the library's, to the bit (float32 -> JSON double -> float32 is exact)."""
    assert list(answer["probabilities"]) == classes  # the run's class order
    np.testing.assert_array_equal(np.array(list(answer["probabilities"].values()), dtype=np.float32), probs)
    assert answer["label"] == classes[int(probs.argmax())]
    assert answer["confidence"] == float(probs.max())


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height pixels, written row by row so that it never exists decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, idat = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8), b""
    for _ in range(height):
        idat += packer.compress(row)
    idat += packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------------------------------
# TestClient


def test_not_ready_until_loaded_and_warmed_up(run, home):
    app = create_app(run)
    cold = TestClient(app)  # not entered: the app has not started, so no model is loaded
    assert cold.get("/healthz").json() == {"status": "up"}
    r = cold.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"] == "1"
    r = cold.post("/v1/predict", json={"image": "", "text": "x"})
    assert r.status_code == 503 and r.json()["error"] == "not_ready"
    assert cold.get("/v1/info").status_code == 503
    assert "mmfuse_ready 0" in cold.get("/metrics").text
    with TestClient(app) as c:
        wait_ready(c)
        body = c.get("/readyz").json()
        assert body["status"] == "ready" and body["warmup_ms"] > 0  # the warm-up batch ran before ready
        assert "mmfuse_ready 1" in c.get("/metrics").text


def test_predict_multipart_json_and_batch_match_the_library(client, predictor, rows):
    classes = predictor.classes
    for row in rows[:3]:
        expected = predictor.predict([row["path"]], [row["text"]]).probs[0]
        r = client.post("/v1/predict", **multipart(row["path"], row["text"]))
        assert r.status_code == 200, r.text
        assert_same(r.json(), expected, classes)
        r = client.post("/v1/predict", json={"image": b64(row["path"]), "text": row["text"]})
        assert_same(r.json(), expected, classes)
        # A data URL, as a browser's FileReader gives it
        r = client.post("/v1/predict", json={"image": "data:image/png;base64," + b64(row["path"]), "text": row["text"]})
        assert_same(r.json(), expected, classes)

    batch = rows[:10]
    expected = predictor.predict([r["path"] for r in batch], [r["text"] for r in batch]).probs
    r = client.post("/v1/predict", json={"items": [{"image": b64(x["path"]), "text": x["text"]} for x in batch]})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == len(batch)
    for answer, probs in zip(items, expected):
        assert_same(answer, probs, classes)
    # the model has learnt the toy task: most answers are the true labels
    assert np.mean([a["label"] == x["label"] for a, x in zip(items, batch)]) >= 0.6


def test_info(client, run, predictor):
    info = client.get("/v1/info").json()
    assert info["classes"] == predictor.classes
    assert info["towers"] == json.loads((run / "towers.json").read_text())
    assert info["metrics"] == json.loads((run / "metrics.json").read_text())
    assert info["fusion"] == "concat" and info["modalities"] == ["image", "text"]
    assert info["inputs"]["text"]["required"] is True and info["inputs"]["image"]["required"] is True
    assert info["inputs"]["max_upload_bytes"] == UPLOAD_LIMIT
    assert info["version"] == mmfuse.__version__


def test_page_and_metrics(client, rows):
    # One answered request of its own: the counters below must not depend on the tests that ran before this one.
    assert client.post("/v1/predict", **multipart(rows[0]["path"], rows[0]["text"])).status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "v1/predict" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN: it works offline
    text = client.get("/metrics").text
    for name in (
        "mmfuse_requests_total",
        "mmfuse_rows_total",
        "mmfuse_batch_seconds_count",
        "mmfuse_request_seconds_sum",
    ):
        assert name in text
    assert re.search(r'mmfuse_requests_total\{status="200"\} \d+', text)


def bad_requests(rows) -> dict:
    """name -> (request kwargs, expected status, expected error code)."""
    img, text = rows[0]["path"], rows[0]["text"]
    jpeg = io.BytesIO()
    Image.open(img).convert("RGB").save(jpeg, "JPEG")
    png = lambda data: {"files": {"image": ("x.png", data, "image/png")}, "data": {"text": text}}  # noqa: E731
    multi = "multipart/form-data; boundary=XyZ"
    return {
        "truncated JPEG": (png(jpeg.getvalue()[: len(jpeg.getvalue()) // 2]), 422, "bad_image"),
        "not an image": (png(b"GIF89a but not really"), 422, "bad_image"),
        "0-byte image": (png(b""), 422, "empty_image"),
        "empty body": ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "empty_body"),
        "upload too large": (png(b"\0" * (UPLOAD_LIMIT + 1)), 413, "upload_too_large"),
        "upload too large, chunked": (
            {"content": iter([b"{" + b" " * 2**20] * 3), "headers": {"content-type": "application/json"}},
            413,
            "upload_too_large",
        ),
        "20k x 20k PNG": (png(huge_png(20_000, 20_000)), 413, "image_too_large"),
        "text too long": ({"json": {"image": b64(img), "text": "a" * 1001}}, 422, "text_too_long"),
        "non-UTF-8 text": (
            {
                "files": {"image": ("x.png", img.read_bytes(), "image/png")},
                "data": {"text": "caf\xe9".encode("latin-1")},
            },
            422,
            "bad_text",
        ),
        "lone surrogate": (
            {
                "content": b'{"image": "%s", "text": "a\\ud800"}' % b64(img).encode(),
                "headers": {"content-type": "application/json"},
            },
            422,
            "bad_text",
        ),
        "missing text (multipart)": (multipart(img, None), 422, "missing_text"),
        "empty text (JSON)": ({"json": {"image": b64(img), "text": "  "}}, 422, "missing_text"),
        "missing image": ({"json": {"text": text}}, 422, "missing_image"),
        "text/plain": ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        "no content type": ({"content": b"hello"}, 415, "unsupported_media_type"),
        "malformed JSON": (
            {"content": b'{"image": ', "headers": {"content-type": "application/json"}},
            400,
            "bad_json",
        ),
        "body not UTF-8": (
            {"content": b'{"text": "\xff"}', "headers": {"content-type": "application/json"}},
            400,
            "bad_json",
        ),
        "JSON list": ({"json": [1, 2]}, 422, "bad_json"),
        "image a number": ({"json": {"image": 5, "text": text}}, 422, "bad_json"),
        "text a list": ({"json": {"image": b64(img), "text": ["a"]}}, 422, "bad_json"),
        "unknown field": ({"json": {"image": b64(img), "txt": text}}, 422, "bad_json"),
        "bad base64": ({"json": {"image": "not base64!", "text": text}}, 422, "bad_image"),
        "items not a list": ({"json": {"items": {"image": b64(img)}}}, 422, "bad_json"),
        "items empty": ({"json": {"items": []}}, 422, "bad_json"),
        "item not an object": ({"json": {"items": ["x"]}}, 422, "bad_json"),
        "bad item in a batch": (
            {"json": {"items": [{"image": b64(img), "text": text}, {"image": b64(img), "text": 3}]}},
            422,
            "bad_json",
        ),
        "too many items": ({"json": {"items": [{"image": "", "text": "x"}] * 17}}, 413, "too_many_items"),
        "multipart without boundary": (
            {"content": b"x", "headers": {"content-type": "multipart/form-data"}},
            400,
            "bad_multipart",
        ),
        "multipart cut short": (
            {
                "content": b'--XyZ\r\nContent-Disposition: form-data; name="text"\r\n\r\nabc',
                "headers": {"content-type": multi},
            },
            400,
            "bad_multipart",
        ),
        "unknown form field": (
            {"files": {"picture": ("x.png", img.read_bytes(), "image/png")}, "data": {"text": text}},
            422,
            "bad_form",
        ),
    }


def test_bad_requests_get_a_4xx_naming_the_problem(client, predictor, rows):
    for name, (kwargs, status, code) in bad_requests(rows).items():
        r = client.post("/v1/predict", **kwargs)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
        body = r.json()
        assert body["error"] == code and body["message"], name
        assert "Traceback" not in r.text and 'File "' not in r.text, name
    for path, method, status in (("/v1/predict", "get", 405), ("/nowhere", "get", 404)):
        r = getattr(client, method)(path)
        assert r.status_code == status and "error" in r.json()
    text = client.get("/metrics").text
    assert 'mmfuse_requests_total{status="413"}' in text and 'mmfuse_requests_total{status="422"}' in text
    # and the server still answers, correctly
    row = rows[1]
    r = client.post("/v1/predict", **multipart(row["path"], row["text"]))
    assert_same(r.json(), predictor.predict([row["path"]], [row["text"]]).probs[0], predictor.classes)


def test_a_model_with_modality_dropout_takes_missing_text(dropout_run, rows):
    predictor = mmfuse.load(dropout_run)
    with TestClient(create_app(dropout_run)) as c:
        wait_ready(c)
        info = c.get("/v1/info").json()
        assert info["inputs"]["text"]["required"] is False and info["modality_dropout"] == 0.3
        path = rows[0]["path"]
        expected = predictor.predict([path], [""]).probs[0]
        assert_same(c.post("/v1/predict", **multipart(path, None)).json(), expected, predictor.classes)
        assert_same(c.post("/v1/predict", json={"image": b64(path)}).json(), expected, predictor.classes)


def test_rows_are_batched_up_to_max_batch(run, predictor, rows, caplog):
    caplog.set_level("INFO", logger="mmfuse.inference.serve")
    with TestClient(create_app(run, max_batch=4, max_wait_ms=200)) as c:
        wait_ready(c)
        caplog.clear()
        # One request of 10 rows runs as batches of 4, 4 and 2 rows: as predict does with batch_size=4.
        batch = rows[:10]
        body = {"items": [{"image": b64(x["path"]), "text": x["text"]} for x in batch]}
        items = c.post("/v1/predict", json=body).json()["items"]
        expected = predictor.predict([x["path"] for x in batch], [x["text"] for x in batch], batch_size=4).probs
        for answer, probs in zip(items, expected):
            assert_same(answer, probs, predictor.classes)
        sizes = [int(m) for m in re.findall(r"batch rows=(\d+)", caplog.text)]
        assert sizes == [4, 4, 2], caplog.text

        # Concurrent single-row requests share batches, never more than 4 rows each.
        caplog.clear()
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda x: c.post("/v1/predict", **multipart(x["path"], x["text"])).json(), rows[:12])
            )
        expected = predictor.predict([x["path"] for x in rows[:12]], [x["text"] for x in rows[:12]]).probs
        for answer, probs in zip(answers, expected):
            # another batch's texts may pad this row's tokens further: the same answer up to float rounding
            assert answer["label"] == predictor.classes[int(probs.argmax())]
            np.testing.assert_allclose(list(answer["probabilities"].values()), probs, atol=1e-5)
        sizes = [int(m) for m in re.findall(r"batch rows=(\d+)", caplog.text)]
        assert sum(sizes) == 12 and max(sizes) <= 4 and len(sizes) < 12, sizes


class _SlowModel:
    """Stands in for a Predictor: each batch after the warm-up waits for ``go``."""

    classes = ["a", "b"]

    def __init__(self):
        self.model = type("M", (), {"modalities": ["text"]})()
        self.go = threading.Event()
        self.calls = 0

    def predict(self, images, texts, batch_size=32):
        self.calls += 1
        if self.calls > 1:
            self.go.wait(10)
        return mmfuse.Prediction(["a"] * len(texts), np.tile([[0.75, 0.25]], (len(texts), 1)), self.classes)


def test_a_full_queue_answers_503_and_recovers():
    model = _SlowModel()
    batcher = Batcher(lambda: model, max_batch=1, max_wait_s=0, queue_rows=2, metrics=Metrics())
    batcher.start()
    assert batcher.ready.wait(10)
    running = batcher.submit(None, ["x"])
    while batcher.queued_rows:  # until the model thread holds it
        time.sleep(0.01)
    queued = [batcher.submit(None, ["y"]), batcher.submit(None, ["z"])]
    with pytest.raises(RequestError) as e:
        batcher.submit(None, ["one too many"])
    assert e.value.status == 503 and e.value.code == "queue_full" and e.value.headers["Retry-After"]
    model.go.set()
    for future in (running, *queued):
        np.testing.assert_array_equal(future.result(10), [[0.75, 0.25]])
    batcher.submit(None, ["room again"]).result(10)
    batcher.stop()


# ---------------------------------------------------------------------------------------------------------------------
# the CLI and a real server


def test_import_mmfuse_does_not_import_fastapi():
    code = "import sys, mmfuse, mmfuse.cli; sys.exit('fastapi' in sys.modules or 'uvicorn' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(SRC)})


def test_serve_without_fastapi_says_what_to_install(run, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", str(run)]) == 2
    assert "pip install 'mmfuse[serve]'" in capsys.readouterr().err


def test_serve_keeps_torchs_idle_threads_from_spinning_unless_told(run, monkeypatch):
    """OMP_WAIT_POLICY is read when torch loads: serve sets it before its import (a user's own value wins)."""
    import mmfuse.inference.serve.app as app

    seen = []
    monkeypatch.setattr(app, "serve", lambda *a, **k: seen.append(os.environ.get("OMP_WAIT_POLICY")) or 0)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["serve", str(run)]) == 0
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["serve", str(run)]) == 0
    assert seen == ["PASSIVE", "ACTIVE"]


def test_serve_refuses_a_folder_that_is_no_run_and_a_busy_port(run, tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "not an mmfuse run directory" in capsys.readouterr().err
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(run), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def Server(run: Path, *args: str):  # noqa: N802 - stands for the benchmark's class
    """``mmfuse serve RUN --port 0`` in a subprocess, the port read from its log: the load benchmark's own."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from serve import Server as BenchServer

    return BenchServer(run, *args, timeout=120)


@pytest.mark.slow  # a real server subprocess
def test_real_server_under_concurrent_load_then_sigterm(run, predictor, rows, home):
    server = Server(run)
    try:
        expected = predictor.predict([x["path"] for x in rows], [x["text"] for x in rows]).probs
        bodies = [(x["path"].read_bytes(), x["text"]) for x in rows]

        def client(k: int) -> list[tuple[int, dict]]:
            out = []
            with httpx.Client(base_url=server.url, timeout=60) as http:
                for j in range(20):
                    i = (k * 20 + j) % len(rows)
                    image, text = bodies[i]
                    r = http.post("/v1/predict", files={"image": ("x.png", image)}, data={"text": text})
                    out.append((i, r.status_code, r.json()))
            return out

        with ThreadPoolExecutor(8) as pool:
            results = [x for part in pool.map(client, range(8)) for x in part]
        assert len(results) == 160
        for i, status, answer in results:
            assert status == 200, answer
            assert answer["label"] == predictor.classes[int(expected[i].argmax())]
            np.testing.assert_allclose(list(answer["probabilities"].values()), expected[i], atol=1e-5)
        assert 'mmfuse_requests_total{status="200"} 160' in httpx.get(server.url + "/metrics").text

        # The README's curl examples, multipart and JSON
        if shutil.which("curl") and shutil.which("base64"):
            path, text, label = rows[0]["path"], rows[0]["text"], predictor.classes[int(expected[0].argmax())]
            multi = f'curl -s -F image=@{path} -F text="{text}" {server.url}/v1/predict'
            json_ = (
                f"curl -s -H 'Content-Type: application/json' {server.url}/v1/predict "
                f'-d "{{\\"image\\": \\"$(base64 -w0 {path})\\", \\"text\\": \\"{text}\\"}}"'
            )
            for cmd in (multi, json_):
                out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout
                assert json.loads(out)["label"] == label, (cmd, out)

        # A request in flight when SIGTERM arrives is answered before the process ends.
        batch = {"items": [{"image": base64.b64encode(b).decode(), "text": t} for b, t in bodies[:12]] * 5}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, server.url + "/v1/predict", json=batch, timeout=60)
            while "mmfuse_requests_in_flight 1" not in httpx.get(server.url + "/metrics").text:
                assert not pending.done(), pending.result().text
                time.sleep(0.005)
            server.proc.send_signal(signal.SIGTERM)
            r = pending.result()
        assert r.status_code == 200 and len(r.json()["items"]) == 60
        assert server.stop() == 0, "".join(server.log)
        assert "Traceback" not in "".join(server.log)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------------------------
# the page in a real browser


@pytest.mark.slow  # the browser
@pytest.mark.parametrize("size", [(1000, 800), (390, 844)], ids=["desktop", "phone"])
def test_page_in_a_real_browser(dropout_run, rows, tmp_path, size, home):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    predictor = mmfuse.load(dropout_run)
    row = rows[2]
    both = predictor.predict([row["path"]], [row["text"]])
    image_only = predictor.predict([row["path"]], [""])
    server = Server(dropout_run)
    driver = chrome(*size)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "submit").is_enabled())
        driver.find_element(By.ID, "file").send_keys(str(row["path"]))
        driver.find_element(By.ID, "text").send_keys(row["text"])
        submit_page(driver, wait)
        assert driver.find_element(By.ID, "label").text == both.labels[0]
        bars = driver.find_elements(By.CSS_SELECTOR, "#fusion .bar .name")
        assert [b.get_attribute("textContent") for b in bars] == predictor.classes
        # Trained with modality dropout: the image-only answer is shown beside it.
        panel = driver.find_element(By.ID, "image-only")
        assert panel.is_displayed() and panel.find_element(By.CSS_SELECTOR, ".label").text == image_only.labels[0]
        # Nothing is wider than the window (a phone would scroll sideways).
        inner, client, scroll = driver.execute_script(
            "const e = document.documentElement; return [window.innerWidth, e.clientWidth, e.scrollWidth]"
        )
        assert inner == size[0] and scroll <= client
        shot = tmp_path / f"page-{size[0]}x{size[1]}.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
    finally:
        driver.quit()
        assert server.stop() == 0
