import os

import pytest
import torch

from clip4str import create_model, list_presets, load_model, save_checkpoint
from clip4str.charset import CHARSETS, caption_updates
from conftest import assert_same_decoding


def _count(model):
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_presets_are_listed():
    assert {"tiny", "b16", "l14", "h14"} <= set(list_presets())


def test_b16_parameter_counts_match_the_paper():
    total, trainable = _count(create_model("b16"))
    print(f"b16: {total / 1e6:.2f}M total, {trainable / 1e6:.2f}M trainable")
    assert abs(total / 158e6 - 1) <= 0.02
    assert abs(trainable / 114e6 - 1) <= 0.03


def test_h14_has_16_vision_heads():
    from clip4str.model.towers import build_clip
    from clip4str.presets import load_preset
    cfg = load_preset("h14")["clip"]
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 1  # heads do not depend on depth
    clip = build_clip(cfg)
    assert clip.visual.transformer.resblocks[0].attn.num_heads == 16
    assert clip.transformer.resblocks[0].attn.num_heads == 16


@pytest.fixture
def small(tiny_overrides):
    return create_model("tiny", text_freeze_layers=1, **tiny_overrides)


def _batch(model, n=3):
    h, w = model.config.image_size
    return torch.randn(n, 3, h, w), ["Hello", "x7#Q", "ab"][:n]


def test_training_forward_and_gradient_flow(small):
    small.train()
    images, labels = _batch(small)
    out = small(images, labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in small.named_parameters()}
    for name in ("image_decoder.head.weight", "cross_decoder.head.weight", "image_decoder.pos_queries",
                 "clip.visual.conv1.weight", "clip.visual.transformer.resblocks.0.attn.in_proj_weight",
                 "clip.transformer.resblocks.1.mlp.c_fc.weight", "clip.text_projection", "clip.ln_final.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    for name in ("clip.token_embedding.weight", "clip.positional_embedding", "clip.logit_scale",
                 "clip.transformer.resblocks.0.attn.in_proj_weight", "clip.transformer.resblocks.0.ln_1.weight"):
        assert grads[name] is None, name
        assert not dict(small.named_parameters())[name].requires_grad


def test_cross_loss_never_reaches_the_image_encoder(small):
    small.train()
    images, labels = _batch(small)
    small(images, labels).cross_loss.backward()
    visual = [p.grad for n, p in small.named_parameters() if n.startswith(("clip.visual.", "image_decoder."))]
    assert all(g is None for g in visual)
    assert small.cross_decoder.head.weight.grad is not None
    assert small.clip.transformer.resblocks[1].mlp.c_fc.weight.grad is not None


def test_frozen_blocks_stay_in_eval_mode(small):
    small.train()
    assert not small.clip.transformer.resblocks[0].training
    assert small.clip.transformer.resblocks[1].training and small.image_decoder.training


def test_image_freezing_and_cross_branch_switch(tiny_overrides):
    model = create_model("tiny", image_freeze_layers=1, cross_branch=False, **tiny_overrides)
    assert model.cross_decoder is None
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"clip.visual.conv1.weight", "clip.visual.positional_embedding", "clip.visual.class_embedding",
            "clip.visual.transformer.resblocks.0.attn.in_proj_weight"} <= frozen
    assert "clip.visual.transformer.resblocks.1.attn.in_proj_weight" not in frozen
    model.train()
    images, labels = _batch(model)
    out = model(images, labels)
    assert out.cross_loss is None and torch.equal(out.loss, out.image_loss)


@pytest.mark.parametrize("options", [{}, {"mode": "nar"}, {"refine_iters": 0}, {"refine_iters": 2},
                                     {"mode": "nar", "refine_iters": 0}, {"max_length": 7, "early_exit": False}])
def test_batch_decoding_equals_decoding_each_image_alone(small, options):
    small.eval()
    images, _ = _batch(small, 3)
    with torch.inference_mode():
        batch = small.decode(images, **options)
        for i in range(3):
            alone = small.decode(images[i:i + 1], **options)
            n = int(alone.lengths[0])
            assert int(batch.lengths[i]) == n
            assert torch.allclose(batch.logits[i, :n], alone.logits[0, :n], atol=1e-5)
        texts = [r.text for r in small.read(images, **options)]
        assert texts == [small.read(images[i:i + 1], **options)[0].text for i in range(3)]


