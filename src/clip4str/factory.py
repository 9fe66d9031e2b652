"""Build models from presets (and optionally CLIP weights from a local file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clip4str.model import CLIP4STR, ModelConfig
from clip4str.model_config import merge
from clip4str.presets import load_preset
from clip4str.weights import fit_positions, load_exact, read_clip_checkpoint, read_imagenet_vit


def create_model(name: str, clip_checkpoint: str | Path | None = None, quick_gelu: bool | None = None,
                 **overrides: Any) -> CLIP4STR:
    """A CLIP4STR from preset `name` with config overrides; towers from `clip_checkpoint` if given.

    With a CLIP file, the tower sizes and activation come from the file (shapes and family), not the preset.
    """
    data = merge(load_preset(name), overrides)
    clip = None
    if clip_checkpoint is not None:
        clip = read_clip_checkpoint(clip_checkpoint, quick_gelu)
        data["clip"] = clip.config
    model = CLIP4STR(ModelConfig.from_dict(data))
    if clip is not None:
        state = dict(clip.state_dict)
        state.setdefault("logit_scale", model.clip.logit_scale.detach().clone())
        load_exact(model.clip, state, str(clip_checkpoint))
    return model


def create_model_from_imagenet_vit(name: str, vit_checkpoint: str | Path, **overrides: Any) -> CLIP4STR:
    """Preset `name` whose image tower is an ImageNet ViT (timm/torchvision file) at the preset's input size."""
    state, vision = read_imagenet_vit(vit_checkpoint)
    data = merge(load_preset(name), overrides)
    vision["image_size"] = data["clip"]["vision_cfg"]["image_size"]
    data["clip"] = merge(data["clip"], {"quick_gelu": False})  # ImageNet ViTs use GELU
    data["clip"]["vision_cfg"] = vision
    model = CLIP4STR(ModelConfig.from_dict(data))
    visual = model.clip.visual
    state["positional_embedding"] = fit_positions(state["positional_embedding"], visual.grid_size)
    for key in ("proj",):  # CLIP's projection to the shared width has no ImageNet counterpart: kept random
        state[key] = visual.state_dict()[key]
    load_exact(visual, state, str(vit_checkpoint))
    return model
