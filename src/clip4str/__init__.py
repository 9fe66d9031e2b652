"""clip4str: CLIP4STR scene text recognition."""

from clip4str.factory import create_model
from clip4str.model import CLIP4STR, ModelConfig
from clip4str.presets import list_presets
from clip4str.weights import load_model, save_checkpoint

__all__ = ["CLIP4STR", "ModelConfig", "create_model", "list_presets", "load_model", "save_checkpoint"]
__version__ = "0.1.0"
