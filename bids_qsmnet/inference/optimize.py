"""Inference-only rewrites of a network that keep its output (to float rounding) and run faster.

* **Batch-norm folding**: in eval mode a ``Conv3d`` followed by ``BatchNorm3d`` is one affine
  map, so the normalisation is folded into the convolution's weights and bias
  (``torch.nn.utils.fusion.fuse_conv_bn_eval``) — one pass over memory less per layer.
* **Channels-last 3-D memory format** (``torch.channels_last_3d``, NDHWC): oneDNN's direct 3-D
  convolutions run on this layout without reordering the tensors at every layer; on the 2-core
  benchmark CPU it halved the time of the default model (``docs/benchmarks.md``).

The rewritten network is a copy: the caller's network (and its state dict) is left as it was.
Outputs agree with the original within ~1e-5 relative (float32 reassociation), and are
deterministic on the CPU: the same input gives the same bytes.
"""

from __future__ import annotations

import copy
import logging

LOGGER = logging.getLogger(__name__)

__all__ = ["optimise_for_inference", "fold_batch_norm"]


def fold_batch_norm(network):
    """Fold every ``conv`` + ``norm`` (BatchNorm3d) pair of our blocks, in place; returns it.

    Only modules holding a ``conv`` and a ``BatchNorm3d`` ``norm`` attribute (our
    :class:`~bids_qsmnet.models.blocks.ConvNormAct`) are rewritten; ``forward`` then skips the
    missing ``norm``.  The network must be in eval mode (running statistics are used).
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if network.training:
        raise ValueError("batch-norm folding needs a network in eval mode")
    n = 0
    for module in network.modules():
        norm = getattr(module, "norm", None)
        conv = getattr(module, "conv", None)
        if isinstance(norm, torch.nn.BatchNorm3d) and isinstance(conv, torch.nn.Conv3d):
            module.conv = fuse_conv_bn_eval(conv, norm)
            del module.norm
            n += 1
    LOGGER.debug("folded %d batch-norm layers into their convolutions", n)
    return network


def optimise_for_inference(network, *, device="cpu", fold: bool = True,
                           channels_last: bool = True):
    """A copy of ``network`` rewritten for fast inference on ``device`` (see module docs)."""
    import torch

    net = copy.deepcopy(network).eval()
    if fold:
        fold_batch_norm(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    return net.to(device)
