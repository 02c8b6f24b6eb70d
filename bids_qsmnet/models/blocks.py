"""Building blocks of the 3-D U-Net: conv → norm → activation, and the levels built from it.

Every block has named children so that state-dict keys read like the diagram and stay stable
across versions (model files store the state dict by key):

* :class:`ConvNormAct` — ``conv`` (, ``norm``) , ``act``
* :class:`TwoConv` — ``conv_0``, ``conv_1`` (two :class:`ConvNormAct`)
* :class:`Down` — ``pool`` (2×2×2 max pool, or identity on the top level), ``convs``
* :class:`UpCat` — ``up`` (2×2×2 stride-2 transposed conv), ``convs`` (after concatenation)

Bias convention
---------------
The original TensorFlow QSMnet adds a bias to every convolution that batch norm then follows.
That bias is redundant (batch norm subtracts the per-channel mean, so ``BN(conv(x) + b)`` equals
``BN(conv(x))`` with the running mean shifted by ``b``), so here a convolution carries a bias
only when no normalisation follows it.  Weights converted from the original checkpoints fold
the bias into ``norm.running_mean`` (``running_mean - b``).  The transposed convolution and the
final 1×1×1 convolution have a bias, as in the original.

Batch-norm constants follow the original: ``eps = 1e-3`` and a running-average decay of 0.99,
i.e. torch ``momentum = 1 - 0.99 = 0.01``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "NORMS", "ConvNormAct", "TwoConv", "Down", "UpCat", "make_activation",
           "set_convolution_layout"]

#: Activation names accepted by :func:`make_activation` (and by every block and the U-Net).
ACTIVATIONS = ("relu", "leaky_relu", "prelu", "elu", "gelu", "silu")
#: Normalisation names accepted by :class:`ConvNormAct` (``None`` means no normalisation).
NORMS = ("batch", "instance", None)


def make_activation(act: str, *, negative_slope: float = 0.1, num_channels: int = 1) -> nn.Module:
    """Return a fresh activation module.

    Parameters
    ----------
    act : str — one of :data:`ACTIVATIONS`
    negative_slope : float — slope for ``x < 0`` of ``leaky_relu`` (QSMnet+ uses 0.1); the
        initial slope of ``prelu``
    num_channels : int — number of learnable slopes of ``prelu`` (one per channel)
    """
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "leaky_relu":
        return nn.LeakyReLU(negative_slope=negative_slope, inplace=True)
    if act == "prelu":
        return nn.PReLU(num_parameters=num_channels, init=negative_slope)
    if act == "elu":
        return nn.ELU(inplace=True)
    if act == "gelu":
        return nn.GELU()
    if act == "silu":
        return nn.SiLU(inplace=True)
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class ConvNormAct(nn.Module):
    """``conv (k×k×k, 'same' padding) → norm → activation``.

    Parameters
    ----------
    in_ch, out_ch : int — channels in and out
    kernel_size : int — odd edge length of the cubic kernel in voxels ('same' padding needs odd)
    norm : {"batch", "instance", None} — normalisation after the convolution
    act : str — one of :data:`ACTIVATIONS`
    negative_slope : float — leaky-ReLU slope (and PReLU initial slope)
    bn_eps : float — epsilon of the normalisation (the original QSMnet: 1e-3)
    bn_momentum : float — torch batch-norm momentum, ``1 - decay`` (the original: 0.01)

    Shapes: ``(B, in_ch, D, H, W) → (B, out_ch, D, H, W)``.

    ``conv_memory_format`` (an attribute, not a parameter; see :func:`set_convolution_layout`)
    runs the convolution alone in that memory format and returns its output to the standard
    layout before the normalisation.
    """

    #: memory format the convolution runs in (``None``: the input's own)
    conv_memory_format: torch.memory_format | None = None

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        kernel_size: int,
        norm: str | None = "batch",
        act: str = "relu",
        negative_slope: float = 0.1,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        in_ch = _check_positive_int("in_ch", in_ch)
        out_ch = _check_positive_int("out_ch", out_ch)
        kernel_size = _check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        self.conv = nn.Conv3d(
            in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=norm is None
        )
        if norm == "batch":
            self.norm = nn.BatchNorm3d(out_ch, eps=bn_eps, momentum=bn_momentum)
        elif norm == "instance":
            self.norm = nn.InstanceNorm3d(out_ch, eps=bn_eps, affine=True)
        self.act = make_activation(act, negative_slope=negative_slope, num_channels=out_ch)
        self._init_weights(act, negative_slope)

    def _init_weights(self, act: str, negative_slope: float) -> None:
        # He initialisation, as the original's variance-scaling initialiser (scale 2, fan in).
        slope = negative_slope if act in ("leaky_relu", "prelu") else 0.0
        nn.init.kaiming_normal_(self.conv.weight, a=slope, nonlinearity="leaky_relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_memory_format is None:
            x = self.conv(x)
        else:
            x = self.conv(x.contiguous(memory_format=self.conv_memory_format)).contiguous()
        if hasattr(self, "norm"):
            x = self.norm(x)
        return self.act(x)


def set_convolution_layout(module: nn.Module, memory_format: torch.memory_format | None) -> int:
    """Run every :class:`ConvNormAct` convolution inside ``module`` in ``memory_format``
    (``torch.channels_last_3d`` or ``None`` for the input's layout); returns how many.

    On the CPU, oneDNN's 3-D convolutions are several times faster channels-last, while
    batch norm (and the activations, pooling and concatenations) are faster in the standard
    layout; for a narrow network (2–8 channels) converting each convolution's input and
    output costs less than either layout throughout (the trainer's choice,
    :data:`bids_qsmnet.training.trainer.NARROW_CHANNELS`).  The weights and the function are
    unchanged (state dicts are layout-free).
    """
    blocks = [m for m in module.modules() if isinstance(m, ConvNormAct)]
    for block in blocks:
        block.conv_memory_format = memory_format
    return len(blocks)


class TwoConv(nn.Module):
    """Two :class:`ConvNormAct` in a row (``conv_0``: in → out, ``conv_1``: out → out).

    Keyword options are those of :class:`ConvNormAct`.
    Shapes: ``(B, in_ch, D, H, W) → (B, out_ch, D, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, **options) -> None:
        super().__init__()
        self.conv_0 = ConvNormAct(in_ch, out_ch, **options)
        self.conv_1 = ConvNormAct(out_ch, out_ch, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_1(self.conv_0(x))


class Down(nn.Module):
    """One encoder level: 2×2×2 max pool (unless ``pool=False``), then :class:`TwoConv`.

    Parameters
    ----------
    in_ch, out_ch : int — channels in and out
    pool : bool — ``False`` for the top level, which sees the input at full resolution
    **options — keyword options of :class:`ConvNormAct`

    Shapes: ``(B, in_ch, D, H, W) → (B, out_ch, D/2, H/2, W/2)`` (``D, H, W`` unchanged
    without pooling).
    """

    def __init__(self, in_ch: int, out_ch: int, *, pool: bool = True, **options) -> None:
        super().__init__()
        self.pool = nn.MaxPool3d(kernel_size=2, stride=2) if pool else nn.Identity()
        self.convs = TwoConv(in_ch, out_ch, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.pool(x))


class UpCat(nn.Module):
    """One decoder level: upsample, concatenate the skip, :class:`TwoConv`.

    ``up`` is a 2×2×2 stride-2 transposed convolution (with bias) from ``in_ch`` to ``skip_ch``
    channels (QSMnet: half of ``in_ch``); its output is concatenated after the skip features
    (``[skip, up]`` along channels, as the original's ``concat(conv12, deconv1)``), and
    ``convs`` maps ``2 * skip_ch`` to ``out_ch`` channels.

    Parameters
    ----------
    in_ch : int — channels of the coarser level's features
    skip_ch : int — channels of the skip connection (and of the upsampled features)
    out_ch : int — channels out (QSMnet: ``skip_ch``)
    **options — keyword options of :class:`ConvNormAct`

    Shapes: ``x (B, in_ch, D, H, W)``, ``skip (B, skip_ch, 2D, 2H, 2W)`` →
    ``(B, out_ch, 2D, 2H, 2W)``.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, **options) -> None:
        super().__init__()
        in_ch = _check_positive_int("in_ch", in_ch)
        skip_ch = _check_positive_int("skip_ch", skip_ch)
        self.up = nn.ConvTranspose3d(in_ch, skip_ch, kernel_size=2, stride=2, bias=True)
        # Each output voxel of a stride-2, 2×2×2 transposed conv receives exactly one tap per
        # input channel, so its fan-in is in_ch: He scale sqrt(2 / in_ch).
        nn.init.normal_(self.up.weight, std=math.sqrt(2.0 / in_ch))
        nn.init.zeros_(self.up.bias)
        self.convs = TwoConv(2 * skip_ch, out_ch, **options)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([skip, self.up(x)], dim=1))
