"""The CPU dropout of training: the distribution of F.dropout (drop rate, scale, gradient, every lane of the
packed random draws) and, with nothing dropped, exactly the loss of the fused attention kernels."""

import pytest
import torch

from clip4str import create_model
from clip4str.model.decoder import Attention
from clip4str.model.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_drop_at_rate_p_in_every_lane_of_the_packed_draws(p):
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([4000, 1001]), p)  # an odd count: the last int64 is only partly used
    dropped = (~keep).flatten()[:4_000_000].view(-1, 4).float().mean(0)  # each of the four 16-bit lanes
    assert torch.allclose(dropped, torch.full((4,), p), atol=0.002), dropped
    rows = (~keep).float().mean(1)
    assert rows.std() < 3 * (p * (1 - p) / 1001) ** 0.5  # no structure along rows beyond binomial noise


def test_dropout_scales_kept_values_and_passes_gradients_through_the_same_mask():
    torch.manual_seed(1)
    x = torch.randn(64, 66, 256, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    assert torch.allclose(y[kept], x[kept] / 0.9)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.9)
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    assert dropout(x, 1.0, True).abs().sum() == 0
    ones = torch.ones(4_000_000)
    assert (dropout(ones, 0.999999, True) != 0).float().mean() < 1e-4  # rounds to every draw: F.dropout's rate
    assert (dropout(ones, 0.999, True) != 0).float().mean() == pytest.approx(0.001, rel=0.1)
    xb = x.detach().bfloat16()
    assert dropout(xb, 0.1, True).dtype == torch.bfloat16


def test_dropout_module_keeps_nn_dropout_state():
    d = Dropout(0.25)
    assert isinstance(d, torch.nn.Dropout) and d.p == 0.25 and d.state_dict() == {}
    d.eval()
    x = torch.randn(3, 4)
    assert d(x) is x


def test_training_loss_with_nothing_dropped_equals_the_fused_kernels(tiny_overrides):
    torch.manual_seed(2)
    model = create_model("tiny", **tiny_overrides, dropout=0.0).train()
    images = torch.randn(4, 3, *model.config.image_size)
    labels = ["hello", "42", "Park", "x"]
    torch.manual_seed(3)
    fused = model(images, labels).loss  # dropout 0: SDPA everywhere
    for m in model.modules():  # a drop rate below one draw in 65536: the CPU path runs and drops nothing
        if isinstance(m, Attention):
            m.dropout = 1e-9
        elif isinstance(m, torch.nn.Dropout):
            m.p = 1e-9
    torch.manual_seed(3)
    explicit = model(images, labels).loss
    assert torch.isfinite(explicit)
    assert torch.allclose(explicit, fused, rtol=1e-5, atol=1e-6), (explicit, fused)
