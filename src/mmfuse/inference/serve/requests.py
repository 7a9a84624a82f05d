"""Reading a ``mmfuse serve`` request: the body within its limit, JSON or multipart items, images and texts checked.

Every check here runs before a row is queued, so a bad item is refused with a ``RequestError`` (a status, a code and a
message) rather than failing a batch that holds other requests' rows.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import MultipartParser, parse_options_header

from mmfuse import multilabel
from mmfuse.binary import Decision, predicted
from mmfuse.data.columns import Columns
from mmfuse.data.images import MAX_PIXELS, check_size, to_rgb
from mmfuse.inference.predictor import Predictor
from mmfuse.multilabel import Thresholds

MAX_UPLOAD_BYTES = 16 * 2**20
MAX_TEXT_CHARS = 10_000  # far past any text tower's max_length; only a bound on what a request may make us tokenize
MAX_ITEMS = 256


@dataclass(frozen=True)
class Fields:
    """What an item of a request holds: an image and a text, or a model's named columns (``data.columns.Columns``),
    each a field of its own: an image column's a file (or base64 in JSON), a text or tabular column's a value."""

    images: tuple[str, ...] = ("image",)
    texts: tuple[str, ...] = ("text",)
    tabular: tuple[str, ...] = ()
    columns: bool = False

    @classmethod
    def of(cls, predictor: Predictor) -> Fields:
        named = Columns.of(predictor.cfg.model)
        return cls() if named is None else cls(named.image, named.text, named.tabular, True)

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.images, *self.texts, *self.tabular)


class RequestError(Exception):
    """A request the server refuses: answered with ``status`` and a JSON body ``{"error": code, "message": ...}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


@dataclass
class Limits:
    """What one request may ask of the server."""

    max_upload_bytes: int = MAX_UPLOAD_BYTES
    """Largest request body; refused (413) as soon as it is declared or read past, never buffered whole."""
    max_pixels: int = MAX_PIXELS
    """Largest image in pixels, the decompression-bomb limit training uses; checked before decoding."""
    max_text_chars: int = MAX_TEXT_CHARS
    """Longest text, in characters."""
    max_items: int = MAX_ITEMS
    """Most items in one JSON batch request."""


# ---------------------------------------------------------------------------------------------------------------------
# the OpenAPI description (/openapi.json): the routes read their bodies themselves, so FastAPI cannot infer them

_REFUSAL = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "a stable code, e.g. bad_image"},
        "message": {"type": "string", "description": "what is wrong, in words"},
    },
}


def refusal(what: str, retry: bool = False) -> dict:
    """An OpenAPI response: a refusal's JSON body ``{"error": code, "message": ...}``."""
    out: dict = {"description": what, "content": {"application/json": {"schema": _REFUSAL}}}
    if retry:
        out["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
    return out


ANSWERS = {405: refusal("the route does not take this method")}
NOT_READY = {503: refusal("the model is loading, failed to load, or the queue is full", retry=True)}
PREDICT_ERRORS = {
    400: refusal("the body is empty, not JSON, not UTF-8 or a malformed multipart body"),
    413: refusal("the upload, the image or the batch is over its limit"),
    415: refusal("the Content-Type is neither multipart/form-data nor application/json"),
    422: refusal("an item is missing, of the wrong type, or does not decode"),
}
_ANSWER = {
    "type": "object",
    "required": ["label", "confidence", "probabilities"],
    "properties": {
        "label": {"type": "string"},
        "confidence": {"type": "number"},
        "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}


def predict_openapi(limits: Limits) -> dict:
    """The OpenAPI request body and answer of ``POST /v1/predict``: one item as a form (an image file and its text)
    or as JSON (the image in base64), or a JSON batch ``{"items": [...]}``."""
    text = {"type": "string", "maxLength": limits.max_text_chars, "description": "the item's text"}
    item = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "format": "byte", "description": "the image file in base64"},
            "text": text,
        },
    }
    batch = {
        "type": "object",
        "additionalProperties": False,
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": item, "minItems": 1, "maxItems": limits.max_items}},
    }
    form = {
        "type": "object",
        "additionalProperties": False,
        "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary", "description": "the image file"}, "text": text},
    }
    ok = {
        "oneOf": [
            _ANSWER,
            {"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": _ANSWER}}},
        ]
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": form,
                    "encoding": {"image": {"contentType": "image/png, image/jpeg, image/webp, image/gif, image/bmp"}},
                },
                "application/json": {"schema": {"oneOf": [item, batch]}},
            },
        },
        "responses": {
            "200": {
                "description": "the label, its confidence and every class's probability",
                "content": {"application/json": {"schema": ok}},
            }
        },
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it is declared or read past ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):  # isdigit() alone takes "²", which int() refuses
            raise RequestError(400, "bad_content_length", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise RequestError(413, "upload_too_large", _too_large(int(declared), limit))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, "upload_too_large", _too_large(None, limit))
    if not body:
        raise RequestError(400, "empty_body", "the request body is empty")
    return bytes(body)


