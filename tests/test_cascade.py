"""The decoding cascade: rows whose image-branch reading equals the CTC head's, confidently, skip the cross branch."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clip4str import create_model
from clip4str.cascade import confident_rows
from clip4str.inference import Recognizer
from clip4str.model import clip4str as clip4str_module
from clip4str.model_config import ModelConfig
from conftest import assert_same_decoding, render_word

HELLO = Path(__file__).parents[1] / "examples" / "hello.png"
EOS = 0


def _ctc_columns(readings: list[list[int]], width: int = 8, classes: int = 6) -> np.ndarray:
    """(B, width, classes) log-probabilities whose best path reads each row's characters (blank = EOS = 0)."""
    out = np.log(np.full((len(readings), width, classes), 0.01))
    for b, chars in enumerate(readings):
        path = [c for ch in chars for c in (ch, EOS)]
        path += [EOS] * (width - len(path))
        out[b, np.arange(width), path] = np.log(0.9)
    return out


def test_confident_rows_need_the_ctc_reading_an_eos_and_the_confidence():
    ids = np.array([[1, 2, EOS, 5], [1, 2, EOS, 5], [1, 2, 3, 4], [EOS, 1, 1, 1], [1, 2, EOS, 5], [1, 2, EOS, 5]])
    probs = np.full(ids.shape, 0.99)
    probs[1, 1] = 0.5  # confidence 0.99 * 0.5 * 0.99: below the threshold
    probs[0, 3] = 0.01  # after EOS: not part of the confidence
    lengths = np.array([4, 4, 4, 4, 4, 2])  # the last row's EOS is past its length
    ctc = _ctc_columns([[1, 2], [1, 2], [1, 2, 3, 4], [], [1, 3], [1, 2]])
    sure = confident_rows(ids, probs, lengths, ctc, EOS, threshold=0.9)
    # agrees / too unsure / no EOS / empty / CTC reads otherwise / EOS cut off by the length
    assert sure.tolist() == [True, False, False, False, False, False]
    assert confident_rows(ids, probs, lengths, ctc, EOS, threshold=0.0).tolist() == [True, True, False, False, False,
                                                                                    False]


def test_cascade_confidence_is_checked():
    clip = {"embed_dim": 32, "vision_cfg": {"image_size": [32, 128], "patch_size": [8, 8]}}
    with pytest.raises(ValueError, match="cascade_confidence must be in"):
        ModelConfig(clip=clip, cascade_confidence=1.5)
    assert ModelConfig(clip=clip).cascade_confidence is None  # older checkpoints: no cascade


def _model(tiny_overrides, threshold):
    torch.manual_seed(0)
    return create_model("tiny", ctc_weight=0.5, cascade_confidence=threshold, **tiny_overrides).eval()


def test_confident_rows_take_the_image_branch_and_the_rest_decode_as_without_cascade(tiny_overrides, monkeypatch):
    model = _model(tiny_overrides, 0.5)
    x = torch.randn(4, 3, *model.config.image_size, generator=torch.Generator().manual_seed(3))
    sure = np.array([True, False, True, False])
    monkeypatch.setattr(clip4str_module, "confident_rows", lambda *a: sure)
    rows = []
    monkeypatch.setattr(model, "cross_memories", lambda tokens, passes, f=model.cross_memories:
                        rows.append(len(tokens)) or f(tokens, passes))
    with torch.inference_mode():
        # no runaway guard: random weights never emit EOS, and the guard would replace every reading alike
        ours = model.decode(x, max_length=8, guard=False)
        assert rows == [2], "the cross branch runs on the two unsure rows only"
        every = model.decode(x, max_length=8, guard=False, cascade=False)
        alone = [model.decode(x[b:b + 1], max_length=8, guard=False, cascade=False) for b in range(4)]
    torch.testing.assert_close(ours.image_logits, every.image_logits, atol=0, rtol=0)
    for b in range(4):
        n = int(ours.lengths[b])
        if sure[b]:  # the image branch's reading, as it is
            assert n == int(ours.image_lengths[b])
            torch.testing.assert_close(ours.logits[b, :n], ours.image_logits[b, :n], atol=0, rtol=0)
        else:  # what decoding without the cascade gives this row, alone or in the whole batch
            for ref in (alone[b], every):
                row = b if ref is every else 0
                assert n == int(ref.lengths[row])
                torch.testing.assert_close(ours.logits[b, :n], ref.logits[row, :n], atol=1e-5, rtol=0)


