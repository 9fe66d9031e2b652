"""Parameter-efficient tuning on a frozen CLIP: CLIP-Adapter and a ladder side network (LST)."""

from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from clip4str.model.towers import encode_image_tokens

PEFT_METHODS = ("none", "adapter", "lst")
PEFT_PREFIXES = ("image_peft.", "text_peft.")


class Adapter(nn.Module):
    """CLIP-Adapter: x -> ratio * MLP(x) + (1 - ratio) * x, with a 4x bottleneck MLP of two linear layers."""

    def __init__(self, dim: int, ratio: float = 0.2, reduction: int = 4) -> None:
        super().__init__()
        self.ratio = ratio
        self.mlp = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(dim // reduction, dim, bias=False), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ratio * self.mlp(x) + (1 - self.ratio) * x


class ImageAdapter(nn.Module):
    """Frozen image tower followed by an adapter on every token."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        self.adapter = Adapter(dim, ratio)

    def forward(self, visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return self.adapter(encode_image_tokens(visual, images))


class LadderSideNetwork(nn.Module):
    """LST: a narrow side network fed from every frozen block through gated down-projections.

    No gradient flows through the frozen backbone. Side state s_i = g_i * s_{i-1} + (1 - g_i) * down_i(h_i),
    then a side transformer block; g_i = sigmoid(alpha_i) is learnt. The result is up-projected to the shared
    width and added to the frozen output; the up-projection starts at zero, so training starts from CLIP.
    """

    def __init__(self, visual: nn.Module, out_dim: int, reduction: int = 8) -> None:
        super().__init__()
        width = visual.conv1.out_channels
        side = max(8, width // reduction)
        heads = next(h for h in range(max(1, side // 64), 0, -1) if side % h == 0)
        blocks = len(visual.transformer.resblocks)
        self.downs = nn.ModuleList(nn.Linear(width, side) for _ in range(blocks + 1))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(side, heads, batch_first=True) for _ in range(blocks))
        self.gates = nn.Parameter(torch.zeros(blocks))
        self.norm = nn.LayerNorm(side)
        self.up = nn.Linear(side, out_dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = visual.conv1(images).flatten(2).transpose(1, 2)
            cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
            hidden = [x]
            for block in visual.transformer.resblocks:
                x = block(x)
                hidden.append(x)
            frozen = visual.ln_post(x)
            frozen = frozen @ visual.proj if visual.proj is not None else frozen
        s = self.downs[0](hidden[0])
        for i, block in enumerate(self.blocks):
            g = torch.sigmoid(self.gates[i])
            s = block(g * s + (1 - g) * self.downs[i + 1](hidden[i + 1]))
        return frozen + self.up(self.norm(s))


def build_peft(method: str, clip: CLIP, adapter_ratio: float, lst_reduction: int
               ) -> tuple[nn.Module | None, nn.Module | None]:
    """(image module, text feature module) for a PEFT method; the caller freezes the whole CLIP."""
    if method not in PEFT_METHODS:
        raise ValueError(f"peft must be one of {PEFT_METHODS}, got {method!r}")
    dim = clip.text_projection.shape[1]
    if method == "adapter":
        return ImageAdapter(dim, adapter_ratio), Adapter(dim, adapter_ratio)
    if method == "lst":
        return LadderSideNetwork(clip.visual, dim, lst_reduction), None
    return None, None
