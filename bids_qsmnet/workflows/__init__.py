"""Nipype workflow factories (``init_*_wf``).

``from bids_qsmnet.workflows import init_qsmnet_wf`` works; each name is imported on first
use, so importing this package alone does not import Nipype.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "init_participant_wf": "base", "init_single_run_wf": "base",
    "init_qsmnet_wf": "qsmnet", "init_phase_wf": "phase", "init_training_wf": "training",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
