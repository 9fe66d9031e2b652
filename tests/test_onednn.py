"""fp32 linear layers through oneDNN with packed weights: the same products, only where registered and inferring."""

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip4str.inference import Recognizer
from clip4str.model import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN packed linear")
HELLO = Path(__file__).parents[1] / "examples" / "hello.png"


def _weight(out_features=1024, in_features=256):
    return nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)


def test_packed_products_equal_plain_ones_in_every_layout():
    weight, bias = _weight(), torch.randn(1024)
    onednn.register(weight)
    with torch.inference_mode():
        for x in (torch.randn(65, 256), torch.randn(3, 65, 256), torch.randn(2, 65, 512)[..., ::2]):
            for b in (bias, None):
                torch.testing.assert_close(onednn.linear(x, weight, b), F.linear(x, weight, b), atol=1e-4, rtol=1e-5)


def test_small_products_unregistered_weights_and_training_stay_plain(monkeypatch):
    weight = _weight()
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or F.linear(a[0], weight))
    x_small, x = torch.randn(1, 256), torch.randn(65, 256, requires_grad=True)
    with torch.inference_mode():
        onednn.linear(torch.randn(65, 256), weight)  # not registered
    onednn.register(weight)
    with torch.inference_mode():
        assert torch.equal(onednn.linear(x_small, weight), F.linear(x_small, weight))  # a decoding step's size
        onednn.linear(x_small.double(), weight.double())
    y = onednn.linear(x, weight)  # autograd: the plain product, gradients flow
    y.sum().backward()
    assert calls == [] and weight.grad is not None and x.grad is not None
    with torch.inference_mode():
        onednn.linear(torch.randn(65, 256), weight)
    assert calls == [1]


def test_an_in_place_update_or_new_data_repacks_the_weight():
    weight, x = _weight(), torch.randn(65, 256)
    onednn.register(weight)
    with torch.inference_mode():
        onednn.linear(x, weight)
    with torch.no_grad():
        weight.mul_(-2.0)
    with torch.inference_mode():
        torch.testing.assert_close(onednn.linear(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5)
    weight.data = torch.randn(1024, 256)  # bypasses the version counter
    with torch.inference_mode():
        torch.testing.assert_close(onednn.linear(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5)


def test_a_view_registered_for_a_slice_is_packed_while_it_shows_the_same_data(monkeypatch):
    """A decoder's keys-and-values rows are a new slice of its projection at every call: the view registered for
    them carries the packing, and stops being used once the parameter's data is replaced."""
    from clip4str.model.decoder import Attention

    attn = Attention(256, 8)
    assert onednn.pack_linears(attn) == 2  # the output projection and the keys-and-values rows
    calls = []
    packed_product = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or packed_product(*a))
    x = torch.randn(1, 81, 256)

    def plain(a):
        k, v = F.linear(x, a.in_proj_weight[256:], a.in_proj_bias[256:]).chunk(2, -1)
        return a._heads(k), a._heads(v)

    with torch.inference_mode():
        for ours, ref in zip(attn.project_kv(x), plain(attn), strict=True):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert calls == [1]
    copied = copy.deepcopy(attn)  # a packed module still copies
    with torch.inference_mode():
        torch.testing.assert_close(copied.project_kv(x)[0], attn.project_kv(x)[0], atol=1e-5, rtol=1e-5)
    calls.clear()
    attn.in_proj_weight.data = torch.randn(768, 256)  # the registered view is left on the old storage
    with torch.inference_mode():
        for ours, ref in zip(attn.project_kv(x), plain(attn), strict=True):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert calls == [] and "_kv_weight" not in attn.__dict__  # dropped: it would keep the old storage alive


def test_autocast_and_flop_counting_see_the_plain_product():
    from torch.utils.flop_counter import FlopCounterMode

    weight, x = _weight(), torch.randn(65, 256)
    onednn.register(weight)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert onednn.linear(x, weight).dtype == F.linear(x, weight).dtype == torch.bfloat16
        with FlopCounterMode(display=False) as counter:
            onednn.linear(x, weight)
    assert counter.get_total_flops() == 2 * 65 * 256 * 1024


def test_builtin_model_reads_the_same_packed_and_plain():
    from PIL import Image

    from clip4str.bench import word_image

    packed, plain = Recognizer.from_pretrained(), Recognizer.from_pretrained(packed=False)
    assert any(isinstance(m, onednn.PackedLinear) for m in packed.model.modules())
    assert not any(isinstance(m, onednn.PackedLinear) for m in plain.model.modules())
    images = [Image.open(HELLO).convert("RGB"), word_image("Street"), word_image("CLIP4STR 2026")]
    for batch in (images[:1], images):
        a, b = packed.read(batch), plain.read(batch)
        assert [r.text for r in a] == [r.text for r in b]
        assert max(abs(r.confidence - s.confidence) for r, s in zip(a, b, strict=True)) < 1e-4
    state = {k: v.clone() for k, v in packed.model.state_dict().items()}
    assert state.keys() == plain.model.state_dict().keys()  # the same parameters under the same names


def test_without_onednn_the_model_is_left_as_it_is(monkeypatch, tiny_overrides):
    from clip4str import create_model

    monkeypatch.setattr(onednn, "available", lambda: False)
    model = create_model("tiny", **tiny_overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert onednn.pack_linears(model) == 0
    assert len(caught) == 1 and "oneDNN" in str(caught[0].message)
    assert not any(isinstance(m, onednn.PackedLinear) for m in model.modules())
