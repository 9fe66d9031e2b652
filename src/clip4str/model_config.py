"""The model configuration: everything needed to rebuild a CLIP4STR module, stored beside its weights."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from clip4str.charset import CHARSETS, resolve_charset

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DECODE_MODES = ("ar", "nar")
# Ranges far beyond any CLIP4STR model (ViT-H/14: 32 layers of width 1280) that keep a checkpoint made elsewhere
# from asking for unbounded memory or loops (a config.json with 100,000 layers or 10 million refinement passes).
INT_RANGES = {"max_label_length": (1, 1024), "decoder_depth": (1, 64), "decoder_heads": (1, 256),
              "text_context_length": (1, 1024), "num_permutations": (1, 256), "text_freeze_layers": (-1, 1024),
              "image_freeze_layers": (-1, 1024), "lst_reduction": (1, 1024), "refine_iters": (0, 16)}
FLOAT_RANGES = {"decoder_mlp_ratio": (1e-3, 16.0), "dropout": (0.0, 1.0), "cross_loss_weight": (0.0, 1e6),
                "ctc_weight": (0.0, 1e6), "adapter_ratio": (0.0, 1.0)}
TOWER_RANGES = {"width": (1, 16384), "layers": (0, 256), "heads": (1, 256), "head_width": (1, 16384),
                "context_length": (1, 4096), "vocab_size": (1, 10_000_000)}
MAX_PARAMETERS = 4e9  # the towers' estimated size (ViT-bigG/14 CLIP: 2.5e9)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_towers(clip: Any) -> None:
    """The open_clip tower config's sizes: integers in range, and an estimated size that fits in memory."""
    if not isinstance(clip, dict) or not isinstance(clip.get("vision_cfg", {}), dict) or \
            not isinstance(clip.get("text_cfg", {}), dict):
        raise ValueError("clip must be a mapping with vision_cfg and text_cfg mappings (open_clip's tower config)")
    vision, text = clip.get("vision_cfg", {}), clip.get("text_cfg", {})
    if "image_size" not in vision or "patch_size" not in vision:
        raise ValueError("clip.vision_cfg needs image_size and patch_size")
    for where, cfg in (("vision_cfg", vision), ("text_cfg", text)):
        for key, (lo, hi) in TOWER_RANGES.items():
            if key in cfg and not (_is_int(cfg[key]) and lo <= cfg[key] <= hi):
                raise ValueError(f"clip.{where}.{key} must be an integer in [{lo}, {hi}], got {cfg[key]!r}")
    if "embed_dim" in clip and not (_is_int(clip["embed_dim"]) and 1 <= clip["embed_dim"] <= 16384):
        raise ValueError(f"clip.embed_dim must be an integer in [1, 16384], got {clip['embed_dim']!r}")
    sides = {}
    for key in ("image_size", "patch_size"):
        sides[key] = vision[key] if isinstance(vision[key], (list, tuple)) else [vision[key]] * 2
        if len(sides[key]) != 2 or not all(_is_int(v) and 1 <= v <= 4096 for v in sides[key]):
            raise ValueError(f"clip.vision_cfg.{key} must be one or two integers in [1, 4096], got {vision[key]!r}")
    if any(p > i for p, i in zip(sides["patch_size"], sides["image_size"], strict=True)):
        raise ValueError(f"clip.vision_cfg.patch_size {vision['patch_size']!r} is larger than the image "
                         f"({vision['image_size']!r})")
    size = 12 * sum(c.get("width", 0) ** 2 * c.get("layers", 0) for c in (vision, text)) + \
        text.get("vocab_size", 0) * text.get("width", 0)
    if size > MAX_PARAMETERS:
        raise ValueError(f"clip towers of about {size:.2g} parameters are more than this library builds "
                         f"({MAX_PARAMETERS:.0g}); the config is damaged or not a CLIP4STR model")


@dataclass
class ModelConfig:
    """CLIP towers (open_clip config), decoders, charset, freezing, preprocessing and decoding defaults."""

    clip: dict[str, Any]
    charset: str = CHARSETS["94"]
    max_label_length: int = 25
    decoder_depth: int = 1
    decoder_heads: int = 8
    decoder_mlp_ratio: float = 4.0
    dropout: float = 0.1
    text_context_length: int = 16
    caption_charset: str = CHARSETS["36"]
    cross_branch: bool = True
    cross_loss_weight: float = 1.0
    ctc_weight: float = 0.0  # > 0: a CTC head on the image tokens' columns (training loss; decoding: guard, rescoring)
    num_permutations: int = 6
    perm_forward: bool = True
    perm_mirrored: bool = True
    text_freeze_layers: int = 6
    image_freeze_layers: int = -1
    peft: str = "none"
    adapter_ratio: float = 0.2
    lst_reduction: int = 8
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD
    decode_mode: str = "ar"
    refine_iters: int = 1
    # Decoding: a row whose image-branch reading equals the CTC head's with at least this confidence is given
    # without the cross-modal branch (`clip4str.cascade`); None: every row goes through it.
    cascade_confidence: float | None = None
    # Reading: a crop (or window) read with less than this confidence is read again at two other vertical scales
    # and the most confident of the three readings is kept (`clip4str.reading.vertical_views`); None: read once.
    second_look_confidence: float | None = None

    def __post_init__(self) -> None:
        self.charset = resolve_charset(self.charset)
        self.caption_charset = resolve_charset(self.caption_charset)
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {self.decode_mode!r}")
        for key, (lo, hi) in INT_RANGES.items():
            if not (_is_int(getattr(self, key)) and lo <= getattr(self, key) <= hi):
                raise ValueError(f"{key} must be an integer in [{lo}, {hi}], got {getattr(self, key)!r}")
        for key, (lo, hi) in FLOAT_RANGES.items():
            if not (_is_number(getattr(self, key)) and lo <= getattr(self, key) <= hi):
                raise ValueError(f"{key} must be a number in [{lo:g}, {hi:g}], got {getattr(self, key)!r}")
        for key in ("cross_branch", "perm_forward", "perm_mirrored"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        for key in ("cascade_confidence", "second_look_confidence"):
            value = getattr(self, key)
            if value is not None and not (_is_number(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{key} must be in [0, 1] or null, got {value!r}")
        for key, positive in (("image_mean", False), ("image_std", True)):
            value = getattr(self, key)
            if len(value) != 3 or not all(_is_number(v) and (v > 0 or not positive) for v in value):
                raise ValueError(f"{key} must be 3 finite numbers{' > 0' if positive else ''} (R, G, B), got "
                                 f"{list(value)!r}")
        _check_towers(self.clip)

    @property
    def image_size(self) -> tuple[int, int]:
        """Model input (height, width)."""
        size = self.clip["vision_cfg"]["image_size"]
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def embed_dim(self) -> int:
        """Shared image-text width, also the decoders' width."""
        return int(self.clip["embed_dim"])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(names)}")
        if "clip" not in data:
            raise ValueError("model config needs a 'clip' section (open_clip tower config)")
        return cls(**copy.deepcopy(data))


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `overrides` into a copy of `base` (nested dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
