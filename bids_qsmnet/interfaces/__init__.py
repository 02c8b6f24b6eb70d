"""Nipype interfaces: thin adapters over the plain functions of the other sub-packages.

``from bids_qsmnet.interfaces import TrainQSMnet`` works; each name is imported on first use,
so importing this package alone does not import Nipype.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "StackEchoes": "phase", "EchoBrainMask": "phase", "FitTotalField": "phase",
    "RemoveBackground": "phase",
    "ConvertToPPM": "qsm", "BrainMask": "qsm", "ToNetworkFrame": "qsm",
    "FromNetworkFrame": "qsm",
    "QSMnetInference": "inference",
    "ExtractPatches": "training", "TrainQSMnet": "training",
    "DerivativesSink": "derivatives", "ReportMosaics": "derivatives",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
