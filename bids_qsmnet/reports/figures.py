"""Figures: validation slices (as the tutorial displays them) and loss curves (matplotlib)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..io.atomic import atomic_output

__all__ = ["valid_slices", "plot_validation_slices", "plot_loss_curves", "symmetric_window",
           "panel_aspect", "mosaic_slices", "mosaic_layout", "plot_mosaic", "make_mosaics",
           "MOSAIC_STYLES"]


def _pyplot():
    from .agg import plt  # the Agg backend: never open a window

    return plt


def _savefig_atomic(fig, out_png: str | os.PathLike, *, dpi: int,
                    metadata: dict | None = None) -> str:
    """Save ``fig`` through a hidden temporary sibling and a rename, then close it.

    A run killed while saving leaves at most the hidden temporary file, never a truncated
    figure under the real name.
    """
    plt = _pyplot()
    path = os.fspath(out_png)
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=fmt, metadata=metadata,
                        facecolor=fig.get_facecolor())
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


#: the three views of a mosaic: (name, the axis a slice is taken across), in row order
VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def symmetric_window(volume: np.ndarray, mask: np.ndarray | None = None, *,
                     percentile: float = 99.0) -> float:
    """The half-width ``b`` of a display window ``−b…b`` symmetric about 0: the ``percentile``
    of ``|volume|`` inside ``mask`` (the non-zero voxels without a mask; 1 when there are
    none or all are 0).

    >>> symmetric_window(np.array([-0.1, 0.2, 0.05, 0.0]), percentile=100)
    0.2
    """
    vol = np.asarray(volume, dtype=np.float64)
    inside = vol[mask > 0] if mask is not None and np.any(mask) else vol[vol != 0]
    inside = np.abs(inside[np.isfinite(inside)])
    bound = float(np.percentile(inside, percentile)) if inside.size else 0.0
    return bound if bound > 0 else 1.0


def panel_aspect(voxel_size: Sequence[float], axis: int) -> float:
    """matplotlib ``aspect`` (height over width of one displayed voxel) of a slice taken across
    ``axis`` and shown as ``np.rot90(slice)``: the columns run along the first remaining axis,
    the rows along the second.

    >>> panel_aspect((0.86, 0.86, 2.0), 1)   # coronal: rows along z, columns along x
    2.3255813953488373
    """
    a, b = (i for i in range(3) if i != axis)
    return float(voxel_size[b]) / float(voxel_size[a])


def _box(mask: np.ndarray | None, vol: np.ndarray, voxel_size, margin_mm: float):
    """Voxel index bounds ``[(lo, hi), ...]`` (inclusive) of the brain, ``margin_mm`` wider."""
    where = mask > 0 if mask is not None and np.any(mask) else vol != 0
    if not np.any(where):
        return [(0, n - 1) for n in vol.shape]
    bounds = []
    for axis, idx in enumerate(np.nonzero(where)):
        pad = int(np.ceil(margin_mm / float(voxel_size[axis])))
        bounds.append((max(int(idx.min()) - pad, 0),
                       min(int(idx.max()) + pad, vol.shape[axis] - 1)))
    return bounds


def mosaic_slices(lo: int, hi: int, n: int) -> list[int]:
    """``n`` distinct slice indices spread over ``lo…hi`` (its middle 70 %; the middle slice
    when ``n`` is 1).

    >>> mosaic_slices(0, 100, 3)
    [15, 50, 85]
    """
    if n == 1:
        return [int(round((lo + hi) / 2))]
    pos = np.linspace(lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo), n)
    return sorted({int(round(p)) for p in pos})


def mosaic_layout(extents_mm: Sequence[tuple[float, float]], n_cols: int, *,
                  min_px: int = 200) -> list[tuple[int, int]]:
    """``(width, height)`` in pixels of the panels of each row of a mosaic.

    Every row is ``n_cols`` panels of the same width, so the rows fill the same width with no
    empty canvas; each panel has the physical aspect of its row's ``(width, height)`` extent in
    mm, and the shortest side of any panel is at least ``min_px``.

    >>> mosaic_layout([(150.0, 200.0), (150.0, 150.0), (200.0, 150.0)], 6)
    [(267, 356), (267, 267), (267, 200)]
    """
    ratios = [h / w for w, h in extents_mm]
    width = max(min_px, *(min_px / r for r in ratios))
    return [(int(np.ceil(width - 1e-9)), int(np.ceil(width * r - 1e-9))) for r in ratios]


def plot_mosaic(volume: np.ndarray, out_png: str | os.PathLike, *, mask: np.ndarray | None = None,
                voxel_size: Sequence[float] = (1.0, 1.0, 1.0), vmin: float | None = None,
                vmax: float | None = None, percentile: float = 99.0, symmetric: bool = True,
                n_slices: int = 7, title: str = "", label: str = "", unit: str = "ppm",
                cmap: str = "gray", outline: bool = False, min_px: int = 200,
                axial_slices: Sequence[int] | None = None) -> str:
    """Axial, coronal and sagittal slices of a volume, one row of ``n_slices`` per view, drawn
    at their physical aspect ratio, cropped to the brain, with a labelled colour bar.

    Parameters
    ----------
    volume : (X, Y, Z) ndarray — in ``unit``
    out_png : the PNG to write (through a temporary file and a rename)
    mask : (X, Y, Z) brain mask: the display window and the crop come from it
    voxel_size : (3,) float — mm, the NIfTI voxel sizes (``header.get_zooms()[:3]``)
    vmin, vmax : the display window; by default ``±`` the ``percentile`` of ``|volume|``
        inside the mask (``symmetric``), or its ``100 − percentile`` … ``percentile``
        percentiles (not ``symmetric``: maps without sign, such as R2*)
    n_slices : slices per view (spread over the middle 70 % of the brain)
    label : what the volume is, for the colour bar (``χ``, ``local field``)
    outline : draw the mask's outline on every panel
    min_px : the shortest side of a panel, pixels
    axial_slices : axial slice indices to show instead (kept when all lie in the volume)

    The window and how it was chosen are written on the colour bar and into the PNG's
    ``Description`` text chunk (which the HTML report quotes).
    """
    _pyplot()  # the Agg backend before anything of matplotlib
    from matplotlib import colormaps, colors

    vol = np.asarray(volume, dtype=np.float32)
    mk = None if mask is None else np.asarray(mask) > 0
    inside = vol[mk] if mk is not None and np.any(mk) else vol[vol != 0]
    name = label or "value"
    if vmin is None or vmax is None:
        if symmetric:
            bound = symmetric_window(vol, mk, percentile=percentile)
            vmin, vmax = -bound, bound
            how = f"±{bound:.3g} {unit} = ±p{percentile:g} of |{name}| inside the brain mask"
        else:
            lo, hi = (np.percentile(inside, [100 - percentile, percentile])
                      if inside.size else (0.0, 1.0))
            vmin, vmax = float(lo), (float(hi) if hi > lo else float(lo) + 1.0)
            how = (f"{vmin:.3g}…{vmax:.3g} {unit} = p{100 - percentile:g}…p{percentile:g} "
                   "inside the brain mask")
    else:
        how = f"{vmin:.3g}…{vmax:.3g} {unit} (fixed)"
    vox = [float(v) for v in voxel_size]
    bounds = _box(mk, vol, vox, margin_mm=4.0)
    rows = []
    for view, axis in VIEWS:
        slices = mosaic_slices(*bounds[axis], n_slices)
        if axis == 2 and axial_slices and all(0 <= int(z) < vol.shape[2] for z in axial_slices):
            slices = [int(z) for z in axial_slices]
        a, b = (i for i in range(3) if i != axis)
        extent = ((bounds[a][1] - bounds[a][0] + 1) * vox[a],
                  (bounds[b][1] - bounds[b][0] + 1) * vox[b])
        rows.append((view, axis, slices, extent))
    ncol = max(len(r[2]) for r in rows)
    sizes = mosaic_layout([r[3] for r in rows], ncol, min_px=min_px)

    gap, left, bar_w, top = 4, 4, 120, (36 if title else 6)
    width = left + ncol * sizes[0][0] + (ncol - 1) * gap + bar_w
    height = top + sum(h for _, h in sizes) + len(rows) * gap + 2
    crop = tuple(slice(lo, hi + 1) for lo, hi in bounds)
    sub = vol[crop]
    sub_mask = None if mk is None or not outline else mk[crop]
    norm, colormap = colors.Normalize(vmin=vmin, vmax=vmax), colormaps[cmap]
    canvas = np.zeros((height, width, 4), np.uint8)
    canvas[..., 3] = 255
    labels = []
    y = top
    for (view, axis, slices, _), (w, h) in zip(rows, sizes):
        for c, s in enumerate(slices):
            x = left + c * (w + gap)
            k = int(s) - bounds[axis][0]
            img = _resample(np.rot90(_slice(sub, axis, k)), h, w)
            panel = colormap(norm(img), bytes=True)
            if sub_mask is not None:
                panel[_outline(_resample(np.rot90(_slice(sub_mask, axis, k)), h, w))] = \
                    (0, 0, 0, 255)
            canvas[y:y + h, x:x + w] = panel
            labels.append((x + 0.03 * w, y + 0.03 * h, f"{view} {int(s)}"))
        y += h + gap
    return _draw_mosaic(canvas, labels, out_png, norm=norm, cmap=colormap, title=title,
                        bar=(bar_w, top, left), name=name, unit=unit, how=how)


def _slice(vol: np.ndarray, axis: int, k: int) -> np.ndarray:
    """Slice ``k`` across ``axis``: a view (``np.take`` would copy the whole volume of a
    non-contiguous crop for each slice)."""
    return vol[(slice(None),) * axis + (int(k),)]


def _resample(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """``img`` (rows × columns) at ``h × w`` pixels, nearest neighbour (pixel centres)."""
    rows = np.minimum(((np.arange(h) + 0.5) * img.shape[0] / h).astype(int), img.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * img.shape[1] / w).astype(int), img.shape[1] - 1)
    return img[np.ix_(rows, cols)]


def _outline(inside: np.ndarray) -> np.ndarray:
    """The pixels of ``inside`` (bool) with a 4-neighbour outside it (the panel's border does
    not count as outside): a one-pixel line along the mask's edge, drawn over the panel."""
    from scipy import ndimage as ndi

    inside = np.asarray(inside, bool)
    return inside & ~ndi.binary_erosion(inside, ndi.generate_binary_structure(2, 1),
                                        border_value=1)


