"""Binding-level checks of ``keyfuse._core.extract3d`` / ``extract2d`` (the Rust extractor)."""

from __future__ import annotations

import numpy as np
import pytest

from keyfuse import _core
from keyfuse.errors import InvalidArgumentError, InvalidImageError

KEYS = {
    "ijk",
    "scale",
    "orientation",
    "descriptors",
    "polarity",
    "response",
    "eigenvalues",
    "point",
}


def blob(shape: tuple[int, ...], centre: tuple[float, ...], sigma: float) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return np.exp(-r2 / (2 * sigma**2)).astype(np.float32)


def texture(shape: tuple[int, int, int], n: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.float32)
    for _ in range(n):
        c = [rng.uniform(6, s - 6) for s in shape]
        out += rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.5) * blob(shape, c, rng.uniform(1.5, 4))
    return out


def test_fields_dtypes_and_shapes() -> None:
    f = _core.extract3d(blob((48, 48, 48), (24.2, 23.7, 24.4), 3.0), (1.0, 1.0, 1.0))
    assert set(f) == KEYS
    n = len(f["ijk"])
    assert n >= 1
    expect = {
        "ijk": (np.float64, (n, 3)),
        "scale": (np.float32, (n,)),
        "orientation": (np.float32, (n, 3, 3)),
        "descriptors": (np.uint8, (n, 64)),
        "polarity": (np.int8, (n,)),
        "response": (np.float32, (n,)),
        "eigenvalues": (np.float32, (n, 3)),
        "point": (np.int64, (n,)),
    }
    for key, (dtype, shape) in expect.items():
        assert f[key].dtype == dtype, key
        assert f[key].shape == shape, key
    best = int(np.argmax(np.abs(f["response"])))
    np.testing.assert_allclose(f["ijk"][best], [24.2, 23.7, 24.4], atol=0.35)
    assert abs(f["scale"][best] / 3.0 - 1) < 0.15
    # rows are rotations; descriptors are permutations of 0..63
    o = f["orientation"].astype(np.float64)
    np.testing.assert_allclose(
        o @ o.transpose(0, 2, 1), np.broadcast_to(np.eye(3), o.shape), atol=1e-4
    )
    np.testing.assert_allclose(np.linalg.det(o), 1.0, atol=1e-4)
    assert (np.sort(f["descriptors"], axis=1) == np.arange(64)).all()
    assert (np.diff(f["point"]) >= 0).all() and f["point"][0] == 0


def test_spacing_is_in_mm() -> None:
    # the same blob with 2 mm voxels: σ in mm doubles, voxel coordinates do not change
    v = blob((48, 48, 48), (24.2, 23.7, 24.4), 3.0)
    a = _core.extract3d(v, (1.0, 1.0, 1.0))
    b = _core.extract3d(v, (2.0, 2.0, 2.0))
    np.testing.assert_allclose(b["ijk"], a["ijk"], atol=1e-9)
    np.testing.assert_allclose(b["scale"], 2 * a["scale"], rtol=1e-6)


def test_defaults_and_parameters() -> None:
    d = _core.default_extract_params()
    assert d["sigma0"] == 1.6 and isinstance(d["scales_per_octave"], int)
    v = texture((40, 40, 40), seed=1)
    few = _core.extract3d(v, (1.0, 1.0, 1.0), max_orientations=1)
    assert len(np.unique(few["point"])) == len(few["point"])
    with pytest.raises(InvalidArgumentError, match="sigma0"):
        _core.extract3d(v, (1.0, 1.0, 1.0), not_a_parameter=1)
    with pytest.raises(InvalidArgumentError):
        _core.extract3d(v, (1.0, 1.0, 1.0), sigma0=-1)
    with pytest.raises(InvalidArgumentError):
        _core.extract3d(v, (1.0, 1.0, 1.0), sigma0="big")
    with pytest.raises(InvalidArgumentError):
        _core.extract3d(v, (1.0, 0.0, 1.0))


@pytest.mark.parametrize(
    "volume",
    [
        np.zeros((20, 20, 20), np.float32),
        np.full((20, 21, 22), 3.5, np.float32),
        np.ones((1, 1, 1), np.float32),
        np.random.default_rng(0).random((5, 40, 40)).astype(np.float32),
    ],
)
def test_featureless_or_tiny_volumes_are_empty(volume: np.ndarray) -> None:
    f = _core.extract3d(volume, (1.0, 1.0, 1.0))
    assert all(len(a) == 0 for a in f.values())
    assert f["descriptors"].shape == (0, 64)


def test_bad_values_and_huge_volumes_raise() -> None:
    v = blob((20, 20, 20), (10, 10, 10), 2.0)
    v[1, 2, 3] = np.nan
    with pytest.raises(InvalidImageError):
        _core.extract3d(v, (1.0, 1.0, 1.0))
    with pytest.raises(InvalidImageError, match="max_voxels"):
        _core.extract3d(np.zeros((20, 20, 20), np.float32), (1.0, 1.0, 1.0), max_voxels=1000)


def test_non_contiguous_input_matches_contiguous() -> None:
    v = texture((40, 44, 36), seed=2)
    t = np.ascontiguousarray(v.transpose(2, 1, 0)).transpose(2, 1, 0)  # same values, F order
    assert not t.flags.c_contiguous
    a = _core.extract3d(v, (1.0, 1.0, 1.0))
    b = _core.extract3d(t, (1.0, 1.0, 1.0))
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key])


def test_extract2d() -> None:
    img = blob((64, 60), (30.4, 25.7), 3.5)
    f = _core.extract2d(img, (1.0, 1.0))
    assert set(f) == KEYS
    best = int(np.argmax(np.abs(f["response"])))
    np.testing.assert_allclose(f["ijk"][best], [30.4, 25.7, 0.0], atol=0.3)
    assert (f["ijk"][:, 2] == 0).all()
    assert (np.sort(f["descriptors"], axis=1) == np.arange(64)).all()
    o = f["orientation"]
    np.testing.assert_allclose(o[:, 2], np.broadcast_to([0, 0, 1], (len(o), 3)), atol=1e-6)
    assert len(_core.extract2d(np.zeros((30, 30), np.float32), (1.0, 1.0))["ijk"]) == 0
