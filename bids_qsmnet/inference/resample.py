"""The network frame on files: a field and its mask resampled into it (with a JSON file
describing the frame), and a map brought back onto the input grid.

See :mod:`bids_qsmnet.inference.frame` for the frame itself.  Outputs are written into
``newpath`` (default: the current folder), named after the input.
"""

from __future__ import annotations

import json

import numpy as np

from ..io.nifti import derived_path, load_volume, save_volume
from .frame import NetworkFrame, from_frame, network_frame, to_frame

__all__ = ["frame_affine", "frame_to_json", "frame_from_json", "resample_to_frame",
           "resample_from_frame"]


def frame_affine(affine: np.ndarray, frame: NetworkFrame) -> np.ndarray:
    """World affine of the network-frame grid, given the input's affine.

    world = L·S⁻¹·(c0 + Q·h·u) + t, with L and t the input affine's linear part and offset.
    """
    A = np.asarray(affine, dtype=np.float64)
    LS = A[:3, :3] / np.asarray(frame.voxel_size)[None, :]
    out = np.eye(4)
    out[:3, :3] = LS @ frame.basis * frame.target_voxel
    out[:3, 3] = LS @ frame.origin + A[:3, 3]
    return out


def frame_to_json(frame: NetworkFrame) -> dict:
    """The JSON form of a :class:`~bids_qsmnet.inference.frame.NetworkFrame`."""
    return {"input_shape": list(frame.input_shape), "voxel_size": list(frame.voxel_size),
            "b0_dir": list(frame.b0_dir), "target_voxel": frame.target_voxel,
            "basis": frame.basis.tolist(), "origin": frame.origin.tolist(),
            "shape": list(frame.shape), "identity": frame.identity}


def frame_from_json(d: dict) -> NetworkFrame:
    """The :class:`~bids_qsmnet.inference.frame.NetworkFrame` of :func:`frame_to_json`'s
    dict."""
    return NetworkFrame(tuple(d["input_shape"]), tuple(d["voxel_size"]), tuple(d["b0_dir"]),
                        float(d["target_voxel"]), np.asarray(d["basis"]),
                        np.asarray(d["origin"]), tuple(d["shape"]), bool(d["identity"]))


def resample_to_frame(field_file: str, mask_file: str, *, b0_dir=None, target_voxel: float = 1.0,
                      newpath: str | None = None) -> tuple[str, str, str, list]:
    """Field and mask in the network frame, plus a JSON file describing the frame.

    ``b0_dir`` overrides the direction derived from the affine (e.g. a sidecar ``B0_dir``).
    Returns ``(field_in_frame, mask_in_frame, frame_json, b0_dir_used)``.
    """
    import nibabel as nib

    from ..physics.orientation import b0_dir_from_affine, voxel_sizes_from_affine

    field, img = load_volume(field_file, what="local field")
    mask, _ = load_volume(mask_file, what="brain mask")
    b0 = (np.asarray(b0_dir, float) if b0_dir is not None else b0_dir_from_affine(img.affine))
    frame = network_frame(field.shape, voxel_sizes_from_affine(img.affine), b0,
                          target_voxel=target_voxel)
    f_frame = to_frame(field, frame, order=3)
    m_frame = to_frame(mask.astype(np.float32), frame, order=1) > 0.5
    aff = frame_affine(img.affine, frame)
    ref = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), aff)
    out_f = save_volume(np.where(m_frame, f_frame, 0).astype(np.float32), ref,
                        derived_path(field_file, "_frame", newpath))
    out_m = save_volume(m_frame.astype(np.uint8), ref,
                        derived_path(field_file, "_framemask", newpath), dtype=np.uint8)
    out_j = derived_path(field_file, "_frame", newpath, extension=".json")
    with open(out_j, "w") as fh:
        json.dump(frame_to_json(frame), fh, indent=1)
    return out_f, out_m, out_j, [float(v) for v in frame.b0_dir]


def resample_from_frame(in_file: str, frame_file: str, reference: str, mask_file: str, *,
                        newpath: str | None = None) -> str:
    """Bring a network-frame map back onto the reference (input) grid, masked."""
    with open(frame_file) as fh:
        frame = frame_from_json(json.load(fh))
    data, _ = load_volume(in_file, what="χ map")
    _, ref = load_volume(reference, what="reference")
    mask, _ = load_volume(mask_file, what="brain mask")
    back = from_frame(data, frame, order=3)
    return save_volume(np.where(mask > 0, back, 0).astype(np.float32), ref,
                       derived_path(in_file, "_native", newpath))
