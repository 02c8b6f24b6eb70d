"""Named network architectures: each name is a :class:`~bids_qsmnet.models.unet.UNet3d` config.

=============== ========================== ====== ============ =========================
name            channels                   kernel activation   use
=============== ========================== ====== ============ =========================
``toy``         2, 4                       5³     ReLU         the tutorial's qsmnet_toy
``qsmnet``      32, 64, 128, 256, 512      5³     ReLU         QSMnet (≈99 M parameters)
``qsmnet+``     32, 64, 128, 256, 512      5³     leaky 0.1    QSMnet+
``qsmnet-mid``  24, 48, 96, 192            3³     leaky 0.1    2.25x slim's compute
``qsmnet-slim`` 16, 32, 64, 128            3³     leaky 0.1    CPU training / inference
``qsmnet-lite`` 8, 16, 32, 64              3³     leaky 0.1    quick CPU runs and tests
=============== ========================== ====== ============ =========================

All use batch norm with ε = 1e-3 and momentum 0.01 (decay 0.99), one input and one output
channel.  Listing the names does not import torch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = ["list_architectures", "architecture_config", "build_network"]

_COMMON: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "norm": "batch",
    "bn_eps": 1e-3,
    "bn_momentum": 0.01,
    "negative_slope": 0.1,
}

_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "toy": {**_COMMON, "channels": [2, 4], "kernel_size": 5, "act": "relu"},
    "qsmnet": {**_COMMON, "channels": [32, 64, 128, 256, 512], "kernel_size": 5, "act": "relu"},
    "qsmnet+": {
        **_COMMON,
        "channels": [32, 64, 128, 256, 512],
        "kernel_size": 5,
        "act": "leaky_relu",
    },
    "qsmnet-mid": {**_COMMON, "channels": [24, 48, 96, 192], "kernel_size": 3,
                   "act": "leaky_relu"},
    "qsmnet-slim": {
        **_COMMON,
        "channels": [16, 32, 64, 128],
        "kernel_size": 3,
        "act": "leaky_relu",
    },
    "qsmnet-lite": {**_COMMON, "channels": [8, 16, 32, 64], "kernel_size": 3, "act": "leaky_relu"},
}


def list_architectures() -> list[str]:
    """Names of the registered architectures, in registry order."""
    return list(_ARCHITECTURES)


def architecture_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The :class:`UNet3d` config of architecture ``name``, with ``overrides`` applied.

    Parameters
    ----------
    name : str — one of :func:`list_architectures`
    **overrides — constructor options to change (e.g. ``channels=(4, 8)``)

    Returns
    -------
    config : dict — validated, JSON-serialisable; ``UNet3d(**config)`` builds the network

    Raises
    ------
    ValueError
        for an unknown name (the message lists the known ones), an unknown option or an
        impossible value.
    """
    from .unet import check_unet_config

    if name not in _ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {name!r}; known architectures: {', '.join(list_architectures())}"
        )
    config = copy.deepcopy(_ARCHITECTURES[name])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for architecture {name!r}; options: {sorted(config)}"
        )
    config.update(overrides)
    return check_unet_config(**config)


def build_network(name_or_config: str | Mapping[str, Any]):
    """Build a fresh (randomly initialised) :class:`UNet3d` from a name or a config dict.

    Parameters
    ----------
    name_or_config : str or mapping — an architecture name, or ``UNet3d`` keyword arguments
        (for instance ``net.config`` or a model file's ``architecture``)

    Returns
    -------
    network : UNet3d — in training mode, on the CPU
    """
    from .unet import UNet3d

    if isinstance(name_or_config, str):
        return UNet3d(**architecture_config(name_or_config))
    if isinstance(name_or_config, Mapping):
        try:
            return UNet3d(**dict(name_or_config))
        except TypeError as exc:  # unknown keyword
            raise ValueError(f"invalid network config {dict(name_or_config)!r}: {exc}") from None
    raise ValueError(
        f"expected an architecture name or a config dict, got {type(name_or_config).__name__}"
    )
