"""What a POST /v1/read brings: the body within its limits, the images in it (multipart or JSON base64), each
decoded only after its size and its windows of model work are checked."""

from __future__ import annotations

import base64
import binascii

from fastapi import Request
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from clip4str.data.transforms import ImageDecodeError, load_image, open_image
from clip4str.reading import window_count

MAX_PIXELS = 16_000_000  # per image: a word crop never needs more; larger ones are refused as bombs
REQUEST_PIXELS = 64_000_000  # per request, so that many compressible images cannot exhaust memory either
EXIF_ORIENTATION = 0x0112  # values 5-8: the picture is stored turned a quarter (phones), read upright


class ImageRefused(ValueError):
    """An image or request over one of the server's limits (HTTP 413)."""


class UnsupportedType(ValueError):
    """A request body of a content type the API does not take (HTTP 415)."""


class JsonImages(BaseModel):
    """JSON request body: base64-encoded image files, optionally named."""

    images: list[str]
    names: list[str] | None = None


def base64_image(data: str) -> bytes:
    """An image file from base64 as clients send it: plain, wrapped in lines (MIME), URL-safe, or a data URL."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    data = "".join(data.split())
    if "-" in data or "_" in data:
        data = data.replace("-", "+").replace("_", "/")
    return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)


def decode_upload(name: str, data: bytes, budget: list[int], windows: list[int], window_aspect: float,
                  max_windows: int) -> tuple[Image.Image, int]:
    """The image and its windows of model work; refuses bombs and crops over the window limits before decoding
    any pixels (a 20000x1 PNG is 101 bytes and 5,000 windows)."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        with open_image(data) as probe:  # header only: refuse bombs before decoding pixels
            size = probe.size
            if _turned_a_quarter(probe):
                size = size[::-1]  # read upright: its windows too
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{name}: refused, too many pixels for a word crop (decompression bomb?)") from e
    except MemoryError:
        raise
    except Exception as e:  # Pillow's plugins raise many types for damaged headers (AVIF: RuntimeError)
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


def _turned_a_quarter(probe: Image.Image) -> bool:
    """Whether the header's EXIF orientation (5-8) has the picture read turned a quarter, as phones store it; a PNG's
    EXIF from its header chunk only (Pillow's getexif() decodes a whole PNG to look for one after its pixels)."""
    if probe.format == "PNG":
        exif = Image.Exif()
        exif.load(probe.info.get("exif") or b"")
    else:
        exif = probe.getexif()
    return exif.get(EXIF_ORIENTATION) in (5, 6, 7, 8)


async def read_body(request: Request, limit: int) -> bytes | None:
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


async def images_of_form(request: Request, kind: str, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
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


def images_of_json(kind: str, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
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
                out.append((n, base64_image(d)))
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"image {i} ({n!r}) is not valid base64 ({e})") from e
        return out
    raise UnsupportedType(f"unsupported content type {kind or 'none'!r}: use multipart/form-data or application/json")
