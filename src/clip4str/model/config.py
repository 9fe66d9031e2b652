"""The model configuration: everything needed to rebuild a CLIP4STR module, stored beside its weights."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from clip4str.charset import CHARSETS, resolve_charset

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DECODE_MODES = ("ar", "nar")


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
        if self.max_label_length < 1 or self.refine_iters < 0 or self.num_permutations < 1:
            raise ValueError("max_label_length and num_permutations must be >= 1, refine_iters >= 0")
        if self.cascade_confidence is not None and not 0.0 <= self.cascade_confidence <= 1.0:
            raise ValueError(f"cascade_confidence must be in [0, 1] or null, got {self.cascade_confidence!r}")
        if self.second_look_confidence is not None and not 0.0 <= self.second_look_confidence <= 1.0:
            raise ValueError("second_look_confidence must be in [0, 1] or null, got "
                             f"{self.second_look_confidence!r}")
        vision = self.clip.get("vision_cfg", {})
        if "image_size" not in vision or "patch_size" not in vision:
            raise ValueError("clip.vision_cfg needs image_size and patch_size")

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
