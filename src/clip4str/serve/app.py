"""`clip4str serve`: HTTP API (FastAPI) and a web page; requests are batched for the model."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from importlib import resources

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from clip4str.data.transforms import ImageDecodeError
from clip4str.serve.batching import Batcher, QueueFull
from clip4str.serve.uploads import (
    MAX_PIXELS,
    REQUEST_PIXELS,
    ImageRefused,
    UnsupportedType,
    decode_upload,
    images_of_form,
    images_of_json,
    read_body,
)


class ReadItem(BaseModel):
    """One image's reading."""

    name: str
    text: str
    confidence: float
    char_probs: list[float]
    attention_png: str | None = None
    error: str | None = None  # why this image was not read (its text is then empty)
    note: str | None = None  # the image does not look like a cropped word (a whole photo, say)


class ReadResponse(BaseModel):
    """Results in request order."""

    results: list[ReadItem]


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


def create_app(recognizer, max_batch: int = 32, max_upload_mb: float = 10.0, max_images: int = 64,
               max_wait_ms: float = 5.0, max_windows: int = 24, max_request_windows: int = 256,
               max_queue_windows: int = 512, decode_options: dict | None = None, body_seconds: float = 60.0,
               max_attention_images: int = 8) -> FastAPI:
    """The ASGI app around a Recognizer (PyTorch or ONNX backend). Work is bounded in windows (a long crop is
    read in several): per image, per request and in the queue; where the second look is on, a window may be read
    up to three times. decode_options: keywords of every read (guard, rescore, cascade, second_look; the model's
    defaults otherwise). An upload must arrive within `body_seconds` (60: 10 MB at 170 kB/s), or 408: a slow
    body holds no task forever. Attention strips (about 7x a reading's work each, outside the batcher's queue) are
    drawn for at most `max_attention_images` images at once, across requests; more is 413 or 503."""
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
    app.state.attention_in_flight = 0  # images whose strips are promised; the event loop alone changes it

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
        cfg = recognizer.config.to_dict()  # both backends' ModelConfig
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
                           "queued_windows": max_queue_windows, "attention_images": max_attention_images,
                           "pixels_per_image": MAX_PIXELS,
                           "pixels_per_request": REQUEST_PIXELS}}

    @app.post("/v1/read", response_model=ReadResponse, openapi_extra={"requestBody": READ_BODY},
              responses={400: {"model": ErrorResponse}, 408: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                         415: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def read(request: Request, attention: bool = Query(False, description="add attention strips (PNG)")):
        try:
            body = await asyncio.wait_for(read_body(request, limit), body_seconds)
        except TimeoutError:
            # Connection: close, or the unread rest of the body would keep the connection (and its task) open.
            return _error(408, f"the upload did not arrive within {body_seconds:g} s; send it again", close=True)
        if body is None:
            return _error(413, f"upload over the {max_upload_mb:g} MB limit", close=True)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not body:
            return _error(400, "no images in the request (empty body); send multipart files or JSON images")
        try:
            named = await images_of_form(request, kind, body, max_images) if kind == "multipart/form-data" else \
                await asyncio.to_thread(images_of_json, kind, body, max_images)  # parsing is CPU work
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
        if not (attention and hasattr(recognizer, "model")):  # the ONNX backend draws no strips
            return await _read_named(named)
        if len(named) > max_attention_images:
            return _error(413, f"attention strips for {len(named)} images in one request; at most "
                               f"{max_attention_images} (or read without ?attention=1)")
        if app.state.attention_in_flight + len(named) > max_attention_images:
            return _error(503, "server busy drawing attention strips; retry shortly")
        app.state.attention_in_flight += len(named)
        try:
            return await _read_named(named, attention=True)
        finally:
            app.state.attention_in_flight -= len(named)

    async def _read_named(named: list[tuple[str, bytes]], attention: bool = False) -> ReadResponse | JSONResponse:
        budget, windows = [REQUEST_PIXELS], [max_request_windows, max_request_windows]
        aspect = recognizer.window_aspect
        try:  # decoding is CPU work: off the event loop
            decoded = await asyncio.to_thread(
                lambda: [decode_upload(name, data, budget, windows, aspect, max_windows) for name, data in named])
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
            strip = await asyncio.to_thread(_attention, recognizer, image, r.text, model_lock) \
                if attention and not r.error else None
            items.append(ReadItem(name=name, text=r.text, confidence=r.confidence, char_probs=r.char_probs,
                                  attention_png=strip, error=r.error, note=r.note))
        return ReadResponse(results=items)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("clip4str.serve").joinpath("index.html").read_text(encoding="utf-8")

    return app


def _attention(recognizer, image: Image.Image, text: str, lock: threading.Lock) -> str | None:
    """The attention strip of the reading `text` as a PNG data URL (PyTorch backend only)."""
    if not hasattr(recognizer, "model"):
        return None
    from clip4str.visualize import attention_strip

    buf = io.BytesIO()
    with lock:
        attention_strip(recognizer, image, buf, text)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
