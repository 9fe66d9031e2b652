"""`clip4str serve`: HTTP API (FastAPI) and a web page; requests are batched for the model."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import threading
from importlib import resources

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from clip4str.data.transforms import ImageDecodeError, load_image, open_image
from clip4str.reading import window_count
from clip4str.serve.batching import Batcher, QueueFull

MAX_PIXELS = 16_000_000  # per image: a word crop never needs more; larger ones are refused as bombs
REQUEST_PIXELS = 64_000_000  # per request, so that many compressible images cannot exhaust memory either


class ImageRefused(ValueError):
    """An image or request over one of the server's limits (HTTP 413)."""


class UnsupportedType(ValueError):
    """A request body of a content type the API does not take (HTTP 415)."""


class ReadItem(BaseModel):
    """One image's reading."""

    name: str
    text: str
    confidence: float
    char_probs: list[float]
    attention_png: str | None = None


class ReadResponse(BaseModel):
    """Results in request order."""

    results: list[ReadItem]


class JsonImages(BaseModel):
    """JSON request body: base64-encoded image files, optionally named."""

    images: list[str]
    names: list[str] | None = None


class ErrorResponse(BaseModel):
    """A 4xx/5xx answer."""

    error: str


def _error(status: int, message: str, close: bool = False) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"} if close else None)


# The request body of POST /v1/read for the OpenAPI schema (the endpoint parses it itself, to bound its work).
READ_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "description": "base64 (or a data: URL)"}},
        "names": {"type": "array", "items": {"type": "string"}}}}}}}


def _base64_image(data: str) -> bytes:
    """An image file from base64 as clients send it: plain, wrapped in lines (MIME), URL-safe, or a data URL."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    data = "".join(data.split())
    if "-" in data or "_" in data:
        data = data.replace("-", "+").replace("_", "/")
    return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)


def _decode(name: str, data: bytes, budget: list[int], windows: list[int], window_aspect: float,
            max_windows: int) -> tuple[Image.Image, int]:
    """The image and its windows of model work; refuses bombs and crops over the window limits before decoding
    any pixels (a 20000x1 PNG is 101 bytes and 5,000 windows)."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        with open_image(data) as probe:  # header only: refuse bombs before decoding pixels
            size = probe.size
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{name}: refused, too many pixels for a word crop (decompression bomb?)") from e
    except (OSError, ValueError) as e:
        raise ImageDecodeError(f"{name}: could not be decoded as an image ({e.__class__.__name__})") from e
    if size[0] * size[1] > MAX_PIXELS:
        raise ImageDecodeError(f"{name}: {size[0]}x{size[1]} pixels is more than {MAX_PIXELS}; send a word crop")
    n = window_count(size[0], size[1], window_aspect)
    if n > max_windows:
        raise ImageRefused(f"{name}: a {size[0]}x{size[1]} image is read in {n} windows; the server reads at most "
                           f"{max_windows} per image (crop it to the text, or split it)")
    budget[0] -= size[0] * size[1]
    windows[0] -= n
    if budget[0] < 0:
        raise ImageDecodeError(f"{name}: the images of this request hold more than {REQUEST_PIXELS} pixels")
    if windows[0] < 0:
        raise ImageRefused(f"{name}: the images of this request need more than the {windows[1]} windows of model "
                           "work the server takes per request; send fewer or shorter crops")
    try:
        return load_image(data), n
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{name}: could not be decoded ({e})") from e


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it passes `limit` bytes (also for chunked uploads, which carry no
    Content-Length): nothing past the limit is buffered."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's cache: request.form() parses this instead of the consumed stream
    return body


