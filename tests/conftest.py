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


def labelled_folder(root: Path, words: list[str]) -> Path:
    """A folder dataset of `words` rendered as images, with its labels.tsv."""
    for i, w in enumerate(words):
        render_word(w).save(root / f"{i}.png")
    (root / "labels.tsv").write_text("".join(f"{i}.png\t{w}\n" for i, w in enumerate(words)))
    return root


def reading_stops(logits: torch.Tensor, lengths: torch.Tensor, eos: int) -> list[int]:
    """Where each row's reading ends: its first EOS within its length (included), else its length."""
    is_eos = logits.argmax(-1) == eos
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, logits.shape[1])
    return torch.minimum(first, lengths.to(first)).tolist()


def assert_same_decoding(a, b, eos: int, atol: float = 1e-4) -> None:  # noqa: ANN001 - two DecodeOutputs
    """Two decodings give the same readings: for the final and the image branch's logits, each row ends at the
    same position and its logits agree up to there (positions after a reading's end are never read)."""
    for (la, na), (lb, nb) in [((a.logits, a.lengths), (b.logits, b.lengths)),
                               ((a.image_logits, a.image_lengths), (b.image_logits, b.image_lengths))]:
        stops = reading_stops(la, na, eos)
        assert stops == reading_stops(lb, nb, eos)
        for row, stop in enumerate(stops):
            assert la[row, :stop].argmax(-1).tolist() == lb[row, :stop].argmax(-1).tolist()
            torch.testing.assert_close(la[row, :stop], lb[row, :stop], atol=atol, rtol=0)


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


OVERFIT_WORDS = ["hello", "World", "42", "STREET", "cafe", "x7Q", "Parking", "ok"]
READ_MODES = {
    "ar": {"mode": "ar", "refine_iters": 0},
    "ar+refine": {"mode": "ar", "refine_iters": 1},
    "nar": {"mode": "nar", "refine_iters": 0},
    "nar+refine2": {"mode": "nar", "refine_iters": 2},
}


@pytest.fixture(scope="session")
def overfit_checkpoint(tmp_path_factory):
    """The tiny preset trained until every decoding mode reads 8 rendered words; saved as a checkpoint.

    Returns (checkpoint folder, rendered images, losses).
    """
    from clip4str import create_model, save_checkpoint
    from clip4str.data.transforms import preprocess

    torch.manual_seed(0)
    model = create_model("tiny")
    cfg = model.config
    rendered = [render_word(w) for w in OVERFIT_WORDS]
    images = preprocess(rendered, cfg.image_size, cfg.image_mean, cfg.image_std)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(400):
        model.train()
        loss = model(images, OVERFIT_WORDS, generator=generator).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 24:
            model.eval()
            if all([r.text for r in model.read(images, **o)] == OVERFIT_WORDS for o in READ_MODES.values()):
                break
    model.eval()
    folder = save_checkpoint(model, tmp_path_factory.mktemp("overfit") / "ckpt", provenance={"test": "overfit"})
    return folder, rendered, losses
