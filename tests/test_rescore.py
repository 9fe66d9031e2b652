"""Joint rescoring: the CTC likelihood, the candidates, the choice, and both backends choosing alike."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip4str import create_model, rescore
from clip4str.onnx_backend import OnnxRecognizer


@pytest.mark.parametrize("chars", [[3], [3, 3], [1, 2, 3], [5, 5, 5, 2], [1, 2, 1, 2, 1, 2, 1, 2, 1, 2]])
def test_ctc_log_likelihood_is_pytorchs(chars):
    log_probs = torch.randn(8, 7, generator=torch.Generator().manual_seed(len(chars))).log_softmax(-1)
    expected = -F.ctc_loss(log_probs[:, None], torch.tensor([chars]), torch.tensor([8]), torch.tensor([len(chars)]),
                           blank=0, reduction="sum", zero_infinity=False).item()
    got = rescore.ctc_log_likelihood(log_probs.numpy().astype(np.float64), chars, blank=0)
    if math.isinf(expected):  # 10 alternating characters need 10 columns; there are 8
        assert got == -math.inf and len(chars) == 10
    else:
        assert got == pytest.approx(expected, abs=1e-4)


def test_a_label_too_long_for_the_columns_is_impossible():
    log_probs = np.log(np.full((3, 4), 0.25))
    assert rescore.ctc_log_likelihood(log_probs, [1, 1, 1], blank=0) == -math.inf  # needs 5 columns


def test_readings_end_at_eos_and_runaways_have_none():
    assert rescore.readings([[3, 4, 0, 5], [3, 3, 3, 3], [0, 1, 1, 1]], [4, 4, 4], eos=0) == [[3, 4], None, []]
    assert rescore.readings([[3, 4, 0]], [2], eos=0) == [None]  # its EOS lies beyond its length


def test_candidates_only_where_readings_differ():
    finals, images, ctcs = [[1, 2], [1, 2], [], None, [1], [1, 2]], [[1, 2], [1, 3], [1], [4], [1], None], \
        [[1, 2], [1, 2], [2], [4], [], [1, 2, 3, 4, 5, 6]]
    cands = rescore.candidates(finals, images, ctcs, max_chars=5)
    # row 0 agrees, row 2 has no final reading, row 3's never ended (the guard's), row 4: CTC read nothing,
    # row 5: the image branch never ended and the CTC reading is longer than the decoding limit
    assert cands.owner == [1, 1] and cands.chars == [[1, 2], [1, 3]]
    tgt_in, targets = cands.teacher_forcing(bos=8, eos=0, pad=9)
    assert tgt_in.tolist() == [[8, 1, 2], [8, 1, 3]] and targets.tolist() == [[1, 2, 0], [1, 3, 0]]


def _logits_reading(rows, classes=6):
    out = np.full((len(rows), 3, classes), -5.0)
    for n, row in enumerate(rows):
        for k, (c, logit) in enumerate(row):
            out[n, k, c] = logit
    return out


def test_the_reading_with_the_best_sum_of_the_three_scores_wins():
    cands = rescore.Candidates([0, 0, 1, 1], [[1, 2], [1, 3], [4, 4], [4]])
    _, targets = cands.teacher_forcing(bos=6, eos=0, pad=5)
    # image decoder prefers [1, 3] a little, cross decoder prefers [1, 2] a little: the CTC columns decide
    image = _logits_reading([[(1, 5), (2, 3), (0, 5)], [(1, 5), (3, 5), (0, 5)], [(4, 5), (4, 5), (0, 5)],
                             [(4, 5), (0, 5)]])
    cross = _logits_reading([[(1, 5), (2, 5), (0, 5)], [(1, 5), (3, 3.5), (0, 5)], [(4, 5), (4, 5), (0, 5)],
                             [(4, 5), (0, 5)]])
    columns = np.log(np.full((2, 4, 6), 0.01))
    columns[0, [0, 1, 2, 3], [1, 1, 3, 0]] = np.log(0.95)  # row 0's columns read "1 3"
    columns[1, [0, 1, 2, 3], [4, 0, 4, 0]] = np.log(0.95)  # row 1's read "4 4": its final reading stays
    found = rescore.choose(cands, image, cross, columns, targets, blank=0, pad=5)
    assert list(found) == [0] and found[0][0] == [1, 3]
    probs = found[0][1]  # the cross decoder's probabilities of "1", "3" and EOS
    assert len(probs) == 3 and probs[1] == pytest.approx(math.exp(3.5) / (math.exp(3.5) + math.exp(-5) * 5))


def test_both_backends_rescore_the_builtin_model_alike():
    from clip4str.data.synth import WordRenderer
    from clip4str.inference import Recognizer

    renderer = WordRenderer(seed=0)  # hard synthetic words: the three readings often differ
    images = [renderer.render(i)[0] for i in range(48)]
    rec, onnx = Recognizer.from_pretrained(), OnnxRecognizer()
    plain = [r.text for r in rec.read(images, rescore=False)]
    ours = [r.text for r in rec.read(images)]
    assert sum(p != o for p, o in zip(plain, ours, strict=True)) >= 1, "rescoring changed nothing: not tested"
    assert [r.text for r in onnx.read(images)] == ours
    assert [r.text for r in onnx.read(images, rescore=False)] == plain


def test_rescoring_keeps_runaways_for_the_guard_and_works_without_a_cross_branch(tiny_overrides):
    torch.manual_seed(0)
    for cross in (True, False):
        model = create_model("tiny", ctc_weight=0.5, cross_branch=cross, **tiny_overrides).eval()
        x = torch.randn(8, 3, 32, 128, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            plain = model.decode(x, max_length=8, rescore=False, guard=False)
            ours = model.decode(x, max_length=8, guard=False)
        # random weights never emit EOS: every reading runs to the limit, so nothing is a candidate
        assert not (plain.logits.argmax(-1) == model.tokenizer.eos_id).any()
        assert torch.equal(ours.logits, plain.logits) and torch.equal(ours.lengths, plain.lengths)
