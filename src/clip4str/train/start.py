"""The model a run starts from: a preset with random weights, CLIP or ImageNet towers, or a clip4str checkpoint's
weights fitted to the config (input size, deeper tower, the CTC head), keeping the checkpoint's decoding settings."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

from clip4str.factory import create_model, create_model_from_imagenet_vit
from clip4str.inference import default_model_path
from clip4str.model import CLIP4STR
from clip4str.model_config import ModelConfig
from clip4str.train.config import TrainConfig
from clip4str.weights import (
    CONFIG_NAME,
    add_identity_blocks,
    fit_positions,
    load_exact,
    model_config,
    read_checkpoint_config,
    read_tensors,
)

# Settings that only shape training or are decoding options: a run may start from weights trained with others.
TRAINING_ONLY_KEYS = {"dropout", "cross_loss_weight", "ctc_weight", "num_permutations", "perm_forward",
                      "perm_mirrored", "text_freeze_layers", "image_freeze_layers", "decode_mode", "refine_iters",
                      "cascade_confidence", "second_look_confidence"}
# A run from a checkpoint keeps these of its settings unless its config sets them: the CTC head (which the runaway
# guard, joint rescoring and the cascade read with) and the decoding defaults, so a fine-tuned built-in model reads
# as the built-in one does.
INHERITED_KEYS = ("ctc_weight", "decode_mode", "refine_iters", "cascade_confidence", "second_look_confidence")


def build_model(cfg: TrainConfig, init: bool = True) -> CLIP4STR:
    """The model of the config with its initialisation (random, a CLIP file, an ImageNet ViT file or a clip4str
    checkpoint). init=False skips a clip4str checkpoint's weights (a resumed or exported run's come from its
    last.ckpt); CLIP and ImageNet files are read either way, as they set the towers' shapes."""
    m = cfg.model
    kind, _, path = m.init.partition(":")
    if kind not in ("random", "clip", "imagenet", "checkpoint", "builtin") or \
            (kind not in ("random", "builtin") and not path):
        raise ValueError("model.init must be random, builtin, clip:<file>, imagenet:<file> or "
                         f"checkpoint:<clip4str folder>, got {m.init!r}")
    if kind == "imagenet":
        return create_model_from_imagenet_vit(m.preset, path, **m.overrides)
    folder = default_model_path() if kind == "builtin" else Path(path)
    overrides = dict(m.overrides)
    if kind in ("checkpoint", "builtin"):
        if init or (folder / CONFIG_NAME).is_file():
            overrides |= inherited_settings(folder, overrides)
        else:  # resumed or exported after the start checkpoint was removed: what the run recorded when it began
            overrides |= recorded_settings(Path(cfg.train.out_dir) / "config.yaml", overrides)
        m.overrides.update({k: overrides[k] for k in INHERITED_KEYS if k in overrides})  # into the run's config.yaml
    model = create_model(m.preset, clip_checkpoint=path if kind == "clip" else None, **overrides)
    if init and kind in ("checkpoint", "builtin"):
        load_weights_into(model, folder)
    return model


def inherited_settings(folder: str | Path, overrides: dict) -> dict:
    """The INHERITED_KEYS of checkpoint `folder` that `overrides` (the config's model keys) does not set."""
    doc, weights = read_checkpoint_config(folder)
    parent = model_config(doc, weights.parent / CONFIG_NAME).to_dict()
    return {k: parent[k] for k in INHERITED_KEYS if k not in overrides and k in parent}


def recorded_settings(run_config: Path, overrides: dict) -> dict:
    """The INHERITED_KEYS a run's config.yaml recorded at its start that `overrides` does not set."""
    if not run_config.is_file():
        return {}
    model = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("model") or {}
    return {k: model[k] for k in INHERITED_KEYS if k not in overrides and k in model}


def load_weights_into(model: CLIP4STR, folder: str | Path) -> None:
    """Start from a clip4str checkpoint's weights; the training-only CTC head may be on either side alone, and the
    input size may differ (same patches: the image positions are resampled to the new grid)."""
    doc, weights = read_checkpoint_config(folder)
    parent = model_config(doc, weights.parent / CONFIG_NAME)
    ours, theirs = _sizeless(model.config.to_dict()), _sizeless(parent.to_dict())
    differ = [f"{k}: checkpoint {theirs[k]!r}, config {ours[k]!r}" for k in ours
              if k not in TRAINING_ONLY_KEYS and ours[k] != theirs[k]]
    if differ:
        raise ValueError(f"checkpoint {folder} was built with other model settings ({'; '.join(differ)}); "
                         "set those model.* keys to the checkpoint's values, start from another checkpoint, or "
                         "train a new model from random weights (model.init=random)")
    state = read_tensors(weights)[0]
    own = model.state_dict()
    # Another input size with the same patches: the image tokens' positions are resampled to the new grid.
    key, grid, parent_grid = "clip.visual.positional_embedding", _grid(model.config), _grid(parent)
    if key in state and grid != parent_grid:
        state[key] = fit_positions(state[key], grid, parent_grid)
        print(f"{folder}: input {parent.image_size[0]}x{parent.image_size[1]} -> {model.config.image_size[0]}x"
              f"{model.config.image_size[1]}: image positions resampled from {parent_grid[0]}x{parent_grid[1]} to "
              f"{grid[0]}x{grid[1]} patches", file=sys.stderr)
    have, want = parent.clip["vision_cfg"]["layers"], model.config.clip["vision_cfg"]["layers"]
    if want < have:
        raise ValueError(f"checkpoint {folder} has {have} image-tower layers, the config {want}; a run may add "
                         "layers to a checkpoint's tower, not remove them")
    if want > have:  # a deeper tower: the new blocks start as identities
        if model.config.peft != "none":
            raise ValueError(f"model.peft={model.config.peft} freezes the image tower: blocks added to checkpoint "
                             f"{folder}'s {have} layers would never train; grow the tower without PEFT first")
        state = add_identity_blocks(state, own, "clip.visual.transformer.resblocks.", have, want)
        print(f"{folder}: image tower {have} -> {want} layers: blocks {have}-{want - 1} added as identities (their "
              "output projections zero)", file=sys.stderr)
    state = {k: v for k, v in state.items() if not k.startswith("ctc_head.") or k in own}
    state.update({k: v for k, v in own.items() if k.startswith("ctc_head.") and k not in state})
    load_exact(model, state, f"checkpoint {folder}")
    model.provenance = doc.get("provenance", {})  # the parent's, kept as the lineage of what this run makes


def _grid(config: ModelConfig) -> tuple[int, int]:
    """The image tokens' (rows, columns)."""
    patch = config.clip["vision_cfg"]["patch_size"]
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return config.image_size[0] // patch[0], config.image_size[1] // patch[1]


def _sizeless(config: dict) -> dict:
    """A model config without its input size and image-tower depth, which a checkpoint's weights can be fitted
    to."""
    config = copy.deepcopy(config)
    config["clip"].get("vision_cfg", {}).pop("image_size", None)
    config["clip"].get("vision_cfg", {}).pop("layers", None)
    return config
