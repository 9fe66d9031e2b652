"""Zero-shot word ranking with CLIP towers trained in the test to match word images and their text."""

import pytest
import torch
import torch.nn.functional as F

from clip4str.cli import main
from clip4str.data.transforms import preprocess
from clip4str.model.towers import build_clip, clip_bpe_tokenizer
from clip4str.model_config import OPENAI_MEAN, OPENAI_STD
from clip4str.zeroshot import DEFAULT_TEMPLATE, rank_words
from conftest import render_word

WORDS = ["cat", "horse", "river", "market"]
LOSS_GOAL = 0.05  # each true pair then has a probability of about 0.95 or more, far from any rival
MAX_STEPS = 1000


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
    torch.manual_seed(0)
    clip = build_clip({"embed_dim": 64, "quick_gelu": False,
                       "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 2, "head_width": 64},
                       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}})
    images = preprocess([render_word(w) for w in WORDS], (64, 64), OPENAI_MEAN, OPENAI_STD)
    ids = clip_bpe_tokenizer(77)([DEFAULT_TEMPLATE.format(w) for w in WORDS])
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-3)
    target = torch.arange(len(WORDS))
    # CLIP's contrastive loss on four (image, caption) pairs, until every pair wins clearly. A fixed number of
    # steps ends elsewhere on CPUs whose math kernels differ (AVX2, AVX-512, AMX); a loss threshold does not.
    for _ in range(MAX_STEPS):
        img = F.normalize(clip.encode_image(images), dim=-1)
        txt = F.normalize(clip.encode_text(ids), dim=-1)
        logits = clip.logit_scale.exp() * img @ txt.T
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        if loss.item() < LOSS_GOAL:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < LOSS_GOAL, f"the tiny CLIP did not learn the four pairs in {MAX_STEPS} steps: {loss:.3f}"
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.pt"
    torch.save(clip.state_dict(), path)
    return clip, path


def test_probabilities_sum_to_one_and_the_true_word_ranks_first(trained_clip):
    clip, _ = trained_clip
    for word in WORDS:
        ranking = rank_words(clip, render_word(word), WORDS)
        assert sum(p for _, p in ranking) == pytest.approx(1.0, abs=1e-5)
        assert ranking[0][0] == word and ranking[0][1] > 2 * ranking[1][1], ranking


def test_zeroshot_command_with_a_local_clip_file(trained_clip, tmp_path, capsys):
    _, path = trained_clip
    render_word("river").save(tmp_path / "river.png")
    assert main(["zeroshot", str(tmp_path / "river.png"), "--clip", str(path), "--candidates", *WORDS]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert lines[0][0] == "river" and sum(float(p) for _, p in lines) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="template"):
        rank_words(trained_clip[0], tmp_path / "river.png", WORDS, template="no slot")
