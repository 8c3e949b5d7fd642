"""Figures of volumes: keypoints, matches, alignment checks, segmentations and
retrieval montages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError
from keyfuse.plotting._slices import (
    _FG,
    _NAMES,
    _VIEWS,
    EDGE_COLOUR,
    LABEL_COLOURS,
    POLARITY_COLOURS,
    _as_image,
    _bounds,
    _cuts,
    _draw_background,
    _heading,
    _new_figure,
    _otsu,
    _planes,
    _sample,
    _step,
    _style_panel,
    _views,
    _window,
    brain_centre,
    save_figure,
)

# ------------------------------------------------------------------------- keypoints


def plot_keypoints(
    image: Any,
    keypoints: Any,
    *,
    cut_coords: Sequence[float] | None = None,
    views: Sequence[str] = _VIEWS,
    radiological: bool = False,
    radius: float = float(np.sqrt(3.0)),
    title: str | None = None,
) -> Any:
    """Keypoints over orthogonal slices of their image.

    A keypoint is drawn on a slice when the slice cuts its sphere (radius ``radius`` ×
    its scale σ, default √3·σ, the radius of a 3D DoG blob), as the circle where the
    slice cuts it, with a dot at the keypoint's position projected on the slice; colour
    is polarity (:data:`POLARITY_COLOURS`).

    Parameters
    ----------
    image : Image or path
    keypoints : KeypointSet (its ``xyz`` in the image's world mm)
    cut_coords : (x, y, z) mm, optional — default the head's centre of mass
    views : any of "sagittal", "coronal", "axial"
    radiological : bool — mirror axial/coronal views (default neurological)
    """
    img = _as_image(image)
    kps = keypoints
    if not hasattr(kps, "xyz") or not hasattr(kps, "scale"):
        raise InvalidArgumentError("keypoints must be a KeypointSet")
    vs = _views(views)
    centre = _cuts(img, cut_coords)
    planes = _planes(_bounds(img), centre, _step(img), vs)
    window = _window(img.data)
    xyz = np.asarray(kps.xyz, dtype=np.float64)
    r = radius * np.asarray(kps.scale, dtype=np.float64)
    pol = np.where(np.asarray(kps.polarity) >= 0, 1, -1)
    fig = _new_figure(3.6 * len(vs), 4.2)
    shown = 0
    for n, plane in enumerate(planes):
        ax = fig.add_subplot(1, len(vs), n + 1)
        _draw_background(ax, img, plane, window)
        cut, ha, va = plane.axes
        d = np.abs(xyz[:, cut] - plane.coord)
        sel = np.flatnonzero(d < r)
        shown += sel.size
        for p in (1, -1):
            s = sel[pol[sel] == p]
            if s.size == 0:
                continue
            from matplotlib.collections import EllipseCollection

            rr = np.sqrt(r[s] ** 2 - d[s] ** 2)
            ax.add_collection(
                EllipseCollection(
                    2 * rr,
                    2 * rr,
                    np.zeros(s.size),
                    units="xy",
                    offsets=np.c_[xyz[s, ha], xyz[s, va]],
                    offset_transform=ax.transData,
                    facecolors="none",
                    edgecolors=POLARITY_COLOURS[p],
                    linewidths=1.0,
                )
            )
            ax.scatter(xyz[s, ha], xyz[s, va], s=14, c=POLARITY_COLOURS[p], linewidths=0, zorder=3)
        _style_panel(ax, plane, radiological)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", ls="", color=POLARITY_COLOURS[1], label="DoG max (dark blob)"),
        Line2D(
            [], [], marker="o", ls="", color=POLARITY_COLOURS[-1], label="DoG min (bright blob)"
        ),
    ]
    leg = fig.legend(
        handles=handles, loc="upper right", fontsize=8, frameon=False, labelcolor=_FG, ncol=2
    )
    leg.set_zorder(5)
    _heading(
        fig,
        title or f"{len(kps)} keypoints (circle: where the slice cuts the √3σ sphere)",
        radiological,
        f"{shown} keypoint cuts shown",
    )
    fig.subplots_adjust(left=0.01, right=0.99, top=0.84, bottom=0.07, wspace=0.04)
    return fig


# --------------------------------------------------------------------------- matches


def plot_matches(
    image_a: Any,
    keypoints_a: Any,
    image_b: Any,
    keypoints_b: Any,
    matches: Any,
    *,
    view: str = "axial",
    inliers: npt.ArrayLike | None = None,
    max_lines: int = 80,
    radiological: bool = False,
    title: str | None = None,
) -> Any:
    """The matches between two scans: each scan's slice through its head centre (side by
    side), matched keypoints projected onto it and joined by lines.

    Lines are coloured by inlier status when ``inliers`` is given (e.g.
    ``alignment.inliers`` for ``alignment.matches``: green inlier, red outlier), else by
    the match's translation density ``p`` (bright = agrees with many other matches). The
    ``max_lines`` matches with the highest ``p`` are drawn.
    """
    from matplotlib.patches import ConnectionPatch

    img_a, img_b = _as_image(image_a, "image_a"), _as_image(image_b, "image_b")
    (vw,) = _views(view)
    ia = np.asarray(matches.ia, dtype=np.int64)
    ib = np.asarray(matches.ib, dtype=np.int64)
    p = np.asarray(getattr(matches, "p", np.ones(ia.size)), dtype=np.float64)
    inl = None if inliers is None else np.asarray(inliers, dtype=bool)
    if inl is not None and inl.shape != ia.shape:
        raise InvalidArgumentError(f"inliers has {inl.size} entries for {ia.size} matches")
    order = np.argsort(-p, kind="stable")[: max(0, int(max_lines))]
    fig = _new_figure(9.0, 4.8)
    axes = []
    for n, (img, kps, idx) in enumerate(((img_a, keypoints_a, ia), (img_b, keypoints_b, ib))):
        plane = _planes(_bounds(img), brain_centre(img), _step(img), (vw,))[0]
        ax = fig.add_subplot(1, 2, n + 1)
        _draw_background(ax, img, plane, _window(img.data))
        _, ha, va = plane.axes
        xyz = np.asarray(kps.xyz)[idx[order]]
        ax.scatter(xyz[:, ha], xyz[:, va], s=10, c="#ffe119", linewidths=0, zorder=3)
        _style_panel(
            ax, plane, radiological, title=f"{'AB'[n]}: {_NAMES[plane.axes[0]]}-projection"
        )
        axes.append((ax, plane, np.asarray(kps.xyz)))
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    pn = p[order] / (p[order].max() if order.size and p[order].max() > 0 else 1.0)
    (ax_a, pl_a, xa), (ax_b, pl_b, xb) = axes
    for rank, m in enumerate(order):
        colour = (
            ("#3cb44b" if inl[m] else "#e6194b")
            if inl is not None
            else cmap(0.25 + 0.75 * pn[rank])
        )
        con = ConnectionPatch(
            xyA=(xa[ia[m], pl_a.axes[1]], xa[ia[m], pl_a.axes[2]]),
            coordsA=ax_a.transData,
            xyB=(xb[ib[m], pl_b.axes[1]], xb[ib[m], pl_b.axes[2]]),
            coordsB=ax_b.transData,
            color=colour,
            linewidth=0.7,
            alpha=0.8,
        )
        fig.add_artist(con)
    what = (
        f"{int(inl.sum())} inliers (green) / {ia.size} matches"
        if inl is not None
        else f"{ia.size} matches"
    )
    _heading(
        fig,
        title or f"{what}; {order.size} strongest drawn",
        radiological,
        "keypoints projected onto the slice",
    )
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.07, wspace=0.08)
    return fig


# ------------------------------------------------------------------------- alignment


def _edge_levels(img: Any) -> list[float]:
    d = np.asarray(img.data, dtype=np.float32)[::2, ::2, ::2]
    t1 = _otsu(d)
    inside = d[d > t1]
    return [t1, _otsu(inside)] if inside.size > 10 else [t1]


def plot_alignment(
    moving: Any,
    fixed: Any,
    alignment: Any,
    *,
    cut_coords: Sequence[float] | None = None,
    views: Sequence[str] = _VIEWS,
    radiological: bool = False,
    title: str | None = None,
) -> Any:
    """An alignment check: the fixed image with the moving image's edges, before (as
    scanned, identity) and after ``alignment`` (``kf.align(moving_kps, fixed_kps)``).

    Edges are iso-contours of the moving image at its two Otsu levels (head outline and
    the grey/white boundary), resampled through the transform onto the fixed image's
    slices. Good alignment puts the contours on the fixed image's boundaries.
    """
    mov, fix = _as_image(moving, "moving"), _as_image(fixed, "fixed")
    mat = np.asarray(getattr(alignment, "matrix", alignment), dtype=np.float64)
    if mat.shape != (4, 4) or not np.all(np.isfinite(mat)):
        raise InvalidArgumentError("alignment must be an Alignment or a 4×4 matrix")
    vs = _views(views)
    centre = _cuts(fix, cut_coords)
    planes = _planes(_bounds(fix), centre, _step(fix), vs)
    window = _window(fix.data)
    levels = _edge_levels(mov)
    rows = (("before", np.eye(4)), ("after", np.linalg.inv(mat)))
    fig = _new_figure(3.4 * len(vs), 7.4)
    for r, (name, to_moving) in enumerate(rows):
        for c, plane in enumerate(planes):
            ax = fig.add_subplot(2, len(vs), r * len(vs) + c + 1)
            _draw_background(ax, fix, plane, window)
            edge = _sample(mov, plane, world_to_world=to_moving)
            if np.ptp(edge) > 0:
                ax.contour(
                    plane.h,
                    plane.v,
                    edge,
                    levels=levels,
                    colors=EDGE_COLOUR,
                    linewidths=0.9,
                )
            _style_panel(ax, plane, radiological)
            if c == 0:
                ax.text(
                    -0.02,
                    0.5,
                    name,
                    rotation=90,
                    ha="right",
                    va="center",
                    color=_FG,
                    fontsize=10,
                    transform=ax.transAxes,
                )
    info = ""
    if hasattr(alignment, "n_inliers"):
        info = (
            f": {alignment.n_inliers} inliers, rmse {alignment.rmse:.2f} mm, "
            f"scale {alignment.scale:.3f}"
        )
    _heading(
        fig, title or f"alignment check (fixed image, moving edges in orange){info}", radiological
    )
    fig.subplots_adjust(left=0.04, right=0.99, top=0.9, bottom=0.05, wspace=0.04, hspace=0.12)
    return fig


# ----------------------------------------------------------------------- segmentation


def _label_colour(value: int, order: Sequence[int]) -> str:
    return LABEL_COLOURS[list(order).index(value) % len(LABEL_COLOURS)]


def _label_image(segmentation: Any, like: Any) -> tuple[Any, dict[int, Any]]:
    """(label Image, {label: probability Image}) from a Segmentation, Image, path or array."""
    from keyfuse.image import Image

    if hasattr(segmentation, "labels") and hasattr(segmentation, "affine"):
        aff = np.asarray(segmentation.affine)
        lab = Image(np.asarray(segmentation.labels), aff)
        probs = {
            int(k): Image(np.asarray(v, dtype=np.float32), aff)
            for k, v in getattr(segmentation, "probabilities", {}).items()
        }
        return lab, probs
    if isinstance(segmentation, np.ndarray):
        if segmentation.shape != like.shape:
            raise InvalidArgumentError(
                f"label array shape {segmentation.shape} differs from the image's {like.shape}"
            )
        return Image(segmentation, like.affine), {}
    return _as_image(segmentation, "segmentation"), {}


def plot_segmentation(
    image: Any,
    segmentation: Any,
    *,
    label_names: Mapping[int, str] | None = None,
    probabilities: bool = True,
    cut_coords: Sequence[float] | None = None,
    radiological: bool = False,
    alpha: float = 0.5,
    title: str | None = None,
) -> Any:
    """A segmentation over its image: orthogonal slices with the labels in colour and a
    legend, and below them one panel per label with its probability map (when the
    segmentation carries them, e.g. a :class:`keyfuse.Segmentation`).

    Parameters
    ----------
    segmentation : Segmentation, label Image, path, or label array on the image's grid
    label_names : label value → name for the legend (default ``label <n>``)
    probabilities : draw the per-label probability maps (default True)
    alpha : opacity of the label colours
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    img = _as_image(image)
    lab, probs = _label_image(segmentation, img)
    data = np.asarray(lab.data)
    values = [int(v) for v in np.unique(data) if v != 0]
    values = sorted(set(values) | set(probs))
    names = dict(label_names or {})
    centre = _cuts(img, cut_coords)
    planes = _planes(_bounds(img), centre, _step(img), _VIEWS)
    window = _window(img.data)
    show_p = probabilities and bool(probs)
    n_p = len(probs) if show_p else 0
    prow = int(np.ceil(n_p / 5)) if n_p else 0
    fig = _new_figure(11.0, 4.0 + 2.5 * prow)
    gs = fig.add_gridspec(1 + prow, 15, height_ratios=[1.6] + [1.0] * prow)
    colours = ["#000000"] + [_label_colour(v, values) for v in values]
    lut = np.zeros(int(max(values, default=0)) + 1, dtype=np.int64)
    for n, v in enumerate(values):
        if v >= 0:
            lut[v] = n + 1
    cmap = ListedColormap(colours)
    for c, plane in enumerate(planes):
        ax = fig.add_subplot(gs[0, 5 * c : 5 * c + 5])
        _draw_background(ax, img, plane, window)
        sl = _sample(lab, plane, order=0).astype(np.int64)
        idx = np.where((sl > 0) & (sl < lut.size), lut[np.clip(sl, 0, lut.size - 1)], 0)
        ax.imshow(
            np.ma.masked_equal(idx, 0),
            cmap=cmap,
            vmin=0,
            vmax=len(colours) - 1,
            alpha=alpha,
            origin="lower",
            extent=plane.extent,
            interpolation="nearest",
        )
        _style_panel(ax, plane, radiological)
    handles = [
        Patch(color=_label_colour(v, values), label=f"{v}: {names.get(v, f'label {v}')}")
        for v in values
    ]
    if handles:
        fig.legend(
            handles=handles,
            loc="upper right",
            fontsize=8,
            frameon=False,
            labelcolor=_FG,
            ncol=min(len(handles), 5),
        )
    if show_p:
        for n, v in enumerate(sorted(probs)):
            pimg = probs[v]
            mask = np.asarray(pimg.data) > 0.5 * float(np.max(pimg.data))
            if mask.any():
                ijk = np.argwhere(mask).mean(axis=0)
                z = float((pimg.affine[:3, :3] @ ijk + pimg.affine[:3, 3])[2])
            else:
                z = float(centre[2])
            plane = _planes(_bounds(img), (centre[0], centre[1], z), _step(img), ("axial",))[0]
            ax = fig.add_subplot(gs[1 + n // 5, 3 * (n % 5) : 3 * (n % 5) + 3])
            _draw_background(ax, img, plane, window)
            pm = _sample(pimg, plane)
            im = ax.imshow(
                np.ma.masked_less_equal(pm, 0.02),
                cmap="hot",
                vmin=0.0,
                vmax=1.0,
                alpha=0.85,
                origin="lower",
                extent=plane.extent,
                interpolation="nearest",
            )
            _style_panel(
                ax, plane, radiological, title=f"p({names.get(v, v)}), z={plane.coord:.0f}"
            )
    _heading(fig, title or f"segmentation: {len(values)} labels", radiological)
    fig.subplots_adjust(left=0.01, right=0.93, top=0.86, bottom=0.06, wspace=0.1, hspace=0.18)
    if show_p:
        boxes = [a.get_position() for a in fig.axes[-n_p:]]
        y0, y1 = min(b.y0 for b in boxes), max(b.y1 for b in boxes)
        cax = fig.add_axes((0.935, y0 + 0.1 * (y1 - y0), 0.01, 0.8 * (y1 - y0)))
        cb = fig.colorbar(im, cax=cax)
        cb.ax.tick_params(colors=_FG, labelsize=7)
        cb.set_label("probability", color=_FG, fontsize=8)
    return fig


# -------------------------------------------------------------------------- retrieval


@dataclass
class MontagePanel:
    """One panel of a retrieval montage: a scan, its id, score, label and relevance."""

    image: Any
    subject_id: str
    score: float | None = None
    label: str | None = None
    relevant: bool | None = None


def plot_retrieval(
    query: Any,
    hits: Sequence[Any],
    *,
    query_id: str = "query",
    query_label: str | None = None,
    view: str = "axial",
    radiological: bool = False,
    ncols: int = 6,
    title: str | None = None,
) -> Any:
    """A retrieval montage: the query and its top-k hits as slices through each scan's
    head centre, titled with rank, id, score and label.

    ``hits`` are :class:`MontagePanel` (or tuples ``(image, subject_id, score, label,
    relevant)``, trailing fields optional). A hit known relevant gets a green frame,
    one known irrelevant a red one.
    """
    (vw,) = _views(view)
    items = [h if isinstance(h, MontagePanel) else MontagePanel(*h) for h in hits]
    if not items:
        raise InvalidArgumentError("plot_retrieval needs at least one hit")
    panels = [MontagePanel(query, query_id, None, query_label, None), *items]
    ncols = max(1, min(int(ncols), len(panels)))
    nrows = int(np.ceil(len(panels) / ncols))
    fig = _new_figure(2.3 * ncols, 2.6 * nrows + 0.5)
    for n, hit in enumerate(panels):
        img = _as_image(hit.image, hit.subject_id)
        plane = _planes(_bounds(img), brain_centre(img), _step(img, 128), (vw,))[0]
        ax = fig.add_subplot(nrows, ncols, n + 1)
        _draw_background(ax, img, plane, _window(img.data))
        head = "query" if n == 0 else f"#{n}"
        line2 = [] if hit.score is None else [f"{hit.score:.3f}"]
        if hit.label:
            line2.append(str(hit.label))
        _style_panel(ax, plane, radiological, title=f"{head} {hit.subject_id}\n{'  '.join(line2)}")
        frame = {True: "#3cb44b", False: "#e6194b", None: None}[hit.relevant]
        if n == 0:
            frame = "#ffffff"
        if frame:
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(frame)
                spine.set_linewidth(3)
    _heading(fig, title or f"top {len(items)} hits (green: relevant, red: not)", radiological)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.7 / (2.6 * nrows + 0.5), bottom=0.06)
    return fig


def overlay_path(nifti_path: str | PathLike[str]) -> Path:
    """Where :func:`save_segmentation_overlay` writes: ``labels.nii.gz`` →
    ``labels_overlay.png`` in the same folder."""
    p = Path(nifti_path)
    stem = p.name
    for suffix in (".nii.gz", ".nii", ".mgz", ".nrrd", ".mha"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return p.with_name(f"{stem}_overlay.png")


def save_segmentation_overlay(
    image: Any,
    segmentation: Any,
    nifti_path: str | PathLike[str],
    *,
    label_names: Mapping[int, str] | None = None,
) -> Path:
    """Write the :func:`plot_segmentation` figure as a PNG beside a segmentation's NIfTI
    output (see :func:`overlay_path`); returns the PNG's path."""
    fig = plot_segmentation(image, segmentation, label_names=label_names)
    return save_figure(fig, overlay_path(nifti_path))
