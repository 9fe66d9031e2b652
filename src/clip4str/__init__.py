"""clip4str: CLIP4STR scene text recognition.

Names are imported on first use, so that the ONNX Runtime backend (`clip4str.onnx_backend`) runs without
PyTorch installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "CLIP4STR": "clip4str.model", "ModelConfig": "clip4str.model", "create_model": "clip4str.factory",
    "list_presets": "clip4str.presets", "load_model": "clip4str.weights", "save_checkpoint": "clip4str.weights",
    "Recognizer": "clip4str.inference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clip4str' has no attribute {name!r}")
