"""The U-Net, its blocks and the architecture registry."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bids_qsmnet.models import (
    UNet3d,
    architecture_config,
    build_network,
    count_parameters,
    list_architectures,
)
from bids_qsmnet.models.blocks import ConvNormAct, Down, TwoConv, UpCat

torch.set_num_threads(2)

# Pinned parameter counts (conv without bias before batch norm; see blocks.py).
PINNED_PARAMETERS = {
    "toy": 5_351,
    "qsmnet": 99_451_041,
    "qsmnet+": 99_451_041,
    "qsmnet-mid": 3_151_369,
    "qsmnet-slim": 1_401_265,
    "qsmnet-lite": 350_809,
}


def analytic_parameter_count(channels, k, c_in=1, c_out=1, norm=True) -> int:
    """Parameters of the U-Net layout, counted layer by layer from its definition."""

    def conv(ci, co):  # k³ conv, bias only without norm, + BN gamma/beta
        return k**3 * ci * co + (2 * co if norm else co)

    total = conv(c_in, channels[0]) + conv(channels[0], channels[0])
    for lo, hi in zip(channels[:-1], channels[1:], strict=True):
        total += conv(lo, hi) + conv(hi, hi)  # encoder level
        total += 8 * hi * lo + lo  # 2×2×2 transposed conv with bias
        total += conv(2 * lo, lo) + conv(lo, lo)  # decoder level after concatenation
    return total + channels[0] * c_out + c_out  # final 1×1×1 conv with bias


@pytest.fixture(scope="module")
def qsmnet():
    torch.manual_seed(0)
    return build_network("qsmnet").eval()


def test_registry_names():
    assert list_architectures() == ["toy", "qsmnet", "qsmnet+", "qsmnet-mid", "qsmnet-slim",
                                    "qsmnet-lite"]


@pytest.mark.parametrize("name", ["toy", "qsmnet-mid", "qsmnet-slim", "qsmnet-lite"])
def test_parameter_counts_small(name):
    net = build_network(name)
    n = count_parameters(net)
    cfg = net.config
    print(f"{name}: {n} parameters")
    assert n == PINNED_PARAMETERS[name]
    assert n == analytic_parameter_count(cfg["channels"], cfg["kernel_size"])


def test_qsmnet_parameter_count(qsmnet):
    n = count_parameters(qsmnet)
    print(f"qsmnet: {n} parameters")
    assert n == PINNED_PARAMETERS["qsmnet"]
    assert n == analytic_parameter_count([32, 64, 128, 256, 512], 5)
    assert 98e6 <= n <= 101e6  # "about 99 M" (Yoon et al. 2018)


def test_qsmnet_forward_64(qsmnet):
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.inference_mode():
        y = qsmnet(x)
    assert y.shape == (1, 1, 64, 64, 64)
    assert torch.isfinite(y).all()
    assert qsmnet.depth == 4 and qsmnet.multiple == 16


def test_qsmnet_plus_differs_only_by_activation(qsmnet):
    plus = build_network("qsmnet+")
    a, b = qsmnet.config, plus.config
    assert {k for k in a if a[k] != b[k]} == {"act"}
    assert (a["act"], b["act"], b["negative_slope"]) == ("relu", "leaky_relu", 0.1)
    assert count_parameters(plus) == PINNED_PARAMETERS["qsmnet+"]
    sa, sb = qsmnet.state_dict(), plus.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape for k in sa)
    leaky = [m for m in plus.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == 18  # two per level: 5 encoder + 4 decoder levels
    assert all(m.negative_slope == 0.1 for m in leaky)
    assert not any(isinstance(m, nn.LeakyReLU) for m in qsmnet.modules())
    assert sum(isinstance(m, nn.ReLU) for m in qsmnet.modules()) == 18


def test_qsmnet_batch_norm_constants(qsmnet):
    bns = [m for m in qsmnet.modules() if isinstance(m, nn.BatchNorm3d)]
    assert len(bns) == 18
    # TF: eps 1e-3, running average decay 0.99 -> torch momentum 0.01
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)


def test_qsmnet_layer_channels(qsmnet):
    convs = {n: m for n, m in qsmnet.named_modules() if isinstance(m, nn.Conv3d)}
    assert (convs["down_4.convs.conv_1.conv"].in_channels, convs["final"].out_channels) == (512, 1)
    up = qsmnet.upcat_4.up
    assert (up.in_channels, up.out_channels, up.kernel_size, up.stride) == (
        512,
        256,
        (2, 2, 2),
        (2, 2, 2),
    )
    assert qsmnet.upcat_4.convs.conv_0.conv.in_channels == 512  # 256 skip + 256 upsampled
    assert all(m.kernel_size == (5, 5, 5) for n, m in convs.items() if n != "final")


def test_toy_forward_shape():
    torch.manual_seed(0)
    net = build_network("toy")
    x = torch.randn(2, 1, 32, 32, 32)
    y = net(x)
    assert y.shape == (2, 1, 32, 32, 32)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 1, 32, 32, 32)


def test_toy_matches_tutorial_table():
    """The tutorial's qsmnet_toy, layer by layer (name: in → out channels, kernel, stride)."""
    net = build_network("toy")
    table = {
        "conv11": (net.down_0.convs.conv_0.conv, 1, 2, 5, 1),
        "conv12": (net.down_0.convs.conv_1.conv, 2, 2, 5, 1),
        "conv21": (net.down_1.convs.conv_0.conv, 2, 4, 5, 1),
        "conv22": (net.down_1.convs.conv_1.conv, 4, 4, 5, 1),
        "deconv1": (net.upcat_1.up, 4, 2, 2, 2),
        "conv31": (net.upcat_1.convs.conv_0.conv, 4, 2, 5, 1),
        "conv32": (net.upcat_1.convs.conv_1.conv, 2, 2, 5, 1),
        "out_image": (net.final, 2, 1, 1, 1),
    }
    for name, (layer, c_in, c_out, k, stride) in table.items():
        assert (layer.in_channels, layer.out_channels) == (c_in, c_out), name
        assert layer.kernel_size == (k, k, k) and layer.stride == (stride,) * 3, name
    assert isinstance(net.down_1.pool, nn.MaxPool3d) and net.down_1.pool.kernel_size == 2
    assert isinstance(net.upcat_1.up, nn.ConvTranspose3d) and net.upcat_1.up.bias is not None
    assert net.final.bias is not None

    # Feature shapes as the tutorial prints them (batch, channels, x, y, z).
    shapes = {}

    def record(name):
        def hook(module, inputs, output):
            shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))

        return hook

    for name, (layer, *_rest) in table.items():
        layer.register_forward_hook(record(name))
    net.down_1.pool.register_forward_hook(record("maxpool1"))
    net(torch.zeros(3, 1, 32, 32, 32))
    assert shapes["conv12"][1] == (3, 2, 32, 32, 32)
    assert shapes["maxpool1"][1] == (3, 2, 16, 16, 16)
    assert shapes["conv22"][1] == (3, 4, 16, 16, 16)
    assert shapes["deconv1"][1] == (3, 2, 32, 32, 32)
    assert shapes["conv31"][0] == (3, 4, 32, 32, 32)  # concat1 = [conv12, deconv1]
    assert shapes["out_image"][1] == (3, 1, 32, 32, 32)


