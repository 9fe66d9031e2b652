"""Training augmentation of the reference: RandAugment (3 ops, magnitude 5, no sharpness) + blur + Poisson noise."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

MAX_LEVEL = 10.0
# Geometry limits of PARSeq's policy, tuned for wide word crops: strong horizontal shear, little vertical.
ROTATE_DEG, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y = 30.0, 0.9, 0.2, 0.10, 0.30


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _fill(img: Image.Image) -> tuple[int, ...]:
    return (128,) * len(img.getbands())


def _shear(img: Image.Image, sx: float = 0.0, sy: float = 0.0) -> Image.Image:
    """Shear along x (by sx x height) or y (by sy x width) on a canvas grown to hold the whole picture: cut in the
    crop's own frame, the letters at a wide crop's ends left the picture under their label."""
    w, h = img.size
    off_x, off_y = max(sx, 0.0) * h, max(sy, 0.0) * w
    size = (w + int(round(abs(sx) * h)), h + int(round(abs(sy) * w)))
    # PIL maps each output pixel back to the input: x_in = x + sx*y - off_x, y_in = sy*x + y - off_y
    return img.transform(size, Image.Transform.AFFINE, (1, sx, -off_x, sy, 1, -off_y), Image.Resampling.BILINEAR,
                         fillcolor=_fill(img))


def _shift(img: Image.Image, dx: float = 0.0, dy: float = 0.0) -> Image.Image:
    """The picture moved by (dx, dy) pixels within a canvas grown by as much: off centre, nothing cut."""
    w, h = img.size
    out = Image.new(img.mode, (w + int(round(abs(dx))), h + int(round(abs(dy)))), _fill(img))
    out.paste(img, (int(round(max(dx, 0.0))), int(round(max(dy, 0.0)))))
    return out


def _poisson(img: Image.Image, lam: float, rng: random.Random) -> Image.Image:
    noise = np.random.default_rng(rng.getrandbits(64)).poisson(lam, (img.height, img.width, 1)) - lam
    arr = np.asarray(img, dtype=np.float32) + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def rescale_vertically(img: Image.Image, share: float) -> Image.Image:
    """The text at another vertical scale: `share` > 0 repeats that share of the height above and below (edge
    rows), < 0 cuts it from top and bottom; a crop too short to change is returned as it is."""
    w, h = img.size
    if share >= 0:
        pad = int(round(h * share))
        if not pad:
            return img
        pixels = np.asarray(img)
        widths = ((pad, pad), (0, 0)) + ((0, 0),) * (pixels.ndim - 2)
        return Image.fromarray(np.pad(pixels, widths, mode="edge"))
    cut = int(h * -share)
    return img.crop((0, cut, w, h - cut)) if cut and h - 2 * cut > 0 else img


def join_horizontally(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two crops side by side (RGB) at the height of `left`, `right` resized with its aspect kept."""
    left, right = left.convert("RGB"), right.convert("RGB")
    h = left.height
    width = max(1, int(round(right.width * h / right.height)))
    out = Image.new("RGB", (left.width + width, h))
    out.paste(left, (0, 0))
    out.paste(right.resize((width, h), Image.Resampling.BILINEAR), (left.width, 0))
    return out


# name -> op(img, level in 0..1, rng); every level maps to the op's strength as in timm's "increasing" ops. The
# geometric ops grow the picture instead of cutting it (unlike timm's, in the crop's own frame), so every letter of
# the label stays in it.
OPS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "AutoContrast": lambda img, m, r: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, r: ImageOps.equalize(img),
    "Invert": lambda img, m, r: ImageOps.invert(img),
    # expand: as the upright box around a rotated word in a photo holds it
    "Rotate": lambda img, m, r: img.rotate(_signed(m * ROTATE_DEG, r), Image.Resampling.BILINEAR, expand=True,
                                           fillcolor=_fill(img)),
    "Posterize": lambda img, m, r: ImageOps.posterize(img, max(1, 8 - int(m * 4))),
    "Solarize": lambda img, m, r: ImageOps.solarize(img, 256 - int(m * 256)),
    "SolarizeAdd": lambda img, m, r: Image.eval(img, lambda v, a=int(m * 110): min(255, v + a) if v < 128 else v),
    "Color": lambda img, m, r: ImageEnhance.Color(img).enhance(1.0 + _signed(m * 0.9, r)),
    "Contrast": lambda img, m, r: ImageEnhance.Contrast(img).enhance(1.0 + _signed(m * 0.9, r)),
    "Brightness": lambda img, m, r: ImageEnhance.Brightness(img).enhance(1.0 + _signed(m * 0.9, r)),
    "ShearX": lambda img, m, r: _shear(img, sx=_signed(m * SHEAR_X, r)),
    "ShearY": lambda img, m, r: _shear(img, sy=_signed(m * SHEAR_Y, r)),
    "TranslateX": lambda img, m, r: _shift(img, dx=_signed(m * TRANSLATE_X, r) * img.width),
    "TranslateY": lambda img, m, r: _shift(img, dy=_signed(m * TRANSLATE_Y, r) * img.height),
    "GaussianBlur": lambda img, m, r: img.filter(ImageFilter.GaussianBlur(max(0.1, m * 2.0 * min(img.size) / 32))),
    "PoissonNoise": lambda img, m, r: _poisson(img, max(1.0, m * 40.0), r),
}


# A data source's `augment` options and their ranges (magnitude on RandAugment's 0-10 scale).
AUGMENT_RANGES = {"num_ops": (0, 8), "magnitude": (0.0, MAX_LEVEL), "prob": (0.0, 1.0)}


def check_augment(where: str, augment: object) -> None:
    """A data source's `augment` mapping, or a one-line ValueError naming `where` (the source) and the option."""
    if augment is None:
        return
    if not isinstance(augment, dict) or set(augment) - set(AUGMENT_RANGES):
        raise ValueError(f"{where}: augment takes a mapping of {sorted(AUGMENT_RANGES)}, got "
                         f"{str(augment)[:80]}")
    for key, value in augment.items():
        low, high = AUGMENT_RANGES[key]
        whole = key != "num_ops" or isinstance(value, int) or isinstance(value, float) and value.is_integer()
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high or not whole:
            kind = "a whole number" if key == "num_ops" else "a number"
            raise ValueError(f"{where}: augment.{key} must be {kind} in [{low}, {high}], got "
                             f"{str(value)[:80]}")


class RandAugment:
    """Pick `num_ops` ops per image, each applied with probability `prob` at a noisy magnitude."""

    def __init__(self, num_ops: int = 3, magnitude: float = 5.0, magnitude_std: float = 0.5, prob: float = 0.5,
                 ops: list[str] | None = None, seed: int | None = None) -> None:
        self.ops = list(OPS) if ops is None else ops
        unknown = set(self.ops) - set(OPS)
        if unknown:
            raise ValueError(f"unknown augmentation ops {sorted(unknown)}; known: {sorted(OPS)}")
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.rng = random.Random(seed)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> Image.Image:
        """Augment an RGB image; `rng` (e.g. seeded per sample) makes the result reproducible."""
        rng = self.rng if rng is None else rng
        for name in rng.choices(self.ops, k=self.num_ops):
            if rng.random() > self.prob:
                continue
            level = self.magnitude + rng.gauss(0, self.magnitude_std) if self.magnitude_std else self.magnitude
            img = OPS[name](img, min(max(level, 0.0), MAX_LEVEL) / MAX_LEVEL, rng)
        return img
