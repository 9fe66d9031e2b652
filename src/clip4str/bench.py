"""`clip4str bench`: parameters, GFLOPs, batch-1 latency, batched throughput and peak memory of a model."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from clip4str.reading import BaseRecognizer

WORD = "hello"


def word_image(text: str = WORD) -> Image.Image:
    """A rendered word, the input every latency figure here refers to."""
    font = ImageFont.load_default(size=32)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("RGB", (right - left + 16, bottom - top + 12), (235, 230, 215))
    ImageDraw.Draw(img).text((8 - left, 6 - top), text, font=font, fill=(30, 30, 60))
    return img


@dataclass
class BenchResult:
    """Numbers of one configuration."""

    params_m: float | None
    gflops: float | None
    latency_ms: float
    throughput: float
    peak_mb: float
    text: str
    first_ms: float  # the first read, compilation included


def _peak_mb(rec: BaseRecognizer) -> float:
    if getattr(rec.device, "type", None) == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(rec.device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _sync(rec: BaseRecognizer) -> None:
    if getattr(rec.device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(rec.device)


def _torch_counts(rec: BaseRecognizer, x: object, options: dict) -> tuple[float | None, float | None]:
    """(parameters in millions, GFLOPs per image) of a PyTorch model; (None, None) for other backends."""
    if not hasattr(rec, "model"):
        return None, None
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode(), rec.autocast():
        rec.model.decode(x.to(rec.device), **options)
    return sum(p.numel() for p in rec.model.parameters()) / 1e6, counter.get_total_flops() / 1e9


def run_bench(rec: BaseRecognizer, batch_size: int = 64, repeats: int = 20, fixed_length: int | None = None
              ) -> BenchResult:
    """Measure `rec` on the rendered word; `fixed_length` decodes that many characters (untrained models)."""
    options = {"max_length": fixed_length, "early_exit": False} if fixed_length else {}
    img = word_image()
    x1 = rec.preprocess([img])
    t0 = time.perf_counter()
    rec.decode_tensors(x1, **options)
    _sync(rec)
    first_ms = 1000 * (time.perf_counter() - t0)
    params, gflops = _torch_counts(rec, x1, options)
    for _ in range(3):
        text = rec.decode_tensors(x1, **options)[0].text
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rec.decode_tensors(rec.preprocess([img]), **options)
        _sync(rec)
        times.append(time.perf_counter() - t0)
    xb = rec.preprocess([img] * batch_size)
    rec.decode_tensors(xb, **options)
    batch_times = []
    for _ in range(max(3, repeats // 5)):
        t0 = time.perf_counter()
        rec.decode_tensors(rec.preprocess([img] * batch_size), **options)
        _sync(rec)
        batch_times.append(time.perf_counter() - t0)
    return BenchResult(params, gflops, 1000 * statistics.median(times), batch_size / statistics.median(batch_times),
                       _peak_mb(rec), text, first_ms)
