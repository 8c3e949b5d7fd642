"""Shared machinery of the figures: world-aligned slices of a volume, the grey
background, panel styling and the display convention, saving."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError, KeyfuseIOError

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
    bounds: npt.NDArray[Any], centre: Any, step: float, views: Sequence[str]
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
    world_to_world: npt.NDArray[Any] | None = None,
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


def _heading(fig: Any, title: str, radiological: bool, extra: str = "") -> None:
    """A figure's title (top left) and its display-convention note (bottom)."""
    fig.suptitle(title, color=_FG, fontsize=11, x=0.02, ha="left")
    _convention_note(fig, radiological, extra)


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