def test_checkpoint_round_trip(small, tmp_path):
    small.eval()
    images, _ = _batch(small)
    old = os.umask(0o022)
    try:
        folder = save_checkpoint(small, tmp_path / "ckpt", provenance={"note": "test"})
    finally:
        os.umask(old)
    # As any new file (safetensors alone would make the weights readable by their owner only).
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {"config.json": 0o644,
                                                                            "model.safetensors": 0o644}
    loaded = load_model(folder)
    assert loaded.provenance == {"note": "test"}
    with torch.inference_mode():
        assert torch.equal(small.decode(images).logits, loaded.decode(images).logits)


def test_malformed_inputs_raise_clear_errors(small, tmp_path):
    small.eval()
    with pytest.raises(ValueError, match=r"shape \(B, 3, 32, 128\)"):
        small.decode(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="empty batch"):
        small.decode(torch.randn(0, 3, 32, 128))
    with pytest.raises(ValueError, match="repeats characters 'a'"):
        create_model("tiny", charset="abca")
    with pytest.raises(ValueError, match="unknown preset 'b17'"):
        create_model("b17")
    with pytest.raises(ValueError, match="unknown model config keys"):
        create_model("tiny", nonsense=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="label is empty"):
        small(torch.randn(1, 3, 32, 128), ["€€"])
    with pytest.raises(ValueError, match="mode must be"):
        small.decode(torch.randn(1, 3, 32, 128), mode="beam")


