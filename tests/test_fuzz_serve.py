"""mmfuse serve against generated requests: Schemathesis cases from the app's own /openapi.json (valid and invalid
bodies, images that decode and images that do not), with the method, query, headers and body further mangled by
Hypothesis, sent in-process to the ASGI app. Every answer is below 500, every refusal is a JSON 4xx that says what is
wrong, and the server still answers a correct request correctly afterwards.

    pytest tests/test_fuzz_serve.py            # the fast tier: the schema, and the fixes the fuzzing led to
    pytest -m slow tests/test_fuzz_serve.py    # the fuzzing: at least FUZZ_REQUESTS requests per endpoint
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import requests
import schemathesis
from conftest import read_csv
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import mmfuse
from mmfuse.inference.serve.app import create_app

FUZZ_REQUESTS = 1000  # per endpoint, in the slow tier
UPLOAD_LIMIT = 256 * 2**10  # small limits, so that generated bodies reach them
MAX_TEXT = 500
MAX_ITEMS = 8
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
BASE = "http://testserver"


@st.composite
def image_files(draw) -> bytes:
    """An image file of any size, mode and format Pillow writes, at times cut short or with a byte changed."""
    mode, fmt = draw(
        st.sampled_from(
            [
                ("RGB", "PNG"),
                ("RGBA", "PNG"),
                ("L", "PNG"),
                ("P", "PNG"),
                ("1", "PNG"),
                ("I;16", "PNG"),
                ("LA", "PNG"),
                ("RGB", "JPEG"),
                ("L", "JPEG"),
                ("CMYK", "JPEG"),
                ("P", "GIF"),
                ("RGB", "BMP"),
                ("RGBA", "WEBP"),
            ]  # fmt: skip
        )
    )
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(Image.new(mode, (1, 1)).getbands())))
    img = Image.fromarray(pixels.astype(np.uint8).squeeze(-1) if pixels.shape[-1] == 1 else pixels.astype(np.uint8))
    img = img.convert(mode) if img.mode != mode else img
    out = io.BytesIO()
    img.save(out, fmt)
    data = out.getvalue()
    damage = draw(st.sampled_from(["none", "none", "cut", "flip"]))
    if damage == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    return data


# The form's image part and the JSON's base64 image: real image files rather than Schemathesis's random bytes, which
# never decode, so that requests get past the image check to the model.
schemathesis.openapi.media_type("image/png", image_files())
schemathesis.openapi.format("byte", image_files().map(lambda data: base64.b64encode(data).decode()))

ODD_CONTENT_TYPES = [
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "multipart/form-data; boundary=x",
    'multipart/form-data; boundary="a b"',
    "multipart/form-data; boundary=\xe9\xe9",
    "multipart/mixed; boundary=x",
    "application/json; charset=latin-1",
    "APPLICATION/JSON",
    "text/plain",
    "application/x-www-form-urlencoded",
    "image/png",
    "",
    ";",
]
ODD_LENGTHS = ["0", "-1", "1e3", "\xb2", "\xbd", " 12", "99999999999999999999999", "0x10", ""]


def header_text() -> st.SearchStrategy[str]:
    """A header value as HTTP carries it: Latin-1 (raw_asgi sends its bytes), no line breaks."""
    return st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)


@st.composite
def mangled(draw, case_strategy) -> tuple[str, str, dict, bytes | None]:
    """A Schemathesis case as (method, url, headers, body), at times with its method, query, Content-Type,
    Content-Length or body replaced."""
    case = draw(case_strategy)
    prepared = requests.Request(**_request_kwargs(case)).prepare()
    method, url, body = prepared.method, prepared.url, prepared.body
    headers = {k: v for k, v in prepared.headers.items() if k.lower() != "content-length"}
    if isinstance(body, str):
        body = body.encode("utf-8")
    for change in draw(st.sets(st.sampled_from(["method", "query", "type", "length", "body", "header"]), max_size=3)):
        if change == "method":
            method = draw(st.sampled_from(METHODS))
        elif change == "query":
            pairs = draw(st.lists(st.tuples(st.text(max_size=10), st.text(max_size=20)), min_size=1, max_size=3))
            url = requests.Request("GET", url, params=pairs).prepare().url
        elif change == "type":
            headers["Content-Type"] = draw(st.sampled_from(ODD_CONTENT_TYPES) | header_text())
        elif change == "length":
            headers["Content-Length"] = draw(st.sampled_from(ODD_LENGTHS) | header_text())
        elif change == "body":
            body = draw(st.binary(max_size=300) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "replace")))
        else:
            headers[draw(st.sampled_from(["Accept", "Content-Encoding", "Transfer-Encoding", "X-Any"]))] = draw(
                header_text()
            )
    return method, url, headers, body


def _request_kwargs(case) -> dict:
    kwargs = case.as_transport_kwargs(base_url=BASE)
    return {k: kwargs[k] for k in ("method", "url", "headers", "params", "files", "data", "json") if k in kwargs}


def check_answer(r: Answer, method: str, url: str, classes: list[str], what: str) -> None:
    """The properties of every answer: no 5xx; a refusal is JSON that names what is wrong; a 200 from predict is
    a distribution over the run's classes."""
    assert r.status < 500, f"{what}: {r.status} {r.body[:300]!r}"
    if r.status >= 400:
        assert r.headers.get("content-type", "").startswith("application/json"), f"{what}: {r.headers} {r.body[:200]!r}"
        body = json.loads(r.body)
        reason = body.get("message") or body.get("detail")
        assert isinstance(body.get("error"), str) and body["error"], f"{what}: {body}"
        assert isinstance(reason, str) and reason.strip(), f"{what}: {body}"
        assert b"Traceback" not in r.body, what
    elif r.status == 200 and method == "POST" and urlsplit(url).path == "/v1/predict":
        body = json.loads(r.body)
        for answer in body.get("items", [body]):
            assert list(answer["probabilities"]) == classes, what
            assert answer["label"] in classes and abs(sum(answer["probabilities"].values()) - 1) < 1e-4, what


