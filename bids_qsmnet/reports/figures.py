"""Figures: validation slices (as the tutorial displays them) and loss curves (matplotlib)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..io.atomic import atomic_output

__all__ = ["valid_slices", "plot_validation_slices", "plot_loss_curves", "plot_mosaic"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # never open a window: BIDS-Apps run non-interactively
    import matplotlib.pyplot as plt

    return plt


def _savefig_atomic(fig, out_png: str | os.PathLike, *, dpi: int) -> str:
    """Save ``fig`` through a hidden temporary sibling and a rename, then close it.

    A run killed while saving leaves at most the hidden temporary file, never a truncated
    figure under the real name.
    """
    plt = _pyplot()
    path = os.fspath(out_png)
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=fmt)
    finally:
        plt.close(fig)
    return path


def valid_slices(n: int, slices: Sequence[int]) -> list[int]:
    """The requested axial slice indices that exist in a volume of ``n`` slices; when none do,
    four evenly spaced slices through the middle."""
    kept = [int(s) for s in slices if 0 <= int(s) < n]
    return kept or sorted({int(round(f * (n - 1))) for f in (0.35, 0.45, 0.55, 0.65)})


def plot_validation_slices(pred: np.ndarray, label: np.ndarray, out_png: str | os.PathLike, *,
                           slices: Sequence[int] = (52, 72, 92, 112), vmin: float = -0.1,
                           vmax: float = 0.2, title: str = "") -> str:
    """Prediction, label and difference on axial slices (third axis), χ in ppm.

    The tutorial shows slices 52, 72, 92, 112 with a −0.1…0.2 ppm window; when one of them
    misses the brain, four slices spread over the brain are shown instead.
    """
    plt = _pyplot()
    idx = valid_slices(pred.shape[2], slices)
    z = np.nonzero(np.any(label != 0, axis=(0, 1)))[0]
    if z.size and not all(z.min() <= i <= z.max() for i in idx):
        # the tutorial's slices miss this (smaller) brain: four slices spread over it instead
        idx = sorted({int(round(z.min() + f * (z.max() - z.min()))) for f in (0.2, 0.4, 0.6, 0.8)})
    fig, axes = plt.subplots(3, len(idx), figsize=(2.4 * len(idx), 7.2), squeeze=False)
    rows = (("prediction", pred, (vmin, vmax)), ("label", label, (vmin, vmax)),
            ("difference", pred - label, (-(vmax - vmin) / 2, (vmax - vmin) / 2)))
    for r, (name, vol, (lo, hi)) in enumerate(rows):
        for c, z in enumerate(idx):
            ax = axes[r, c]
            im = ax.imshow(np.rot90(vol[:, :, z]), cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"slice {z}")
            if c == 0:
                ax.set_ylabel(name)
        fig.colorbar(im, ax=list(axes[r]), shrink=0.8, label="ppm")
    if title:
        fig.suptitle(title)
    return _savefig_atomic(fig, out_png, dpi=80)


def plot_loss_curves(rows: Sequence[dict], out_png: str | os.PathLike, *, title: str = "") -> str:
    """Training and validation losses against the optimiser step.

    ``rows`` are log records with ``kind`` ("train" or "val"), ``step`` and loss columns
    (``loss``, ``l1``, ``model``, ``gradient``); training rows are smoothed over 20 steps.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    for key, style in (("loss", "-"), ("l1", "--"), ("model", ":"), ("gradient", "-.")):
        pts = [(int(r["step"]), float(r[key])) for r in train if r.get(key) not in (None, "")]
        if not pts:
            continue
        steps, vals = map(np.asarray, zip(*pts))
        k = min(20, len(vals))
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, style, label=f"train {key}")
    pts = [(int(r["step"]), float(r["loss"])) for r in val if r.get("loss") not in (None, "")]
    if pts:
        steps, vals = zip(*pts)
        ax.plot(steps, vals, "o-", label="validation loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (normalised units)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _savefig_atomic(fig, out_png, dpi=90)


def plot_mosaic(volume: np.ndarray, out_png: str | os.PathLike, *, mask: np.ndarray | None = None,
                vmin: float | None = None, vmax: float | None = None, n_slices: int = 6,
                title: str = "", unit: str = "ppm",
                axial_slices: Sequence[int] | None = None) -> str:
    """Axial, coronal and sagittal slice mosaics of a volume (one row each).

    Axial slices are the tutorial's 52, 72, 92, 112 when all lie within the brain, else six
    slices spread over it (as coronal and sagittal rows are); the
    display window defaults to the 1st–99th percentile inside the mask, symmetric for signed
    maps.
    """
    plt = _pyplot()
    vol = np.asarray(volume, dtype=np.float32)
    inside = vol[mask > 0] if mask is not None and np.any(mask) else vol[vol != 0]
    if vmin is None or vmax is None:
        lo, hi = (np.percentile(inside, [1, 99]) if inside.size else (-1.0, 1.0))
        bound = max(abs(lo), abs(hi)) or 1.0
        vmin, vmax = (-bound, bound) if lo < 0 < hi else (lo, hi)
    if mask is not None and np.any(mask):
        idx = np.nonzero(mask)
        bounds = [(int(i.min()), int(i.max())) for i in idx]
    else:
        bounds = [(0, n - 1) for n in vol.shape]

    def spread(axis):
        lo, hi = bounds[axis]
        return np.linspace(lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo), n_slices).astype(int)

    wanted = [int(z) for z in (axial_slices or (52, 72, 92, 112))]
    lo_z, hi_z = bounds[2]
    ax_slices = wanted if all(lo_z <= z <= hi_z for z in wanted) else spread(2)
    rows = [("axial", 2, ax_slices), ("coronal", 1, spread(1)), ("sagittal", 0, spread(0))]
    ncol = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(3, ncol, figsize=(2.0 * ncol, 6.4), squeeze=False)
    for r, (name, axis, slices) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(slices):
                continue
            img = np.take(vol, int(slices[c]), axis=axis)
            im = ax.imshow(np.rot90(img), cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_title(f"{name} {int(slices[c])}", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label=unit)
    if title:
        fig.suptitle(title, fontsize=9)
    return _savefig_atomic(fig, out_png, dpi=72)


def make_mosaics(field_file: str, chi_file: str, mask_file: str, out_dir: str,
                 entities: dict, r2star_file: str | None = None) -> list[str]:
    """Slice mosaics (PNG) of the input field and the χ map under ``sub-*/figures/``, and of
    the R2* map (1/s, window 0 to its 99th percentile in the mask) when ``r2star_file`` is
    given."""
    from ..bids.derivatives import MOSAIC_KINDS, mosaic_paths
    from ..io.nifti import load_volume

    field, _ = load_volume(field_file, what="local field")
    chi, _ = load_volume(chi_file, what="χ map")
    mask, _ = load_volume(mask_file, what="brain mask")
    volumes = {"field": (field, "local field (ppm)", (None, None), "ppm"),
               "chimap": (chi, "susceptibility χ (ppm)", (-0.1, 0.2), "ppm")}
    if r2star_file:
        r2star, _ = load_volume(r2star_file, what="R2* map")
        inside = r2star[mask > 0]
        top = float(np.percentile(inside, 99)) if inside.size else 0.0
        volumes["r2star"] = (r2star, "R2* (1/s)", (0.0, top or 1.0), "1/s")
    outs = mosaic_paths(out_dir, entities, r2star=bool(r2star_file))
    for kind, png in zip(MOSAIC_KINDS, outs):
        vol, title, window, unit = volumes[kind]
        os.makedirs(os.path.dirname(png), exist_ok=True)
        # plot_mosaic writes through a hidden temporary file and a rename
        plot_mosaic(np.where(mask > 0, vol, 0), png, mask=mask > 0, vmin=window[0],
                    vmax=window[1], title=title, unit=unit)
    return outs
