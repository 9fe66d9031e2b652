"""The runaway guard: a reading that never ends or repeats one character to the limit is replaced by the CTC
head's reading, in both backends; ordinary readings are never touched."""

import numpy as np
import pytest
import torch

from clip4str.factory import create_model
from clip4str.inference import Recognizer
from clip4str.runaway import RUNAWAY_RUN, apply_guard, ctc_greedy, find_runaways, reading_as_logits, run_start
from conftest import render_word

EOS, BLANK = 0, 0


def _log_probs(columns: list[int], classes: int = 6, p: float = 0.9) -> np.ndarray:
    """(1, W, C) log-probabilities whose best class per column is `columns`."""
    out = np.full((1, len(columns), classes), np.log((1 - p) / (classes - 1)))
    for t, c in enumerate(columns):
        out[0, t, c] = np.log(p)
    return out


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    [(chars, probs)] = ctc_greedy(_log_probs([1, 1, BLANK, 1, 2, 2, BLANK]), BLANK)
    assert chars == [1, 1, 2] and probs == pytest.approx([0.9, 0.9, 0.9])


@pytest.mark.parametrize(("ids", "length", "ctc_columns", "expected"), [
    ([1, 2, EOS], 3, [3, BLANK], None),                                # an ordinary reading is kept
    ([1, 2, 2, 2, 2, EOS], 6, [3, BLANK], None),                       # a run of 4 is kept
    ([1] + [2] * RUNAWAY_RUN + [EOS], 7, [3, BLANK, 4], [3, 4]),       # a run of 5: the CTC reading
    ([1, 2, 3, 1, 2, 3], 6, [3, BLANK, 4], [3, 4]),                    # no EOS within the length: the CTC reading
    ([1, 3] + [2] * 6 + [EOS], 9, [2, 0, 2, 0, 2, 0, 2, 0, 2], [1, 3, 2]),  # CTC runs away too: cut in the run
    ([1] + [2] * 6 + [EOS], 8, [BLANK, BLANK], [1, 2]),                # an empty CTC reading: cut in the run
    ([1, 2, 3, 1, 2, 3], 6, [BLANK], [1, 2, 3, 1, 2, 3]),              # nothing better and no run: kept as read
])
def test_what_replaces_a_runaway(ids, length, ctc_columns, expected):
    calls = []

    def log_probs():
        calls.append(1)
        return _log_probs(ctc_columns)

    probs = np.full((1, 10, 6), 0.1)
    found = find_runaways([ids], [length], EOS, log_probs, lambda: probs)
    assert (found[0][0] if found else None) == expected
    if expected is None:
        assert not calls  # the CTC head is not even run when nothing runs away
    else:
        assert len(found[0][1]) == len(expected) + 1  # a probability for each character and for EOS


def test_a_replaced_row_decodes_to_the_ctc_text_with_its_probabilities():
    from clip4str.charset import Tokenizer

    tok = Tokenizer("abc")
    a, b = tok.encode_ids("ab")
    logits = np.zeros((2, 8, tok.num_classes), dtype=np.float32)
    logits[0, :, a] = 9.0                          # row 0: 'aaaaaaaa', never ends
    logits[1, 0, b], logits[1, 1:, tok.eos_id] = 9.0, 9.0  # row 1: 'b'
    lengths = np.array([8, 2])
    new, new_lengths = apply_guard(logits, lengths, tok.eos_id, lambda: _log_probs([b, b, 0, a], 4, 0.8).repeat(2, 0))
    assert np.array_equal(new[1], logits[1]) and new_lengths.tolist() == [3, 2]
    texts = tok.decode(torch.from_numpy(new).softmax(-1), new_lengths.tolist())
    assert [t.text for t in texts] == ["ba", "b"]
    assert texts[0].confidence == pytest.approx(0.8 * 0.8, rel=1e-4)
    assert reading_as_logits([a], [1.0, 1.0], 4, tok.eos_id).shape == (2, 4)
    # A probability too low to be the most likely class is raised just enough to stay the reading.
    low = reading_as_logits([a], [0.01, 0.01], 4, tok.eos_id)
    assert low.argmax(-1).tolist() == [a, tok.eos_id]


def test_run_start():
    assert run_start([1, 2, 2, 2, 2, 2, 3]) == 1 and run_start([1, 2, 2, 2, 2]) is None


def _runaway_model(tiny_overrides):
    """A tiny model whose decoders say 'a' forever and whose CTC head reads 'b' in every column."""
    model = create_model("tiny", ctc_weight=0.5, **tiny_overrides).eval()
    a, b = model.tokenizer.encode_ids("ab")
    with torch.no_grad():
        for head, char in [(model.image_decoder.head, a), (model.cross_decoder.head, a), (model.ctc_head, b)]:
            head.weight.zero_()
            head.bias.fill_(-10.0)
            head.bias[char] = 10.0
    return model


def test_the_model_reads_a_runaway_with_its_ctc_head(tiny_overrides):
    model = _runaway_model(tiny_overrides)
    rec = Recognizer(model)
    image = render_word("b")
    assert rec.read([image])[0].text == "b"
    # Every step reads "a", also the one after the last character where EOS belongs.
    assert rec.read([image], guard=False)[0].text == "a" * (model.config.max_label_length + 1)


@pytest.mark.slow
def test_the_onnx_backend_guards_the_same_way(tiny_overrides, tmp_path):
    from clip4str.export import export_onnx
    from clip4str.onnx_backend import CTC_HEAD, OnnxRecognizer

    model = _runaway_model(tiny_overrides)
    export_onnx(model, tmp_path / "onnx")
    assert (tmp_path / "onnx" / CTC_HEAD).is_file()
    rec = OnnxRecognizer(tmp_path / "onnx")
    image = render_word("b")
    assert rec.read([image])[0].text == "b"
    # Every step reads "a", also the one after the last character where EOS belongs.
    assert rec.read([image], guard=False)[0].text == "a" * (model.config.max_label_length + 1)
