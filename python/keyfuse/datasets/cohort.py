"""A reproducible simulated cohort built from the real MNI152 template.

Every individual is the template warped by a smooth deformation and given a
band-limited fine-scale "anatomical texture" (an intensity modulation inside the
brain). Both have a family part, shared by all members of a family, and a personal
part: identical (MZ) twins get a much smaller personal part than fraternal (DZ) twins
and siblings. A group label (``"F"``/``"M"``, "sex") changes global size and shape.
Each *scan* of an individual then gets a random similarity transform (rotation,
isotropic scale, translation), a smooth multiplicative bias field, a contrast change
(gamma and gain) and Rician noise. Some individuals are scanned twice (rescans: same
anatomy, new pose, bias and noise).

Label maps (left/right grey matter, left/right white matter, ventricles) are derived
from the template's tissue maps and follow exactly the same composed transform (one
``scipy.ndimage.map_coordinates`` per image: scan voxel → world → inverse pose →
inverse group change → family + personal B-spline deformation → template voxel).

>>> cohort = kf.datasets.simulate_cohort("cohort/", n_families=4, resolution_mm=4)
>>> cohort.table[0]["family"], cohort.image(0), cohort.label_map(0)
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import CorruptDataError, InvalidArgumentError, KeyfuseIOError
from keyfuse.image import Image, load_image

__all__ = ["LABELS", "Cohort", "simulate_cohort"]

#: label value → structure name of the simulated label maps
LABELS: dict[int, str] = {
    1: "left_gm",
    2: "right_gm",
    3: "left_wm",
    4: "right_wm",
    5: "ventricles",
}

TABLE_NAME = "cohort.csv"
COLUMNS = [
    "subject",  # scan id (unique; the id used in an index)
    "individual",  # anatomical individual (a rescan shares it with its original)
    "family",
    "relation",  # "mz_twin" | "dz_twin" | "sibling"
    "twin_of",  # individual id of the co-twin ("" if none)
    "group",  # "F" | "M"
    "rescan_of",  # subject id of the first scan of this individual ("" if none)
    "rotation_deg",  # rotation angle of the scan pose
    "scale",  # isotropic scale of the scan pose
    "transform",  # JSON 4×4: subject world mm -> scan world mm
    "image",  # path relative to the cohort directory ("" in memory)
    "labels",
]

# 1-D mean square of a cubic B-spline summed over integer shifts (∫B²): makes the
# deformation amplitude parameters RMS millimetres per axis
_BSPLINE_MS = 151.0 / 315.0


@dataclass
class Cohort:
    """A simulated (or loaded) cohort: one table row per scan, with images and label maps.

    Attributes
    ----------
    table : list of dict rows with the columns of :data:`COLUMNS` (subject, individual,
        family, relation, twin_of, group, rescan_of, rotation_deg, scale, transform,
        image, labels). ``keyfuse.evaluate`` helpers accept it (or the Cohort) directly.
    root : directory the cohort was written to, or None for an in-memory cohort.
    label_names : label value → structure name.
    """

    table: list[dict[str, Any]]
    root: Path | None = None
    label_names: dict[int, str] = field(default_factory=lambda: dict(LABELS))
    _images: list[Image] | None = None
    _labels: list[Image] | None = None

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        fams = len({r["family"] for r in self.table})
        where = str(self.root) if self.root else "in memory"
        return f"Cohort({len(self)} scans, {fams} families, {where})"

    @property
    def subjects(self) -> list[str]:
        """Scan ids, in table order."""
        return [str(r["subject"]) for r in self.table]

    def column(self, name: str) -> list[Any]:
        """One column of the table as a list."""
        if self.table and name not in self.table[0]:
            raise InvalidArgumentError(f"cohort table has no column {name!r}")
        return [r[name] for r in self.table]

    def _position(self, key: int | str) -> int:
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= int(key) < len(self):
                raise InvalidArgumentError(f"scan index {key} out of range (0..{len(self) - 1})")
            return int(key) % len(self)
        ids = self.subjects
        if key not in ids:
            raise InvalidArgumentError(f"no scan named {key!r} in the cohort")
        return ids.index(key)

    def image_path(self, key: int | str) -> Path:
        """Path of a scan's NIfTI image (written cohorts only)."""
        return self._path(key, "image")

    def label_path(self, key: int | str) -> Path:
        """Path of a scan's NIfTI label map (written cohorts only)."""
        return self._path(key, "labels")

    def _path(self, key: int | str, col: str) -> Path:
        row = self.table[self._position(key)]
        if self.root is None or not row.get(col):
            raise InvalidArgumentError("this cohort lives in memory: it has no files")
        return self.root / str(row[col])

    def image(self, key: int | str) -> Image:
        """The scan image (by position or subject id)."""
        i = self._position(key)
        if self._images is not None:
            return self._images[i]
        return load_image(self._path(i, "image"))

    def label_map(self, key: int | str) -> Image:
        """The scan's label map (values in :attr:`label_names`, 0 = background)."""
        i = self._position(key)
        if self._labels is not None:
            return self._labels[i]
        return load_image(self._path(i, "labels"))

    def images(self) -> Iterator[Image]:
        """Every scan image, in table order."""
        for i in range(len(self)):
            yield self.image(i)

    def to_pandas(self) -> Any:
        """The table as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.table, columns=COLUMNS)

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> Cohort:
        """Open a cohort written by :func:`simulate_cohort` (reads its ``cohort.csv``)."""
        root_p = Path(root)
        path = root_p / TABLE_NAME
        if not path.exists():
            raise KeyfuseIOError(f"{root_p} is not a cohort directory (no {TABLE_NAME})")
        try:
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise CorruptDataError(f"cannot read {path}: {exc}") from exc
        if not rows or any(c not in rows[0] for c in ("subject", "family", "image")):
            raise CorruptDataError(f"{path} lacks the subject/family/image columns")
        for r in rows:
            for key in ("rotation_deg", "scale"):
                if r.get(key) not in (None, ""):
                    r[key] = float(r[key])
        return cls(table=rows, root=root_p)


# ------------------------------------------------------------------------ template


@dataclass
class _Template:
    t1: npt.NDArray[np.float32]
    weight: npt.NDArray[np.float32]  # brain tissue weight (GM+WM) for the texture
    labels: npt.NDArray[np.uint8]
    affine: npt.NDArray[np.float64]
    centre: npt.NDArray[np.float64]  # world mm, centre of the brain


@functools.lru_cache(maxsize=2)
def _template(resolution_mm: float) -> _Template:
    """The template maps at ``resolution_mm`` (cached: read-only arrays)."""
    from scipy import ndimage as ndi

    from keyfuse.datasets.mni import mni152

    t1 = mni152("t1", resolution_mm)
    gm = np.asarray(mni152("gm", resolution_mm).data, dtype=np.float32)
    wm = np.asarray(mni152("wm", resolution_mm).data, dtype=np.float32)
    data = np.asarray(t1.data, dtype=np.float32)
    it = max(1, round(6.0 / resolution_mm))
    brain = ndi.binary_fill_holes(ndi.binary_closing((gm + wm) > 0.3, iterations=it))
    labels = np.zeros(data.shape, dtype=np.uint8)
    ijk = np.indices(data.shape, dtype=np.float64).reshape(3, -1)
    xyz = (t1.affine[:3, :3] @ ijk + t1.affine[:3, 3:4]).reshape((3, *data.shape))
    right = xyz[0] >= 0  # RAS: +x is the subject's right
    is_gm = brain & (gm >= wm) & (gm > 0.3)
    is_wm = brain & (wm > gm) & (wm > 0.3)
    labels[is_gm & ~right] = 1
    labels[is_gm & right] = 2
    labels[is_wm & ~right] = 3
    labels[is_wm & right] = 4
    # ventricles: CSF-dark, non-tissue, deep inside the brain, near the midline
    inner = ndi.binary_erosion(brain, iterations=it)
    dark = inner & (data < np.percentile(data[brain], 10)) & (gm < 0.3) & (wm < 0.3)
    comp, n = ndi.label(dark)
    if n:
        vox_mm3 = float(abs(np.linalg.det(t1.affine[:3, :3])))
        sizes = np.asarray(ndi.sum(dark, comp, range(1, n + 1))) * vox_mm3
        coms = ndi.center_of_mass(dark, comp, range(1, n + 1))
        for k in range(n):
            c = t1.affine[:3, :3] @ np.asarray(coms[k]) + t1.affine[:3, 3]
            near_mid = abs(c[0]) < 15 and -50 < c[1] < 20 and -15 < c[2] < 40
            if near_mid and sizes[k] >= 0.02 * sizes.max():
                labels[comp == k + 1] = 5
    weight = np.clip(gm + wm, 0.0, 1.0).astype(np.float32)
    centre = xyz[:, brain].mean(axis=1) if brain.any() else xyz.reshape(3, -1).mean(axis=1)
    for arr in (data, weight, labels):
        arr.flags.writeable = False
    return _Template(data, weight, labels, t1.affine.copy(), np.asarray(centre, np.float64))


# ------------------------------------------------------------------ random fields


def _bspline_field(
    rng: np.random.Generator,
    lo: npt.NDArray[np.float64],
    hi: npt.NDArray[np.float64],
    spacing_mm: float,
    rms: float,
    components: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]]:
    """Random cubic B-spline coefficients on a control grid covering [lo, hi] (world
    mm, with a 2-node margin); returns (grid origin, coefficients (C, X, Y, Z))."""
    origin = lo - 2 * spacing_mm
    n = np.ceil((hi - lo) / spacing_mm).astype(int) + 5
    scale = rms / np.sqrt(_BSPLINE_MS**3)
    coef = (rng.standard_normal((components, *n)) * scale).astype(np.float32)
    return origin, coef


_SUB = 4  # dense evaluation at a quarter of the control spacing


def _bspline_weights(n_in: int) -> npt.NDArray[np.float32]:
    """(n_out, n_in) cubic B-spline basis sampled at 1/_SUB of the knot spacing."""
    t = np.arange((n_in - 1) * _SUB + 1, dtype=np.float64) / _SUB
    x = np.abs(t[:, None] - np.arange(n_in, dtype=np.float64)[None, :])
    w = np.where(x < 1, 2.0 / 3.0 - x**2 + 0.5 * x**3, np.where(x < 2, (2 - x) ** 3 / 6.0, 0.0))
    return w.astype(np.float32)


def _densify(coef: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Evaluate a cubic B-spline field (C, X, Y, Z) densely at 1/_SUB of its spacing.

    The evaluation on a regular grid is separable (three small matrix products).
    Evaluating the cubic spline at a million scan points would be slow (64 taps), so
    each individual's field is densified once and every scan interpolates it
    linearly: for fields this smooth the difference is a small fraction of a voxel.
    """
    wx, wy, wz = (_bspline_weights(n) for n in coef.shape[1:])
    return np.einsum("xi,yj,zk,cijk->cxyz", wx, wy, wz, coef, optimize=True).astype(np.float32)


