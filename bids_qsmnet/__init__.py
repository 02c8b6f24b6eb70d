"""bids_qsmnet: quantitative susceptibility mapping with QSMnet / QSMnet+ as a BIDS-App.

Sub-packages (one concern each; docs/layout.md says what lives where):

``physics``     dipole kernel, forward model, SMV kernel, units, classical inversions
``phase``       the phase chain: raw GRE echoes → total field → local field
``io``          NIfTI and field files, atomic writes, folder locks
``models``      the 3-D U-Net family (toy, QSMnet, QSMnet+, slim), model files, losses
``metrics``     NRMSE, HFEN, SSIM, PSNR, region means
``data``        synthetic susceptibility phantoms and the example BIDS dataset
``training``    training settings, patch extraction to HDF5 and the trainer
``inference``   whole-volume and tiled prediction, the network frame, refinement
``bids``        discovery (pybids), sidecar settings and derivatives
``interfaces``  Nipype interfaces (thin adapters over the plain functions)
``workflows``   ``init_*_wf`` Nipype workflow factories
``cli``         the ``bids_qsmnet`` command line
``reports``     HTML reports and figures
"""

from .__about__ import __version__

__all__ = ["__version__"]