def _too_large(size: int | None, limit: int) -> str:
    what = f"{size:,} bytes" if size is not None else "over the limit"
    return f"the upload is {what}; the limit is {limit:,} bytes ({limit / 2**20:.0f} MB, set by --max-upload-mb)"


def parse_json(body: bytes, limits: Limits, fields: Fields = Fields()) -> tuple[list[dict], bool]:
    """Items of a JSON body ``{"image": base64, "text": str}`` or ``{"items": [...]}``, and whether it was one item."""
    try:
        doc = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "bad_json", "the body is not UTF-8 text") from None
    except ValueError as e:
        raise RequestError(400, "bad_json", f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RequestError(422, "bad_json", f"the body must be a JSON object, not {_json_type(doc)}")
    if "items" not in doc:
        return [_item(doc, None, fields)], True
    if set(doc) != {"items"}:
        raise RequestError(
            422, "bad_json", f"a batch body holds only 'items'; also found {sorted(set(doc) - {'items'})}"
        )
    items = doc["items"]
    if not isinstance(items, list):
        raise RequestError(422, "bad_json", f"'items' must be a list of objects, not {_json_type(items)}")
    if not items:
        raise RequestError(422, "bad_json", "'items' is empty")
    if len(items) > limits.max_items:
        raise RequestError(413, "too_many_items", f"{len(items)} items; one request may hold {limits.max_items}")
    return [_item(item, i, fields) for i, item in enumerate(items)], False


def _item(item, i: int | None, fields: Fields) -> dict:
    where = "" if i is None else f"item #{i}: "
    if not isinstance(item, dict):
        what = "'image' and 'text'" if not fields.columns else f"the fields {list(fields.names)}"
        raise RequestError(422, "bad_json", f"{where}must be an object with {what}, not {_json_type(item)}")
    unknown = set(item) - set(fields.names)
    if unknown:
        has = "image and text" if not fields.columns else f"the model's columns {list(fields.names)}"
        raise RequestError(422, "bad_json", f"{where}unknown field(s) {sorted(unknown)}; an item has {has}")
    out = {name: item.get(name) for name in fields.names}
    for name in fields.images:
        image = out[name]
        if image is None:
            continue
        if not isinstance(image, str):
            raise RequestError(422, "bad_json", f"{where}'{name}' must be a base64 string, not {_json_type(image)}")
        if image.startswith("data:") and "," in image:  # a data URL, as a browser's FileReader gives
            image = image.split(",", 1)[1]
        try:
            out[name] = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, "bad_image", f"{where}'{name}' is not valid base64") from None
    for name in fields.texts:
        if out[name] is not None and not isinstance(out[name], str):
            raise RequestError(422, "bad_json", f"{where}'{name}' must be a string, not {_json_type(out[name])}")
    for name in fields.tabular:
        value = out[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise RequestError(
                422, "bad_json", f"{where}'{name}' must be a number or a string, not {_json_type(value)}"
            )
    return {**out, "index": i}


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def parse_multipart(body: bytes, content_type: str, fields: Fields = Fields()) -> dict:
    """The ``image`` and ``text`` parts of a multipart/form-data body, as raw bytes.

    Parsed here rather than by Starlette's form reader, which decodes a field that is not UTF-8 as Latin-1 (so the
    model would read mojibake) and spools uploads to disk with no size limit.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "bad_multipart", "multipart/form-data without a boundary")
    parts: list[dict] = []
    header = [bytearray(), bytearray()]
    ended = []

    def header_end():
        parts[-1]["headers"][bytes(header[0]).lower().strip()] = bytes(header[1])
        header[0].clear()
        header[1].clear()

    callbacks = {
        "on_part_begin": lambda: parts.append({"headers": {}, "data": bytearray()}),
        "on_part_data": lambda data, start, end: parts[-1]["data"].extend(data[start:end]),
        "on_header_field": lambda data, start, end: header[0].extend(data[start:end]),
        "on_header_value": lambda data, start, end: header[1].extend(data[start:end]),
        "on_header_end": header_end,
        "on_end": lambda: ended.append(True),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as e:  # python-multipart's parse errors; any of them means a malformed body
        raise RequestError(400, "bad_multipart", f"the multipart body is malformed: {e}") from None
    if not ended:
        raise RequestError(400, "bad_multipart", "the multipart body ends before its closing boundary")
    given: dict[str, bytes] = {}
    for part in parts:
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in fields.names:
            send = "'image' (a file) and 'text'" if not fields.columns else f"the model's columns {list(fields.names)}"
            raise RequestError(422, "bad_form", f"unknown form field {name!r}; send {send}")
        if name in given:
            raise RequestError(422, "bad_form", f"form field {name!r} given twice; send one item per request")
        given[name] = bytes(part["data"])
    out: dict = {"index": None}
    for name in fields.names:
        value = given.get(name)
        if value is not None and name not in fields.images:
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RequestError(422, "bad_text", f"'{name}' is not UTF-8 (byte {e.start})") from None
        elif fields.columns and value == b"":  # a file input left empty: an empty cell
            value = None
        out[name] = value
    return out


def decode_image(data: bytes | None, max_pixels: int, where: str = "") -> Image.Image:
    """An uploaded image as RGB, as training reads one: the size checked from the header before any decoding."""
    if data is None:
        raise RequestError(422, "missing_image", f"{where}no 'image'; this model needs one")
    if not data:
        raise RequestError(422, "empty_image", f"{where}the image upload is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            try:
                check_size(img, max_pixels)
            except ValueError as e:
                raise RequestError(413, "image_too_large", f"{where}{e}") from None
            img.load()
            rgb = to_rgb(img)
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(
            422, "bad_image", f"{where}the upload is not an image in a format Pillow reads (JPEG, PNG, WebP, ...)"
        ) from None
    except Exception as e:  # PIL raises many types for a corrupt file; all mean the same to the client
        raise RequestError(422, "bad_image", f"{where}the image cannot be decoded ({type(e).__name__}: {e})") from None
    if 0 in rgb.size:
        raise RequestError(422, "bad_image", f"{where}the image is empty ({rgb.size[0]}x{rgb.size[1]} pixels)")
    return rgb


def check_text(text: str | None, predictor: Predictor, limits: Limits, where: str = "", name: str = "text") -> str:
    text = text or ""
    if len(text) > limits.max_text_chars:
        raise RequestError(
            422, "text_too_long", f"{where}'{name}' is {len(text):,} characters; the limit is {limits.max_text_chars:,}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud800"
        raise RequestError(422, "bad_text", f"{where}'{name}' is not valid Unicode (a lone surrogate)") from None
    if not text.strip() and "text" in predictor.model.modalities and not predictor.accepts_missing_text:
        raise RequestError(
            422,
            "missing_text",
            f"{where}no 'text'; this model was trained without --modality-dropout and needs text with every image",
        )
    return text


def prepare(items: list[dict], predictor: Predictor, limits: Limits) -> tuple[list[Image.Image] | None, list]:
    """Checks every item and decodes its image: a bad item is refused before any row is queued. For a model with
    named columns: (None, one row dict per item, as ``Predictor.predict(rows=...)`` takes them)."""
    fields = Fields.of(predictor)
    if fields.columns:
        rows = []
        for item in items:
            where = "" if item["index"] is None else f"item #{item['index']}: "
            row = {
                c: decode_image(item[c], limits.max_pixels, f"{where}'{c}': ") if item[c] else None
                for c in fields.images
            }
            row |= {c: check_text(item[c], predictor, limits, where, c) for c in fields.texts}
            rows.append(row | {c: item[c] for c in fields.tabular})
        return None, rows
    uses_images = "image" in predictor.model.modalities
    images, texts = [], []
    for item in items:
        where = "" if item["index"] is None else f"item #{item['index']}: "
        texts.append(check_text(item["text"], predictor, limits, where))
        if uses_images:  # a text-only model reads no image, as predict(None, texts) reads none
            images.append(decode_image(item["image"], limits.max_pixels, where))
    return (images if uses_images else None), texts


def answer(
    probs: np.ndarray, classes: list[str], decision: Decision | None = None, thresholds: Thresholds | None = None
) -> dict:
    """One item's answer: its label (the argmax, or a binary run's ``decision``), that label's probability and all.
    With a multi-label run's ``thresholds``: its set (``labels``, in label order; ``label``, joined by |) and every
    label's probability."""
    if thresholds is not None:
        names = multilabel.label_sets(probs[None], classes, thresholds)[0]
        return {
            "labels": names,
            "label": multilabel.joined(names),
            "probabilities": {c: float(p) for c, p in zip(classes, probs)},
        }
    top = int(predicted(probs[None], classes, decision)[0])
    return {
        "label": classes[top],
        "confidence": float(probs[top]),
        "probabilities": {c: float(p) for c, p in zip(classes, probs)},
    }
