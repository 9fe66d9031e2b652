"""The tiny preset memorises a batch of rendered words: every decoding mode then reads all of them."""

import pytest
import torch

from clip4str import load_model
from clip4str.data.transforms import preprocess
from conftest import OVERFIT_WORDS, READ_MODES


@pytest.fixture(scope="module")
def overfit(overfit_checkpoint):
    folder, rendered, losses = overfit_checkpoint
    model = load_model(folder)
    cfg = model.config
    return model, preprocess(rendered, cfg.image_size, cfg.image_mean, cfg.image_std), losses


@pytest.mark.slow
@pytest.mark.parametrize("mode", READ_MODES)
def test_every_decoding_mode_reads_the_overfit_batch(overfit, mode):
    model, images, losses = overfit
    print(f"steps={len(losses)} first loss={losses[0]:.3f} last loss={losses[-1]:.4f}")
    assert losses[-1] < losses[0] / 10
    assert [r.text for r in model.read(images, **READ_MODES[mode])] == OVERFIT_WORDS


@pytest.mark.slow
def test_image_branch_and_batching_agree_on_the_overfit_batch(overfit):
    model, images, _ = overfit
    with torch.inference_mode():
        out = model.decode(images)
        image_texts = [r.text for r in model.tokenizer.decode(out.image_logits.softmax(-1), out.image_lengths)]
        alone = [model.read(images[i:i + 1])[0].text for i in range(len(OVERFIT_WORDS))]
    assert image_texts == OVERFIT_WORDS
    assert alone == OVERFIT_WORDS
