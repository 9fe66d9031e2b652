"""`train.compile_encoder`: the image tower of training steps through `torch.compile` (its input shape is fixed,
so one compilation serves the run), falling back to eager mode where compiling fails on the machine at hand."""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from clip4str.errors import first_line
from clip4str.model import CLIP4STR
from clip4str.model.towers import encode_image_tokens


def attention_kernel(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernels of a training step: on CPU the plain (math) kernel, which trained ~15-20% faster than
    the fused flash kernel at these shapes (benchmarks/train_step.py); on GPU PyTorch's own choice."""
    return sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else contextlib.nullcontext()


def compile_image_encoder(model: CLIP4STR, batch_size: int, forward_context: contextlib.AbstractContextManager
                          ) -> bool:
    """Compile the image tower for `model`'s training steps, trying it first on a zero batch of the training
    shape under the step's precision (`forward_context`), forward and backward; True if it is in use. A failure
    (no C++ compiler, a backend that does not support the device) is reported in one line and training stays
    eager: the run goes on either way."""
    compiled = torch.compile(encode_image_tokens, dynamic=False)

    def tokens(visual: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        # Another batch size (samples that failed to load were dropped) goes eager rather than recompiling.
        return (compiled if images.shape[0] == batch_size else encode_image_tokens)(visual, images)

    device = next(model.parameters()).device
    images = torch.zeros(batch_size, 3, *model.config.image_size, device=device)
    try:
        with forward_context, attention_kernel(device):
            out = compiled(model.clip.visual, images)
        out.float().sum().backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure means: train eagerly
        reason = first_line(e, 200)
        print(f"train.compile_encoder: torch.compile failed on this machine ({type(e).__name__}: {reason}); "
              "training in eager mode", file=sys.stderr, flush=True)
        return False
    finally:
        model.zero_grad(set_to_none=True)
    model.train_image_tokens = tokens
    return True
