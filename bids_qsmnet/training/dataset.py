"""torch ``Dataset`` over an HDF5 patch store (see :mod:`bids_qsmnet.training.patches`)."""

from __future__ import annotations

import os

import numpy as np

from .patches import read_store_info

__all__ = ["PatchDataset", "KernelCache"]


class PatchDataset:
    """Normalised training patches read lazily from an HDF5 patch store.

    Each item is a dict of tensors: ``input`` and ``label`` (1, P, P, P) float32, normalised
    with ``normalization`` (the store's own constants by default); ``mask`` (1, P, P, P)
    float32; ``b0_dir`` and ``voxel_size`` (3,) float64, from which the patch's dipole kernel
    is built for the model loss.  The file is opened on first access in each worker process
    (h5py handles must not cross ``fork``).
    """

    def __init__(self, path: str | os.PathLike, *, normalization: dict | None = None,
                 indices=None):
        import torch.utils.data  # noqa: F401  (torch must be importable)

        self.path = os.fspath(path)
        self.info = read_store_info(self.path)
        self.normalization = dict(normalization or self.info.normalization)
        self.indices = (np.arange(self.info.n_patches) if indices is None
                        else np.asarray(indices, dtype=np.int64))
        self._h5 = None
        self._h5_pid = None

    def __len__(self) -> int:
        return len(self.indices)

    def _file(self):
        # A handle opened before a fork (DataLoader workers on Linux) is not pickled but
        # inherited, and HDF5 handles must not be shared across processes: reopen per process.
        if self._h5 is None or self._h5_pid != os.getpid():
            import h5py

            if self._h5 is not None:  # HDF5 would hand back the inherited file otherwise
                try:
                    self._h5.close()
                except Exception:  # noqa: BLE001  (a broken inherited handle is dropped anyway)
                    pass
            self._h5 = h5py.File(self.path, "r")
            self._h5_pid = os.getpid()
        return self._h5

    def __getstate__(self):  # picklable for DataLoader workers: drop the open handle
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_h5_pid"] = None
        return state

    def __getitem__(self, item: int) -> dict:
        import torch

        h5 = self._file()
        i = int(self.indices[item])
        n = self.normalization
        field = (h5["input"][i] - n["input_mean"]) / n["input_std"]
        label = (h5["label"][i] - n["label_mean"]) / n["label_std"]
        mask = h5["mask"][i].astype(np.float32)
        return {
            "input": torch.from_numpy((field * mask).astype(np.float32)),
            "label": torch.from_numpy((label * mask).astype(np.float32)),
            "mask": torch.from_numpy(mask),
            "b0_dir": torch.from_numpy(h5["b0_dir"][i].astype(np.float64)),
            "voxel_size": torch.from_numpy(h5["voxel_size"][i].astype(np.float64)),
        }


class KernelCache:
    """Dipole kernels by (shape, voxel size, B0 direction), built once per distinct key."""

    def __init__(self, device=None, max_items: int = 256):
        self.device = device
        self.max_items = max_items
        self._cache: dict = {}

    def get(self, shape, voxel_size, b0_dir):
        from ..physics.dipole import dipole_kernel_torch

        key = (tuple(int(s) for s in shape), tuple(np.round(np.asarray(voxel_size), 6)),
               tuple(np.round(np.asarray(b0_dir), 6)))
        k = self._cache.get(key)
        if k is None:
            if len(self._cache) >= self.max_items:
                self._cache.clear()
            k = dipole_kernel_torch(key[0], key[1], key[2], device=self.device)
            self._cache[key] = k
        return k

    def batch(self, shape, voxel_sizes, b0_dirs):
        """Kernels for a batch, shaped (B, 1, X, Y, Z), or (X, Y, Z) when all are equal."""
        import torch

        vs = np.asarray(voxel_sizes.cpu() if hasattr(voxel_sizes, "cpu") else voxel_sizes)
        bd = np.asarray(b0_dirs.cpu() if hasattr(b0_dirs, "cpu") else b0_dirs)
        kernels = [self.get(shape, v, b) for v, b in zip(vs, bd)]
        if all(k is kernels[0] for k in kernels):
            return kernels[0]
        return torch.stack(kernels)[:, None]
