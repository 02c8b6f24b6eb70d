"""Floating-point operations of a network, counted from its layers (no timing involved).

The count is what the performance benchmarks divide by the wall time to get an achieved
GFLOP/s, to compare with the machine's dense-convolution throughput.  Convolutions dominate a
U-Net, so only they are counted, as 2 FLOPs (one multiply, one add) per multiply-accumulate:

* ``Conv3d``: ``2 · C_in/groups · k³ · C_out`` per output voxel (plus nothing for the bias);
* ``ConvTranspose3d``: ``2 · C_in · k³ · C_out / groups`` per *input* voxel (each input voxel
  is scattered to ``k³`` outputs per output channel).

Normalisation, activations, pooling and concatenation are memory-bound and are reported
separately as ``other_elements`` (elements written), not as FLOPs.  Shapes propagate on
PyTorch's ``meta`` device, so counting a 256×256×176 volume allocates nothing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

__all__ = ["count_flops"]


def count_flops(network, shape: Sequence[int], *, batch: int = 1) -> dict:
    """FLOPs of one forward pass of ``network`` on a ``(batch, C, *shape)`` input.

    Parameters
    ----------
    network : torch.nn.Module — a 3-D network (input channels: those of its first convolution)
    shape : (D, H, W) — spatial size of the input (already a valid size for the network)
    batch : batch size

    Returns
    -------
    dict with ``flops`` (forward, convolutions only), ``conv_layers``, ``other_elements``,
    and ``by_layer`` (name → FLOPs).
    """
    import torch
    from torch import nn

    net = copy.deepcopy(network).to("meta").eval()
    first = next((m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))),
                 None)
    in_ch = first.in_channels if first is not None else 1
    by_layer: dict[str, int] = {}
    other = [0]
    handles = []

    def conv_hook(name):
        def hook(mod, inputs, output):
            k = math.prod(mod.kernel_size)
            if isinstance(mod, nn.ConvTranspose3d):
                n_in = math.prod(inputs[0].shape[2:]) * inputs[0].shape[0]
                macs = n_in * mod.in_channels * k * mod.out_channels // mod.groups
            else:
                n_out = math.prod(output.shape[2:]) * output.shape[0]
                macs = n_out * mod.out_channels * k * mod.in_channels // mod.groups
            by_layer[name] = by_layer.get(name, 0) + 2 * int(macs)
        return hook

    def other_hook(mod, inputs, output):
        if isinstance(output, torch.Tensor):
            other[0] += output.numel()

    for name, mod in net.named_modules():
        if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d)):
            handles.append(mod.register_forward_hook(conv_hook(name)))
        elif len(list(mod.children())) == 0:
            handles.append(mod.register_forward_hook(other_hook))
    try:
        with torch.no_grad():
            net(torch.empty((batch, in_ch, *map(int, shape)), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return {"flops": sum(by_layer.values()), "conv_layers": len(by_layer),
            "other_elements": other[0], "by_layer": by_layer}