@pytest.fixture(scope="module")
def home(module_home):
    """The module's runs train in the shared warm home."""
    return module_home


@pytest.fixture(scope="module")
def served(head_run, home):
    """(client, schema) for the shared head run, ready to answer; small limits so that fuzzed bodies reach them."""
    app = create_app(head_run, max_upload_bytes=UPLOAD_LIMIT, max_text_chars=MAX_TEXT, max_items=MAX_ITEMS)
    with TestClient(app, base_url=BASE, raise_server_exceptions=False, follow_redirects=False) as client:
        for _ in range(2400):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the app never became ready")
        # From the client, not from_asgi: that would start the app's lifespan, and so a second model, of its own.
        yield client, schemathesis.openapi.from_dict(client.get("/openapi.json").json())


@pytest.fixture(scope="module")
def good(toy_data, head_run, home):
    """A correct request and the library's answer to it."""
    row = read_csv(toy_data / "test.csv")[0]
    path = toy_data / row["image"]
    return path, row["text"], mmfuse.load(head_run).predict([path], [row["text"]]).probs[0]


def assert_still_correct(client, good, classes) -> None:
    path, text, probs = good
    r = client.post("/v1/predict", files={"image": (path.name, path.read_bytes(), "image/png")}, data={"text": text})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.array(list(r.json()["probabilities"].values()), dtype=np.float32), probs)
    item = {"image": base64.b64encode(path.read_bytes()).decode(), "text": text}
    r = client.post("/v1/predict", json={"items": [item, item]})
    assert r.status_code == 200, r.text
    assert [a["label"] for a in r.json()["items"]] == [classes[int(probs.argmax())]] * 2


# ---------------------------------------------------------------------------------------------------------------------
# the fast tier: the schema the fuzzing reads, and what the fuzzing found


