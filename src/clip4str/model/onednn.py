"""fp32 matrix products of CPU inference through oneDNN, with each weight packed once into its blocked layout.

Why: PyTorch's CPU `linear` calls MKL's sgemm, which on the AMD EPYC this project runs on reaches about a third of
the speed of oneDNN with a prepacked weight at the sizes of a read (65 image tokens x 256 -> 1024: 259 us against
85 us; batch 32: 5.3 ms against 2.3 ms). A oneDNN call costs about 17 us however small, so products of fewer than
`MIN_MACS` multiply-adds (a decoding step's, a caption's) stay with MKL. Only weights registered by `pack_linears`
are packed; training, autograd, autocast, other dtypes and devices, torch.compile, ONNX export and dispatch modes
(FLOP counting) use `F.linear` unchanged.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

MIN_MACS = 2**20  # where oneDNN's fixed cost stops losing to MKL here (256- and 128-wide layers, 4-65 rows)
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> (`_key` of its data when packed, packed weight)


def available() -> bool:
    """Whether this PyTorch has oneDNN's packed linear (a private operator: checked, never assumed)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") and \
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           registered: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN where `weight` is registered and the call is fp32 CPU inference of several rows.

    registered: the tensor registered for `weight` where `weight` is a new view at each call (a slice of a
    parameter): its packing is used while it shows the same data.
    """
    # The cheap tests come first (most calls are small products), the registry lookup last; dynamo must not
    # trace the registry, and a tracer must not see the registered view.
    if torch.compiler.is_compiling() or x.numel() * weight.shape[0] < MIN_MACS or x.dtype != torch.float32 or \
            x.device.type != "cpu" or weight.dtype != torch.float32 or \
            (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) or torch.jit.is_tracing() or \
            _get_current_dispatch_mode() is not None or torch.is_autocast_enabled("cpu") or \
            torch.onnx.is_in_onnx_export():
        # Graphs (torch.compile, ONNX export) record the plain product; dispatch modes (FLOP counting) and
        # autocast see the operator they know.
        return F.linear(x, weight, bias)
    if registered is not None and _key(registered) != _key(weight):
        registered = None
    entry = _PACKED.get(weight if registered is None else registered)
    if entry is None:
        return F.linear(x, weight, bias)
    key, packed = entry
    if packed is None or key != _key(weight):  # packed lazily, again after any change of the weight's data
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)
        _PACKED[weight if registered is None else registered] = (_key(weight), packed)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose forward goes through `linear` (assigned by `pack_linears`; same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _key(weight: torch.Tensor) -> tuple:
    """What identifies a weight's values: in-place updates bump the version, `.data = ...` changes the storage."""
    version = -1 if weight.is_inference() else weight._version  # inference tensors have no version counter
    return weight.data_ptr(), weight.dtype, tuple(weight.shape), version


def register(weight: torch.Tensor) -> None:
    """Let `linear` pack `weight` (at its first use in fp32 CPU inference)."""
    if weight not in _PACKED:
        _PACKED[weight] = (_key(weight), None)


def pack_linears(model: nn.Module) -> int:
    """Route `model`'s fp32 linear layers (and projections that call `linear` with a registered weight) through
    oneDNN in CPU inference; returns how many weights were registered (0 where this PyTorch lacks oneDNN)."""
    if not available():
        warnings.warn("this PyTorch has no oneDNN packed linear; fp32 reads use its default matrix products",
                      stacklevel=2)
        return 0
    count = 0
    for module in model.modules():
        if type(module) in (nn.Linear, PackedLinear, nn.modules.linear.NonDynamicallyQuantizableLinear):
            module.__class__ = PackedLinear
            register(module.weight)
            count += 1
        elif getattr(module, "packable_weights", None):
            for weight in module.packable_weights():
                register(weight)
                count += 1
    return count
