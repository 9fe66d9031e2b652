"""Synthetic scene-text word images: words, fonts, colours, backgrounds and the distortions of real photos.

Sample `i` of a generator with seed `s` depends only on (s, i): the stream is deterministic, resumable from
any position, and the same in every worker.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from torch.utils.data import IterableDataset, get_worker_info

from clip4str.charset import CHARSETS
from clip4str.data.fonts import FontInfo, discover_fonts, load_font, usable_fonts
from clip4str.data.synth_background import LUMA, Backgrounds, calmed
from clip4str.data.words import WordSampler

__all__ = ["LUMA", "SyntheticStream", "WordRenderer", "WordSampler"]

@functools.lru_cache(maxsize=65536)
def _glyph(path: str, size: int, ch: str) -> tuple[Image.Image, float]:
    """A character's mask on a full-height cell, and its advance; reused across samples."""
    font = load_font(path, size)
    ascent, descent = font.getmetrics()
    advance = font.getlength(ch)
    cell = Image.new("L", (int(math.ceil(advance)) + 4, ascent + descent + 4), 0)
    ImageDraw.Draw(cell).text((2, 2), ch, font=font, fill=255)
    return cell, advance


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """Coefficients for PIL's PERSPECTIVE transform mapping output points `dst` to input points `src`."""
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(rows, dtype=np.float64), src.reshape(8)).tolist()


def _motion_blur(image: Image.Image, rng: np.random.Generator, height: int | None = None) -> Image.Image:
    """The mean of the image shifted along a short line, mostly horizontal, as long as a tenth of `height` (the
    letters'; default the image's)."""
    arr = np.asarray(image, dtype=np.float32)
    steps = max(2, int(round(float(rng.uniform(0.05, 0.12)) * (height or arr.shape[0]) * 2)))
    angle = float(rng.normal(0, 0.35))
    padded = np.pad(arr, ((steps, steps), (steps, steps), (0, 0)), mode="edge")
    out = np.zeros_like(arr)
    for t in range(steps):
        dx, dy = int(round(t * math.cos(angle))), int(round(t * math.sin(angle)))
        out += padded[steps + dy:steps + dy + arr.shape[0], steps + dx:steps + dx + arr.shape[1]]
    return Image.fromarray(np.clip(out / steps, 0, 255).astype(np.uint8))


