"""The one preprocessing function: any image input -> RGB -> model input size -> model mean/std."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = str | Path | bytes | Image.Image | np.ndarray


class ImageDecodeError(ValueError):
    """An input could not be turned into an image; the message names the input."""


# The raster formats word crops come in. Pillow would also open EPS by running Ghostscript (`gs`) on the file, i.e.
# a PostScript program from outside, and a score of rare formats (scientific, game, fax) no crop is stored in:
# files from outside are opened as these formats only.
RASTER_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "DIB", "TIFF", "WEBP", "AVIF", "PPM", "TGA", "JPEG2000")


def open_image(source: str | Path | bytes | IO[bytes]) -> Image.Image:
    """Pillow's lazy `Image.open` of a path, encoded bytes or a binary file, limited to RASTER_FORMATS."""
    Image.init()
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    return Image.open(fp, formats=[f for f in RASTER_FORMATS if f in Image.OPEN])


def _describe(item: object) -> str:
    if isinstance(item, (str, Path)):
        return repr(str(item))
    if isinstance(item, bytes):
        return f"<{len(item)} bytes>"
    return f"<{type(item).__name__}>"


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape:
        raise ImageDecodeError(f"array of shape {arr.shape} is not an image; expected HxW, HxWx3 or HxWx4")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise ImageDecodeError(f"array of dtype {arr.dtype} is not an image")
        if np.issubdtype(arr.dtype, np.floating):
            # Floats are 0..1 (the usual convention; a resize may overshoot it a little) unless a value is above 2:
            # then 0..255 (a uint8 image converted with .astype(float)). Integers wider than 8 bits by their range.
            arr = np.nan_to_num(arr.astype(np.float32))
            scale = 255.0 if arr.max(initial=0) <= 2.0 else 1.0
            arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
        else:
            top = 65535 if arr.max(initial=0) > 255 else 255
            arr = np.clip(arr.astype(np.float64) * 255.0 / top + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK, ...) -> RGB; transparency is laid on white."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # One float32 copy, scaled in place: a large 16-bit image is a large array already.
        arr = np.array(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if image.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr *= 255.0 / top
        arr += 0.5
        image = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8))
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(item: ImageInput) -> Image.Image:
    """Decode a path, encoded bytes, PIL image or NumPy array into an RGB PIL image (EXIF rotation applied)."""
    try:
        if isinstance(item, np.ndarray):
            return to_rgb(_array_to_pil(item))
        if isinstance(item, Image.Image):  # Image.open(path) keeps the EXIF orientation unapplied, as files do
            if 0 in item.size:  # a degenerate crop box: nothing to read (it was read as a confident word)
                raise ImageDecodeError(f"image of {item.width}x{item.height} pixels holds nothing to read")
            return to_rgb(ImageOps.exif_transpose(item))
        if isinstance(item, (str, Path)):
            if Path(item).is_dir():
                raise ImageDecodeError(f"{str(item)!r} is a folder, not an image file")
            if not Path(item).is_file():
                raise ImageDecodeError(f"image {str(item)!r} does not exist")
        if isinstance(item, (str, Path, bytes, bytearray)):
            with open_image(item) as img:
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except (ImageDecodeError, MemoryError):  # MemoryError: the machine's, not the image's; never a skipped sample
        raise
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"image {_describe(item)} could not be decoded: not a file of a format read here "
                               f"({', '.join(RASTER_FORMATS)}), or damaged; convert it to PNG or JPEG") from e
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...) for damaged data
        raise ImageDecodeError(f"image {_describe(item)} could not be decoded ({type(e).__name__}: {e}); "
                               "is it a complete PNG/JPEG/... file?") from e
    raise ImageDecodeError(f"cannot read an image from {_describe(item)}; give a path, bytes, PIL image or array")


def preprocess_array(images: ImageInput | Sequence[ImageInput], size: tuple[int, int], mean: Sequence[float],
                     std: Sequence[float]) -> np.ndarray:
    """Images -> float32 array (B, 3, H, W): RGB, bicubic resize to `size` (no aspect kept), (x - mean) / std."""
    items = [images] if not isinstance(images, (list, tuple)) else list(images)
    if not items:
        raise ValueError("no images given")
    h, w = size
    batch = np.empty((len(items), h, w, 3), dtype=np.uint8)
    for i, item in enumerate(items):
        img = load_image(item)
        batch[i] = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC) if img.size != (w, h) else img)
    x = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


def preprocess(images: ImageInput | Sequence[ImageInput], size: tuple[int, int], mean: Sequence[float],
               std: Sequence[float]):  # -> torch.Tensor (torch imported only here)
    """`preprocess_array` as a float tensor (B, 3, H, W): the one preprocessing function of every path."""
    import torch

    return torch.from_numpy(preprocess_array(images, size, mean, std))
