"""Drafted greedy decoding: a draft checked in one pass gives greedy decoding's logits, right or wrong."""

from pathlib import Path

import pytest
import torch

from clip4str import create_model
from clip4str.inference import Recognizer
from clip4str.model import greedy
from clip4str.model.greedy import cached_greedy
from conftest import reading_stops

HELLO = Path(__file__).parents[1] / "examples" / "hello.png"
STEP = greedy.decoding_step


def _setup(tiny_overrides):
    model = create_model("tiny", **tiny_overrides).eval()
    decoder = model.image_decoder
    images = torch.randn(4, 3, *model.config.image_size, generator=torch.Generator().manual_seed(1))
    kv = decoder.memory_kv(model.encode_image(images))
    return model, decoder, kv


def _drafts(reference, eos):
    classes = reference.shape[-1]
    assert eos == 0, "other characters are 1 .. classes - 1 below"

    def other_char(x, k):
        return 1 + (x + k - 1) % (classes - 1)

    right = reference.argmax(-1)
    wrong_early = right.clone()
    wrong_early[:, 1] = other_char(wrong_early[:, 1], 1)
    wrong_late = right.clone()  # the last row wrong at 5 while the others end inside the checked pass
    wrong_late[-1, 5] = other_char(wrong_late[-1, 5], 3)
    empty = torch.full((right.shape[0], 1), eos)
    longer = torch.cat([right, torch.randint(1, classes, (right.shape[0], 9))], dim=1)
    return {"right": right, "wrong at 1": wrong_early, "wrong at 5 in the last row": wrong_late, "empty": empty,
            "longer": longer}


def test_a_draft_gives_greedy_logits_up_to_each_rows_stop(tiny_overrides, monkeypatch):
    model, decoder, kv = _setup(tiny_overrides)
    tok, steps = model.tokenizer, 26
    budget = torch.tensor([26, 4, 11, 26])
    calls = []

    def counting_step(*args):
        calls.append(1)
        return STEP(*args)

    monkeypatch.setattr(greedy, "decoding_step", counting_step)
    with torch.inference_mode():
        reference, _ = cached_greedy(decoder, kv, steps, True, budget, tok)
        sequential_steps = len(calls)
        stops = reading_stops(reference, budget, tok.eos_id)
        ended = (reference.argmax(-1) == tok.eos_id).any(-1).tolist()
        assert stops == [7, 4, 7, 26] and ended == [True, False, True, False], "rows that end by EOS and by budget"
        for name, draft in _drafts(reference, tok.eos_id).items():
            calls.clear()
            out, _ = cached_greedy(decoder, kv, steps, True, budget, tok, draft=draft)
            assert out.shape == reference.shape, name
            for b, stop in enumerate(stops):
                assert out[b, :stop].argmax(-1).tolist() == reference[b, :stop].argmax(-1).tolist(), name
                torch.testing.assert_close(out[b, :stop], reference[b, :stop], atol=1e-5, rtol=0, msg=name)
            if name in ("right", "longer"):
                assert calls == [], f"{name}: a right draft needs no step"
            if name == "wrong at 1":
                assert 0 < len(calls) <= sequential_steps - 1, name
            if name == "wrong at 5 in the last row":  # rows 0-2 settled by the pass, the last steps from 6
                assert len(calls) == 26 - 6, name


def test_a_right_draft_gives_its_first_refinement_in_the_checking_pass(tiny_overrides, monkeypatch):
    from clip4str.model import refine
    model, decoder, kv = _setup(tiny_overrides)
    tok, steps = model.tokenizer, 26
    passes = []
    cloze = refine.cloze_pass
    monkeypatch.setattr(refine, "cloze_pass", lambda *a, **k: passes.append(1) or cloze(*a, **k))
    with torch.inference_mode():
        plain, lengths, ahead = model._first_pass(decoder, kv, steps, "ar", True, None)
        assert ahead is None
        stops = reading_stops(plain, lengths, tok.eos_id)
        assert len(set(stops)) > 1, "rows of several lengths: tokens after a row's EOS differ from the draft's"
        expected, _ = model._refine(decoder, kv, plain, lengths, steps)
        for name, draft in _drafts(plain, tok.eos_id).items():
            logits, lengths_d, ahead = model._first_pass(decoder, kv, steps, "ar", True, None, draft=draft,
                                                         refine=True)
            assert torch.equal(lengths_d, lengths), name
            assert (ahead is not None) == (name in ("right", "longer")), f"{name}: only a draft read as it is"
            passes.clear()
            out, _ = model._refine(decoder, kv, logits, lengths_d, steps, ahead=ahead)
            assert passes == ([] if ahead is not None else [1]), f"{name}: the refinement was computed ahead"
            assert out.shape == expected.shape, name
            for b, stop in enumerate(stops):
                torch.testing.assert_close(out[b, :stop], expected[b, :stop], atol=1e-5, rtol=0, msg=name)
        # Computed ahead for another reading (here: the last row one token shorter), it does not hold.
        _, _, ahead = model._first_pass(decoder, kv, steps, "ar", True, None, draft=plain.argmax(-1),
                                        refine=True)
        shorter = lengths.clone()
        shorter[-1] -= 1
        passes.clear()
        out, _ = model._refine(decoder, kv, plain, shorter, steps, ahead=ahead)
        assert passes == [1]