def create_app(recognizer, max_batch: int = 32, max_upload_mb: float = 10.0, max_images: int = 64,
               max_wait_ms: float = 5.0, max_windows: int = 24, max_request_windows: int = 256,
               max_queue_windows: int = 512, decode_options: dict | None = None, body_seconds: float = 60.0
               ) -> FastAPI:
    """The ASGI app around a Recognizer (PyTorch or ONNX backend). Work is bounded in windows (a long crop is
    read in several): per image, per request and in the queue; where the second look is on, a window may be read
    up to three times. decode_options: keywords of every read (guard, rescore, cascade, second_look; the model's
    defaults otherwise). An upload must arrive within `body_seconds` (60: 10 MB at 170 kB/s), or 408: a slow
    body holds no task forever."""
    app = FastAPI(title="clip4str", version="1", description="CLIP4STR scene text recognition")

    # Every error answer has the documented shape {"error": ...}, FastAPI's own (a bad query value, 404, 405) too.
    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg', '')}" for err in e.errors())
        return _error(400, f"bad request ({where})")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    schema = app.openapi

    def openapi() -> dict:
        """The schema without the 422 FastAPI lists for every parameter: bad values get 400 {"error": ...}."""
        doc = schema()
        for operation in (op for path in doc.get("paths", {}).values() for op in path.values()):
            operation.get("responses", {}).pop("422", None)
        return doc

    app.openapi = openapi
    model_lock = threading.Lock()  # the batcher and attention maps share one model (and its recording flags)

    def read_batch(images: list[Image.Image]) -> list:
        with model_lock:
            return recognizer.read(images, batch_size=max_batch, max_windows=max_windows, **(decode_options or {}))

    batcher = Batcher(read_batch, max_batch, max_wait_ms, max_queue_windows)
    limit = int(max_upload_mb * 2**20)
    app.state.batcher = batcher

    @app.middleware("http")
    async def limit_upload(request: Request, call_next):  # noqa: ANN001, ANN202
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit() and int(length) > limit:
            return _error(413, f"upload of {int(length)} bytes is over the {max_upload_mb:g} MB limit")
        return await call_next(request)

    @app.on_event("shutdown")
    def _close() -> None:
        batcher.close()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    def model_info() -> dict:
        cfg = getattr(recognizer, "config", None) or recognizer.cfg
        cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
        model = getattr(recognizer, "model", None)
        return {"preset_towers": cfg["clip"], "charset": cfg["charset"], "image_size": cfg["clip"]["vision_cfg"]
                ["image_size"], "decoding": {"mode": cfg["decode_mode"], "refine_iters": cfg["refine_iters"],
                                           "cascade_confidence": cfg.get("cascade_confidence"),
                                           "second_look_confidence": cfg.get("second_look_confidence"),
                                           **(decode_options or {})},
                "cross_branch": cfg["cross_branch"], "provenance": getattr(model, "provenance", {}),
                "backend": "torch" if model is not None else "onnx",
                "device": str(recognizer.device) if model is not None else "cpu", "max_batch": max_batch,
                "limits": {"upload_mb": max_upload_mb, "images_per_request": max_images,
                           "windows_per_image": max_windows, "windows_per_request": max_request_windows,
                           "queued_windows": max_queue_windows, "pixels_per_image": MAX_PIXELS,
                           "pixels_per_request": REQUEST_PIXELS}}

    @app.post("/v1/read", response_model=ReadResponse, openapi_extra={"requestBody": READ_BODY},
              responses={400: {"model": ErrorResponse}, 408: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                         415: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def read(request: Request, attention: bool = Query(False, description="add attention strips (PNG)")):
        try:
            body = await asyncio.wait_for(_read_body(request, limit), body_seconds)
        except TimeoutError:
            # Connection: close, or the unread rest of the body would keep the connection (and its task) open.
            return _error(408, f"the upload did not arrive within {body_seconds:g} s; send it again", close=True)
        if body is None:
            return _error(413, f"upload over the {max_upload_mb:g} MB limit", close=True)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not body:
            return _error(400, "no images in the request (empty body); send multipart files or JSON images")
        try:
            named = await _images_of(request, kind, body, max_images) if kind == "multipart/form-data" else \
                await asyncio.to_thread(_images_of_json, kind, body, max_images)  # parsing is CPU work
        except UnsupportedType as e:
            return _error(415, str(e))
        except ImageRefused as e:
            return _error(413, str(e))
        except ValueError as e:
            return _error(400, str(e))
        if not named:
            return _error(400, "no images in the request; send multipart files or JSON {\"images\": [base64]}")
        if len(named) > max_images:
            return _error(413, f"{len(named)} images in one request; at most {max_images}")
        budget, windows = [REQUEST_PIXELS], [max_request_windows, max_request_windows]
        aspect = recognizer.window_aspect
        try:  # decoding is CPU work: off the event loop
            decoded = await asyncio.to_thread(
                lambda: [_decode(name, data, budget, windows, aspect, max_windows) for name, data in named])
        except ImageRefused as e:
            return _error(413, str(e))
        except ImageDecodeError as e:
            return _error(400, str(e))
        images = [image for image, _ in decoded]
        try:
            results = await batcher.submit(images, [n for _, n in decoded])
        except QueueFull as e:
            return _error(503, f"server busy ({e}); retry shortly")
        items = []
        for (name, _), image, r in zip(named, images, results, strict=True):
            strip = await asyncio.to_thread(_attention, recognizer, image, r.text, model_lock) if attention else None
            items.append(ReadItem(name=name, text=r.text, confidence=r.confidence, char_probs=r.char_probs,
                                  attention_png=strip))
        return ReadResponse(results=items)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("clip4str.serve").joinpath("index.html").read_text(encoding="utf-8")

    return app


async def _images_of(request: Request, kind: str, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    try:  # Starlette stops parsing past max_files with an HTTPException of its own ({"detail": ...})
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
    except (HTTPException, MultiPartException) as e:
        reason = str(getattr(e, "detail", None) or getattr(e, "message", str(e)))
        if reason.startswith("Too many"):
            raise ImageRefused(f"multipart body refused: {reason}; at most {max_images} images per request") from e
        raise ValueError(f"bad multipart body: {reason}") from e
    files = [(f.filename or f"image{i}", await f.read()) for i, f in enumerate(form.getlist("files"))
             if hasattr(f, "read")]
    if not files and len(form):
        raise ValueError(f"no images in the request: the multipart body has field(s) {sorted(set(form.keys()))} "
                         "but no file in a field named 'files' (curl -F files=@word.png)")
    return files


def _images_of_json(kind: str, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    if kind == "application/json":
        try:
            payload = JsonImages.model_validate_json(body or b"{}")
        except ValueError as e:
            raise ValueError(f"bad JSON body: expected {{\"images\": [base64, ...]}} ({str(e)[:120]})") from e
        if len(payload.images) > max_images:  # before any per-image work: a body may list a million tiny strings
            raise ImageRefused(f"{len(payload.images)} images in one request; at most {max_images}")
        names = payload.names or [f"image{i}" for i in range(len(payload.images))]
        if len(names) != len(payload.images):
            raise ValueError(f"{len(names)} names for {len(payload.images)} images; give one name per image")
        out = []
        for i, (n, d) in enumerate(zip(names, payload.images, strict=True)):
            try:
                out.append((n, _base64_image(d)))
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"image {i} ({n!r}) is not valid base64 ({e})") from e
        return out
    raise UnsupportedType(f"unsupported content type {kind or 'none'!r}: use multipart/form-data or application/json")


def _attention(recognizer, image: Image.Image, text: str, lock: threading.Lock) -> str | None:
    """The attention strip of the reading `text` as a PNG data URL (PyTorch backend only)."""
    if not hasattr(recognizer, "model"):
        return None
    from clip4str.visualize import attention_strip

    buf = io.BytesIO()
    with lock:
        attention_strip(recognizer, image, buf, text)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