def test_damaged_checkpoint_is_reported(small, tmp_path):
    folder = save_checkpoint(small, tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        load_model(folder)


def test_a_path_that_is_not_a_checkpoint_folder_is_named(small, tmp_path):
    folder = save_checkpoint(small, tmp_path / "ckpt")
    assert load_model(folder / "config.json").config == small.config  # the folder's own files are fine
    (tmp_path / "photo.png").write_bytes(b"png")
    with pytest.raises(ValueError, match="photo.png' is a file, not a clip4str checkpoint folder"):
        load_model(tmp_path / "photo.png")
    (folder / "image_encoder.onnx").write_bytes(b"onnx")
    with pytest.raises(ValueError, match="is an ONNX export.*--backend onnx"):
        load_model(folder)


def test_charset_override_resizes_the_heads(tiny_overrides):
    model = create_model("tiny", charset="36", **tiny_overrides)
    assert model.config.charset == CHARSETS["36"]
    assert model.image_decoder.head.out_features == 37


def test_stacked_permutations_equal_one_pass_per_permutation(small):
    small.eval()
    images, labels = _batch(small)
    from clip4str.model.permutations import generate_permutations, permutation_masks
    tgt = small.tokenizer.encode(labels)
    tgt_in = tgt[:, :-1]
    padding = (tgt_in == small.tokenizer.pad_id) | (tgt_in == small.tokenizer.eos_id)
    perms = generate_permutations(tgt.shape[1] - 2, 6, generator=torch.Generator().manual_seed(3))
    content, query = (torch.stack(m) for m in zip(*(permutation_masks(p) for p in perms), strict=True))
    with torch.no_grad():
        memory = small.encode_image(images)
        extra = torch.randn(len(images), len(perms), 16, memory.shape[-1])
        stacked = small.cross_decoder.forward_permutations(tgt_in, memory, content, query, padding, extra)
        for p in range(len(perms)):
            one = small.cross_decoder(tgt_in, torch.cat([memory, extra[:, p]], 1), content[p], padding,
                                      query_mask=query[p])
            torch.testing.assert_close(stacked[:, p], one, atol=1e-5, rtol=1e-5)


def test_half_precision_checkpoint_loads_as_float32(small, tmp_path):
    small.eval()
    folder = save_checkpoint(small, tmp_path / "half", dtype=torch.float16)
    loaded = load_model(folder)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    images, _ = _batch(small)
    with torch.inference_mode():
        diff = (small.decode(images).logits - loaded.decode(images).logits).abs().max()
    assert diff < 1e-2


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("options", [{}, {"refine_iters": 0}, {"max_length": 7, "early_exit": False}])
def test_cached_autoregressive_loop_equals_recomputing_the_prefix(tiny_overrides, depth, options):
    model = create_model("tiny", decoder_depth=depth, **tiny_overrides).eval()
    images, _ = _batch(model, 3)
    with torch.inference_mode():
        fast, slow = model.decode(images, **options), model.decode(images, kv_cache=False, **options)
    assert_same_decoding(fast, slow, model.tokenizer.eos_id)


def test_cross_memories_encode_each_changed_caption_once_in_one_call(small, monkeypatch):
    small.eval()
    images, _ = _batch(small, 3)
    calls = []
    encode = small.encode_text
    monkeypatch.setattr(small, "encode_text", lambda captions, device: calls.append(list(captions))
                        or encode(captions, device))
    with torch.inference_mode():
        memory = small.encode_image(images)
        old, new, same = small.cross_memories(memory, [["cat", "dog", "sun"], ["cat", "fog", "sun"],
                                                       ["cat", "fog", "sun"]])
        assert calls == [["cat", "dog", "sun", "fog"]]
        assert same is new
        torch.testing.assert_close(new, small.cross_memories(memory, [["cat", "fog", "sun"]])[0], atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(old, small.cross_memories(memory, [["cat", "dog", "sun"]])[0], atol=1e-5,
                                   rtol=1e-5)
    assert torch.equal(new[[0, 2]], old[[0, 2]]) and not torch.equal(new[1], old[1])


def test_caption_updates_lists_first_pass_then_changes():
    texts, rows = caption_updates([["a", "b"], ["a", "c"], ["d", "c"], ["d", "c"]])
    assert texts == ["a", "b", "c", "d"] and rows == [[0, 1], [1], [0], []]
    assert caption_updates([["x"]]) == (["x"], [[0]])


def test_auxiliary_ctc_loss_trains_the_image_tower(tiny_overrides):
    torch.manual_seed(0)
    model = create_model("tiny", ctc_weight=0.5, **tiny_overrides)
    assert create_model("tiny", **tiny_overrides).ctc_head is None
    images, labels = _batch(model, 3)
    out = model(images, labels)
    assert out.ctc_loss is not None and torch.isfinite(out.ctc_loss)
    torch.testing.assert_close(out.loss, out.image_loss + out.cross_loss + 0.5 * out.ctc_loss)
    out.ctc_loss.backward()
    assert model.ctc_head.weight.grad.abs().sum() > 0
    assert model.clip.visual.conv1.weight.grad.abs().sum() > 0
    assert model.image_decoder.head.weight.grad is None  # CTC touches only the tower and its head
    # A word longer than the 16 columns cannot be aligned: its term is dropped, not infinite.
    long = model(images[:1], ["abcdefghijklmnopqrst"]).ctc_loss.detach()
    assert float(long) == 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(images, labels).ctc_loss
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first
    # Decoding uses the head only to guard against runaway readings (tests/test_runaway.py): without the
    # guard, the same weights without it decode the same logits.
    plain = create_model("tiny", **tiny_overrides)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ctc_head.")})
    model.eval(), plain.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model.decode(images, guard=False).logits, plain.decode(images).logits)


def test_ctc_loss_of_padded_targets_equals_the_concatenated_characters():
    import torch.nn.functional as F

    from clip4str.charset import Tokenizer
    from clip4str.model import ctc

    tok = Tokenizer("abcdefghij")
    tgt = tok.encode(["abc", "j", "hhhh", "abcdefghij"])
    log_probs = torch.randn(4, 9, tok.num_classes, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    chars = tgt[:, 1:]
    is_char = (chars != tok.eos_id) & (chars != tok.pad_id)
    ref = F.ctc_loss(log_probs.transpose(0, 1), chars[is_char], torch.full((4,), 9), is_char.sum(1),
                     blank=tok.eos_id, zero_infinity=True)
    assert ctc.label_lengths(tgt, tok).tolist() == [3, 1, 4, 10]
    torch.testing.assert_close(ctc.ctc_loss(log_probs, tgt, tok), ref)
    torch.testing.assert_close(ctc.ctc_loss(log_probs, tgt, tok, ctc.label_lengths(tgt, tok)), ref)
