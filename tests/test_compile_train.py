"""train.compile_encoder: the compiled image tower gives eager mode's tokens and gradients, a compiler failure
leaves training eager with a one-line note, and a run with it trains and exports."""

import contextlib

import pytest
import torch

from clip4str import create_model
from clip4str.model.towers import encode_image_tokens
from clip4str.train import compile as compile_mod
from clip4str.train.config import load_config
from clip4str.train.run import train


@pytest.mark.slow
def test_the_compiled_tower_gives_eager_tokens_and_gradients(tiny_overrides):
    model = create_model("tiny", **tiny_overrides).train()
    assert compile_mod.compile_image_encoder(model, 3, contextlib.nullcontext())
    assert model.train_image_tokens is not encode_image_tokens
    assert all(p.grad is None for p in model.parameters())  # the try-out leaves no gradients behind
    images = torch.randn(3, 3, *model.config.image_size)
    results = []
    for fn in (encode_image_tokens, model.train_image_tokens):
        tokens = fn(model.clip.visual, images)
        (tokens * torch.linspace(-1, 1, tokens.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((tokens.detach(), grads))
        model.zero_grad(set_to_none=True)
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert eager_grads.keys() == compiled_grads.keys() and eager_grads
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], atol=1e-4, rtol=1e-3, msg=name)
    calls = []
    compiled_tokens = model.train_image_tokens
    model.train_image_tokens = lambda *args: calls.append(1) or compiled_tokens(*args)
    model.train()(images, ["ab", "cd", "e"]).loss.backward()  # a training step goes through it
    assert calls == [1]
    model.eval()  # decoding keeps the eager tower (other batch sizes, no recompilation)
    assert torch.equal(model.encode_image(images), encode_image_tokens(model.clip.visual, images))
    model.decode(images)
    assert calls == [1]
    eager_calls = []  # another batch size (dropped samples) runs eagerly instead of recompiling
    compile_mod.encode_image_tokens = lambda *args: eager_calls.append(1) or encode_image_tokens(*args)
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled_tokens(model.clip.visual, images[:2]),
                                       encode_image_tokens(model.clip.visual, images[:2]))
            compiled_tokens(model.clip.visual, images)
    finally:
        compile_mod.encode_image_tokens = encode_image_tokens
    assert eager_calls == [1]


def test_a_compiler_failure_leaves_training_eager_with_a_note(tiny_overrides, monkeypatch, capsys):
    def broken(fn, **options):
        def run(*args):
            raise RuntimeError("Compiler: cc not found\nmore detail")
        return run

    monkeypatch.setattr(compile_mod.torch, "compile", broken)
    model = create_model("tiny", **tiny_overrides).train()
    assert not compile_mod.compile_image_encoder(model, 2, contextlib.nullcontext())
    assert model.train_image_tokens is encode_image_tokens
    err = capsys.readouterr().err.strip()
    assert err == ("train.compile_encoder: torch.compile failed on this machine (RuntimeError: Compiler: cc not "
                   "found); training in eager mode")


@pytest.mark.slow
def test_a_run_with_the_compiled_encoder_trains_and_exports(tmp_path, capsys):
    from conftest import labelled_folder
    from test_train import WORDS, _config

    (tmp_path / "words").mkdir()
    folder = labelled_folder(tmp_path / "words", WORDS)
    cfg = load_config(_config(tmp_path, folder, max_steps=6), ["train.compile_encoder=true"])
    result = train(cfg)
    assert (result / "model.safetensors").is_file()
    assert "the image tower's training steps run compiled" in capsys.readouterr().err
