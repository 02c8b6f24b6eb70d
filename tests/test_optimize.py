"""Inference rewrites (batch-norm folding, channels-last) keep the network's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_qsmnet.inference.optimize import fold_batch_norm, optimise_for_inference
from bids_qsmnet.inference.predict import predict_normalised
from bids_qsmnet.models.registry import build_network


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    n = build_network("qsmnet-lite")
    # non-trivial running statistics and affine parameters, as after training
    for m in n.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return n.eval()


def test_same_output_and_original_untouched(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = optimise_for_inference(net)
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, out = net(x), opt(x)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in opt.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules()) > 0
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_deterministic_bytes(net):
    opt = optimise_for_inference(net)
    x = np.random.default_rng(2).normal(size=(40, 36, 28)).astype(np.float32)
    a = predict_normalised(opt, x, multiple=net.multiple)
    b = predict_normalised(opt, x, multiple=net.multiple)
    assert a.tobytes() == b.tobytes()


def test_folding_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(build_network("toy").train())
