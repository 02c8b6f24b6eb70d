"""Inference on files: a QSMnet-family model applied to a local field in the network frame,
with the memory it needs checked first, then the data-consistency refinement."""

from __future__ import annotations

import logging
import os

import numpy as np
from nipype.utils.filemanip import fname_presuffix

LOGGER = logging.getLogger(__name__)

__all__ = ["run_qsmnet", "tile_budget", "BYTES_PER_VOXEL_CHANNEL"]

#: CPU bytes per voxel and first-level channel at the peak of a whole-volume forward pass
#: (activations, skip connections, normalised copies): about 6 × 4 measured for the default
#: model (4.7 GB for 256×256×176, docs/benchmarks.md); 8 × 4 leaves a margin
BYTES_PER_VOXEL_CHANNEL = 8 * 4


def tile_budget(shape, *, channels: int, multiple: int,
                available: int | None) -> int | None:
    """The most voxels one network call may take to keep CPU inference within half the
    available memory, or None when the whole volume fits (or memory is unknown).

    Parameters
    ----------
    shape : (3,) int — the field's grid, voxels
    channels : int — channels of the network's first level
    multiple : int — the network's size multiple (``2**depth``)
    available : int or None — bytes of memory left

    Raises
    ------
    MemoryError
        when not even a tile of ``(2 · multiple)³`` voxels fits.
    """
    if available is None:
        return None
    per_voxel = BYTES_PER_VOXEL_CHANNEL * int(channels)
    padded = [-(-int(n) // multiple) * multiple for n in shape]
    need = int(np.prod(padded, dtype=np.int64)) * per_voxel
    budget = available // 2  # the rest: the process itself, resampling, other nodes
    if need <= budget:
        return None
    max_voxels = int(budget // per_voxel)
    if max_voxels < (2 * multiple) ** 3:
        raise MemoryError(f"inference needs about {need / 2**30:.1f} GiB, and "
                          f"{(2 * multiple) ** 3 * per_voxel / 2**30:.2f} GiB even in tiles of "
                          f"{2 * multiple}³ voxels; {available / 2**30:.2f} GiB is available")
    LOGGER.warning("whole-volume inference of %s voxels needs about %.1f GiB, %.1f GiB is "
                   "available: tiling, at most %d voxels per tile", "x".join(map(str, shape)),
                   need / 2**30, available / 2**30, max_voxels)
    return max_voxels


def run_qsmnet(field_file: str, mask_file: str, *, model: str | None = None,
               device: str = "auto", tile: int | None = None, overlap: float | None = None,
               dc_lambda: float | str | None = None, dc_iterations: int | None = None,
               dc_edge_mm: float | None = None, dc_highpass_mm: float | None = None,
               dc_tv: float | None = None,
               flip_axes: list[int] | None = None, residual_passes: int | None = None,
               num_threads: int | None = None,
               newpath: str | None = None) -> tuple[str, dict]:
    """Predict χ (ppm) from a field (ppm) in the network frame and write it next to ``newpath``.

    Parameters
    ----------
    field_file : local field, ppm, B0 along the third axis at the model's voxel size
    mask_file : brain mask on the same grid
    model : model file, folder or shipped name (None: the shipped default)
    device : ``auto``, ``cpu`` or ``cuda[:N]``
    tile : tile edge in voxels for bounded-memory inference (None: whole volume)
    overlap : tile overlap fraction (None: the overlap that makes tiles exact, see
        :mod:`bids_qsmnet.inference.predict`)
    dc_lambda : weight of the network prior in the data-consistency refinement
        (``‖M(Dχ − f)‖² + λ‖χ − χ_net‖²``); ``"auto"``: chosen per input by the model file's
        ``dc_auto`` rule (:class:`bids_qsmnet.inference.refine.AutoLambda`); None: the model
        file's default (its rule when it has one); 0: no refinement
    dc_iterations : conjugate-gradient iterations of the refinement (None: model default / 30)
    dc_edge_mm : width (mm) of the mask-edge ramp of the refinement's data weight (None:
        model default / 0), see :mod:`bids_qsmnet.inference.refine`
    dc_highpass_mm : radius (mm) of the spherical-mean-value high-pass of the refinement's
        data term (None: model default / 0: fields compared as they are)
    dc_tv : total-variation weight of the refinement, ppm·mm (None: the model file's
        ``dc_tv``; 0: the plain conjugate-gradient refinement)
    flip_axes : axes of the flip ensemble (:func:`bids_qsmnet.inference.predict.predict_chi`;
        None: the model file's ``inference.flip_axes``, none if it has none; []: off)
    residual_passes : residual-field passes before the refinement
        (:func:`bids_qsmnet.inference.refine.residual_passes`; None: the model file's
        ``inference.residual_passes``, 0 if it has none)
    num_threads : torch CPU threads

    Returns
    -------
    out_file : χ map, ppm, on the field's grid
    info : model name, sha256 and path, refinement settings and what the refinement chose
        (``data_consistency``: λ used, ``rho0`` and ``residual`` with the rule)
    """
    from ..device import select_device
    from ..inference.predict import ensemble_axes, predict_chi
    from ..inference.refine import dc_settings, pass_count, refine_adaptive
    from ..inference.refine import residual_passes as run_residual_passes
    from ..io.nifti import available_memory, load_volume, save_volume
    from ..models.modelfile import load_model, resolve_model
    from ..physics.orientation import voxel_sizes_from_affine

    if num_threads:
        import torch

        torch.set_num_threads(int(num_threads))
    dev = select_device(device)
    path = resolve_model(model)
    loaded = load_model(path, device=dev)
    field, img = load_volume(field_file, what="local field")
    mask, _ = load_volume(mask_file, what="brain mask")
    mask = mask > 0
    multiple = loaded.network.multiple
    if tile and tile % multiple:  # the network halves the tile `depth` times
        rounded = -(-tile // multiple) * multiple
        LOGGER.warning("--tile %d is not a multiple of %d (2^depth of %s): using %d", tile,
                       multiple, loaded.spec.name, rounded)
        tile = rounded
    max_voxels = None
    if dev.type == "cpu" and not tile:  # a GPU says "out of memory" itself; the CPU may be
        try:                            # OOM-killed
            max_voxels = tile_budget(field.shape, multiple=multiple,
                                     channels=loaded.spec.architecture["channels"][0],
                                     available=available_memory())
        except MemoryError as exc:
            raise MemoryError(f"{os.path.basename(field_file)}: {exc}") from None
    flip_axes = ensemble_axes(loaded.spec.inference, flip_axes)
    residual_passes = pass_count(loaded.spec.inference, residual_passes)
    voxel_size = voxel_sizes_from_affine(img.affine)

    def network(f):
        return predict_chi(loaded, f, mask, device=dev, tile=tile, overlap=overlap,
                           max_voxels=max_voxels, flip_axes=flip_axes)

    try:
        chi = network(field)
        chi = run_residual_passes(network, chi, field, mask, residual_passes,
                                  voxel_size=voxel_size, b0_dir=loaded.spec.b0_dir)
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        text = str(exc).lower()
        if not isinstance(exc, MemoryError) and "out of memory" not in text \
                and "can't allocate memory" not in text:
            raise
        advice = (f"give --tile {max(64, multiple)} to bound it" if not tile
                  else f"give a smaller --tile (a multiple of {multiple})")
        # the field here is the node's resampled copy: its name still starts with the input's
        raise MemoryError(f"out of memory running the network on {dev} for the "
                          f"{'x'.join(map(str, field.shape))} field {os.path.basename(field_file)}"
                          f"; {advice}") from None
    dc = dc_settings(loaded.spec.inference, lam=dc_lambda, n_iter=dc_iterations,
                     edge_mm=dc_edge_mm, highpass_mm=dc_highpass_mm, tv=dc_tv)
    chi, dc_report = refine_adaptive(chi, field, mask, dc, voxel_size=voxel_size,
                                     b0_dir=loaded.spec.b0_dir, device=dev)
    out = fname_presuffix(field_file, suffix="_chi", newpath=newpath or os.getcwd(),
                          use_ext=False) + ".nii.gz"
    save_volume(chi, img, out)
    info = {"name": loaded.spec.name, "sha256": loaded.sha256, "path": str(loaded.path),
            "format_version": loaded.spec.format_version, "device": str(dev),
            "data_consistency": dc_report, "flip_axes": flip_axes,
            "residual_passes": int(residual_passes)}
    return out, info
