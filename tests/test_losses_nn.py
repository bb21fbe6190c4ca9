import pytest
import torch

from tem_ij_plugin.losses import class_weights, deep_supervision_loss, masked_cross_entropy, masked_soft_dice
from tem_ij_plugin.nn import RecurrentUNet


@pytest.mark.parametrize("loss_fn", ["ce", "weighted", "dice", "deep"])
def test_unlabelled_pixels_get_exactly_zero_gradient(loss_fn):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    labels = torch.randint(0, 3, (2, 16, 16))
    unl = torch.rand(2, 16, 16) < 0.6
    labels[unl] = -1
    w = class_weights([10, 100, 5], 0.5)
    loss = {
        "ce": lambda: masked_cross_entropy(logits, labels),
        "weighted": lambda: masked_cross_entropy(logits, labels, w),
        "dice": lambda: masked_soft_dice(logits, labels),
        "deep": lambda: deep_supervision_loss([logits, logits * 2], labels, w, dice_weight=0.5),
    }[loss_fn]()
    loss.backward()
    g = logits.grad.permute(0, 2, 3, 1)
    assert torch.count_nonzero(g[unl]) == 0
    assert torch.count_nonzero(g[~unl]) > 0


def test_loss_ignores_values_under_unlabelled_pixels():
    logits = torch.randn(1, 2, 8, 8)
    labels = torch.full((1, 8, 8), -1)
    labels[0, :4] = 1
    other = logits.clone()
    other[..., 4:, :] = 100.0
    assert torch.equal(masked_cross_entropy(logits, labels), masked_cross_entropy(other, labels))
    assert masked_cross_entropy(logits, torch.full((1, 8, 8), -1)) == 0


def test_class_weights_balance():
    w = class_weights([900, 100], 1.0)
    assert torch.allclose(w[0] * 900, w[1] * 100)
    assert torch.allclose(class_weights([900, 100], 0.0), torch.ones(2))


@pytest.mark.parametrize("steps, feedback", [(1, "input"), (3, "input"), (3, "head")])
def test_recurrent_unet_shapes(steps, feedback):
    net = RecurrentUNet(1, 3, depth=3, base_channels=8, steps=steps, feedback=feedback)
    x = torch.randn(2, 1, 40, 48)
    outs = net(x, all_steps=True)
    assert len(outs) == steps
    assert all(o.shape == (2, 3, 40, 48) for o in outs)
    assert torch.equal(net(x), outs[-1])
    assert net.size_multiple == 4


@pytest.mark.parametrize("feedback", ["input", "head"])
def test_recurrence_feeds_back(feedback):
    torch.manual_seed(0)
    net = RecurrentUNet(1, 2, depth=2, base_channels=4, steps=3, feedback=feedback).eval()
    outs = net(torch.randn(1, 1, 16, 16), all_steps=True)
    assert not torch.allclose(outs[0], outs[2]), "later steps see the earlier softmax"
    with pytest.raises(ValueError):
        RecurrentUNet(1, 2, depth=2, feedback="middle")
