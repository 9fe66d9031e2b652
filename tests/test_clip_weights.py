import json
import warnings

import pytest
import torch
from open_clip.model import CLIP, convert_weights_to_lp
from safetensors.torch import save_file

from clip4str import create_model
from clip4str.model.towers import build_clip, encode_image_tokens, encode_text_tokens
from clip4str.weights import read_clip_checkpoint


def _clip(quick_gelu):
    """A plain open_clip CLIP (nn.MultiheadAttention), as released checkpoints were made."""
    # 64-wide heads as in released CLIPs: the head count is not visible in the shapes of the weights.
    model = CLIP(embed_dim=32, quick_gelu=quick_gelu,
                 vision_cfg={"image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "head_width": 64},
                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}).eval()
    with torch.no_grad():  # non-trivial norms and biases so that a swapped or dropped one shows
        for name, p in model.named_parameters():
            if p.ndim == 1 and "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _outputs(clip):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(1, 49406, (2, 16))
    with torch.no_grad():
        return encode_image_tokens(clip.visual, images), encode_text_tokens(clip, ids)


def _assert_reproduces(reference, path, **kw):
    model = create_model("tiny", clip_checkpoint=path, **kw)
    ref_img, ref_txt = _outputs(reference)
    img, txt = _outputs(model.clip.eval())
    assert img.shape == (2, 17, 32) and txt.shape == (2, 16, 32)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
    return model


def test_openai_torchscript_archive(tmp_path):
    source = _clip(quick_gelu=True)
    convert_weights_to_lp(source)  # OpenAI archives keep matrices in float16
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(source, {"encode_image": torch.randn(1, 3, 32, 32).half()},
                                        check_trace=False)
    torch.jit.save(traced, str(path))
    weights = read_clip_checkpoint(path)
    assert weights.family == "openai" and weights.config["quick_gelu"] is True
    model = _assert_reproduces(source.float(), path)
    assert model.config.image_size == (32, 32)


def test_openai_state_dict_with_metadata_keys(tmp_path):
    source = _clip(quick_gelu=True)
    state = dict(source.state_dict())
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, tmp_path / "openai.pt")
    assert read_clip_checkpoint(tmp_path / "openai.pt").family == "openai"
    _assert_reproduces(source, tmp_path / "openai.pt")


def test_open_clip_training_checkpoint_uses_gelu(tmp_path):
    source = _clip(quick_gelu=False)
    ckpt = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    weights = read_clip_checkpoint(tmp_path / "epoch_3.pt")
    assert weights.family == "open_clip" and weights.config["quick_gelu"] is False
    _assert_reproduces(source, tmp_path / "epoch_3.pt")


def test_open_clip_safetensors_with_config_beside_it(tmp_path):
    source = _clip(quick_gelu=True)  # e.g. a DFN/MetaCLIP model: open_clip format, QuickGELU activation
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    _assert_reproduces(source, tmp_path / "open_clip_model.safetensors")


def test_wrong_activation_changes_the_outputs(tmp_path):
    source = _clip(quick_gelu=True)
    torch.save(source.state_dict(), tmp_path / "plain.pt")  # no family hints: read as open_clip GELU
    with pytest.raises(AssertionError):
        _assert_reproduces(source, tmp_path / "plain.pt")
    _assert_reproduces(source, tmp_path / "plain.pt", quick_gelu=True)


def test_bad_clip_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_clip_checkpoint(tmp_path / "absent.pt")
    source = _clip(quick_gelu=False)
    torch.save(source.state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_clip_checkpoint(tmp_path / "cut.pt")
    torch.save({"clip_model.visual.proj": torch.zeros(2, 2), "visual_decoder.head.weight": torch.zeros(2, 2)},
               tmp_path / "vl4str.pt")
    with pytest.raises(ValueError, match="not a ViT CLIP state dict.*clip4str convert"):
        read_clip_checkpoint(tmp_path / "vl4str.pt")


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_imagenet_vit_initialises_the_image_tower(tmp_path, library):
    from clip4str.factory import create_model_from_imagenet_vit
    if library == "timm":
        import timm
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
        with torch.no_grad():  # a near-zero class token is a near-constant vector where LayerNorm eps dominates
            vit.cls_token.normal_()
    else:
        import torchvision
        vit = torchvision.models.VisionTransformer(224, 16, num_layers=2, num_heads=3, hidden_dim=192,
                                                   mlp_dim=768).eval()
        with torch.no_grad():
            vit.class_token.normal_()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = create_model_from_imagenet_vit("b16", tmp_path / "vit.pth").eval()
    v = model.clip.visual
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = v.conv1(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([v.class_embedding.expand(2, 1, -1), tokens], 1) + v.positional_embedding
        ours = v.ln_post(v.transformer(v.ln_pre(tokens)))
        if library == "timm":
            ref = vit.forward_features(x)
        else:
            ref = vit.encoder(torch.cat([vit.class_token.expand(2, -1, -1),
                                         vit.conv_proj(x).flatten(2).transpose(1, 2)], 1))
    # timm/torchvision LayerNorms use eps 1e-6, open_clip's 1e-5: the only difference.
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)
    assert model.config.clip["vision_cfg"]["no_ln_pre"] is True
    tiny = create_model_from_imagenet_vit("tiny", tmp_path / "vit.pth")
    assert tiny.clip.visual.positional_embedding.shape[0] == 1 + 2 * 8  # 32x128 input, 16x16 patches


def test_tower_attention_matches_multihead_attention():
    reference = _clip(quick_gelu=False)
    ours = build_clip({"embed_dim": 32, "quick_gelu": False,
                       "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "head_width": 64},
                       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}})
    ours.load_state_dict(reference.state_dict())  # strict: the same parameter names
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in ours.modules())
    for train in (False, True):  # eval: MultiheadAttention's fast path; train: its slow path
        reference.train(train), ours.train(train)
        for a, b in zip(_outputs(ours), _outputs(reference), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for a, b in zip(_outputs(ours.eval()), _outputs(reference.eval()), strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=0.05)


def test_fit_positions_resamples_a_grid_of_any_shape():
    from clip4str.weights import fit_positions
    rows, cols, dim = 4, 16, 8
    grid = torch.arange(rows * cols * dim, dtype=torch.float32).reshape(rows * cols, dim)
    pos = torch.cat([torch.full((1, dim), -1.0), grid])
    assert fit_positions(pos, (rows, cols), (rows, cols)) is pos
    for target in ((4, 20), (4, 12), (8, 16), (2, 8)):  # wider, narrower, taller, smaller
        out = fit_positions(pos, target, (rows, cols))
        assert out.shape == (1 + target[0] * target[1], dim)
        assert torch.equal(out[0], pos[0])  # the class token's position is kept
        patches = out[1:].reshape(*target, dim)
        # A linear ramp along the columns stays monotonic after bicubic resampling along them.
        assert (patches[:, 1:, 0] > patches[:, :-1, 0]).all(), target
    with pytest.raises(ValueError, match="does not fit a 3x16 grid"):
        fit_positions(pos, (4, 20), (3, 16))
    square = torch.randn(1 + 7 * 7, dim)
    assert fit_positions(square, (4, 16)).shape == (1 + 64, dim)  # an ImageNet ViT's square grid by default
