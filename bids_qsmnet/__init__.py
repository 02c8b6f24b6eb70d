"""bids_qsmnet: quantitative susceptibility mapping with QSMnet / QSMnet+ as a BIDS-App.

Sub-packages (one concern each):

``physics``     dipole kernel, forward model, units, classical inversions (TKD, iterative)
``models``      the 3-D U-Net family (toy, QSMnet, QSMnet+, slim), model files, losses
``metrics``     NRMSE, HFEN, SSIM, PSNR, region means
``data``        synthetic susceptibility phantoms and the example BIDS dataset
``training``    patch extraction to HDF5 and the trainer
``inference``   whole-volume and tiled prediction
``bids``        discovery (pybids) and derivatives
``interfaces``  Nipype interfaces (thin adapters over the plain functions)
``workflows``   ``init_*_wf`` Nipype workflow factories
``cli``         the ``bids_qsmnet`` command line
``reports``     HTML reports and figures
"""

from .__about__ import __version__

__all__ = ["__version__"]