def test_skip_concatenation_order():
    """``UpCat`` concatenates [skip, upsampled] (the original's concat(conv12, deconv1))."""
    block = UpCat(4, 2, 2, kernel_size=3, norm=None)
    seen = {}
    block.convs.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0]))
    skip = torch.full((1, 2, 4, 4, 4), 7.0)
    block(torch.zeros(1, 4, 2, 2, 2), skip)
    assert torch.equal(seen["x"][:, :2], skip)


def test_blocks_shapes_and_names():
    cna = ConvNormAct(3, 5, kernel_size=3, act="prelu", negative_slope=0.25)
    assert set(dict(cna.named_children())) == {"conv", "norm", "act"}
    assert cna.conv.bias is None  # batch norm follows
    assert torch.allclose(cna.act.weight, torch.full((5,), 0.25))
    assert cna(torch.zeros(2, 3, 6, 6, 6)).shape == (2, 5, 6, 6, 6)
    plain = ConvNormAct(3, 5, kernel_size=1, norm=None)
    assert "norm" not in dict(plain.named_children()) and plain.conv.bias is not None
    inst = ConvNormAct(1, 2, kernel_size=3, norm="instance")
    assert isinstance(inst.norm, nn.InstanceNorm3d) and inst.norm.eps == 1e-3
    assert TwoConv(1, 4, kernel_size=3)(torch.zeros(1, 1, 4, 4, 4)).shape == (1, 4, 4, 4, 4)
    assert Down(4, 8, kernel_size=3)(torch.zeros(1, 4, 8, 8, 8)).shape == (1, 8, 4, 4, 4)


def test_leaky_relu_slope_applies():
    """A leaky ReLU with slope 0.1 maps -1 to -0.1 (through a conv set to identity)."""
    cna = ConvNormAct(1, 1, kernel_size=1, norm=None, act="leaky_relu", negative_slope=0.1)
    with torch.no_grad():
        cna.conv.weight.fill_(1.0)
        cna.conv.bias.zero_()
    out = cna(torch.tensor([-1.0, 2.0]).reshape(1, 1, 2, 1, 1))
    assert torch.allclose(out.flatten(), torch.tensor([-0.1, 2.0]))


