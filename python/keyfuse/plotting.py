"""Figures of what keyfuse found: keypoints, matches, alignments, segmentations, retrieval.

Every function returns a :class:`matplotlib.figure.Figure` drawn with the Agg canvas
(no display, pyplot's global state untouched); :func:`save_figure` writes it as PNG, SVG
or PDF. The defaults follow nilearn's ``plot_anat``:

* slices are cut along the **world** (RAS) axes, whatever the storage orientation or
  obliquity of the scan: each plane is resampled from the voxels through the affine, so
  keypoint world coordinates (``KeypointSet.xyz``) land exactly on the drawn anatomy;
* cuts go through the centre of mass of the head (voxels above an Otsu threshold), or
  through given ``cut_coords=(x, y, z)`` in mm; each panel is titled ``x=…``/``y=…``/``z=…``;
* the **neurological** convention (the subject's left on the left of axial and coronal
  views) is the default; ``radiological=True`` mirrors them. The convention in use is
  written on the figure and the panels carry L/R, A/P letters;
* a grey background scaled to the 2nd–99.8th percentile of the head's intensities.

>>> fig = kf.plotting.plot_keypoints(img, kps)
>>> kf.plotting.save_figure(fig, "keypoints.svg")
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError, KeyfuseIOError

__all__ = [
    "LABEL_COLOURS",
    "POLARITY_COLOURS",
    "brain_centre",
    "figure_to_bytes",
    "overlay_path",
    "plot_alignment",
    "plot_keypoints",
    "plot_matches",
    "plot_precision_recall",
    "plot_retrieval",
    "plot_roc",
    "plot_segmentation",
    "save_figure",
    "save_segmentation_overlay",
]

#: keypoint polarity → colour: +1 (DoG maximum: a dark blob) and −1 (a bright blob)
POLARITY_COLOURS: dict[int, str] = {1: "#ff3b1f", -1: "#19c3ff"}
#: label colours (cycled), saturated and distinct from the grey background
LABEL_COLOURS: tuple[str, ...] = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#ffe119",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#9a6324",
)
#: colour of the moving image's edges in :func:`plot_alignment`
EDGE_COLOUR = "#ffb000"
_VIEWS = ("sagittal", "coronal", "axial")
# per view: the world axis cut, then the horizontal and vertical world axes
_AXES = {"sagittal": (0, 1, 2), "coronal": (1, 0, 2), "axial": (2, 0, 1)}
_NAMES = "xyz"
_BG = "black"
_FG = "white"


# ----------------------------------------------------------------------------- basics


def _new_figure(width: float, height: float, dark: bool = True) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, facecolor=_BG if dark else "white")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | PathLike[str], *, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path``; the format follows the suffix (``.png``, ``.svg``,
    ``.pdf``). Returns the path written."""
    out = Path(path)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        raise InvalidArgumentError(
            f"cannot tell the figure format of {out}: use a .png, .svg or .pdf name"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format=fmt, dpi=dpi, facecolor=fig.get_facecolor())
    except OSError as exc:
        raise KeyfuseIOError(f"cannot write figure to {out}: {exc}") from exc
    return out