def test_all_rows_confident_runs_no_cross_branch_and_none_confident_changes_nothing(tiny_overrides, monkeypatch):
    model = _model(tiny_overrides, 0.5)
    x = torch.randn(3, 3, *model.config.image_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        every = model.decode(x, max_length=8, cascade=False)
        monkeypatch.setattr(clip4str_module, "confident_rows", lambda *a: np.zeros(3, dtype=bool))
        assert_same_decoding(model.decode(x, max_length=8), every, model.tokenizer.eos_id, atol=0)
        monkeypatch.setattr(clip4str_module, "confident_rows", lambda *a: np.ones(3, dtype=bool))
        monkeypatch.setattr(model, "encode_text", lambda *a: pytest.fail("the text encoder ran"))
        ours = model.decode(x, max_length=8, guard=False)
    torch.testing.assert_close(ours.logits, ours.image_logits, atol=0, rtol=0)


def test_no_cascade_without_a_threshold_a_ctc_head_or_in_nar_mode(tiny_overrides, monkeypatch):
    monkeypatch.setattr(clip4str_module, "confident_rows", lambda *a: pytest.fail("the cascade was consulted"))
    x = torch.randn(2, 3, 32, 128, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        _model(tiny_overrides, None).decode(x, max_length=6)
        create_model("tiny", cascade_confidence=0.5, **tiny_overrides).eval().decode(x, max_length=6)  # no CTC head
        _model(tiny_overrides, 0.5).decode(x, max_length=6, mode="nar")
        _model(tiny_overrides, 0.5).decode(x, max_length=6, cascade=False)


def test_builtin_model_skips_the_cross_branch_for_hello_and_reads_as_without_the_cascade():
    """The built-in model sets cascade_confidence (docs/training-builtin.md): `hello` is read by the image
    branch alone; on these words both ways read the same text, on both backends."""
    from PIL import Image

    from clip4str.onnx_backend import OnnxRecognizer

    rec, onnx = Recognizer.from_pretrained(), OnnxRecognizer()
    assert rec.config.cascade_confidence is not None
    assert onnx.cfg["cascade_confidence"] == rec.config.cascade_confidence
    images = [Image.open(HELLO).convert("RGB"), render_word("Street"), render_word("OPEN 24"), render_word("a"),
              render_word("MISSISSIPPI")]
    x = rec.preprocess(images[:1])
    calls = []
    encode_text = rec.model.encode_text
    rec.model.encode_text = lambda *a: calls.append(1) or encode_text(*a)
    assert rec.decode_tensors(x)[0].text == "hello" and calls == []
    assert rec.decode_tensors(x, cascade=False)[0].text == "hello" and calls == [1]
    for batch in (1, 5):
        ours = [r.text for r in rec.read(images, batch_size=batch)]
        assert ours == [r.text for r in rec.read(images, batch_size=batch, cascade=False)]
        assert [r.text for r in onnx.read(images, batch_size=batch)] == ours


def test_the_decoding_flags_reach_read_and_serve_and_only_commands_that_decode_take_them(monkeypatch, tmp_path):
    import uvicorn

    from clip4str import cli
    from clip4str.reading import ReadResult
    from clip4str.serve import app as serve_app

    seen = []

    class Recording:
        compiled, precision = False, "fp32"

        def iter_read(self, paths, batch_size, **options):
            seen.append(options)
            return iter([ReadResult("x", 1.0, [1.0]) for _ in paths])

    monkeypatch.setattr(cli, "recognizer", lambda args: Recording())
    image = tmp_path / "a.png"
    render_word("a").save(image)
    assert cli.main(["read", str(image), "--no-cascade", "--no-rescore"]) == 0
    assert {k: seen[-1][k] for k in ("guard", "rescore", "cascade", "second_look")} == {
        "guard": True, "rescore": False, "cascade": False, "second_look": True}
    assert cli.main(["read", str(image), "--no-second-look"]) == 0
    assert seen[-1]["second_look"] is False
    monkeypatch.setattr(cli, "collect_benchmarks", lambda *a: [SimpleNamespace(name="set", data=[None])])
    monkeypatch.setattr(cli, "run_benchmarks", lambda *a, **options: (seen.append(options), ([], 0.0))[1])
    assert cli.main(["test", str(tmp_path), "--no-second-look", "--no-guard"]) == 0
    assert seen[-1] == {"guard": False, "rescore": True, "cascade": True, "second_look": False, "max_windows": 64}
    monkeypatch.setattr(serve_app, "create_app", lambda rec, **kwargs: seen.append(kwargs["decode_options"]))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert cli.main(["serve", "--no-cascade"]) == 0
    assert seen[-1] == {"guard": True, "rescore": True, "cascade": False, "second_look": True}
    with pytest.raises(SystemExit):  # drawing attention maps does not decode with these options
        cli.main(["attention", str(image), "--out", str(tmp_path / "x.png"), "--no-cascade"])
