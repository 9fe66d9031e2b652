"""The tiny preset memorises a batch of rendered words: every decoding mode then reads all of them."""

import pytest
import torch

from clip4str import create_model
from clip4str.data.transforms import preprocess
from conftest import render_word

WORDS = ["hello", "World", "42", "STREET", "cafe", "x7Q", "Parking", "ok"]
MODES = {
    "ar": {"mode": "ar", "refine_iters": 0},
    "ar+refine": {"mode": "ar", "refine_iters": 1},
    "nar": {"mode": "nar", "refine_iters": 0},
    "nar+refine2": {"mode": "nar", "refine_iters": 2},
}


@pytest.fixture(scope="module")
def overfit():
    torch.manual_seed(0)
    model = create_model("tiny")
    cfg = model.config
    images = preprocess([render_word(w) for w in WORDS], cfg.image_size, cfg.image_mean, cfg.image_std)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(400):
        model.train()
        loss = model(images, WORDS, generator=generator).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 24:
            model.eval()
            if all(model.read(images, **opts) and [r.text for r in model.read(images, **opts)] == WORDS
                   for opts in MODES.values()):
                break
    model.eval()
    return model, images, losses


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_every_decoding_mode_reads_the_overfit_batch(overfit, mode):
    model, images, losses = overfit
    print(f"steps={len(losses)} first loss={losses[0]:.3f} last loss={losses[-1]:.4f}")
    assert losses[-1] < losses[0] / 10
    assert [r.text for r in model.read(images, **MODES[mode])] == WORDS


@pytest.mark.slow
def test_image_branch_and_batching_agree_on_the_overfit_batch(overfit):
    model, images, _ = overfit
    with torch.inference_mode():
        out = model.decode(images)
        image_texts = [r.text for r in model.tokenizer.decode(out.image_logits.softmax(-1), out.image_lengths)]
        alone = [model.read(images[i:i + 1])[0].text for i in range(len(WORDS))]
    assert image_texts == WORDS
    assert alone == WORDS