class WordRenderer:
    """Renders one labelled word image per index, deterministically for a seed."""

    def __init__(self, charset: str = CHARSETS["94"], fonts: list[str | Path] | None = None,
                 backgrounds: list[str | Path] | None = None, seed: int = 0, max_length: int = 25,
                 font_size: tuple[int, int] = (14, 36)) -> None:
        paths = tuple(str(p) for p in (discover_fonts() if fonts is None else discover_fonts(fonts)))
        self.fonts: tuple[FontInfo, ...] = usable_fonts(paths, charset)
        if not self.fonts:
            raise FileNotFoundError("no usable font found (searched "
                                    f"{'the given folders' if fonts else 'the system font folders'}); install a "
                                    "font package such as fonts-dejavu-core or pass a font folder")
        self.words = WordSampler(charset, max_length)
        self.backgrounds = Backgrounds(backgrounds)
        self.seed, self.font_size = seed, font_size

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        return self.render(index)

    def render(self, index: int, difficulty: float = 1.0) -> tuple[Image.Image, str]:
        """Sample `index`; `difficulty` in [0, 1] scales how often each hard effect is applied and how long
        words may be (0: words of at most 3 characters, clean, straight, high-contrast, on plain backgrounds;
        1: the full mix up to max_length)."""
        d = min(max(float(difficulty), 0.0), 1.0)
        rng = np.random.default_rng([self.seed, index])
        font_info, text = self._font_and_text(rng, None if d >= 1 else 3 + int((self.words.max_length - 3) * d))
        size = int(rng.integers(*self.font_size)) // 2 * 2  # even sizes: half as many cached font objects
        font = load_font(font_info.path, size)
        stroke = int(rng.integers(1, max(2, size // 12) + 1)) if rng.random() < 0.12 * d else 0
        if len(text) > 2 and rng.random() < 0.12 * d:
            mask = self._curved(text, font, rng)
        elif not stroke and rng.random() < 0.12 * d:  # street crops (IC15) often hold parts of the next words
            mask = self._with_neighbours(text, font, rng, self.words)
        else:
            mask = self._straight(text, font, stroke, rng)
        mask = self._full_ink(self._warp(mask, rng, d))
        image = self._compose(mask, rng, d)
        return self._degrade(image, rng, d, text_height=int(1.4 * size)), text

    def _font_and_text(self, rng: np.random.Generator, max_chars: int | None = None) -> tuple[FontInfo, str]:
        for _ in range(20):
            info = self.fonts[rng.integers(len(self.fonts))]
            text = self.words(rng, max_chars)
            if info.caps_only:
                if not all(c.upper() in self.words.charset for c in text):
                    continue
                text = text.upper()  # the font draws capitals whatever it is given: the label must say so
            if set(text) <= info.covered:
                return info, text
        return self.fonts[0], "".join(c for c in text if c in self.fonts[0].covered) or "0"

    @staticmethod
    def _straight(text: str, font, stroke: int, rng: np.random.Generator) -> Image.Image:
        ascent, descent = font.getmetrics()
        if stroke or rng.random() >= 0.15:
            width = font.getlength(text) + 2 * stroke
            size = (int(math.ceil(width)) + 4, ascent + descent + 2 * stroke + 4)
            mask = Image.new("L", size, 0)
            ImageDraw.Draw(mask).text((2 + stroke, 2 + stroke), text, font=font, fill=255, stroke_width=stroke,
                                      stroke_fill=255)
            if not stroke:
                return mask
            # Outlined text: outline+fill in the red channel, fill alone in green, warped together later.
            inner = Image.new("L", size, 0)
            ImageDraw.Draw(inner).text((2 + stroke, 2 + stroke), text, font=font, fill=255)
            return Image.merge("RGB", (mask, inner, Image.new("L", size, 0)))
        spacing = float(rng.uniform(0.05, 0.5)) * font.size  # letter-spaced signage
        glyphs = [_glyph(font.path, font.size, c) for c in text]
        width = sum(a for _, a in glyphs) + spacing * (len(text) - 1)
        mask = Image.new("L", (int(math.ceil(width)) + 8, ascent + descent + 4), 0)
        x = 0.0
        for cell, advance in glyphs:
            mask.paste(cell, (int(x), 0), cell)
            x += advance + spacing
        return mask

    @staticmethod
    def _with_neighbours(text: str, font, rng: np.random.Generator, words: WordSampler) -> Image.Image:
        """The word with the ends of other words beside it, cut by the crop's border at a random place in them;
        the label stays the word."""
        ascent, descent = font.getmetrics()
        covered = set(text)  # the font draws these: neighbours use them too
        left = "".join(c for c in words(rng, 4) if c in covered) or text[-1]
        right = "".join(c for c in words(rng, 4) if c in covered) or text[0]
        gap = font.getlength(" ") * float(rng.uniform(0.8, 1.6)) + 2
        widths = [font.getlength(t) for t in (left, text, right)]
        sides = [rng.random() < 0.7, rng.random() < 0.7]
        mask = Image.new("L", (int(sum(widths) + 2 * gap) + 8, ascent + descent + 4), 0)
        draw = ImageDraw.Draw(mask)
        x_text = 2 + widths[0] + gap
        draw.text((x_text, 2), text, font=font, fill=255)
        x0, x1 = x_text - 2, x_text + widths[1] + 2
        if sides[0]:
            draw.text((2, 2), left, font=font, fill=255)
            x0 = 2 + widths[0] * float(rng.uniform(0.45, 0.9))  # the cut falls inside the neighbour
        if sides[1]:
            draw.text((x_text + widths[1] + gap, 2), right, font=font, fill=255)
            x1 = x_text + widths[1] + gap + widths[2] * float(rng.uniform(0.1, 0.55))
        return mask.crop((int(x0), 0, int(math.ceil(x1)), mask.height))

    @staticmethod
    def _curved(text: str, font, rng: np.random.Generator) -> Image.Image:
        """Characters along a circular arc (CUTE80-like), each rotated to the tangent."""
        ascent, descent = font.getmetrics()
        height = ascent + descent
        glyphs = [_glyph(font.path, font.size, c) for c in text]
        total = sum(a for _, a in glyphs)
        if total <= 0:
            raise ValueError(f"font {font.path} gives {text!r} no width (glyphs missing)")
        bend = float(rng.uniform(0.4, 1.6)) * (1 if rng.random() < 0.6 else -1)  # arc angle in radians
        radius = total / abs(bend)
        canvas = Image.new("L", (int(total + 2 * height + 8), int(radius * (1 - math.cos(bend / 2)) + 3 * height)), 0)
        cx, pos = canvas.width / 2, -total / 2
        base = height + (0 if bend > 0 else radius * (1 - math.cos(bend / 2)))
        for cell, adv in glyphs:
            theta = (pos + adv / 2) / radius * (1 if bend > 0 else -1)
            glyph = cell.rotate(-math.degrees(theta), resample=Image.Resampling.BILINEAR, expand=True)
            x = cx + radius * math.sin(abs(theta)) * (1 if pos + adv / 2 > 0 else -1)
            y = base + (radius * (1 - math.cos(theta)) if bend > 0 else -radius * (1 - math.cos(theta)))
            canvas.paste(glyph, (int(x - glyph.width / 2), int(y - glyph.height / 2)), glyph)
            pos += adv
        box = canvas.getbbox()
        return canvas.crop(box) if box else canvas

    @staticmethod
    def _warp(mask: Image.Image, rng: np.random.Generator, d: float = 1.0) -> Image.Image:
        """Rotation, shear and perspective in one transform; output sized to the warped text plus a margin."""
        w, h = mask.size
        pts = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
        angle = math.radians(rng.normal(0, 4 * d) if rng.random() < 1 - 0.15 * d else rng.uniform(-25, 25))
        shear = rng.normal(0, 0.15) if rng.random() < 0.3 * d else 0.0
        out = pts.copy()
        out[:, 0] += shear * (h - out[:, 1])
        c, s = math.cos(angle), math.sin(angle)
        out = out @ np.array([[c, s], [-s, c]])
        if rng.random() < 0.35 * d:  # perspective: move corners independently
            out += rng.normal(0, 0.06, out.shape) * np.array([w, h])
        margin_x, margin_y = rng.uniform(0, 0.15) * h + 1, rng.uniform(0, 0.25) * h + 1
        out -= out.min(0) - np.array([margin_x, margin_y])
        size = (int(out[:, 0].max() + margin_x + 1), int(out[:, 1].max() + margin_y + 1))
        return mask.transform(size, Image.Transform.PERSPECTIVE, _perspective_coeffs(pts, out),
                              Image.Resampling.BILINEAR)

    @staticmethod
    def _full_ink(mask: Image.Image) -> Image.Image:
        """Hairline and thin fonts at small sizes draw strokes narrower than a pixel, which anti-aliasing leaves at
        a tenth to a half of full ink: an all but invisible word under its label. The mask is raised until its
        strongest strokes are opaque; the strokes stay as thin as the font draws them."""
        arr = np.asarray(mask, dtype=np.float32)
        ink = arr[..., 0] if arr.ndim == 3 else arr
        drawn = ink[ink > 0]
        peak = float(np.percentile(drawn, 99)) if drawn.size else 255.0
        if peak >= 200:
            return mask
        return Image.fromarray(np.clip(arr * (255.0 / max(peak, 1.0)), 0, 255).astype(np.uint8), mask.mode)

    def _compose(self, mask: Image.Image, rng: np.random.Generator, d: float = 1.0) -> Image.Image:
        inner = None
        if mask.mode == "RGB":
            mask, inner = mask.getchannel(0), mask.getchannel(1)
        w, h = mask.size
        bg_arr = self.backgrounds.sample(w, h, rng, d)
        weight = np.asarray(mask, dtype=np.float32)
        # Contrast is judged where the text lies, not over the whole (possibly busy) background, in luma (green
        # looks brighter than blue of the same value).
        bg_lum = float((bg_arr @ LUMA * weight).sum() / max(weight.sum(), 1.0)) / 255.0
        fg_lum = (bg_lum + rng.uniform(0.35, 0.65)) % 1.0 if rng.random() < 0.5 else 1.0 - bg_lum
        if abs(fg_lum - bg_lum) < 0.35 + 0.3 * (1 - d):  # easy samples get strong contrast
            fg_lum = 0.08 if bg_lum > 0.5 else 0.92
        tint = rng.uniform(-0.35, 0.35, 3) if rng.random() < 0.6 else np.zeros(3)
        colour = np.clip(fg_lum + tint * min(fg_lum, 1 - fg_lum) * 2, 0, 1)
        if abs(float(colour @ LUMA) - bg_lum) < 0.25:  # the tint took away the contrast chosen above
            colour = np.full(3, fg_lum)
        fg = tuple(int(v) for v in colour * 255)
        bg = Image.fromarray(calmed(bg_arr, weight / 255.0, float(colour @ LUMA)).astype(np.uint8))
        if rng.random() < 0.2 * d:  # shadow: the text's silhouette, offset and darker
            dx, dy = (int(v) for v in rng.integers(-3, 4, 2))
            shadow = ImageChops.offset(mask, dx, dy).point(lambda v: v * 0.6)
            bg = Image.composite(Image.new("RGB", (w, h)), bg, shadow)
        text = Image.new("RGB", (w, h), fg)
        if inner is not None:  # the outline in the opposite colour around the fill
            text = Image.composite(text, Image.new("RGB", (w, h), tuple(255 - v for v in fg)), inner)
        return Image.composite(text, bg, mask)

    @staticmethod
    def _degrade(image: Image.Image, rng: np.random.Generator, d: float = 1.0,
                 text_height: int | None = None) -> Image.Image:
        w, h = image.size
        # Blur and downsampling scale with the letters' height, not the canvas's: a curved or turned word's canvas
        # is several letters tall, and blur sized to it wiped small letters out.
        th = min(h, text_height) if text_height else h
        if rng.random() < 0.15 * d:  # partial occlusion: a see-through bar or a thin line over part of the word
            draw = ImageDraw.Draw(image, "RGBA")
            colour = (*(int(v) for v in rng.integers(0, 256, 3)), int(rng.integers(90, 180)))
            if rng.random() < 0.5:
                x0 = int(rng.uniform(-0.1, 0.9) * w)
                draw.rectangle([x0, 0, x0 + int(rng.uniform(0.03, 0.12) * w), h], fill=colour)
            else:
                draw.line([(0, int(rng.uniform(0, h))), (w, int(rng.uniform(0, h)))], fill=colour,
                          width=int(rng.integers(1, 3)))
        if rng.random() < 0.12 * d:  # a moving camera or vehicle (IC15): the image smeared along a line
            image = _motion_blur(image, rng, th)
        # Blur and downsampling scale with the letters, so that small words stay legible.
        if rng.random() < 0.3 * d:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.0)) * max(1.0, th / 32)))
        elif rng.random() < 0.2 * d:  # low resolution
            f = float(rng.uniform(1.3, max(1.5, th / 14)))
            image = image.resize((max(1, int(w / f)), max(1, int(h / f))), Image.Resampling.BILINEAR).resize(
                (w, h), Image.Resampling.BILINEAR)
        if rng.random() < 0.3 * d:
            arr = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 12), (h, w, 1))
            image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        if rng.random() < 0.4 * d:
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=int(rng.integers(15, 90)))
            image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        return image


class SyntheticStream(IterableDataset):
    """An endless stream of (image, label) from `WordRenderer`; workers take interleaved indices."""

    def __init__(self, renderer: WordRenderer, start: int = 0, transform=None) -> None:
        self.renderer, self.start, self.transform = renderer, start, transform

    def __iter__(self) -> Iterator[tuple[object, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + worker
        while True:
            image, label = self.renderer[index]
            yield (self.transform(image) if self.transform else image), label
            index += workers