def figure_to_bytes(fig: Any, fmt: str = "png", *, dpi: float | None = None) -> bytes:
    """The figure encoded as PNG (or SVG) bytes, e.g. to embed in a report."""
    if fmt not in ("png", "svg"):
        raise InvalidArgumentError(f"fmt must be 'png' or 'svg', not {fmt!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, facecolor=fig.get_facecolor())
    return buf.getvalue()


def _as_image(obj: Any, name: str = "image") -> Any:
    from keyfuse.image import Image, load_image

    if isinstance(obj, Image):
        img = obj
    else:
        try:
            img = load_image(obj)
        except TypeError as exc:
            raise InvalidArgumentError(f"{name}: expected an image or a path, got {obj!r}") from exc
    if img.ndim != 3:
        raise InvalidArgumentError(f"{name} must be a 3D image, got shape {img.shape}")
    return img


def _otsu(values: npt.NDArray[Any], bins: int = 128) -> float:
    """Otsu's threshold of ``values`` (maximises the between-class variance)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0 or v.min() == v.max():
        return float(v.min()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=bins)
    mids = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids) / np.maximum(w0, 1)
    m1 = (np.sum(hist * mids) - np.cumsum(hist * mids)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _head_mask(data: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    d = np.asarray(data, dtype=np.float32)
    return d > _otsu(d[::2, ::2, ::2])


def brain_centre(image: Any) -> npt.NDArray[np.float64]:
    """World coordinates (mm) of the head's centre of mass: nilearn-style default cuts.

    The head is every voxel above Otsu's threshold; an image with nothing above it cuts
    through its geometric centre."""
    img = _as_image(image)
    mask = _head_mask(img.data)
    ijk = np.argwhere(mask).mean(axis=0) if mask.any() else (np.asarray(img.shape) - 1) / 2.0
    return np.asarray(img.affine[:3, :3] @ ijk + img.affine[:3, 3], dtype=np.float64)


def _window(data: npt.NDArray[Any]) -> tuple[float, float]:
    d = np.asarray(data, dtype=np.float32)[::2, ::2, ::2]
    inside = d[d > _otsu(d)]
    if inside.size < 10:
        inside = d.ravel()
    lo, hi = np.percentile(inside, [2.0, 99.8])
    lo = min(float(lo), float(np.percentile(d, 1.0)))
    return lo, (hi if hi > lo else lo + 1.0)


def _bounds(img: Any, transform: npt.NDArray[np.float64] | None = None) -> npt.NDArray[Any]:
    """(3, 2) world bounding box of the image's voxel centres."""
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in img.shape], indexing="ij"))
    pts = corners.reshape(3, -1).T
    world = pts @ img.affine[:3, :3].T + img.affine[:3, 3]
    if transform is not None:
        world = world @ transform[:3, :3].T + transform[:3, 3]
    return np.stack([world.min(axis=0), world.max(axis=0)], axis=1)


@dataclass
class _Plane:
    """One world-aligned slice: cut axis and coordinate, in-plane sample grid."""

    view: str
    coord: float
    h: npt.NDArray[np.float64]  # horizontal world coordinates of the samples
    v: npt.NDArray[np.float64]

    @property
    def axes(self) -> tuple[int, int, int]:
        return _AXES[self.view]

    @property
    def extent(self) -> tuple[float, float, float, float]:
        dh = self.h[1] - self.h[0] if self.h.size > 1 else 1.0
        dv = self.v[1] - self.v[0] if self.v.size > 1 else 1.0
        return (
            self.h[0] - dh / 2,
            self.h[-1] + dh / 2,
            self.v[0] - dv / 2,
            self.v[-1] + dv / 2,
        )

    def points(self) -> npt.NDArray[np.float64]:
        """(V, H, 3) world points of the samples."""
        cut, ha, va = self.axes
        hh, vv = np.meshgrid(self.h, self.v)
        pts = np.empty((*hh.shape, 3))
        pts[..., cut] = self.coord
        pts[..., ha] = hh
        pts[..., va] = vv
        return pts


def _planes(
    bounds: npt.NDArray[Any], centre: Sequence[float], step: float, views: Sequence[str]
) -> list[_Plane]:
    out = []
    for view in views:
        cut, ha, va = _AXES[view]
        axis = [np.arange(bounds[a, 0], bounds[a, 1] + step / 2, step) for a in (ha, va)]
        out.append(_Plane(view, float(centre[cut]), axis[0], axis[1]))
    return out


