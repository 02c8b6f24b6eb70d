"""The configurable 3-D U-Net behind every bids_qsmnet network (toy, QSMnet, QSMnet+, slim).

Layout for ``channels = (c0, c1, ..., cN)`` (``N = depth`` poolings)::

    x ─ down_0 (c0) ─────────────────────────────────── upcat_1 (c0) ─ final ─ y
          └ down_1 (c1) ─────────────────── upcat_2 (c1) ┘
                └ ...                 ... ┘
                      └ down_N (cN) ─ upcat_N ┘

* ``down_0``: two k×k×k conv + norm + activation at full resolution;
  ``down_i`` (i ≥ 1): 2×2×2 max pool, then two convs to ``c_i`` channels;
* ``upcat_i``: 2×2×2 stride-2 transposed conv ``c_i → c_{i-1}`` (QSMnet: halving the
  channels), concatenation with the output of ``down_{i-1}``, two convs ``2·c_{i-1} → c_{i-1}``;
* ``final``: 1×1×1 convolution ``c0 → out_channels`` with bias, no activation.

With ``channels = (32, 64, 128, 256, 512)`` and ``kernel_size = 5`` this is QSMnet's
``qsmnet_deep`` (about 99 M parameters); with ``(2, 4)`` it is the tutorial's ``qsmnet_toy``.
Channels need not double from level to level; the transposed conv always maps a level's
channels onto the next finer level's.

References
----------
Yoon J, Gong E, Chatnuntawech I, et al. Quantitative susceptibility mapping using deep neural
network: QSMnet. NeuroImage 2018;179:199-206. doi:10.1016/j.neuroimage.2018.06.030

Jung W, Yoon J, Ji S, et al. Exploring linearity of deep neural network trained QSM: QSMnet+.
NeuroImage 2020;211:116619. doi:10.1016/j.neuroimage.2020.116619
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .blocks import ACTIVATIONS, NORMS, Down, UpCat

__all__ = ["UNet3d", "count_parameters", "check_unet_config"]


def check_unet_config(
    *,
    in_channels: int = 1,
    out_channels: int = 1,
    channels: Sequence[int] = (32, 64, 128, 256, 512),
    kernel_size: int = 5,
    act: str = "relu",
    negative_slope: float = 0.1,
    norm: str | None = "batch",
    bn_eps: float = 1e-3,
    bn_momentum: float = 0.01,
) -> dict[str, Any]:
    """Validate a :class:`UNet3d` configuration and return it in canonical, JSON-ready form.

    Raises ``ValueError`` naming the offending option (``TypeError`` for unknown options, as
    any Python call does).  The returned dict rebuilds the network with ``UNet3d(**config)``.
    """

    def positive_int(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return int(value)

    def finite_float(name, value, lo, hi, *, lo_open=False):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
        return v

    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise ValueError(f"channels must be a sequence of positive integers, got {channels!r}")
    chans = [positive_int(f"channels[{i}]", c) for i, c in enumerate(channels)]
    if len(chans) < 2:
        raise ValueError(
            f"channels needs at least two levels (one pooling), got {list(channels)!r}"
        )
    kernel_size = positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    if norm == "none":
        norm = None
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    return {
        "in_channels": positive_int("in_channels", in_channels),
        "out_channels": positive_int("out_channels", out_channels),
        "channels": chans,
        "kernel_size": kernel_size,
        "act": act,
        "negative_slope": finite_float("negative_slope", negative_slope, 0.0, 1.0),
        "norm": norm,
        "bn_eps": finite_float("bn_eps", bn_eps, 0.0, 1.0, lo_open=True),
        "bn_momentum": finite_float("bn_momentum", bn_momentum, 0.0, 1.0),
    }


class UNet3d(nn.Module):
    """3-D U-Net with named levels (``down_0 … down_N``, ``upcat_N … upcat_1``, ``final``).

    Parameters
    ----------
    in_channels : int — input channels (1: the local field, normalised)
    out_channels : int — output channels (1: χ, normalised)
    channels : sequence of int — feature channels per level, finest first; ``len - 1`` poolings
    kernel_size : int — odd edge of the cubic convolution kernels in voxels (QSMnet: 5)
    act : str — activation, one of ``relu``, ``leaky_relu``, ``prelu``, ``elu``, ``gelu``, ``silu``
    negative_slope : float — leaky-ReLU slope (QSMnet+: 0.1); PReLU initial slope
    norm : {"batch", "instance", None} — normalisation after every convolution
    bn_eps : float — normalisation epsilon (QSMnet: 1e-3)
    bn_momentum : float — torch batch-norm momentum ``1 - decay`` (QSMnet: decay 0.99 → 0.01)

    Raises
    ------
    ValueError
        for impossible configurations (see :func:`check_unet_config`).

    Notes
    -----
    ``forward`` maps ``(B, in_channels, D, H, W) → (B, out_channels, D, H, W)``; ``D, H, W``
    must be multiples of :attr:`multiple` ``= 2**depth`` (pad first: QSMnet pads to 16).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        kernel_size: int = 5,
        act: str = "relu",
        negative_slope: float = 0.1,
        norm: str | None = "batch",
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        cfg = check_unet_config(
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            kernel_size=kernel_size,
            act=act,
            negative_slope=negative_slope,
            norm=norm,
            bn_eps=bn_eps,
            bn_momentum=bn_momentum,
        )
        self._config = cfg
        chans = cfg["channels"]
        opts = {
            "kernel_size": cfg["kernel_size"],
            "norm": cfg["norm"],
            "act": cfg["act"],
            "negative_slope": cfg["negative_slope"],
            "bn_eps": cfg["bn_eps"],
            "bn_momentum": cfg["bn_momentum"],
        }
        self.down_0 = Down(cfg["in_channels"], chans[0], pool=False, **opts)
        for i in range(1, len(chans)):
            self.add_module(f"down_{i}", Down(chans[i - 1], chans[i], **opts))
        # Decoder registered coarse to fine, in the order forward uses it.
        for i in range(len(chans) - 1, 0, -1):
            self.add_module(f"upcat_{i}", UpCat(chans[i], chans[i - 1], chans[i - 1], **opts))
        self.final = nn.Conv3d(chans[0], cfg["out_channels"], kernel_size=1, bias=True)

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: ``UNet3d(**net.config)`` rebuilds the net."""
        cfg = dict(self._config)
        cfg["channels"] = list(cfg["channels"])
        return cfg

    @property
    def depth(self) -> int:
        """Number of 2×2×2 poolings (``len(channels) - 1``)."""
        return len(self._config["channels"]) - 1

    @property
    def multiple(self) -> int:
        """Spatial sizes must be multiples of this (``2**depth``)."""
        return 2**self.depth

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, D, H, W)`` with sizes that are
        multiples of :attr:`multiple`."""
        if x.ndim != 5:
            raise ValueError(f"expected a 5-D tensor (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self._config["in_channels"]:
            raise ValueError(
                f"expected {self._config['in_channels']} input channel(s), got shape "
                f"{tuple(x.shape)}"
            )
        spatial = tuple(int(s) for s in x.shape[2:])
        if any(s == 0 or s % self.multiple for s in spatial):
            raise ValueError(
                f"spatial size {spatial} must be a multiple of {self.multiple} (2**{self.depth} "
                "for this network's poolings); zero-pad the input first"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D, H, W) → (B, out_channels, D, H, W)`` (normalised units)."""
        self.check_input(x)
        skips = []
        for i in range(self.depth + 1):
            x = getattr(self, f"down_{i}")(x)
            skips.append(x)
        x = skips.pop()
        for i in range(self.depth, 0, -1):
            x = getattr(self, f"upcat_{i}")(x, skips.pop())
        return self.final(x)

    def extra_repr(self) -> str:
        c = self._config
        return (
            f"channels={tuple(c['channels'])}, kernel_size={c['kernel_size']}, act={c['act']!r}, "
            f"norm={c['norm']!r}"
        )


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (scalars) of ``model``; buffers such as running means excluded."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
