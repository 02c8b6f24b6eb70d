"""Choosing the torch device (one place, logged, failing clearly)."""

from __future__ import annotations

import logging

from .errors import UserError

LOGGER = logging.getLogger(__name__)

__all__ = ["select_device", "DeviceError"]


class DeviceError(UserError, RuntimeError):
    """The requested device is not available."""


def select_device(requested: str = "auto"):
    """Return a ``torch.device`` for ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    ``auto`` takes the first CUDA GPU when torch sees one, else the CPU.  Asking for CUDA on a
    machine without a usable GPU raises :class:`DeviceError` instead of falling back to the CPU.
    """
    import torch

    req = (requested or "auto").strip().lower()
    if req == "auto":
        dev = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    elif req == "cpu":
        dev = torch.device("cpu")
    elif req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {requested}: no CUDA GPU is available to torch "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                "use --device cpu, or install a CUDA build of torch")
        dev = torch.device(req if ":" in req else "cuda:0")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s)")
    else:
        raise DeviceError(f"unknown device {requested!r}: use auto, cpu or cuda[:N]")
    if dev.type == "cuda":
        LOGGER.info("using GPU %s (%s)", dev, torch.cuda.get_device_name(dev))
    else:
        LOGGER.info("using the CPU (%d threads)", torch.get_num_threads())
    return dev
