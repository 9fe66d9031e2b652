"""The static decoding step: one graph for every position, compiled results equal to eager ones."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from clip4str import create_model
from clip4str.inference import Recognizer
from clip4str.model.static_step import decoding_step, empty_caches, step_tables
from conftest import assert_same_decoding

OPTIONS = [{}, {"refine_iters": 0}, {"max_length": 7, "early_exit": False}, {"mode": "nar"}]


def _images(model, n, seed=0):
    h, w = model.config.image_size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _assert_same(compiled, eager):
    assert torch.equal(compiled.lengths, eager.lengths) and torch.equal(compiled.image_lengths, eager.image_lengths)
    assert compiled.logits.argmax(-1).tolist() == eager.logits.argmax(-1).tolist()
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled.image_logits, eager.image_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("depth", [1, 2])
def test_one_graph_for_every_position_and_no_graph_break(tiny_overrides, depth):
    model = create_model("tiny", decoder_depth=depth, **tiny_overrides).eval()
    decoder, counter = model.image_decoder, CompileCounter()
    step = torch.compile(decoding_step, backend=counter, fullgraph=True, dynamic=False)  # fullgraph: breaks raise
    with torch.inference_mode():
        kv = decoder.memory_kv(model.encode_image(_images(model, 2)))
        tables, caches = step_tables(decoder, 26), empty_caches(decoder, 2, 26, kv[0][0])
        tokens, eager_tokens, eager_caches = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), caches
        for i in range(26):
            position = torch.tensor(i)
            out, caches = step(decoder, tokens, position, kv, caches, tables)
            ref, eager_caches = decoding_step(decoder, eager_tokens, position, kv, eager_caches, tables)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            tokens, eager_tokens = out.argmax(-1), ref.argmax(-1)
    assert counter.frame_count == 1  # positions are tensors: no recompilation per step


def test_tables_follow_weight_updates(tiny_overrides):
    model = create_model("tiny", **tiny_overrides).eval()
    images = _images(model, 2)
    with torch.inference_mode():
        before = model.decode(images).logits
    with torch.no_grad():  # an optimizer-like in-place update of the weights the tables come from
        model.image_decoder.text_embed.embedding.weight.mul_(3.0)
        model.image_decoder.layers[0].self_attn.in_proj_weight.add_(0.05)
    with torch.inference_mode():
        cached, recomputed = model.decode(images), model.decode(images, kv_cache=False)
    assert_same_decoding(cached, recomputed, model.tokenizer.eos_id)
    assert not torch.allclose(cached.image_logits[:, :1], before[:, :1])
    other = create_model("tiny", **tiny_overrides).eval()
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model.decode(images).logits, other.decode(images).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("options", OPTIONS)
def test_compiled_decoding_equals_eager_on_a_small_model(tiny_overrides, options):
    model = create_model("tiny", **tiny_overrides).eval()
    for batch in (1, 3):
        images = _images(model, batch, seed=batch)
        with torch.inference_mode():
            _assert_same(model.decode(images, compiled=True, **options), model.decode(images, **options))


@pytest.mark.slow
def test_compiled_builtin_model_reads_like_eager():
    from pathlib import Path

    from PIL import Image

    from clip4str.bench import word_image

    eager, compiled = Recognizer.from_pretrained(), Recognizer.from_pretrained(compiled=True)
    hello = Path(__file__).parents[1] / "examples" / "hello.png"
    images = [Image.open(hello).convert("RGB"), word_image("Street"), word_image("CLIP4STR 2026")]
    for batch in (images[:1], images):
        x = eager.preprocess(batch)
        with torch.inference_mode():
            for options in OPTIONS:
                _assert_same(compiled.model.decode(x, compiled=True, **options), eager.model.decode(x, **options))
    assert [r.text for r in compiled.read(images)] == [r.text for r in eager.read(images)]


@pytest.mark.slow
def test_compiled_parity_fixture_equals_eager():
    from clip4str.convert import load_authors_checkpoint
    from conftest import PARITY

    if not (PARITY / "weights.safetensors").is_file():
        pytest.skip(f"parity fixture not found at {PARITY} (../shared beside the clone)")
    model = load_authors_checkpoint(PARITY / "weights.safetensors")[0].eval()
    images = _images(model, 2)
    with torch.inference_mode():
        for options in OPTIONS[:3]:
            _assert_same(model.decode(images, compiled=True, **options), model.decode(images, **options))


def test_cloze_pass_equals_the_decoder_forward(tiny_overrides):
    from clip4str.model.permutations import cloze_query_mask
    from clip4str.model.static_step import cloze_pass

    model = create_model("tiny", **tiny_overrides).eval()
    decoder = model.cross_decoder
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        kv = decoder.memory_kv(torch.randn(3, 20, model.config.embed_dim, generator=gen))
        for length in (1, 6, 26):
            ctx = torch.randint(0, len(model.tokenizer), (3, length), generator=gen)
            padding = torch.arange(length)[None] >= torch.tensor([length, max(1, length - 2), 1])[:, None]
            query_mask = cloze_query_mask(26, length)
            fast = cloze_pass(decoder, ctx, query_mask[None] | padding[:, None], kv, step_tables(decoder, 26))
            ref = decoder(ctx, kv, None, padding, query_len=26, query_mask=query_mask)
            torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_a_step_that_cannot_compile_decodes_eagerly_with_one_warning(tiny_overrides, monkeypatch):
    from clip4str.model import static_step

    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(static_step, "BACKEND", no_compiler)
    model = create_model("tiny", **tiny_overrides).eval()
    images = _images(model, 2)
    with pytest.warns(UserWarning, match="could not compile the decoding step") as caught, torch.inference_mode():
        got = model.decode(images, compiled=True)
    assert len([w for w in caught if "could not compile" in str(w.message)]) == 2  # once per decoder
    with torch.inference_mode():
        _assert_same(got, model.decode(images))


@pytest.mark.slow
def test_serve_with_compile_compiles_before_the_first_request(monkeypatch, capsys):
    import uvicorn

    from clip4str.cli import main
    from clip4str.model import static_step

    started, stepped = [], set()
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(app))
    call = static_step._CompiledStep.__call__
    monkeypatch.setattr(static_step._CompiledStep, "__call__", lambda self, *a: stepped.add(id(self)) or call(self, *a))
    assert main(["serve", "--compile", "--backend", "torch"]) == 0
    assert started and "compiled the decoding step in" in capsys.readouterr().err
    # both decoders' steps ran before the server started (drafts and the cascade could skip them in a warm-up)
    assert len(stepped) == 2
