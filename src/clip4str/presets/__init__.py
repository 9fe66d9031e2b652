"""Model presets as data: one JSON file per preset, keys of `ModelConfig` plus a description."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def list_presets() -> list[str]:
    """Names of the built-in model presets."""
    files = resources.files(__package__).iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset's config dict (without its description)."""
    if name not in list_presets():
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(list_presets())}")
    data = json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text(encoding="utf-8"))
    data.pop("description", None)
    return data
