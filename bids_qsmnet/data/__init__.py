"""Synthetic susceptibility phantoms, local-field simulation and the example BIDS dataset."""

from .example import example_dataset_path, make_example_dataset
from .synthetic import (
    BRAIN_LABELS,
    SOURCE_LABELS,
    Phantom,
    erode_mask,
    make_brain_phantom,
    make_source_phantom,
    random_b0_dir,
    simulate_local_field,
    snr_to_noise_std,
)

__all__ = [
    "BRAIN_LABELS",
    "SOURCE_LABELS",
    "Phantom",
    "make_brain_phantom",
    "make_source_phantom",
    "simulate_local_field",
    "snr_to_noise_std",
    "erode_mask",
    "random_b0_dir",
    "make_example_dataset",
    "example_dataset_path",
]
