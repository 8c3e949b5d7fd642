"""The public exact k-NN (``keyfuse.neighbors.knn``) and GPU scale space
(``keyfuse.gpu.scale_space``): the k-NN equals a numpy brute force and is the same on
either backend; the GPU-only functions raise a clear error without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import textured_volume
from keyfuse import _core
from keyfuse.device import cuda_available
from keyfuse.errors import DeviceUnavailableError, InvalidArgumentError, InvalidImageError
from keyfuse.gpu import scale_space
from keyfuse.neighbors import knn

HAS_GPU = cuda_available()


def _ranks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n, 64)), axis=1).astype(np.uint8)


def test_knn_equals_numpy_brute_force() -> None:
    data, queries = _ranks(500, 0), _ranks(40, 1)
    queries[:3] = data[[7, 7, 300]]  # exact duplicates: distance 0
    idx, d2 = knn(data, queries, 3, device="cpu")
    diff = queries[:, None, :].astype(np.int64) - data[None, :, :].astype(np.int64)
    full = (diff**2).sum(axis=2)
    order = np.lexsort((np.broadcast_to(np.arange(len(data)), full.shape), full), axis=1)[:, :3]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(d2, np.take_along_axis(full, order, axis=1))
    assert (d2[:3, 0] == 0).all() and (idx[:3, 0] == [7, 7, 300]).all()


def test_knn_marks_missing_neighbours() -> None:
    idx, d2 = knn(_ranks(2, 0), _ranks(4, 1), 3, device="cpu")
    assert idx.shape == d2.shape == (4, 3)
    assert (idx[:, 2] == -1).all() and (d2[:, 2] == -1).all()


def test_knn_refuses_bad_descriptors() -> None:
    with pytest.raises(InvalidArgumentError, match="uint8"):
        knn(np.zeros((5, 64), np.float32), _ranks(2, 0), 1, device="cpu")
    with pytest.raises(InvalidArgumentError, match="64"):
        knn(np.zeros((5, 32), np.uint8), _ranks(2, 0), 1, device="cpu")
    with pytest.raises(InvalidArgumentError, match="k"):
        knn(_ranks(5, 0), _ranks(2, 0), 0, device="cpu")


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
def test_gpu_functions_raise_without_a_gpu() -> None:
    with pytest.raises(DeviceUnavailableError):
        knn(_ranks(5, 0), _ranks(2, 0), 1, device="cuda")
    with pytest.raises(DeviceUnavailableError):
        scale_space(np.ones((16, 16, 16), np.float32))


def test_scale_space_needs_a_volume() -> None:
    with pytest.raises(InvalidImageError, match="3D"):
        scale_space(np.ones((16, 16), np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no usable CUDA device")
def test_gpu_knn_equals_cpu_and_scale_space_finds_extrema() -> None:
    data, queries = _ranks(3000, 2), _ranks(300, 3)
    for got, want in zip(
        knn(data, queries, 5, device="cuda"), knn(data, queries, 5, device="cpu"), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    # smooth structures, not white noise: noise has no extremum above the contrast threshold
    vol = np.ascontiguousarray(textured_volume((48, 48, 48), seed=0)[:, :44, :40])
    octaves = scale_space(vol)
    raw = _core.gpu_scale_space(vol, keep_images=False)
    assert len(octaves) == len(raw) >= 2
    for o, r in zip(octaves, raw, strict=True):
        assert o.shape == tuple(r["shape"])  # type: ignore[arg-type]
        np.testing.assert_array_equal(o.extrema, r["extrema"])  # type: ignore[arg-type]
    assert sum(len(o.extrema) for o in octaves) > 0