def test_size_must_be_multiple_of_16(qsmnet):
    with pytest.raises(ValueError, match="multiple of 16"):
        qsmnet(torch.zeros(1, 1, 30, 30, 30))
    with pytest.raises(ValueError, match="multiple of 16"):
        qsmnet(torch.zeros(1, 1, 32, 32, 24))
    with pytest.raises(ValueError, match="5-D"):
        qsmnet(torch.zeros(1, 32, 32, 32))
    with pytest.raises(ValueError, match="input channel"):
        qsmnet(torch.zeros(1, 2, 32, 32, 32))
    toy = build_network("toy")
    assert toy.multiple == 2
    with pytest.raises(ValueError, match="multiple of 2"):
        toy(torch.zeros(1, 1, 31, 32, 32))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"channels": []}, "at least two levels"),
        ({"channels": [8]}, "at least two levels"),
        ({"channels": [8, 0]}, "channels\\[1\\]"),
        ({"channels": "32"}, "sequence"),
        ({"kernel_size": 4}, "odd"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"act": "tanh"}, "activation"),
        ({"norm": "group"}, "norm"),
        ({"bn_eps": 0.0}, "bn_eps"),
        ({"bn_momentum": 1.5}, "bn_momentum"),
        ({"in_channels": 0}, "in_channels"),
        ({"negative_slope": float("nan")}, "negative_slope"),
    ],
)
def test_impossible_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        UNet3d(**{"channels": [2, 4], **bad})


def test_channels_need_not_double():
    net = UNet3d(channels=(3, 5, 6), kernel_size=3)
    assert net.upcat_2.up.out_channels == 5 and net.upcat_1.up.out_channels == 3
    assert net(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 1, 8, 8, 8)
    assert count_parameters(net) == analytic_parameter_count([3, 5, 6], 3)


def test_config_rebuilds_network():
    net = UNet3d(channels=(4, 8, 16), kernel_size=3, act="leaky_relu", norm=None, out_channels=2)
    cfg = json.loads(json.dumps(net.config))  # JSON-serialisable
    again = UNet3d(**cfg)
    assert again.config == net.config
    assert net.config["channels"] == [4, 8, 16] and net.config["norm"] is None
    again.load_state_dict(net.state_dict())  # identical structure
    assert UNet3d(**{**cfg, "norm": "none"}).config["norm"] is None


def test_state_dict_keys_are_stable():
    keys = list(build_network("toy").state_dict())
    assert keys[0] == "down_0.convs.conv_0.conv.weight"
    assert "upcat_1.up.weight" in keys and "upcat_1.convs.conv_1.norm.running_var" in keys
    assert keys[-2:] == ["final.weight", "final.bias"]
    deep = build_network("qsmnet-lite").state_dict()
    assert {k.split(".")[0] for k in deep} == {
        "down_0",
        "down_1",
        "down_2",
        "down_3",
        "upcat_3",
        "upcat_2",
        "upcat_1",
        "final",
    }


def test_architecture_config_and_errors():
    cfg = architecture_config("qsmnet-slim")
    assert cfg["channels"] == [16, 32, 64, 128] and cfg["kernel_size"] == 3
    assert cfg["act"] == "leaky_relu" and cfg["negative_slope"] == 0.1
    assert architecture_config("qsmnet-lite")["channels"] == [8, 16, 32, 64]
    assert architecture_config("toy", channels=(4, 8))["channels"] == [4, 8]
    assert architecture_config("toy")["channels"] == [2, 4]  # overrides do not leak
    with pytest.raises(ValueError, match="known architectures: toy, qsmnet, qsmnet\\+"):
        architecture_config("unet9000")
    with pytest.raises(ValueError, match="unknown option"):
        architecture_config("toy", width=3)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network("nope")
    with pytest.raises(ValueError, match="invalid network config"):
        build_network({"channels": [2, 4], "depth": 3})
    net = build_network({"channels": [2, 4], "kernel_size": 3})
    assert isinstance(net, UNet3d) and net.config["kernel_size"] == 3


def test_count_parameters_trainable_only():
    net = build_network("toy")
    for p in net.down_0.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in net.down_0.parameters())
    assert count_parameters(net, trainable_only=True) == PINNED_PARAMETERS["toy"] - frozen
    assert count_parameters(net) == PINNED_PARAMETERS["toy"]


def test_backward_reaches_every_parameter():
    torch.manual_seed(1)
    net = build_network("qsmnet-lite")
    net(torch.randn(2, 1, 8, 8, 8)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_convolution_layout_switch_keeps_the_function():
    """Convolutions alone in channels-last (the trainer's CPU layout) compute the same
    network: outputs and gradients equal the standard layout's to float rounding, the
    activations between blocks stay in the standard layout, and the state dict is the same."""
    from bids_qsmnet.models.blocks import set_convolution_layout

    torch.manual_seed(0)
    ref = build_network("toy").train()
    net = build_network("toy").train()
    net.load_state_dict(ref.state_dict())
    assert set_convolution_layout(net, torch.channels_last_3d) == 6
    x = torch.randn(2, 1, 16, 16, 16)
    out_ref, out = ref(x), net(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), net.parameters()):
        scale = p.grad.abs().max().item()  # summation order differs: relative to the largest
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-5 * scale, msg=name)
    assert set_convolution_layout(net, None) == 6
    assert all(m.conv_memory_format is None for m in net.modules() if isinstance(m, ConvNormAct))