def _sample(
    img: Any,
    plane: _Plane,
    *,
    order: int = 1,
    world_to_world: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]:
    """The image on a plane's grid; ``world_to_world`` maps plane points into the image's
    world first (e.g. the inverse of an alignment)."""
    from scipy import ndimage

    pts = plane.points().reshape(-1, 3)
    if world_to_world is not None:
        pts = pts @ world_to_world[:3, :3].T + world_to_world[:3, 3]
    inv = np.linalg.inv(img.affine)
    ijk = pts @ inv[:3, :3].T + inv[:3, 3]
    data = np.asarray(img.data)
    if order == 0:
        idx = np.rint(ijk).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < np.asarray(data.shape)), axis=1)
        out = np.zeros(len(idx), dtype=data.dtype)
        out[ok] = data[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    else:
        out = ndimage.map_coordinates(
            data.astype(np.float32, copy=False), ijk.T, order=1, mode="constant", cval=0.0
        )
    return out.reshape(plane.v.size, plane.h.size)


def _step(img: Any, max_samples: int = 220) -> float:
    bounds = _bounds(img)
    span = float(np.max(bounds[:, 1] - bounds[:, 0]))
    return max(float(np.min(img.spacing)), span / max_samples)


def _style_panel(ax: Any, plane: _Plane, radiological: bool, title: str | None = None) -> None:
    ax.set_facecolor(_BG)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    x0, x1, y0, y1 = plane.extent
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    _, ha, _ = plane.axes
    if ha == 0:
        left, right = ("R", "L") if radiological else ("L", "R")
        if radiological:
            ax.invert_xaxis()
    else:
        left, right = "P", "A"
    kw = {"color": _FG, "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **kw)
    ax.text(0.98, 0.5, right, ha="right", va="center", **kw)
    cut = plane.axes[0]
    ax.set_title(
        title
        if title is not None
        else f"{_NAMES[cut]}={plane.coord + 0.0:.0f}".replace("-0", "0")
        if abs(plane.coord) < 0.5
        else f"{_NAMES[cut]}={plane.coord:.0f}",
        color=_FG,
        fontsize=10,
        pad=3,
    )


def _draw_background(ax: Any, img: Any, plane: _Plane, window: tuple[float, float]) -> None:
    ax.imshow(
        _sample(img, plane),
        cmap="gray",
        vmin=window[0],
        vmax=window[1],
        origin="lower",
        extent=plane.extent,
        interpolation="nearest",
    )


def _convention_note(fig: Any, radiological: bool, extra: str = "") -> None:
    conv = (
        "radiological convention: the subject's left on the right (R/L marked)"
        if radiological
        else "neurological convention: the subject's left on the left (L/R marked)"
    )
    fig.text(
        0.5,
        0.01,
        f"{conv}; world (RAS) mm cuts" + (f"; {extra}" if extra else ""),
        ha="center",
        va="bottom",
        color=_FG if fig.get_facecolor()[0] < 0.5 else "0.2",
        fontsize=8,
    )


def _cuts(img: Any, cut_coords: Sequence[float] | None) -> npt.NDArray[np.float64]:
    if cut_coords is None:
        return brain_centre(img)
    c = np.asarray(cut_coords, dtype=np.float64).ravel()
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise InvalidArgumentError(f"cut_coords must be three finite mm values, got {cut_coords}")
    return c


def _views(views: Sequence[str] | str) -> tuple[str, ...]:
    vs = (views,) if isinstance(views, str) else tuple(views)
    bad = [v for v in vs if v not in _VIEWS]
    if bad or not vs:
        raise InvalidArgumentError(f"views must be among {_VIEWS}, got {views!r}")
    return vs


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
    fig.suptitle(
        title or f"{len(kps)} keypoints (circle: where the slice cuts the √3σ sphere)",
        color=_FG,
        fontsize=11,
        x=0.02,
        ha="left",
    )
    _convention_note(fig, radiological, f"{shown} keypoint cuts shown")
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
    fig.suptitle(
        title or f"{what}; {order.size} strongest drawn", color=_FG, fontsize=11, x=0.02, ha="left"
    )
    _convention_note(fig, radiological, "keypoints projected onto the slice")
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
    fig.suptitle(
        title or f"alignment check (fixed image, moving edges in orange){info}",
        color=_FG,
        fontsize=11,
        x=0.02,
        ha="left",
    )
    _convention_note(fig, radiological)
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
    fig.suptitle(
        title or f"segmentation: {len(values)} labels", color=_FG, fontsize=11, x=0.02, ha="left"
    )
    _convention_note(fig, radiological)
    fig.subplots_adjust(left=0.01, right=0.95, top=0.86, bottom=0.06, wspace=0.1, hspace=0.18)
    if show_p:
        boxes = [a.get_position() for a in fig.axes[-n_p:]]
        y0, y1 = min(b.y0 for b in boxes), max(b.y1 for b in boxes)
        cax = fig.add_axes((0.955, y0 + 0.1 * (y1 - y0), 0.01, 0.8 * (y1 - y0)))
        cb = fig.colorbar(im, cax=cax)
        cb.ax.tick_params(colors=_FG, labelsize=7)
        cb.set_label("probability", color=_FG, fontsize=8)
    return fig


# -------------------------------------------------------------------------- retrieval


@dataclass
class Hit:
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

    ``hits`` are :class:`Hit` (or tuples ``(image, subject_id, score, label,
    relevant)``, trailing fields optional). A hit known relevant gets a green frame,
    one known irrelevant a red one.
    """
    (vw,) = _views(view)
    items = [h if isinstance(h, Hit) else Hit(*h) for h in hits]
    if not items:
        raise InvalidArgumentError("plot_retrieval needs at least one hit")
    panels = [Hit(query, query_id, None, query_label, None), *items]
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
    fig.suptitle(
        title or f"top {len(items)} hits (green: relevant, red: not)",
        color=_FG,
        fontsize=11,
        x=0.02,
        ha="left",
    )
    _convention_note(fig, radiological)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.7 / (2.6 * nrows + 0.5), bottom=0.06)
    return fig


# ----------------------------------------------------------------------------- curves


Curves = Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]]


def plot_roc(curves: Curves, *, title: str = "ROC", ax: Any = None) -> Any:
    """ROC curves, one per entry ``name → (scores, labels)``; the legend gives each AUC.
    Returns the figure (draws into ``ax`` when given)."""
    from keyfuse.evaluate import roc_auc, roc_curve

    if not curves:
        raise InvalidArgumentError("plot_roc needs at least one curve")
    fig, ax = _curve_axes(ax)
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_curve(scores, labels)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(scores, labels):.3f})", lw=1.6)
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    _finish_curve_axes(ax, title, "lower right")
    return fig


def plot_precision_recall(
    curves: Curves, *, title: str = "precision–recall", ax: Any = None
) -> Any:
    """Precision–recall curves, one per entry ``name → (scores, labels)``; the legend
    gives each average precision, a dotted line each curve's chance level."""
    from sklearn.metrics import precision_recall_curve

    from keyfuse.evaluate import _pair_inputs, average_precision

    if not curves:
        raise InvalidArgumentError("plot_precision_recall needs at least one curve")
    fig, ax = _curve_axes(ax)
    for name, (scores, labels) in curves.items():
        s, y = _pair_inputs(scores, labels)
        prec, rec, _ = precision_recall_curve(y, s)
        (line,) = ax.step(
            rec, prec, where="post", lw=1.6, label=f"{name} (AP {average_precision(s, y):.3f})"
        )
        ax.axhline(y.mean(), color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    _finish_curve_axes(ax, title, "lower left")
    return fig


def _curve_axes(ax: Any) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    fig = _new_figure(5.0, 4.6, dark=False)
    return fig, fig.add_subplot(1, 1, 1)


def _finish_curve_axes(ax: Any, title: str, loc: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.grid(True, color="0.9", lw=0.6)
    ax.set_title(title, fontsize=11)
    ax.legend(loc=loc, fontsize=8)
    ax.figure.subplots_adjust(left=0.13, right=0.97, top=0.92, bottom=0.11)


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
