"""The U-Net's CPU inference form computes what the trained network computes."""

import numpy as np
import pytest
import torch
from test_predict import random_net
from torch.nn import functional as F

from tem_ij_plugin.backends import TorchBackend
from tem_ij_plugin.modelio import build_network
from tem_ij_plugin.nn import ProbabilityUNet, inference
from tem_ij_plugin.nn.inference import InferenceUNet, _fused_convolution, _UpBlock, inference_form, subpixel_kernel
from tem_ij_plugin.receptive import fold_batchnorm


def _folded(**kw):
    net, _ = random_net(**kw)
    return fold_batchnorm(net).float()


def _probabilities(net, x):
    with torch.no_grad():
        return torch.softmax(net(x), dim=1)


@pytest.mark.parametrize("size", [(2, 2), (2, 3), (5, 7)])
def test_subpixel_kernel_is_the_convolution_of_the_upsample_away_from_the_border(size):
    gen = torch.Generator().manual_seed(0)
    kernel, low = torch.randn(3, 4, 3, 3, generator=gen), torch.randn(1, 4, *size, generator=gen)
    ref = F.conv2d(F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False), kernel, padding=1)
    got = F.pixel_shuffle(F.conv2d(F.pad(low, (1, 1, 1, 1), mode="replicate"), subpixel_kernel(kernel)), 2)
    assert torch.allclose(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)


def test_subpixel_kernel_alone_gets_the_border_wrong():
    # Why the border strips exist: the clamped upsample and the zero padding do not commute.
    gen = torch.Generator().manual_seed(0)
    kernel, low = torch.randn(3, 4, 3, 3, generator=gen), torch.randn(1, 4, 6, 6, generator=gen)
    ref = F.conv2d(F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False), kernel, padding=1)
    got = F.pixel_shuffle(F.conv2d(F.pad(low, (1, 1, 1, 1), mode="replicate"), subpixel_kernel(kernel)), 2)
    assert (got - ref).abs().max() > 0.1


@pytest.mark.parametrize("size", [(1, 1), (1, 3), (3, 1), (2, 2), (4, 6)])
def test_decoder_block_matches_upsample_concatenate_convolve_everywhere(size):
    gen = torch.Generator().manual_seed(1)
    first, second = torch.nn.Conv2d(6 + 2, 3, 3, padding=1), torch.nn.Conv2d(3, 3, 3, padding=1)
    low = torch.randn(2, 6, *size, generator=gen)
    skip = torch.randn(2, 2, 2 * size[0], 2 * size[1], generator=gen)
    with torch.no_grad():
        up = F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        ref = second(first(torch.cat([up, skip], dim=1)).relu()).relu()
        got = _UpBlock(first, second, 6, torch.float32)(low, skip)
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize(
    "depth, shape", [(2, (2, 1, 16, 16)), (3, (1, 1, 32, 48)), (5, (1, 1, 16, 16)), (5, (1, 1, 64, 96))]
)
def test_fp32_form_equals_the_folded_network(depth, shape):
    net = _folded(depth=depth)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    got = inference_form(net, torch.float32)(x)
    assert torch.allclose(got, _probabilities(net, x), atol=1e-5)


