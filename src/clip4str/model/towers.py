"""CLIP image and text towers built with open_clip, returning every token, and their freezing helpers."""

from __future__ import annotations

import copy
import functools
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from clip4str.model import onednn


class TowerAttention(nn.Module):
    """Self-attention with `nn.MultiheadAttention`'s parameters and call, on batch-first tensors with SDPA.

    Why: under autocast (and in training) MultiheadAttention takes its slow path, which projects a transposed
    (L, B, D) view; on CPU in bf16 that runs as a batched matmul against L copies of the weight, making B/16
    image encoding 2.6x slower than fp32. Projecting the contiguous batch-first input avoids it.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not (mha.batch_first and mha._qkv_same_embed_dim and mha.in_proj_bias is not None):
            raise ValueError("TowerAttention replaces batch-first self-attention with a packed, biased projection")
        self.num_heads, self.dropout = mha.num_heads, mha.dropout
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj

    def packable_weights(self) -> list[torch.Tensor]:
        """The weight its projection passes to `onednn.linear` (`onednn.pack_linears`)."""
        return [self.in_proj_weight]

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """(output, None) for self-attention over `query` (B, L, D); `attn_mask` is additive (L, L)."""
        if (key is not None and key is not query) or (value is not None and value is not query) or need_weights:
            raise ValueError("TowerAttention computes self-attention without weights only")
        b, n, d = query.shape
        qkv = onednn.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = attn_mask.to(q.dtype) if attn_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


def build_clip(config: dict[str, Any]) -> CLIP:
    """Build an open_clip `CLIP` from a config dict (embed_dim, quick_gelu, vision_cfg, text_cfg)."""
    cfg = copy.deepcopy(config)
    unknown = set(cfg) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
    if unknown:
        raise ValueError(f"unknown CLIP config keys {sorted(unknown)}")
    clip = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                quick_gelu=bool(cfg.get("quick_gelu", False)))
    for tower in (clip.visual.transformer, clip.transformer):  # same parameter names: checkpoints load as-is
        for block in tower.resblocks:
            block.attn = TowerAttention(block.attn)
    return clip


def encode_image_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """All ViT tokens (class token first) after `ln_post`, projected to the shared width: (B, 1 + HW, D)."""
    x = visual.conv1(images)
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    x = visual.transformer(x)
    x = visual.ln_post(x)
    return x @ visual.proj if visual.proj is not None else x


def encode_text_tokens(clip: CLIP, token_ids: torch.Tensor) -> torch.Tensor:
    """All text token features for a short context (causal mask and positions cut): (B, L, D)."""
    length = token_ids.shape[1]
    if length > clip.positional_embedding.shape[0]:
        raise ValueError(f"text context {length} exceeds the tower's {clip.positional_embedding.shape[0]}")
    x = clip.token_embedding(token_ids) + clip.positional_embedding[:length].to(clip.token_embedding.weight.dtype)
    mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    return x @ clip.text_projection


@functools.lru_cache(maxsize=4)
def clip_bpe_tokenizer(context_length: int) -> SimpleTokenizer:
    """CLIP's BPE tokenizer (vocabulary shipped inside open_clip); truncation keeps EOT last."""
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def _freeze(params: list[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(False)


def freeze_text_tower(clip: CLIP, layers: int) -> list[nn.Module]:
    """Freeze the text tower: -1 nothing, 0 the embeddings, N the embeddings and blocks 0..N-1.

    Returns the frozen blocks, which must stay in eval mode while the rest trains.
    """
    if layers < 0:
        return []
    blocks = clip.transformer.resblocks
    if layers > len(blocks):
        raise ValueError(f"text_freeze_layers={layers} but the text tower has {len(blocks)} blocks")
    _freeze([clip.token_embedding.weight, clip.positional_embedding])
    frozen = list(blocks[:layers])
    _freeze([p for b in frozen for p in b.parameters()])
    return [clip.token_embedding, *frozen]


def freeze_image_tower(visual: nn.Module, layers: int) -> list[nn.Module]:
    """Freeze the image tower: -1 nothing, 0 the patch/position embeddings and ln_pre, N also blocks 0..N-1."""
    if layers < 0:
        return []
    blocks = visual.transformer.resblocks
    if layers > len(blocks):
        raise ValueError(f"image_freeze_layers={layers} but the image tower has {len(blocks)} blocks")
    stem = [visual.conv1, visual.ln_pre]
    _freeze([visual.class_embedding, visual.positional_embedding])
    frozen = stem + list(blocks[:layers])
    _freeze([p for m in frozen for p in m.parameters()])
    return frozen
