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
