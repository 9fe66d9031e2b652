"""Recognizer: load a model once, read many images with PyTorch (any size, long crops in windows, batched)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch

from clip4str.data.transforms import ImageInput, preprocess
from clip4str.model import CLIP4STR, onednn
from clip4str.reading import BaseRecognizer, ReadResult
from clip4str.weights import load_model

PRECISIONS = ("fp32", "bf16", "fp16")
LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTHORS_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


def default_model_path() -> Path:
    """Folder of the built-in model shipped inside the package."""
    return Path(__file__).parent / "pretrained" / "tiny"


def store_matmul_weights_as(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep the weights of linear, convolution and attention projections in `dtype` (in place).

    Why: autocast rounds every fp32 weight to the low dtype again at each call, which on CPU costs as much as
    a fifth of a B/16 read; rounding once gives the very same numbers. Norms and embeddings stay fp32.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.to(dtype)
        elif isinstance(getattr(module, "in_proj_weight", None), torch.nn.Parameter):
            module.in_proj_weight.data = module.in_proj_weight.data.to(dtype)
            if module.in_proj_bias is not None:
                module.in_proj_bias.data = module.in_proj_bias.data.to(dtype)


class Recognizer(BaseRecognizer):
    """Reads text from word crops with a CLIP4STR model on CPU, CUDA or MPS.

    With precision bf16 or fp16 the model passed in is converted in place (see `store_matmul_weights_as`); in fp32
    on CPU its linear layers go through oneDNN with packed weights unless `packed=False` (`model.onednn`; the same
    parameters, products within rounding); `compiled` decodes with the `torch.compile`d step (compiled on the
    first read; `CLIP4STR.decode`).
    """

    def __init__(self, model: CLIP4STR, device: str = "cpu", precision: str = "fp32",
                 window_aspect: float | None = None, compiled: bool = False, packed: bool = True) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        try:
            self.device = torch.device(device)
            self.model = model.to(self.device).eval()
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"device {device!r} is not usable here ({e}); use cpu, cuda or mps") from e
        self.precision, self.compiled = precision, compiled
        if precision != "fp32":
            store_matmul_weights_as(self.model, LOW_PRECISION_DTYPES[precision])
        elif packed and self.device.type == "cpu":
            onednn.pack_linears(self.model)
        self.image_size = model.config.image_size
        self.second_look_confidence = model.config.second_look_confidence
        self.window_aspect = window_aspect or self._default_window()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu", precision: str = "fp32",
                        **kwargs: object) -> Recognizer:
        """Load a checkpoint folder (config.json + model.safetensors), or an authors' .ckpt/.pt file (converted
        in memory); no path = the built-in model."""
        if path is not None and Path(path).is_file() and Path(path).suffix in AUTHORS_SUFFIXES:
            from clip4str.convert import load_authors_checkpoint

            return cls(load_authors_checkpoint(path)[0], device, precision, **kwargs)
        if path is None:
            path = default_model_path()
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"the built-in model is missing from {path} (a damaged install?); "
                                        "reinstall clip4str or pass --model / a checkpoint folder")
        return cls(load_model(path), device, precision, **kwargs)

    @property
    def config(self):  # noqa: ANN201 - ModelConfig
        """The model's configuration."""
        return self.model.config

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images -> the model's input tensor (the one preprocessing function)."""
        cfg = self.model.config
        return preprocess(list(images), cfg.image_size, cfg.image_mean, cfg.image_std)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward pass of this recognizer runs in (autocast to its precision)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=LOW_PRECISION_DTYPES[self.precision])

    @torch.inference_mode()
    def decode_tensors(self, x: torch.Tensor, **options: object) -> list[ReadResult]:
        """Preprocessed images -> results (decoding options as `CLIP4STR.decode`)."""
        options.setdefault("compiled", self.compiled)
        with self.autocast():
            out = self.model.decode(x.to(self.device), **options)
        decoded = self.model.tokenizer.decode(out.logits.float().softmax(-1), out.lengths.tolist())
        return [ReadResult(d.text, d.confidence, d.char_probs) for d in decoded]
