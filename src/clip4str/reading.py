"""Backend-independent reading: results, long-crop windows and their merge, batching (no PyTorch here)."""

from __future__ import annotations

import io
import itertools
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from clip4str.data.augment import rescale_vertically
from clip4str.data.transforms import ImageDecodeError, ImageInput, load_image, to_rgb
from clip4str.metrics import edit_distance


@dataclass
class ReadResult:
    """One image's reading; `error` is set (and text empty) when the image could not be read, `note` when the
    image does not look like what a recognizer reads (a whole photo rather than a word cropped from it)."""

    text: str
    confidence: float
    char_probs: list[float] = field(default_factory=list)
    error: str | None = None
    note: str | None = None


# A word cropped from a photo is wide, or small: of 10,373 real crops (the training and benchmark sets) 5 are 300+
# pixels on both sides at under 2.5:1, 1 of them 600+. An image this large and this square is most likely a whole
# photo, which a recognizer reads as one word of noise.
PHOTO_MIN_SIDE, PHOTO_MAX_ASPECT = 600, 2.5


def photo_note(width: int, height: int) -> str | None:
    """A hint for an image that looks like a whole photo rather than a cropped word, else None."""
    if min(width, height) < PHOTO_MIN_SIDE or width / height >= PHOTO_MAX_ASPECT:
        return None
    return (f"a {width}x{height} image looks like a whole photo: this model reads one cropped word or line; crop "
            "the text first (a text detector gives such crops)")


# At most this share of an overlap's characters may differ between two windows for it to count as one text.
MAX_SEAM_ERROR = 0.34


def overlap_length(left: str, right: str) -> int:
    """Length of the longest suffix of `left` that starts `right` (the text two windows share)."""
    for k in range(min(len(left), len(right)), 0, -1):
        if left.endswith(right[:k]):
            return k
    return 0


