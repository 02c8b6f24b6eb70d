"""FLOP counting against hand-counted layers (2 FLOPs per multiply-accumulate)."""

from __future__ import annotations

import torch
from torch import nn

from bids_qsmnet.models.flops import count_flops
from bids_qsmnet.models.registry import build_network


def test_single_conv_and_transposed_conv():
    net = nn.Sequential(nn.Conv3d(3, 5, 3, padding=1), nn.ReLU(),
                        nn.ConvTranspose3d(5, 2, 2, stride=2))
    r = count_flops(net, (4, 6, 8), batch=2)
    conv = 2 * (2 * 4 * 6 * 8) * 5 * 27 * 3          # per output voxel: C_out·k³·C_in MACs
    tconv = 2 * (2 * 4 * 6 * 8) * 5 * 8 * 2          # per input voxel: C_in·k³·C_out MACs
    assert r["by_layer"] == {"0": conv, "2": tconv}
    assert r["flops"] == conv + tconv and r["conv_layers"] == 2
    assert r["other_elements"] == 2 * 5 * 4 * 6 * 8  # the ReLU's output


def test_unet_counts_scale_with_voxels_and_leave_the_network_untouched():
    net = build_network("toy")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small = count_flops(net, (16, 16, 16))["flops"]
    big = count_flops(net, (32, 32, 32))["flops"]
    assert big == 8 * small  # fully convolutional: linear in the number of voxels
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert next(net.parameters()).device.type == "cpu"


def test_qsmnet_first_layer_by_hand():
    # QSMnet's first layer: 1 → 32 channels, 5³ kernel, on every voxel of the input
    r = count_flops(build_network("qsmnet"), (64, 64, 64))
    first = next(v for k, v in r["by_layer"].items() if k.endswith("conv_0.conv"))
    assert first == 2 * 64**3 * 32 * 125 * 1
