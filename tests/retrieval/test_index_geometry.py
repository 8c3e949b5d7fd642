"""Compact keypoint geometry of on-disk indexes (keyfuse.index_geometry): the default for
new indexes, within its documented bounds on real keypoints, special values kept exactly,
scores unchanged; ``geometry="exact"`` stays bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_index import make_cohort

import keyfuse as kf
from keyfuse.index_geometry import SCALE_MANTISSA, pack_frames, unpack_frames

EXACT = ("descriptors", "polarity", "flags")
ANGLE_DEG = 0.23  # the documented bound on a frame's rotation error


@pytest.fixture(scope="module")
def real() -> kf.KeypointSet:
    return kf.extract(kf.datasets.mni152(resolution_mm=3.0))


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation angles (degrees) between frames ``a`` and ``b`` ((n, 3, 3))."""
    rel = np.einsum("nij,nkj->nik", np.asarray(a, np.float64), np.asarray(b, np.float64))
    cos = (np.trace(rel, axis1=1, axis2=2) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def _check_bounds(got: kf.KeypointSet, want: kf.KeypointSet, exact_rows=None) -> None:
    """``got`` within the compact bounds of ``want``; ``exact_rows`` bit for bit."""
    for f in EXACT:
        assert np.asarray(getattr(got, f)).tobytes() == np.asarray(getattr(want, f)).tobytes()
    assert got.shape == want.shape and np.array_equal(got.affine, want.affine)
    ok = np.isfinite(want.ijk).all(axis=1)
    extent = want.ijk[ok].max(axis=0) - want.ijk[ok].min(axis=0)
    err = np.abs(got.ijk[ok] - want.ijk[ok])
    assert (err <= extent / 65535 * 0.5 * (1 + 1e-9) + 1e-12).all()
    for f in ("scale", "response", "eigenvalues"):
        a, b = getattr(got, f), getattr(want, f)
        fin = np.isfinite(b) & (b != 0)
        assert a[~fin].tobytes() == b[~fin].tobytes()  # zeros, infinities, NaN: kept
        assert (np.abs(a[fin] - b[fin]) <= np.abs(b[fin]) * 2.0 ** -(SCALE_MANTISSA + 1)).all()
    rows = np.ones(len(want), bool) if exact_rows is None else ~exact_rows
    sign = np.sign(np.linalg.det(want.orientation[rows].astype(np.float64)))
    ang = _angles(
        got.orientation[rows] * sign[:, None, None], want.orientation[rows] * sign[:, None, None]
    )
    assert ang.max() <= ANGLE_DEG
    if exact_rows is not None:
        assert got.orientation[exact_rows].tobytes() == want.orientation[exact_rows].tobytes()


def test_compact_geometry_of_real_keypoints(real, tmp_path: Path) -> None:
    """MNI152 at 3 mm, plainly and as a mirrored storage (every frame a reflection):
    positions within half a step of extent/65535, scales, responses and eigenvalues
    within 2⁻¹¹, frames within 0.23°, the rest bit for bit, no exception rows; scores
    equal the exact index's."""
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    mirrored = kf.KeypointSet(
        real.ijk, real.scale, -real.orientation, real.descriptors, real.polarity,
        real.response, real.eigenvalues, real.flags, affine=real.affine @ flip, shape=real.shape,
    )  # fmt: skip
    cohort = make_cohort(n_families=2, size=2, n=150)
    rows = [("real", real, None, {}), ("mirrored", mirrored, None, {})]
    rows += [(sid, kps, None, lab) for sid, kps, lab in cohort]
    compact = kf.Index.create(tmp_path / "compact.kfi", shard_size=3000)
    compact.add_many(rows)
    exact = kf.Index.create(tmp_path / "exact.kfi", shard_size=3000, geometry="exact")
    exact.add_many(rows)
    m = json.loads((tmp_path / "compact.kfi" / "manifest.json").read_text())
    assert (m["geometry"], m["version"]) == ("compact", 6) and compact.geometry == "compact"
    back = kf.Index(tmp_path / "compact.kfi")
    assert back.geometry == "compact"
    for sid, kps, *_ in rows:
        _check_bounds(back.keypoints(sid), kps)
    ang = _angles(back.keypoints("real").orientation, real.orientation)
    assert 0.01 < ang.mean() < 0.1  # quantised, not kept
    import pyarrow.parquet as pq

    part = pq.read_table(next((tmp_path / "compact.kfi").glob("keypoints-*.parquet")))
    assert part.column("orientation_x0").null_count == part.num_rows  # no exceptions
    assert part.column("ijk_x0").null_count == part.num_rows
    # scores never read the geometry
    opened_exact = kf.Index(tmp_path / "exact.kfi")
    assert np.array_equal(back.pairwise(exact=True), opened_exact.pairwise(exact=True))
    assert np.array_equal(back.pairwise(exact=False), opened_exact.pairwise(exact=False))
    assert back.search("real", k=3) == opened_exact.search("real", k=3)
    for sid, kps, *_ in rows:
        assert opened_exact.keypoints(sid) == kps


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_special_frames_and_positions_are_kept_exactly(real, tmp_path: Path) -> None:
    """Frames that are no proper rotation of the subject's handedness (NaN, infinite,
    zero, scaled, a reflection among rotations, sheared), positions that are not finite
    and responses or eigenvalues that are not finite, zero or the largest float come
    back bit for bit; the other rows within the bounds."""
    n = 40
    o = np.array(real.orientation[:n])
    special = np.zeros(n, bool)
    special[[1, 3, 5, 7, 9, 11, 12]] = True
    o[1, 0, 0] = np.nan
    o[3, 2] = [np.inf, 0.0, -np.inf]
    o[5] = 0.0
    o[7] *= np.float32(1.01)
    o[9] = -o[9]
    o[11, 0] = o[11, 1]
    o[12, 0, 1] += np.float32(1e-3)
    ijk = np.array(real.ijk[:n])
    ijk[20, 1] = np.nan
    ijk[21] = [np.inf, 1.0, 2.0]
    response, eig = np.array(real.response[:n]), np.array(real.eigenvalues[:n])
    response[2], eig[3] = np.nan, [np.inf, -0.0, 3.4028235e38]
    kps = kf.KeypointSet(
        ijk, real.scale[:n], o, real.descriptors[:n], real.polarity[:n], response, eig,
        real.flags[:n], affine=real.affine, shape=real.shape,
    )  # fmt: skip
    ix = kf.Index.create(tmp_path / "odd.kfi")
    ix.add("odd", kps)
    got = kf.Index(tmp_path / "odd.kfi").keypoints("odd")
    _check_bounds(got, kps, exact_rows=special)
    assert got.ijk[20:22].tobytes() == ijk[20:22].tobytes()
    assert np.array_equal(got.ijk[22:], real.ijk[22:n], equal_nan=True) is False  # quantised
    # a subject with a single keypoint (zero extent) and one without any
    one = kps[[0]]
    ix.add("one", one)
    with pytest.warns(UserWarning, match="no keypoints"):
        ix.add_many([("none", kf.KeypointSet.empty(real.affine, real.shape), None, {})])
    back = kf.Index(tmp_path / "odd.kfi")
    assert np.array_equal(back.keypoints("one").ijk, one.ijk)
    assert len(back.keypoints("none")) == 0


def test_frame_codes_bound_and_identity() -> None:
    """Random rotations: the 32-bit code's rotation error stays within 0.23° (mean
    ≈ 0.08°); the identity comes back exactly."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.random(20000, random_state=7).as_matrix().astype(np.float32)
    ang = _angles(unpack_frames(pack_frames(rot)), rot)
    assert ang.max() <= ANGLE_DEG and ang.mean() < 0.1
    eye = np.broadcast_to(np.eye(3, dtype=np.float32), (2, 3, 3))
    assert np.array_equal(unpack_frames(pack_frames(eye)), eye)


def test_geometry_is_chosen_at_creation(real, tmp_path: Path) -> None:
    """``geometry="exact"`` is recorded (format 5, bit for bit) and kept by appends; an
    opened index refuses another choice; bad values raise; a rewrite (remove) of a
    compact index stays within the bounds."""
    path = tmp_path / "exact.kfi"
    kf.Index.create(path, geometry="exact").add("a", real)
    m = json.loads((path / "manifest.json").read_text())
    assert (m["geometry"], m["version"]) == ("exact", 5)
    ix = kf.Index(path, mode="r+")
    assert ix.geometry == "exact"
    ix.add("b", real[::2])
    assert kf.Index(path).keypoints("b") == real[::2]
    with pytest.raises(kf.InvalidArgumentError, match="stores exact geometry"):
        kf.Index(path, geometry="compact")
    with pytest.raises(kf.InvalidArgumentError, match="geometry must be"):
        kf.Index(geometry="lossy")
    compact = kf.Index.create(tmp_path / "c.kfi")
    compact.add_many([("a", real, None, {}), ("b", real[::3], None, {})])
    compact.remove("b")
    compact.remove([])  # a second rewrite of already quantised values
    _check_bounds(kf.Index(tmp_path / "c.kfi").keypoints("a"), real)
    # an in-memory index keeps every value; saving writes its geometry choice
    mem = kf.Index(geometry="exact")
    mem.add("a", real)
    mem.save(tmp_path / "saved.kfi")
    assert kf.Index(tmp_path / "saved.kfi").keypoints("a") == real
