"""Shared test helpers: rendered word images, the shared data folder, tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARITY = SHARED / "official-parity"


def render_word(text: str, size: int = 28, fg: tuple = (20, 20, 20), bg: tuple = (235, 235, 225)) -> Image.Image:
    """A word drawn with Pillow's built-in font on a flat background."""
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("RGB", (right - left + 12, bottom - top + 10), bg)
    ImageDraw.Draw(img).text((6 - left, 5 - top), text, font=font, fill=fg)
    return img


@pytest.fixture
def parity_dir() -> Path:
    """The authors' parity fixture; tests using it skip where ../shared is absent."""
    if not (PARITY / "weights.safetensors").is_file():
        pytest.skip(f"parity fixture not found at {PARITY} (../shared beside the clone)")
    return PARITY


@pytest.fixture
def tiny_overrides() -> dict:
    """A much smaller tiny model for fast unit tests (same code paths)."""
    return {
        "clip": {"embed_dim": 32, "vision_cfg": {"width": 64, "layers": 2, "head_width": 32},
                 "text_cfg": {"width": 32, "heads": 2, "layers": 2, "vocab_size": 49408}},
        "decoder_heads": 4,
    }


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