def test_drafts_are_ignored_where_they_cannot_apply(tiny_overrides):
    model = create_model("tiny", decoder_depth=2, **tiny_overrides).eval()
    images = torch.randn(2, 3, *model.config.image_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for options in ({}, {"early_exit": False, "max_length": 6}, {"mode": "nar"}):
            on, off = model.decode(images, **options), model.decode(images, draft=False, **options)
            torch.testing.assert_close(on.logits, off.logits, atol=0, rtol=0)


@pytest.mark.slow
def test_builtin_model_reads_the_same_with_and_without_drafts():
    from PIL import Image

    from clip4str.bench import word_image

    rec = Recognizer.from_pretrained()
    images = [Image.open(HELLO).convert("RGB"), word_image("Street"), word_image("CLIP4STR 2026"),
              word_image("a"), word_image("MISSISSIPPI")]
    for batch in (images[:1], images):
        x = rec.preprocess(batch)
        with torch.inference_mode():
            for options in ({}, {"refine_iters": 0}, {"refine_iters": 2}, {"max_length": 3}, {"mode": "nar"},
                            {"rescore": False, "guard": False}, {"compiled": True}):
                on, off = rec.model.decode(x, **options), rec.model.decode(x, draft=False, **options)
                assert torch.equal(on.lengths, off.lengths) and torch.equal(on.image_lengths, off.image_lengths)
                for b, n in enumerate(on.lengths.tolist()):
                    torch.testing.assert_close(on.logits[b, :n], off.logits[b, :n], atol=1e-4, rtol=0)
                for b, n in enumerate(on.image_lengths.tolist()):
                    torch.testing.assert_close(on.image_logits[b, :n], off.image_logits[b, :n], atol=1e-4, rtol=0)
    assert [r.text for r in rec.read(images)] == [r.text for r in rec.read(images, draft=False)]


@pytest.mark.slow
def test_a_refinement_computed_ahead_is_dropped_when_the_captions_change(monkeypatch):
    """The cross branch's refinement computed with its check holds for the first pass's memory only."""
    from PIL import Image

    from clip4str.model.clip4str import CLIP4STR
    rec = Recognizer.from_pretrained()
    x = rec.preprocess([Image.open(HELLO).convert("RGB")])
    captions = CLIP4STR.captions

    def changed_at_refinement(self, logits, lengths=None):  # the refinement's call passes no lengths
        out = captions(self, logits, lengths)
        return out if lengths is not None else [c + "s" for c in out]

    monkeypatch.setattr(CLIP4STR, "captions", changed_at_refinement)
    with torch.inference_mode():
        on, off = rec.model.decode(x, rescore=False), rec.model.decode(x, draft=False, rescore=False)
    n = int(on.lengths[0])
    assert n == int(off.lengths[0])
    torch.testing.assert_close(on.logits[0, :n], off.logits[0, :n], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_builtin_model_reads_hello_in_one_decoder_pass_per_branch_it_runs(monkeypatch):
    """Both drafts right: one pass per branch checks the draft and refines it; no step, no other pass. With the
    cascade (the built-in model's default) the cross branch does not run for `hello`: one pass in all."""
    from PIL import Image

    from clip4str.model import refine, static_step
    from clip4str.onnx_backend import OnnxRecognizer
    hello = Image.open(HELLO).convert("RGB")
    passes, steps = [], []
    cloze = static_step.cloze_pass
    for module in (greedy, refine):
        monkeypatch.setattr(module, "cloze_pass", lambda *a, **k: passes.append(1) or cloze(*a, **k))
    monkeypatch.setattr(greedy, "decoding_step", lambda *a: steps.append(1) or STEP(*a))
    rec = Recognizer.from_pretrained()
    for cascade, expected in ((False, 2), (True, 1)):
        passes.clear()
        assert rec.read([hello], cascade=cascade)[0].text == "hello"
        assert (len(passes), len(steps)) == (expected, 0)
    onnx_passes = []
    run = OnnxRecognizer._step
    monkeypatch.setattr(OnnxRecognizer, "_step", lambda self, *a, **k: onnx_passes.append(1) or run(self, *a, **k))
    for cascade, expected in ((False, 2), (True, 1)):
        onnx_passes.clear()
        assert OnnxRecognizer().read([hello], cascade=cascade)[0].text == "hello"
        assert len(onnx_passes) == expected


@pytest.mark.slow
def test_builtin_onnx_model_reads_the_same_with_and_without_drafts_in_fewer_passes(monkeypatch):
    import numpy as np
    from PIL import Image

    from clip4str.bench import word_image
    from clip4str.onnx_backend import OnnxRecognizer

    rec = OnnxRecognizer()
    images = [Image.open(HELLO).convert("RGB"), word_image("Street"), word_image("CLIP4STR 2026"), word_image("a")]
    x = rec.preprocess(images)
    passes = {}
    step = OnnxRecognizer._step
    for draft in (True, False):
        calls = []

        def counting(self, *args, calls=calls, **kwargs):
            calls.append(1)
            return step(self, *args, **kwargs)

        monkeypatch.setattr(OnnxRecognizer, "_step", counting)
        passes[draft] = (rec.decode(x, draft=draft), len(calls))
    (on, on_calls), (off, off_calls) = passes[True], passes[False]
    assert np.array_equal(on[1], off[1])
    eos = rec.tokenizer.eos_id
    stops = reading_stops(torch.from_numpy(on[0]), torch.from_numpy(on[1]), eos)
    assert stops == reading_stops(torch.from_numpy(off[0]), torch.from_numpy(off[1]), eos)
    for b, stop in enumerate(stops):
        assert np.abs(on[0][b, :stop] - off[0][b, :stop]).max() < 1e-4
    assert on_calls < off_calls
    assert [r.text for r in rec.read(images)] == [r.text for r in rec.read(images, draft=False)]