def _sample_dense(
    dense: npt.NDArray[np.float32],
    origin: npt.NDArray[np.float64],
    spacing_mm: float,
    pts: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """Trilinear samples of each component of a densified field at world points (3, N)."""
    from scipy import ndimage as ndi

    step = np.float32(spacing_mm / _SUB)
    g = ((pts - origin[:, None].astype(np.float32)) / step).astype(np.float32)
    return np.stack(
        [ndi.map_coordinates(c, g, order=1, mode="nearest", output=np.float32) for c in dense]
    )


def _hat_weights(n: int, stride: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Coarse sample positions every ``stride`` voxels (covering 0..n-1) and the
    (n, n_coarse) linear-interpolation weights back onto every voxel."""
    pos = np.arange(0, n - 1 + stride, stride, dtype=np.float32)
    x = np.arange(n, dtype=np.float32)
    w = np.clip(1.0 - np.abs(x[:, None] - pos[None, :]) / np.float32(stride), 0.0, None)
    return pos, w.astype(np.float32)


def _displacement_on_grid(
    dense: npt.NDArray[np.float32],
    origin: npt.NDArray[np.float64],
    spacing_mm: float,
    to_q: npt.NDArray[np.float64],
    grid_shape: tuple[int, ...],
    resolution_mm: float,
) -> npt.NDArray[np.float32]:
    """The deformation (3, N) at every scan voxel, for points q = to_q · ijk.

    The field varies over tens of millimetres, so it is sampled on a scan grid about
    6 mm apart and interpolated linearly (separably, three small matrix products)
    instead of interpolating it at every voxel.
    """
    stride = max(1, round(spacing_mm / _SUB / resolution_mm))
    (px, wx), (py, wy), (pz, wz) = (_hat_weights(n, stride) for n in grid_shape)
    cijk = np.stack(np.meshgrid(px, py, pz, indexing="ij")).reshape(3, -1)
    cq = (to_q[:3, :3].astype(np.float32) @ cijk + to_q[:3, 3:4].astype(np.float32)).astype(
        np.float32
    )
    coarse = _sample_dense(dense, origin, spacing_mm, cq).reshape(3, px.size, py.size, pz.size)
    full = np.einsum("xi,yj,zk,cijk->cxyz", wx, wy, wz, coarse, optimize=True)
    return np.ascontiguousarray(full, dtype=np.float32).reshape(3, -1)


def _bias_field(
    rng: np.random.Generator, shape: tuple[int, ...], resolution_mm: float, amplitude: float
) -> npt.NDArray[np.float32]:
    """Smooth log bias field: a sum of separable low-frequency cosines (wavelengths
    over 100 mm), RMS ``amplitude``; separable, so it costs almost nothing."""
    out = np.zeros(shape, dtype=np.float32)
    terms = 6
    for _ in range(terms):
        factors = []
        for n in shape:
            x = np.arange(n, dtype=np.float32) * np.float32(resolution_mm)
            freq = rng.uniform(0.0, 2 * np.pi / 100.0)
            factors.append(np.cos(freq * x + rng.uniform(0, 2 * np.pi)).astype(np.float32))
        a = np.float32(rng.standard_normal() * amplitude * np.sqrt(8.0 / terms))
        out += a * factors[0][:, None, None] * factors[1][None, :, None] * factors[2][None, None, :]
    return out


def _texture(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float
) -> npt.NDArray[np.float32]:
    """Band-limited noise (difference of Gaussians, one octave), unit variance."""
    from scipy import ndimage as ndi

    white = rng.standard_normal(shape).astype(np.float32)
    band = ndi.gaussian_filter(white, sigma_vox) - ndi.gaussian_filter(white, 2.0 * sigma_vox)
    std = float(band.std())
    return (band / std if std > 0 else band).astype(np.float32)


def _rotation(rng: np.random.Generator, max_deg: float) -> npt.NDArray[np.float64]:
    """A rotation about a uniformly random axis by an angle uniform in [-max, max]."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    ang = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * (k @ k)


def _about(
    centre: npt.NDArray[np.float64], linear: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """4×4 map x ↦ centre + linear·(x − centre)."""
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = centre - linear @ centre
    return m


# --------------------------------------------------------------------- the cohort


@dataclass
class _Individual:
    id: str
    family: int
    relation: str
    twin_of: str
    group: str
    personal: float  # personal-variation factor (MZ twins small)


def _family_plan(
    n_families: int, family_size: int, seed: int, mz_personal: float
) -> list[_Individual]:
    """Family structures cycle MZ twins, DZ twins, plain siblings."""
    people: list[_Individual] = []
    nid = 0
    for f in range(n_families):
        rng = np.random.default_rng([seed, 1, f])
        kind = ("mz", "dz", "sib")[f % 3]
        ids = [f"sub-{nid + m:03d}" for m in range(family_size)]
        nid += family_size
        twin_group = rng.choice(["F", "M"])
        for m, sid in enumerate(ids):
            twin = kind != "sib" and m < 2 and family_size >= 2
            if twin:
                rel = "mz_twin" if kind == "mz" else "dz_twin"
                other = ids[1 - m]
                # MZ twins share their sex; DZ twins draw theirs
                grp = str(twin_group) if kind == "mz" else str(rng.choice(["F", "M"]))
                personal = mz_personal if kind == "mz" else 1.0
            else:
                rel, other, grp, personal = "sibling", "", str(rng.choice(["F", "M"])), 1.0
            people.append(_Individual(sid, f, rel, other, grp, personal))
    return people


def simulate_cohort(
    out_dir: str | os.PathLike[str] | None = None,
    n_families: int = 12,
    family_size: int = 3,
    n_rescans: int = 4,
    *,
    seed: int = 0,
    resolution_mm: float = 1.5,
    shape: Sequence[int] | None = None,
    deformation_spacing_mm: float = 24.0,
    family_deformation_mm: float = 2.5,
    personal_deformation_mm: float = 1.2,
    texture_scale_mm: float = 4.0,
    family_texture: float = 0.3,
    personal_texture: float = 0.15,
    mz_personal: float = 0.5,
    group_effect: float = 0.04,
    rotation_deg: float = 10.0,
    scale_range: float = 0.05,
    translation_mm: float = 8.0,
    bias: float = 0.15,
    contrast: float = 0.15,
    noise: float = 0.01,
    progress: bool = True,
) -> Cohort:
    """Simulate a cohort of families, twins and rescans from the MNI152 template.

    Parameters
    ----------
    out_dir : None (default: keep everything in memory) or a directory that receives
        ``images/<subject>.nii.gz``, ``labels/<subject>.nii.gz`` (their names in
        ``labels/dseg.tsv``, a BIDS look-up table; same file names, so
        tools can pair them) and
        ``cohort.csv``; existing files are overwritten.
    n_families : number of families (default 12). Families cycle through three
        structures: identical (MZ) twins + siblings, fraternal (DZ) twins + siblings,
        siblings only.
    family_size : individuals per family (default 3, at least 1).
    n_rescans : individuals scanned a second time (default 4), chosen at random.
        Defaults give 36 individuals and 40 scans.
    seed : everything is a deterministic function of the seed and the parameters.
    resolution_mm : voxel size of the scans (default 1.5: about 1,230 keypoints per
        scan; 2 mm gives about 410 and is faster; tests use 4).
    shape : None (default: the template's field of view) or the scan grid shape,
        centred on the brain — small shapes make tiny test cohorts.
    deformation_spacing_mm : control-point spacing of the B-spline deformations (24).
    family_deformation_mm, personal_deformation_mm : RMS displacement per axis of the
        shared family deformation (2.5) and of each member's own (1.2).
    texture_scale_mm : scale of the band-limited anatomical texture (4.0): it gives
        the keypoint detector individual, family-shared structure to find.
    family_texture, personal_texture : relative intensity amplitude of the family and
        personal texture inside the brain (0.3, 0.15).
    mz_personal : fraction of the personal deformation and texture that identical
        twins get (0.5; siblings and fraternal twins get all of it).
    group_effect : relative global size/shape change between the "F" and "M" groups
        (0.04: "M" is about 4% larger, more along y than z).
    rotation_deg, scale_range, translation_mm : scan pose ranges (10°, ±5%, ±8 mm).
    bias : amplitude of the smooth log bias field (0.15).
    contrast : range of the gamma and gain change (±0.15).
    noise : Rician noise σ relative to the template maximum (0.01).
    progress : show a tqdm progress bar (default True).

    Returns
    -------
    Cohort
        The table (one row per scan) and access to images and label maps.
    """
    from scipy import ndimage as ndi
    from tqdm.auto import tqdm

    if n_families < 1 or family_size < 1:
        raise InvalidArgumentError("n_families and family_size must be at least 1")
    if n_rescans < 0 or n_rescans > n_families * family_size:
        raise InvalidArgumentError(
            f"n_rescans must be in 0..{n_families * family_size}, got {n_rescans}"
        )
    if not (np.isfinite(resolution_mm) and 0.5 <= resolution_mm <= 8):
        raise InvalidArgumentError(f"resolution_mm must be in [0.5, 8], got {resolution_mm}")
    for name, val in (
        ("family_deformation_mm", family_deformation_mm),
        ("personal_deformation_mm", personal_deformation_mm),
        ("family_texture", family_texture),
        ("personal_texture", personal_texture),
        ("mz_personal", mz_personal),
        ("rotation_deg", rotation_deg),
        ("translation_mm", translation_mm),
        ("bias", bias),
        ("noise", noise),
    ):
        if not np.isfinite(val) or val < 0:
            raise InvalidArgumentError(f"{name} must be a finite value >= 0, got {val}")
    if not 0 <= scale_range < 0.5 or not 0 <= contrast < 0.9 or not 0 <= group_effect < 0.5:
        raise InvalidArgumentError("scale_range, contrast and group_effect must be small fractions")
    if deformation_spacing_mm <= 0 or texture_scale_mm <= 0:
        raise InvalidArgumentError("deformation_spacing_mm and texture_scale_mm must be positive")

    if shape is not None and (len(tuple(shape)) != 3 or min(int(v) for v in shape) < 4):
        raise InvalidArgumentError(f"shape must be 3 sizes >= 4, got {tuple(shape)}")

    tpl = _template(float(resolution_mm))
    tshape = tpl.t1.shape
    # scan grid
    if shape is None:
        grid_shape = tuple(int(s) for s in tshape)
        grid_affine = tpl.affine.copy()
    else:
        grid_shape = tuple(int(s) for s in shape)
        grid_affine = np.diag([resolution_mm, resolution_mm, resolution_mm, 1.0])
        grid_affine[:3, 3] = tpl.centre - resolution_mm * (np.asarray(grid_shape) - 1) / 2.0
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in tshape], indexing="ij")).reshape(3, -1)
    tworld = tpl.affine[:3, :3] @ corners + tpl.affine[:3, 3:4]
    lo, hi = tworld.min(axis=1) - 20.0, tworld.max(axis=1) + 20.0
    t_inv = np.linalg.inv(tpl.affine)
    tmax = float(tpl.t1.max())

    people = _family_plan(n_families, family_size, seed, mz_personal)
    pick = np.random.default_rng([seed, 2]).choice(len(people), size=n_rescans, replace=False)
    rescanned = {people[int(i)].id for i in pick}

    scans: list[tuple[_Individual, str, str]] = []  # (person, subject id, rescan_of)
    for p in people:
        scans.append((p, p.id, ""))
        if p.id in rescanned:
            scans.append((p, f"{p.id}-rescan", p.id))

    root = Path(out_dir) if out_dir is not None else None
    if root is not None:
        try:
            (root / "images").mkdir(parents=True, exist_ok=True)
            (root / "labels").mkdir(parents=True, exist_ok=True)
            # the label maps' names, as a BIDS look-up table (index, name)
            (root / "labels" / "dseg.tsv").write_text(
                "index\tname\n0\tbackground\n"
                + "".join(f"{k}\t{v}\n" for k, v in sorted(LABELS.items()))
            )
        except OSError as exc:
            raise KeyfuseIOError(f"cannot create cohort directory {root}: {exc}") from exc

    sigma_vox = texture_scale_mm / resolution_mm
    fam_cache: dict[int, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]] = {}
    ind_cache: dict[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]] = {}
    # group change: "M" larger (more along y), "F" smaller, about the brain centre
    shape_dir = np.array([0.9, 1.2, 0.9])
    group_lin = {
        "M": np.diag(1.0 + 0.5 * group_effect * shape_dir),
        "F": np.diag(1.0 - 0.5 * group_effect * shape_dir),
    }
    ijk = np.indices(grid_shape, dtype=np.float32).reshape(3, -1)
    ones = np.ones((1, ijk.shape[1]), np.float32)
    ijk1 = np.concatenate([ijk, ones])
    del ijk

    table: list[dict[str, Any]] = []
    images: list[Image] = []
    label_maps: list[Image] = []
    bar = tqdm(scans, desc="simulate", unit="scan", disable=not progress)
    for p, sid, rescan_of in bar:
        # family and personal parts (cached: rescans and relatives reuse them)
        if p.family not in fam_cache:
            frng = np.random.default_rng([seed, 3, p.family])
            _, fcoef = _bspline_field(
                frng, lo, hi, deformation_spacing_mm, family_deformation_mm, 3
            )
            ftex = _texture(frng, tshape, sigma_vox)
            fam_cache[p.family] = (fcoef, ftex)
        if p.id not in ind_cache:
            prng = np.random.default_rng([seed, 4, int(p.id.split("-")[1])])
            _, pcoef = _bspline_field(
                prng, lo, hi, deformation_spacing_mm, personal_deformation_mm * p.personal, 3
            )
            ptex = _texture(prng, tshape, sigma_vox)
            fcoef, ftex = fam_cache[p.family]
            textured = tpl.t1 * (
                1.0 + tpl.weight * (family_texture * ftex + personal_texture * p.personal * ptex)
            )
            ind_cache[p.id] = (_densify(fcoef + pcoef), textured.astype(np.float32))
        coef, textured = ind_cache[p.id]
        origin = lo - 2 * deformation_spacing_mm

        # scan pose and acquisition
        srng = np.random.default_rng([seed, 5, len(table)])
        rot = _rotation(srng, rotation_deg)
        scl = 1.0 + srng.uniform(-scale_range, scale_range)
        pose = _about(tpl.centre, scl * rot)
        pose[:3, 3] += srng.uniform(-translation_mm, translation_mm, 3)
        angle = float(np.rad2deg(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))))

        # scan voxel -> world -> subject space -> group-neutral space, one matrix
        grp = _about(tpl.centre, group_lin[p.group])
        to_q = np.linalg.inv(grp) @ np.linalg.inv(pose) @ grid_affine
        q = (to_q[:3].astype(np.float32) @ ijk1).astype(np.float32)
        q += _displacement_on_grid(
            coef, origin, deformation_spacing_mm, to_q, grid_shape, resolution_mm
        )
        vox = (t_inv[:3, :3].astype(np.float32) @ q + t_inv[:3, 3:4].astype(np.float32)).astype(
            np.float32
        )
        del q
        img = ndi.map_coordinates(
            textured, vox, order=1, mode="constant", cval=0.0, output=np.float32
        )
        lab = ndi.map_coordinates(tpl.labels, vox, order=0, mode="constant", cval=0)
        del vox

        # acquisition: bias field (smooth, in scan space), contrast, Rician noise
        logb = _bias_field(srng, grid_shape, resolution_mm, bias).reshape(-1)
        gamma = 1.0 + srng.uniform(-contrast, contrast)
        gain = 1.0 + srng.uniform(-contrast, contrast)
        x = np.clip(img / np.float32(tmax), 0.0, None) ** np.float32(gamma)
        x = x * np.exp(logb) * np.float32(gain * tmax)
        sd = np.float32(noise * tmax)
        n1 = srng.standard_normal(x.shape).astype(np.float32) * sd
        n2 = srng.standard_normal(x.shape).astype(np.float32) * sd
        x = np.sqrt((x + n1) ** 2 + n2**2).astype(np.float32)

        scan = Image(x.reshape(grid_shape), grid_affine)
        labmap = Image(lab.reshape(grid_shape).astype(np.uint8), grid_affine)
        row: dict[str, Any] = {
            "subject": sid,
            "individual": p.id,
            "family": f"fam-{p.family:02d}",
            "relation": p.relation,
            "twin_of": p.twin_of,
            "group": p.group,
            "rescan_of": rescan_of,
            "rotation_deg": round(angle, 4),
            "scale": round(float(scl), 6),
            "transform": json.dumps([round(float(v), 6) for v in pose.ravel()]),
            "image": "",
            "labels": "",
        }
        if root is not None:
            row["image"] = f"images/{sid}.nii.gz"
            row["labels"] = f"labels/{sid}.nii.gz"
            try:
                scan.save(root / row["image"])
                labmap.save(root / row["labels"])
            except OSError as exc:
                raise KeyfuseIOError(f"cannot write cohort image for {sid}: {exc}") from exc
        else:
            images.append(scan)
            label_maps.append(labmap)
        table.append(row)
        # an individual's warp is no longer needed once all its scans are done
        if (sid == p.id and p.id not in rescanned) or rescan_of:
            ind_cache.pop(p.id, None)

    if root is not None:
        _write_table(root / TABLE_NAME, table)
        return Cohort(table=table, root=root)
    return Cohort(table=table, root=None, _images=images, _labels=label_maps)


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    from keyfuse._io import atomic_path

    try:
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    except OSError as exc:
        raise KeyfuseIOError(f"cannot write {path}: {exc}") from exc
