"""GPU paths, run for real where a CUDA device exists (skipped on CPU-only machines such as CI)."""

import numpy as np
import pytest
import torch
from conftest import tiny_settings

from tem_ij_plugin.annotations import rasterize
from tem_ij_plugin.predict import predict_stack
from tem_ij_plugin.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_train_on_cuda_and_predict_on_both_devices(synthetic):
    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    res = train(image[None], labels, tiny_settings(20), device="cuda")
    assert res.model.meta["history"]["rounds"][-1]["device"].startswith("cuda")
    net = res.model.net
    cpu = predict_stack(net.cpu(), image[None], res.model.normalization, torch.device("cpu"), precision="fp32")
    gpu = predict_stack(net.cuda(), image[None], res.model.normalization, torch.device("cuda"), precision="fp32")
    assert np.abs(cpu - gpu).max() < 1e-3
    bf16 = predict_stack(net, image[None], res.model.normalization, torch.device("cuda"), precision="bf16")
    assert np.abs(bf16 - gpu).max() < 0.05


def test_predictor_on_cuda_matches_cpu(synthetic):
    from tem_ij_plugin.predict import make_predictor

    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    net = train(image[None], labels, tiny_settings(20), device="cpu").model.net
    x = (image / 255.0).astype(np.float32)
    cpu = make_predictor(net, torch.device("cpu"), "torch", "fp32", tile=128).plane(x)
    # auto on CUDA: bf16 (or fp16) autocast, checked against fp32 on the probe; plane stitched on the device
    gpu = make_predictor(net, torch.device("cuda"), "auto", "auto", tile=128, probe=x[:128, :128])
    assert gpu.backend.name == "torch"
    assert gpu.precision in ("bf16", "fp16", "fp32")
    # the check covers the probe tile; elsewhere reduced precision may move a little more
    assert np.abs(gpu.plane(x) - cpu).max() <= 0.05
    exact = make_predictor(net, torch.device("cuda"), "torch", "fp32", tile=128)
    assert np.abs(exact.plane(x) - cpu).max() <= 1e-3


def test_auto_precision_on_this_gpu_is_bf16_or_checked_fp16():
    from tem_ij_plugin.runtime import resolve_precision

    cuda = torch.device("cuda")
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_precision(cuda, "auto", checked=True) == expected


def test_auto_precision_never_trains_in_unscaled_fp16():
    from tem_ij_plugin.runtime import resolve_precision

    assert resolve_precision(torch.device("cuda"), "auto", checked=False) in ("bf16", "fp32")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_plane_normalised_on_the_gpu_is_bit_identical_to_normalize(dtype):
    from tem_ij_plugin.normalization import normalize
    from tem_ij_plugin.predict import _to_device

    raw = np.random.default_rng(0).integers(0, np.iinfo(dtype).max + 1, (300, 400)).astype(dtype)
    lo, hi = 7.25, 201.5
    ours = _to_device(raw, torch.device("cuda"), (lo, hi)).cpu().numpy()
    assert np.array_equal(ours, normalize(raw, lo, hi))


def test_a_raw_plane_on_the_gpu_predicts_as_the_normalised_plane(synthetic):
    from tem_ij_plugin.normalization import normalize
    from tem_ij_plugin.predict import make_predictor

    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    net = train(image[None], labels, tiny_settings(20), device="cpu").model.net
    pred = make_predictor(net, torch.device("cuda"), "torch", "fp32", tile=128)
    raw = pred.plane(image, normalization=(10.0, 240.0))
    assert np.array_equal(raw, pred.plane(normalize(image, 10.0, 240.0)))


def test_reading_back_through_the_page_locked_buffer_changes_no_value(synthetic):
    from tem_ij_plugin.predict import make_predictor

    image = synthetic[0]
    net = train(image[None], rasterize(synthetic[2], (1,) + image.shape), tiny_settings(20), device="cpu").model.net
    pred = make_predictor(net, torch.device("cuda"), "torch", "fp32", tile=128)
    pinned = pred.plane(image, normalization=(0.0, 255.0))
    pred.pinned_readback = False
    assert np.array_equal(pinned, pred.plane(image, normalization=(0.0, 255.0)))