def _draw_mosaic(canvas: np.ndarray, labels, out_png, *, norm, cmap, title: str, bar,
                 name: str, unit: str, how: str) -> str:
    """The composed panels ``canvas`` (RGBA, one pixel per figure pixel) with the panels'
    labels (pixel positions of their top-left corners), the colour bar and the title, which
    matplotlib draws on a transparent layer laid over the panels; written as PNG (through a
    temporary file and a rename) with ``Title`` and ``Description`` text chunks."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from PIL import Image, PngImagePlugin

    height, width = canvas.shape[:2]
    bar_w, top, left = bar
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor=(0, 0, 0, 0))
    try:
        for x, y, text in labels:
            fig.text(x / width, 1 - y / height, text, color="white", fontsize=9, va="top",
                     ha="left", bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.5,
                                      "linewidth": 0})
        grid_h = height - top - 2
        cax = fig.add_axes(((width - bar_w + 14) / width, 1 - (top + 0.85 * grid_h) / height,
                            18 / width, 0.7 * grid_h / height))
        colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
        colorbar.set_label(f"{name} ({unit}); window {how}", color="white", fontsize=10)
        colorbar.ax.tick_params(colors="white", labelsize=9)
        colorbar.outline.set_edgecolor("white")
        if title:
            fig.text(left / width, 1 - 8 / height, title, color="white", fontsize=13,
                     va="top")
        fig.canvas.draw()
        layer = np.asarray(fig.canvas.buffer_rgba())[:height, :width]
    finally:
        plt.close(fig)
    alpha = layer[..., 3:4].astype(np.float32) / 255.0  # straight (not premultiplied) alpha
    rgb = canvas[..., :3] * (1.0 - alpha) + layer[..., :3] * alpha
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title or name)
    info.add_text("Description", f"{name} ({unit}), window {how}")
    path = os.fspath(out_png)
    with atomic_output(path) as tmp:
        Image.fromarray(np.round(rgb).astype(np.uint8), "RGB").save(tmp, format="PNG",
                                                                    pnginfo=info)
    return path


#: how :func:`make_mosaics` draws each kind: (title, colour-bar label, colour map, outline,
#: unit, window symmetric about 0)
MOSAIC_STYLES = {
    "field": ("Input local field", "local field", "RdBu_r", True, "ppm", True),
    "chimap": ("Susceptibility χ", "χ", "gray", False, "ppm", True),
    "r2star": ("R2*", "R2*", "inferno", False, "1/s", False),
}


def make_mosaics(field_file: str, chi_file: str, mask_file: str, out_dir: str,
                 entities: dict, r2star_file: str | None = None, *,
                 paths: list[str] | None = None) -> list[str]:
    """Slice mosaics (PNG) of the input field (with the mask's outline) and the χ map under
    ``sub-*/figures/``, each in a window ±p99 of its magnitude inside the mask, and of the R2*
    map (1/s, window p1…p99 inside the mask) when ``r2star_file`` is given; at the voxel
    sizes of the χ map's NIfTI header.  ``paths``: where to write them (field, χ[, R2*]),
    instead of the names :func:`~bids_qsmnet.bids.derivatives.mosaic_paths` gives."""
    from ..bids.derivatives import MOSAIC_KINDS, mosaic_paths  # pybids only without paths
    from ..io.nifti import load_volume

    field, _ = load_volume(field_file, what="local field")
    chi, chi_img = load_volume(chi_file, what="χ map")
    mask, _ = load_volume(mask_file, what="brain mask")
    voxel_size = tuple(float(v) for v in chi_img.header.get_zooms()[:3])
    brain = mask > 0
    volumes = {"field": field, "chimap": np.where(brain, chi, 0)}
    if r2star_file:
        r2star, _ = load_volume(r2star_file, what="R2* map")
        volumes["r2star"] = np.where(brain, r2star, 0)
    outs = paths or mosaic_paths(out_dir, entities, r2star=bool(r2star_file))
    if len(outs) != (3 if r2star_file else 2):
        raise ValueError(f"{len(outs)} mosaic path(s) for {3 if r2star_file else 2} mosaics")
    for kind, png in zip(MOSAIC_KINDS, outs):
        title, label, cmap, outline, unit, symmetric = MOSAIC_STYLES[kind]
        os.makedirs(os.path.dirname(png), exist_ok=True)
        plot_mosaic(volumes[kind], png, mask=brain, voxel_size=voxel_size, title=title,
                    label=label, cmap=cmap, outline=outline, unit=unit, symmetric=symmetric)
    return outs
