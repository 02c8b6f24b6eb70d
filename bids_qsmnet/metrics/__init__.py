"""Image-quality metrics of susceptibility maps (NRMSE, HFEN, SSIM, PSNR, slope, region means).

See :mod:`bids_qsmnet.metrics.scores` for the definitions and the choices behind them.
"""

from .scores import hfen, log_kernel, nrmse, psnr, region_means, score_all, slope, ssim

__all__ = ["nrmse", "hfen", "ssim", "psnr", "region_means", "score_all", "slope", "log_kernel"]
