"""``python -m bids_qsmnet.train``: train a network on a patch store (see
:mod:`bids_qsmnet.training.command`; also the ``torchrun`` entry point)."""

from __future__ import annotations

import sys

from .training.command import build_parser, main
from .training.volumes import load_validation_volume

__all__ = ["build_parser", "main", "load_validation_volume"]

if __name__ == "__main__":
    sys.exit(main())