def seam(left: str, right: str) -> tuple[int, int]:
    """Where to join the readings of two overlapping windows: (characters of `left` to keep, first character of
    `right` to keep). The shared text is found by edit distance, since windows often disagree where one of them
    cuts a letter (`counterrevolutilt` + `revolutionaries`); each window then gives the half of the overlap
    nearer its own middle. No overlap found: both are kept whole."""
    best, where = 0, (len(left), 0)
    for m1 in range(1, len(left) + 1):
        for m2 in (m1, m1 - 1, m1 + 1):  # equal lengths first: they win ties
            if not 1 <= m2 <= len(right):
                continue
            d = edit_distance(left[-m1:], right[:m2])
            longer = max(m1, m2)
            # Matched characters, less a penalty per edit, so that a long overlap with one slip beats a short
            # exact one only when it explains more.
            gain = longer - 2 * d
            if d <= MAX_SEAM_ERROR * longer and gain > best:
                best, where = gain, (len(left) - m1 + m1 // 2, m2 // 2)
    return where


def _window_geometry(width: int, height: int, window_aspect: float, overlap: float) -> tuple[int, int] | None:
    """(window width, step) of a crop read in windows, or None when it is read whole."""
    win = max(1, int(round(window_aspect * height)))
    if width <= win * 1.5:
        return None
    return win, max(1, int(win * (1 - overlap)))


def window_count(width: int, height: int, window_aspect: float, overlap: float = 0.25) -> int:
    """How many windows `split_long` cuts from an image of this size (from its header alone: a server counts
    the model work of a request before decoding any pixels)."""
    geometry = _window_geometry(width, height, window_aspect, overlap)
    if geometry is None:
        return 1
    win, step = geometry
    return len(range(0, width - win, step)) + 1


def split_long(image: Image.Image, window_aspect: float, overlap: float = 0.25) -> list[Image.Image]:
    """Overlapping crops of width `window_aspect` x height covering a wide image (one crop if it fits)."""
    w, h = image.size
    geometry = _window_geometry(w, h, window_aspect, overlap)
    if geometry is None:
        return [image]
    win, step = geometry
    return [image.crop((x, 0, x + win, h)) for x in [*range(0, w - win, step), w - win]]


# The second look's views: text height relative to the crop changes with how tightly a detector cut it, and a
# model reads some words only at another scale (docs/training-builtin.md, "The second look").
SECOND_LOOK_PAD, SECOND_LOOK_CROP = 0.15, 0.08


def vertical_views(image: Image.Image) -> list[Image.Image]:
    """The same text at two other vertical scales (RGB): 15% of the height repeated above and below, 8% cut."""
    image = to_rgb(image)
    views = [rescale_vertically(image, SECOND_LOOK_PAD), rescale_vertically(image, -SECOND_LOOK_CROP)]
    return [v for v in views if v is not image]  # a crop too short to change gives no view that equals it


def _char_part(r: ReadResult) -> list[float]:
    """Per-character probabilities without the EOS one (absent when a window hit the length limit)."""
    return r.char_probs[: len(r.text)]


def merge_windows(parts: list[ReadResult]) -> ReadResult:
    """One reading from the readings of overlapping windows, left to right (joined at `seam`)."""
    text, probs = parts[0].text, _char_part(parts[0])
    for p in parts[1:]:
        keep, start = seam(text, p.text)
        text, probs = text[:keep] + p.text[start:], probs[:keep] + _char_part(p)[start:]
    last = parts[-1]
    probs += last.char_probs[len(last.text):]  # the last window's EOS probability, if it has one
    return ReadResult(text, float(np.prod(probs)) if probs else 0.0, probs)


# A crop wider than this many windows is refused, not read: real text lines take a few dozen at most.
MAX_WINDOWS = 64
MAX_REFINE_ITERS = 8  # more passes change nothing a reader would see and cost a decoder pass each


def as_items(images: ImageInput | Iterable[ImageInput]) -> Iterator[ImageInput]:
    """One image, or a list, tuple or iterator (a generator) of images, as an iterator; anything else is one
    item (whose result says what it is not)."""
    if isinstance(images, (list, tuple)) or (isinstance(images, Iterator) and not isinstance(images, io.IOBase)):
        return iter(images)
    return iter([images])


def _integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_read_options(batch_size: object, options: dict) -> None:
    """Refuse option values that would fail deep inside decoding or be silently ignored, naming the option."""
    if not _integer(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    refine = options.get("refine_iters")
    if refine is not None and (not _integer(refine) or not 0 <= refine <= MAX_REFINE_ITERS):
        raise ValueError(f"refine_iters must be an integer from 0 to {MAX_REFINE_ITERS}, got {refine!r}")
    if options.get("mode") not in (None, "ar", "nar"):
        raise ValueError(f"mode must be 'ar' or 'nar', got {options['mode']!r}")
    for flag in ("second_look", "cascade", "draft", "guard", "rescore", "early_exit", "compiled"):
        if flag in options and not isinstance(options[flag], (bool, numbers.Integral)):
            raise ValueError(f"{flag} must be True or False, got {options[flag]!r}")
    windows = options.get("max_windows")
    if windows is not None and (not _integer(windows) or windows < 1):
        raise ValueError(f"max_windows must be an integer >= 1, got {windows!r}")


class BaseRecognizer:
    """Reading logic shared by the PyTorch and ONNX Runtime backends.

    Subclasses provide `image_size` (H, W), `preprocess(images)` and `decode_tensors(x, **options)`.
    """

    image_size: tuple[int, int]
    window_aspect: float
    second_look_confidence: float | None = None  # the model's; see `second_look`

    def preprocess(self, images: Sequence[ImageInput]):  # noqa: ANN201 - backend's array type
        raise NotImplementedError

    def decode_tensors(self, x, **options: object) -> list[ReadResult]:  # noqa: ANN001
        raise NotImplementedError

    def _default_window(self) -> float:
        h, w = self.image_size
        # Crops up to 1.5x the model's own aspect (at least 6:1) are read whole; wider ones in windows.
        return max(w / h, 4.0) * 1.5

    def read(self, images: ImageInput | Iterable[ImageInput], batch_size: int = 32, **options: object
             ) -> list[ReadResult]:
        """Read one image or several (a list or any iterable of paths, bytes, PIL images, arrays; any mix); one
        result per image.

        Options are the decoding options: mode ('ar'|'nar'), refine_iters, max_length, early_exit, guard, rescore,
        cascade, draft (both backends), compiled (PyTorch); second_look (default True: where the model sets
        `second_look_confidence`, a crop read with less is read again at two other vertical scales and the most
        confident reading is kept); max_windows (default MAX_WINDOWS: a wider image gets an error result).
        """
        return list(self.iter_read(images, batch_size, **options))

    def iter_read(self, images: ImageInput | Iterable[ImageInput], batch_size: int = 32, **options: object
                  ) -> Iterator[ReadResult]:
        """Like `read`, yielding results in order as batches finish (for progress bars and long lists)."""
        items = as_items(images)
        options = {k: v for k, v in options.items() if v is not None}
        check_read_options(batch_size, options)
        threshold = self.second_look_confidence if options.pop("second_look", True) else None
        max_windows = int(options.pop("max_windows", MAX_WINDOWS))
        while batch := list(itertools.islice(items, batch_size)):  # a long iterator is read as it comes
            pieces: list[Image.Image] = []
            owners: list[tuple[int, int, str | None] | ReadResult] = []
            for item in batch:
                try:
                    image = load_image(item)
                    n = window_count(*image.size, self.window_aspect)
                    if n > max_windows:  # a 100-byte 20000x1 PNG would be read as thousands of crops
                        raise ImageDecodeError(f"image of {image.width}x{image.height} pixels is {n} windows wide, "
                                               f"more than the limit of {max_windows}: crop it to the text, or "
                                               "raise the limit (max_windows; --max-windows)")
                    windows = split_long(image, self.window_aspect)
                except ImageDecodeError as e:
                    owners.append(ReadResult("", 0.0, [], str(e)))
                    continue
                owners.append((len(pieces), len(windows), photo_note(*image.size)))
                pieces.extend(windows)
            results = self._decode_pieces(pieces, batch_size, options)
            if threshold is not None:
                self._second_look(pieces, results, threshold, batch_size, options)
            for owner in owners:
                if isinstance(owner, ReadResult):
                    yield owner
                else:
                    first, n, note = owner
                    result = results[first] if n == 1 else merge_windows(results[first:first + n])
                    result.note = note
                    yield result

    def _decode_pieces(self, pieces: list[Image.Image], batch_size: int, options: dict) -> list[ReadResult]:
        """One reading per piece, `batch_size` at a time."""
        results: list[ReadResult] = []
        for s in range(0, len(pieces), batch_size):
            results.extend(self.decode_tensors(self.preprocess(pieces[s:s + batch_size]), **options))
        return results

    def _second_look(self, pieces: list[Image.Image], results: list[ReadResult], threshold: float,
                     batch_size: int, options: dict) -> None:
        """Re-read the pieces below `threshold` at other scales, keeping the most confident reading (first on ties)."""
        unsure = [i for i, r in enumerate(results) if r.confidence < threshold]
        if not unsure:
            return
        views = [vertical_views(pieces[i]) for i in unsure]
        again = iter(self._decode_pieces([v for vs in views for v in vs], batch_size, options))
        for i, vs in zip(unsure, views, strict=True):
            for r in [next(again) for _ in vs]:
                if r.confidence > results[i].confidence:
                    results[i] = r
