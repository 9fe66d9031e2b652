"""Recognizer: load a model once, read many images (any size, long crops split into windows), batched."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from clip4str.data.transforms import ImageDecodeError, ImageInput, load_image, preprocess
from clip4str.model import CLIP4STR
from clip4str.weights import load_model

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ReadResult:
    """One image's reading; `error` is set (and text empty) when the image could not be read."""

    text: str
    confidence: float
    char_probs: list[float] = field(default_factory=list)
    error: str | None = None


def overlap_length(left: str, right: str) -> int:
    """Length of the longest suffix of `left` that starts `right` (the text two windows share)."""
    for k in range(min(len(left), len(right)), 0, -1):
        if left.endswith(right[:k]):
            return k
    return 0


def split_long(image: Image.Image, window_aspect: float, overlap: float = 0.25) -> list[Image.Image]:
    """Overlapping crops of width `window_aspect` x height covering a wide image (one crop if it fits)."""
    w, h = image.size
    win = max(1, int(round(window_aspect * h)))
    if w <= win * 1.5:
        return [image]
    step = max(1, int(win * (1 - overlap)))
    starts = list(range(0, w - win, step)) + [w - win]
    return [image.crop((x, 0, x + win, h)) for x in starts]


def default_model_path() -> Path:
    """Folder of the built-in model shipped inside the package."""
    return Path(__file__).parent / "pretrained" / "tiny"


class Recognizer:
    """Reads text from word crops with a CLIP4STR model."""

    def __init__(self, model: CLIP4STR, device: str = "cpu", precision: str = "fp32",
                 window_aspect: float | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        self.model = model.to(device).eval()
        self.device, self.precision = torch.device(device), precision
        h, w = model.config.image_size
        # Crops up to twice the model's own aspect (at least 8:1) are read whole; wider ones in windows.
        self.window_aspect = window_aspect or max(w / h, 4.0) * 1.5

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu", precision: str = "fp32",
                        **kwargs: object) -> Recognizer:
        """Load a checkpoint folder (config.json + model.safetensors); no path = the built-in model."""
        if path is None:
            path = default_model_path()
            if not (path / "config.json").is_file():
                raise FileNotFoundError("no built-in model is installed in this copy of clip4str yet; pass a "
                                        "checkpoint folder (clip4str train writes OUT/final)")
        return cls(load_model(path), device, precision, **kwargs)

    @property
    def config(self):  # noqa: ANN201 - ModelConfig
        """The model's configuration."""
        return self.model.config

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images -> the model's input tensor (the one preprocessing function)."""
        cfg = self.model.config
        return preprocess(list(images), cfg.image_size, cfg.image_mean, cfg.image_std)

    @torch.inference_mode()
    def decode_tensors(self, x: torch.Tensor, **options: object) -> list[ReadResult]:
        """Preprocessed images -> results (decoding options as `CLIP4STR.decode`)."""
        with self._autocast():
            out = self.model.decode(x.to(self.device), **options)
        decoded = self.model.tokenizer.decode(out.logits.float().softmax(-1), out.lengths.tolist())
        return [ReadResult(d.text, d.confidence, d.char_probs) for d in decoded]

    def read(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32, mode: str | None = None,
             refine_iters: int | None = None) -> list[ReadResult]:
        """Read one image or a list (paths, bytes, PIL images, arrays; any mix); one result per image."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        return list(self.iter_read(items, batch_size, mode=mode, refine_iters=refine_iters))

    def iter_read(self, items: Sequence[ImageInput], batch_size: int = 32, **options: object
                  ) -> Iterator[ReadResult]:
        """Like `read`, yielding results in order as batches finish (for progress bars and long lists)."""
        options = {k: v for k, v in options.items() if v is not None}
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            pieces: list[Image.Image] = []
            owners: list[tuple[int, int] | ReadResult] = []
            for item in chunk:
                try:
                    windows = split_long(load_image(item), self.window_aspect)
                except ImageDecodeError as e:
                    owners.append(ReadResult("", 0.0, [], str(e)))
                    continue
                owners.append((len(pieces), len(windows)))
                pieces.extend(windows)
            results: list[ReadResult] = []
            for s in range(0, len(pieces), batch_size):
                results.extend(self.decode_tensors(self.preprocess(pieces[s:s + batch_size]), **options))
            for owner in owners:
                if isinstance(owner, ReadResult):
                    yield owner
                    continue
                first, n = owner
                parts = results[first:first + n]
                text, probs = parts[0].text, parts[0].char_probs[:-1]  # the EOS probability comes last
                for p in parts[1:]:
                    k = overlap_length(text, p.text)
                    text, probs = text + p.text[k:], probs + p.char_probs[k:-1]
                probs.append(parts[-1].char_probs[-1])
                conf = float(torch.tensor(probs, dtype=torch.float64).prod())
                yield ReadResult(text, conf, probs)
