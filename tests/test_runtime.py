"""Process-level behaviour: heavy calls release the GIL and honour Ctrl-C, forked workers
work."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

import keyfuse as kf
from conftest import textured_volume
from keyfuse import _core


def _descriptors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64), dtype=np.uint8)


def _points(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 100.0, (n, 3))


_SJ = {"k": 10, "exact": True, "checks": 64, "alpha2_floor": 1.0, "alpha2_cap_fraction": 0.1}


def _engine() -> _core.SearchEngine:
    engine = _core.SearchEngine(trees=4)
    for s in range(6):
        engine.add(_descriptors(4000, s))
    return engine


def _atlas_keypoints() -> tuple[_core.AtlasKeypoints, list[np.ndarray]]:
    n = 6000
    atlases = _core.AtlasKeypoints(
        [_descriptors(n, s) for s in range(3)],
        [_points(n, s) for s in range(3)],
        [np.full(n, 2.0) for _ in range(3)],
        [np.ones(n, np.int32) for _ in range(3)],
    )
    return atlases, [_descriptors(n, 9), _points(n, 9), np.full(n, 2.0)]


def _transfer() -> Callable[[], object]:
    shape = (96, 96, 96)
    labels = np.zeros(shape, np.int32)
    labels[20:70, 20:70, 20:70] = 1
    intensity = np.ones(shape, np.float32)
    atlases = _core.TransferAtlases([labels] * 2, [intensity] * 2)
    n = 400
    rng = np.random.default_rng(0)
    args = (
        intensity,
        rng.integers(0, 2, n).astype(np.uint32),
        np.ones(n, np.int32),
        rng.integers(-3, 4, (n, 3)).astype(np.int32),
        np.ones(n),
        np.full(1, np.inf, np.float32),
        0.5,
    )
    return lambda: atlases.transfer(*args)


def _heavy_calls() -> dict[str, Callable[[], Callable[[], object]]]:
    """Every heavy `_core` entry point: a factory preparing its inputs, returning the call."""
    vol = textured_volume((64, 64, 64), seed=3)
    return {
        "extract3d": lambda: lambda: _core.extract3d(vol, (1.0, 1.0, 1.0)),
        "extract2d": lambda: lambda: _core.extract2d(
            np.ascontiguousarray(np.tile(vol[:, :, 32], (6, 6))), (1.0, 1.0)
        ),
        "knn_exact": lambda: lambda: _core.knn_exact(
            _descriptors(40_000, 0), _descriptors(4000, 1), k=5
        ),
        "knn_forest": lambda: lambda: _core.knn_forest(
            _descriptors(40_000, 0),
            _descriptors(20_000, 1),
            k=5,
            checks=128,
            trees=8,
            leaf_size=8,
            seed=1,
        ),
        "match_sets": lambda: lambda: _core.match_sets(
            _descriptors(20_000, 0),
            _points(20_000, 0),
            np.full(20_000, 2.0),
            _descriptors(20_000, 1),
            _points(20_000, 1),
            np.full(20_000, 2.0),
            ratio=1.0,
            scale_factor=2.0,
            hough=True,
            hough_sigma=3.0,
            keep_fraction=0.1,
            kde_bandwidth=3.0,
        ),
        "ransac_similarity": lambda: lambda: _core.ransac_similarity(
            _points(20_000, 0),
            _points(20_000, 1),
            iterations=4000,
            inlier_mm=5.0,
            max_scale=2.0,
            with_scale=True,
            seed=1,
        ),
        "soft_intersections": lambda: lambda: _core.soft_intersections(
            _descriptors(20_000, 0),
            _descriptors(20_000, 1),
            xyz_a=None,
            scale_a=None,
            xyz_b=None,
            scale_b=None,
            posterior=False,
            **_SJ,
        ),
        "reference_votes": lambda: lambda: _core.reference_votes(
            [_descriptors(8000, s) for s in range(4)], k=5, exact=True, checks=64
        ),
        "SearchEngine.search": lambda: (
            lambda e=_engine(), q=_descriptors(8000, 9): e.search(  # type: ignore[misc]
                q, exclude=None, allowed=None, posterior=False, **_SJ
            )
        ),
        "SearchEngine.pairwise": lambda: (
            lambda e=_engine(): e.pairwise(symmetric=False, posterior=True, **_SJ)  # type: ignore[misc]
        ),
        "SearchEngine.reference_votes": lambda: (
            lambda e=_engine(): e.reference_votes(k=5, exact=True, checks=64)  # type: ignore[misc]
        ),
        "SearchEngine.build_forest": lambda: (
            lambda e=_engine(): e.build_forest()  # type: ignore[misc]
        ),
        "keypoint_log_likelihood": lambda: lambda: _core.keypoint_log_likelihood(
            _descriptors(4000, 0),
            _descriptors(40_000, 1),
            np.repeat(np.arange(40, dtype=np.int64), 1000),
            np.arange(40, dtype=np.int64) % 2,
            2,
            exclude_sample=None,
            k=None,
            background=1.0,
            checks=None,
        ),
        "vector_log_likelihood": lambda: lambda: _core.vector_log_likelihood(
            np.random.default_rng(0).normal(size=(3000, 256)),
            np.random.default_rng(1).normal(size=(3000, 256)),
            np.arange(3000, dtype=np.int64) % 2,
            2,
            exclude=None,
            background=1.0,
        ),
        "binary_log_likelihood": lambda: lambda: _core.binary_log_likelihood(
            _descriptors(3000, 0) & 1,
            _descriptors(3000, 1) & 1,
            np.arange(3000, dtype=np.int64) % 2,
            2,
            exclude=None,
            background=1.0,
        ),
        "AtlasKeypoints.match_all": lambda: (
            lambda ak=_atlas_keypoints(): ak[0].match_all(  # type: ignore[misc]
                *ak[1], ratio=1.0, scale_factor=2.0, hough=True, hough_queries=0
            )
        ),
        "TransferAtlases.transfer": _transfer,
    }


@pytest.mark.parametrize("name", sorted(_heavy_calls()))
def test_heavy_calls_release_the_gil(name: str) -> None:
    """While a heavy call runs, another Python thread keeps running."""
    call = _heavy_calls()[name]()
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    worker = threading.Thread(target=count)
    worker.start()
    time.sleep(0.01)  # the counter is running
    before = ticks
    start = time.perf_counter()
    call()
    elapsed = time.perf_counter() - start
    during = ticks - before
    stop.set()
    worker.join()
    # with the GIL held the counter could not advance during the call
    assert elapsed > 0.02, f"{name} too quick ({elapsed:.3f} s) to show anything"
    assert during >= 3, f"{name}: {during} ticks in {elapsed:.3f} s"


def test_ctrl_c_interrupts_a_heavy_call_promptly() -> None:
    # a search of minutes (seconds with AMX), interrupted after 0.3 s
    data = _descriptors(1_000_000, 0)
    queries = _descriptors(50_000, 1)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    start = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        _core.knn_exact(data, queries, k=5)
    elapsed = time.perf_counter() - start
    timer.join()
    assert elapsed < 2.5, f"interrupted only after {elapsed:.1f} s"
    # the next call runs normally
    idx, _ = _core.knn_exact(data[:1000], data[:10], k=1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(10))


def _child_extract(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    kps = kf.extract(textured_volume((32, 32, 32), seed=2))
    queue.put(len(kps))


def test_extraction_works_in_a_forked_child() -> None:
    # the parent has used rayon's pool; a forked child must not hang on it
    parent = len(kf.extract(textured_volume((32, 32, 32), seed=2)))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_extract, args=(queue,))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 0, "forked child hung or crashed"
    assert queue.get(timeout=5) == parent


def test_import_is_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, keyfuse; "
        "heavy = [m for m in ('onnxruntime', 'sklearn', 'matplotlib', 'nilearn', 'dask') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    assert np.__name__ == "numpy"