def test_openapi_describes_every_route_and_both_predict_bodies(served):
    client, schema = served
    doc = client.get("/openapi.json").json()
    routes = {(r.path, m) for r in client.app.routes for m in getattr(r, "methods", ()) if r.path != "/openapi.json"}
    described = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert described == {(p, m) for p, m in routes if m != "HEAD"}
    body = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    form = body["multipart/form-data"]["schema"]
    assert form["properties"]["image"]["format"] == "binary" and form["properties"]["text"]["maxLength"] == MAX_TEXT
    assert body["application/json"]["schema"]["oneOf"][1]["properties"]["items"]["maxItems"] == MAX_ITEMS
    assert {"400", "413", "415", "422", "503"} <= set(doc["paths"]["/v1/predict"]["post"]["responses"])
    assert len(list(schema.get_all_operations())) == len(described)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_asgi(client: TestClient, method: str, url: str, headers: dict[str, str | bytes], body: bytes | None) -> Answer:
    """One request straight to the ASGI app, in the client's event loop, with the header bytes as a real server
    passes them on: the test client re-encodes a Latin-1 header value as UTF-8 (which hid a 500, below)."""
    parts = urlsplit(url)
    raw = [(b"host", b"testserver")]
    raw += [(k.lower().encode(), v if isinstance(v, bytes) else v.encode("latin-1")) for k, v in headers.items()]
    if body and not any(k == b"content-length" for k, _ in raw):
        raw.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(parts.path),
        "raw_path": parts.path.encode(),
        "query_string": parts.query.encode(),
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    sent, chunks = [], [body or b""]

    async def receive():
        return {"type": "http.request", "body": chunks.pop() if chunks else b"", "more_body": False}

    async def send(message):
        sent.append(message)

    try:
        client.portal.call(client.app, scope, receive, send)
    except Exception:  # Starlette answers 500, then raises the error again for the server to log
        if not sent:
            raise
    start = next(m for m in sent if m["type"] == "http.response.start")
    return Answer(
        start["status"],
        {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start.get("headers", [])},
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"),
    )


@pytest.mark.parametrize("length", [b"\xb2", b"\xb9", b"1e3", b"-1", b"0x10"])
def test_a_content_length_that_is_no_decimal_number_is_a_400(served, length):
    """str.isdigit() holds for '\xb2' (superscript two) and int() refuses it: that was a 500."""
    client, _ = served
    headers = {"Content-Type": "application/json", "Content-Length": length}
    r = raw_asgi(client, "POST", f"{BASE}/v1/predict", headers, b'{"text": "x"}')
    body = json.loads(r.body)
    assert r.status == 400 and body["error"] == "bad_content_length" and "Content-Length" in body["message"], body


# ---------------------------------------------------------------------------------------------------------------------
# the slow tier: the fuzzing


def fuzz_operation(client, op, classes: list[str], sent: Counter, statuses: Counter) -> None:
    """FUZZ_REQUESTS generated requests to one operation: Schemathesis's valid and invalid cases, mangled."""
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    cases = st.one_of(*(op.as_strategy(generation_mode=m) for m in modes if _can_generate(op, m)))

    @settings(
        max_examples=FUZZ_REQUESTS * (3 if op.body else 1),  # the one operation with a body gets more
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=["generate", "shrink"],
    )
    @given(request=mangled(cases))
    def fuzz(request):
        method, url, headers, body = request
        r = raw_asgi(client, method, url, headers, body)
        sent[op.path] += 1
        statuses[op.path, r.status] += 1
        check_answer(r, method, url, classes, f"{method} {url} {headers} {body[:200] if body else body!r}")

    fuzz()


@pytest.mark.slow
def test_fuzzed_requests_get_no_5xx_and_json_refusals(served, good):
    client, schema = served
    classes = client.get("/v1/info").json()["classes"]
    sent: Counter = Counter()
    statuses: Counter = Counter()
    for result in schema.get_all_operations():
        start = time.perf_counter()
        fuzz_operation(client, result.ok(), classes, sent, statuses)
        print(f"{result.ok().label}: {sent[result.ok().path]} requests in {time.perf_counter() - start:.1f} s")
        assert_still_correct(client, good, classes)
    print(f"statuses: {dict(sorted(statuses.items()))}")
    assert set(sent) == {op.ok().path for op in schema.get_all_operations()}
    assert min(sent.values()) >= FUZZ_REQUESTS, sent
    # Among the generated predictions, both answered and refused ones
    assert statuses["/v1/predict", 200] > 0 and statuses["/v1/predict", 422] > 0, statuses


def _can_generate(op, mode) -> bool:
    """Whether Schemathesis can make a case of this mode (an operation with no inputs has no invalid ones)."""
    return mode == schemathesis.GenerationMode.POSITIVE or op.body or any(True for _ in op.iter_parameters())
