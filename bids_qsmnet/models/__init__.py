"""Networks, model files and losses.

* :mod:`.blocks` — ``ConvNormAct``, ``TwoConv``, ``Down``, ``UpCat``
* :mod:`.unet` — ``UNet3d`` (toy, QSMnet, QSMnet+ and slimmer variants), ``count_parameters``
* :mod:`.registry` — named architectures: ``list_architectures``, ``architecture_config``,
  ``build_network``
* :mod:`.modelfile` — the ``.safetensors`` model file: ``ModelSpec``, ``save_model``,
  ``load_model``, ``resolve_model``
* :mod:`.losses` — ``qsmnet_loss`` and its terms

Names are imported lazily, so ``import bids_qsmnet.models`` (and the registry and
``resolve_model``) do not import torch; a command line's ``--help`` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "blocks": ("ConvNormAct", "TwoConv", "Down", "UpCat", "make_activation", "ACTIVATIONS"),
    "unet": ("UNet3d", "count_parameters", "check_unet_config"),
    "registry": ("list_architectures", "architecture_config", "build_network"),
    "modelfile": (
        "FORMAT_VERSION",
        "DEFAULT_MODEL_NAME",
        "MODEL_FILENAME",
        "ModelFileError",
        "Normalization",
        "ModelSpec",
        "LoadedModel",
        "save_model",
        "load_model",
        "read_model_spec",
        "file_sha256",
        "resolve_model",
        "list_shipped_models",
        "shipped_models_dir",
    ),
    "losses": ("qsmnet_loss", "l1_loss", "model_loss", "gradient_loss", "neighbour_gradient"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