def test_form_handles_several_input_channels_and_classes():
    net = fold_batchnorm(
        build_network(
            {"n_classes": 3, "depth": 3, "base_channels": 8, "steps": 1, "norm": "batch", "in_channels": 2}
        ).eval()
    )
    x = torch.rand((1, 2, 32, 32), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(inference_form(net.float(), torch.float32)(x), _probabilities(net, x), atol=1e-5)


def test_bf16_form_keeps_the_image_precision_in_the_first_convolution():
    net = _folded(depth=2)
    form = inference_form(net, torch.bfloat16)
    # A faint gradient on a bright background: below bf16's resolution (2**-8 near 1), above fp32's
    x = (0.9 + 1e-3 * torch.rand((1, 1, 32, 32), generator=torch.Generator().manual_seed(4))).float()
    first = net.unet.down[0][0]
    with torch.no_grad():
        ref = first(x).to(torch.bfloat16)  # fp32 layer, its output stored in bf16 as every layer's is
        got = form.first(form._input(x), relu=False)
        rounded = first(x.to(torch.bfloat16).float()).to(torch.bfloat16)  # the image rounded to bf16 first
    # the same bf16 value as the fp32 layer on 0.91 of the outputs here, against 0.66 with the image rounded
    assert (got == ref).float().mean() > (rounded == ref).float().mean() + 0.1


@pytest.mark.parametrize("in_channels, batch", [(1, 1), (2, 3)])
def test_bf16_form_stays_close_to_fp32(in_channels, batch):
    net = _folded(depth=4, in_channels=in_channels)
    x = torch.rand((batch, in_channels, 64, 64), generator=torch.Generator().manual_seed(5))
    got = inference_form(net, torch.bfloat16)(x)
    assert (got - _probabilities(net, x)).abs().max() < 0.02


def test_eager_reduced_precision_keeps_the_first_and_last_layers_in_fp32():
    net = TorchBackend(_folded(), torch.device("cpu"), "fp16").net.net
    assert [type(m).__name__ for m in (net.unet.down[0][0], net.unet.out)] == ["_FP32", "_FP32"]


def test_the_form_refuses_sides_that_are_not_multiples():
    form = inference_form(_folded(depth=3), torch.float32)
    with pytest.raises(ValueError, match="multiples of 4"):
        form(torch.rand(1, 1, 32, 30))


def test_the_backend_computes_sides_the_form_refuses_eager():
    net = _folded(depth=3)
    x = torch.rand((1, 1, 33, 30), generator=torch.Generator().manual_seed(9))
    got = TorchBackend(net, torch.device("cpu"), "fp32")(x)
    assert torch.allclose(got, _probabilities(net, x), atol=1e-6)


def test_no_form_where_it_fails_on_this_machine(monkeypatch):
    def fails(self, x):
        raise RuntimeError("mkldnn_convolution: bf16 path needs the cpu support avx512bw")  # as on an AVX2 CPU

    monkeypatch.setattr(InferenceUNet, "__call__", fails)
    assert inference_form(_folded(), torch.bfloat16) is None


def test_no_form_for_a_network_with_normalisation_layers_left():
    net, _ = random_net(norm="group")
    assert inference_form(fold_batchnorm(net), torch.float32) is None


def test_no_form_for_an_unfolded_network():
    net, _ = random_net()
    assert inference_form(net, torch.float32) is None


def test_no_form_for_a_network_that_ends_in_a_softmax():
    net = build_network({"n_classes": 2, "depth": 3, "base_channels": 8, "steps": 1, "norm": "batch"})
    probabilities = ProbabilityUNet(depth=3, base_channels=8, steps=1, norm="batch")
    probabilities.load_state_dict(net.state_dict())
    assert inference_form(fold_batchnorm(probabilities.eval()), torch.float32) is None


def test_no_form_for_a_recurrent_network():
    net = build_network({"n_classes": 2, "depth": 3, "base_channels": 8, "steps": 2, "norm": "batch"}).eval()
    assert inference_form(fold_batchnorm(net), torch.float32) is None


def test_no_form_in_half_precision():
    assert inference_form(_folded(), torch.float16) is None


def test_the_cpu_torch_backend_runs_the_form(monkeypatch):
    backend = TorchBackend(_folded(), torch.device("cpu"), "bf16")
    monkeypatch.setattr(backend, "net", None)  # the eager network is not what computes
    assert backend(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_the_torch_backend_runs_an_unfoldable_network_eager():
    net, _ = random_net(norm="group")
    backend = TorchBackend(fold_batchnorm(net), torch.device("cpu"), "fp32")
    x = torch.rand((1, 1, 32, 32), generator=torch.Generator().manual_seed(6))
    assert np.allclose(backend(x).numpy(), _probabilities(net, x).numpy(), atol=1e-6)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fused convolution is oneDNN's")
def test_the_fused_convolution_is_found_where_torch_has_onednn():
    assert _fused_convolution(torch.float32) is not None


def test_the_public_operators_compute_the_same_without_the_fused_convolution(monkeypatch):
    net = _folded(depth=3)
    x = torch.rand((1, 1, 32, 48), generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(inference, "_fused_convolution", lambda dtype: None)  # as on a torch without oneDNN
    assert torch.allclose(inference_form(net, torch.float32)(x), _probabilities(net, x), atol=1e-5)
