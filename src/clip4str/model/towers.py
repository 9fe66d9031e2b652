"""CLIP image and text towers built with open_clip, returning every token, and their freezing helpers."""

from __future__ import annotations

import copy
import functools
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from torch import nn


def build_clip(config: dict[str, Any]) -> CLIP:
    """Build an open_clip `CLIP` from a config dict (embed_dim, quick_gelu, vision_cfg, text_cfg)."""
    cfg = copy.deepcopy(config)
    unknown = set(cfg) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
    if unknown:
        raise ValueError(f"unknown CLIP config keys {sorted(unknown)}")
    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                quick_gelu=bool(cfg.get("quick_gelu", False)))


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
