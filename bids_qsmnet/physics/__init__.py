"""Physics of QSM: the dipole forward model, field units, B0 orientation and classical inversions.

Everything here is plain numpy (torch only inside the ``*_torch`` twins, imported lazily).
Conventions: arrays indexed ``(i, j, k)`` along the voxel axes, ``voxel_size`` in mm,
``b0_dir`` in voxel space (default ``(0, 0, 1)``), susceptibility and local field in ppm.
"""

from .dipole import (
    dipole_kernel,
    dipole_kernel_torch,
    forward_field,
    forward_field_adjoint,
    forward_field_torch,
    kspace_grid,
    normalise_b0_dir,
)
from .inversion import closed_form_l2, data_consistency, gradient_kernel_sq, tkd, tv_admm
from .orientation import b0_dir_from_affine, obliquity_deg, voxel_sizes_from_affine
from .units import (
    GAMMA_BAR_MHZ_PER_T,
    UNITS,
    field_to_ppm,
    hz_to_ppm,
    hz_to_rad,
    normalise_units,
    ppm_to_field,
    ppm_to_hz,
    rad_to_hz,
)

__all__ = [
    # dipole
    "normalise_b0_dir",
    "kspace_grid",
    "dipole_kernel",
    "forward_field",
    "forward_field_adjoint",
    "dipole_kernel_torch",
    "forward_field_torch",
    # units
    "GAMMA_BAR_MHZ_PER_T",
    "UNITS",
    "normalise_units",
    "hz_to_ppm",
    "ppm_to_hz",
    "rad_to_hz",
    "hz_to_rad",
    "field_to_ppm",
    "ppm_to_field",
    # orientation
    "voxel_sizes_from_affine",
    "b0_dir_from_affine",
    "obliquity_deg",
    # inversion
    "tkd",
    "closed_form_l2",
    "tv_admm",
    "data_consistency",
    "gradient_kernel_sq",
]
