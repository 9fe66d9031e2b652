"""Dropout with cheaper random masks on CPU, where PyTorch's `bernoulli_` was a fifth of a training step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# One random int64 gives four 16-bit draws; an element is dropped when its draw falls in the lowest
# k = round(p * 65536) of the 65536 values: the drop rate is k / 65536 (p within 1/131072), and kept values are
# scaled by the inverse of the rate actually drawn, so the expectation is exact.
_DRAWS = 65536


def dropped_draws(p: float) -> int:
    """How many of the 65536 16-bit draws drop an element at rate p."""
    return min(max(round(p * _DRAWS), 0), _DRAWS)


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A boolean CPU mask of `shape`: True (keep) with probability 1 - dropped_draws(p) / 65536, from the global
    generator."""
    n = shape.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    return bits.view(torch.int16)[:n].view(shape) >= dropped_draws(p) - _DRAWS // 2


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout(x, p, training)`; on CPU the mask comes from 16 random bits per element (3x faster here)."""
    if not training or p == 0.0:
        return x
    k = dropped_draws(p)
    if x.device.type != "cpu" or k == _DRAWS:
        return F.dropout(x, p, True)
    return (x * keep_mask(x.shape, p)).mul_(_DRAWS / (_DRAWS - k))


class Dropout(nn.Dropout):
    """`nn.Dropout` with the cheaper CPU masks of `dropout` (same parameters and state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
