"""The CLIP4STR network: towers, decoders, permutations and the module that joins them."""

from clip4str.model.clip4str import CLIP4STR, DecodeOutput
from clip4str.model.loss import LossOutput
from clip4str.model_config import ModelConfig

__all__ = ["CLIP4STR", "DecodeOutput", "LossOutput", "ModelConfig"]
