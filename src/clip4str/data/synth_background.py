"""Backgrounds for synthetic words: flat, gradients, noise, procedural textures and crops of photographs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from clip4str.data.transforms import open_image

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# Photographs that Debian desktop packages ship (gnome-backgrounds, mate-backgrounds, desktop-base ...).
DEFAULT_PHOTO_DIRS = ("/usr/share/backgrounds", "/usr/share/wallpapers")
PHOTO_SIDE = 640  # photos are kept in memory at this size
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 weights of R, G, B
# Legibility: at most MAX_LOST_INK of a word's ink may lie on background within LOW_CONTRAST luma of the text.
LOW_CONTRAST, MAX_LOST_INK = 0.15, 0.2


def calmed(background: np.ndarray, ink: np.ndarray, text_luma: float) -> np.ndarray:
    """The background (h, w, 3, 0..255) pulled toward its mean colour under the text until at most MAX_LOST_INK of
    the ink (h, w, 0..1) lies on pixels within LOW_CONTRAST luma of the text colour (0..1). The text's colour is
    chosen against that mean, but a busy photo (flowers, foliage) has much of it near any colour, and such words
    were all but invisible under their labels; a sign's text stands out from its surface."""
    total = float(ink.sum())
    if not total:
        return background
    mean = (background * ink[..., None]).sum((0, 1)) / total
    for keep in (1.0, 0.6, 0.35, 0.15, 0.0):
        out = mean + keep * (background - mean) if keep < 1 else background
        lost = float((ink * (np.abs(out @ LUMA / 255 - text_luma) < LOW_CONTRAST)).sum()) / total
        if lost <= MAX_LOST_INK:
            break
    return out


def discover_photos(dirs: list[str | Path] | None = None) -> list[Path]:
    """Photo files under the given folders, or under CLIP4STR_BACKGROUNDS and the Debian wallpaper folders."""
    if dirs is None:
        env = [d for d in os.environ.get("CLIP4STR_BACKGROUNDS", "").split(os.pathsep) if d]
        dirs = [*env, *DEFAULT_PHOTO_DIRS]
    else:
        for d in dirs:
            if not Path(d).is_dir():
                raise FileNotFoundError(f"background folder {str(d)!r} does not exist")
    found = set()
    for d in dirs:
        if Path(d).is_dir():
            found.update(p for p in Path(d).rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    return sorted(found)


class Backgrounds:
    """Draws an RGB float array (h, w, 3) in 0..255 for a word canvas."""

    def __init__(self, photo_dirs: list[str | Path] | None = None) -> None:
        self.photos = discover_photos(photo_dirs)
        self._cache: dict[int, np.ndarray | None] = {}

    def _photo(self, i: int) -> np.ndarray | None:
        if i not in self._cache:
            try:
                with open_image(self.photos[i]) as img:
                    img.draft("RGB", (PHOTO_SIDE, PHOTO_SIDE))  # fast JPEG downscale while decoding
                    img = img.convert("RGB")
                    img.thumbnail((PHOTO_SIDE, PHOTO_SIDE))
                    self._cache[i] = np.asarray(img)
            except Exception:  # an unreadable wallpaper is skipped, not fatal
                self._cache[i] = None
        return self._cache[i]

    def sample(self, w: int, h: int, rng: np.random.Generator, difficulty: float = 1.0) -> np.ndarray:
        """A background of size (h, w); lower `difficulty` means fewer photos and less noise."""
        r = rng.random()
        if self.photos and r < 0.35 * difficulty:
            photo = self._photo(int(rng.integers(len(self.photos))))
            if photo is not None:
                return self._crop(photo, w, h, rng)
        base = rng.uniform(0, 255, 3)
        if r < 0.55:
            out = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
        elif r < 0.75:
            other = rng.uniform(0, 255, 3)
            t = np.linspace(0, 1, w if rng.random() < 0.7 else h, dtype=np.float32)
            ramp = t[None, :, None] if len(t) == w else t[:, None, None]
            out = np.broadcast_to(base * (1 - ramp) + other * ramp, (h, w, 3)).astype(np.float32)
        elif r < 0.9:
            out = self._texture(w, h, base, rng)
        else:
            out = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
        if rng.random() < 0.5 * difficulty:
            out = out + rng.normal(0, rng.uniform(3, 25), (h, w, 1)).astype(np.float32)
        return np.clip(out, 0, 255)

    @staticmethod
    def _crop(photo: np.ndarray, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
        ph, pw = photo.shape[:2]
        scale = rng.uniform(0.3, 1.0)
        cw = max(2, min(pw, int(pw * scale)))
        ch = max(2, min(ph, int(cw * h / w)))
        x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(crop, dtype=np.float32)

    @staticmethod
    def _texture(w: int, h: int, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Low-frequency blotches (upsampled noise) plus optional stripes: walls, paper, wood, metal."""
        coarse = rng.normal(0, 1, (max(2, h // 8), max(2, w // 8), 1)).astype(np.float32)
        img = Image.fromarray(((coarse - coarse.min()) / (np.ptp(coarse) + 1e-6) * 255).astype(np.uint8)[..., 0])
        blotch = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC), np.float32)[..., None] / 255.0 - 0.5
        out = base + blotch * rng.uniform(20, 90)
        if rng.random() < 0.4:
            period = rng.uniform(3, 12)
            stripes = np.sin(np.arange(w if rng.random() < 0.5 else h) * 2 * np.pi / period).astype(np.float32)
            out = out + (stripes[None, :, None] if len(stripes) == w else stripes[:, None, None]) * rng.uniform(5, 25)
        return out.astype(np.float32)
