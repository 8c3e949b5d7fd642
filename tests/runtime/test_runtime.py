"""Process-level behaviour: heavy calls release the GIL and honour Ctrl-C, forked workers
work."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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

#: Every heavy `_core` entry point: a function that prepares its inputs and returns the call.
HEAVY_CALLS: dict[str, Callable[[], Callable[[], object]]] = {}


def heavy(fn: Callable[[], Callable[[], object]]) -> Callable[[], Callable[[], object]]:
    HEAVY_CALLS[fn.__name__.removeprefix("_").replace("__", ".")] = fn
    return fn


@heavy
def _extract3d() -> Callable[[], object]:
    # ≈ 35 ms on a quiet 2-core machine: 64³ (10 ms) was too quick to show anything
    vol = textured_volume((96, 96, 96), seed=3)
    return lambda: _core.extract3d(vol, (1.0, 1.0, 1.0))


@heavy
def _extract2d() -> Callable[[], object]:
    img = np.ascontiguousarray(np.tile(textured_volume((64, 64, 64), seed=3)[:, :, 32], (4, 4)))
    return lambda: _core.extract2d(img, (1.0, 1.0))


@heavy
def _knn_exact() -> Callable[[], object]:
    data, queries = _descriptors(100_000, 0), _descriptors(5000, 1)
    return lambda: _core.knn_exact(data, queries, k=5)


@heavy
def _knn_forest() -> Callable[[], object]:
    data, queries = _descriptors(40_000, 0), _descriptors(20_000, 1)
    forest = {"trees": 8, "leaf_size": 8, "seed": 1}
    return lambda: _core.knn_forest(data, queries, k=5, checks=128, **forest)


@heavy
def _match_sets() -> Callable[[], object]:
    n = 4000
    a = (_descriptors(n, 0), _points(n, 0), np.full(n, 2.0))
    b = (_descriptors(n, 1), _points(n, 1), np.full(n, 2.0))
    params = {"ratio": 1.0, "scale_factor": 2.0, "hough": True, "hough_sigma": 3.0}
    return lambda: _core.match_sets(*a, *b, keep_fraction=0.1, kde_bandwidth=3.0, **params)


@heavy
def _ransac_similarity() -> Callable[[], object]:
    src, dst = _points(20_000, 0), _points(20_000, 1)
    params = {"iterations": 4000, "inlier_mm": 5.0, "max_scale": 2.0, "with_scale": True}
    return lambda: _core.ransac_similarity(src, dst, seed=1, **params)


@heavy
def _soft_intersections() -> Callable[[], object]:
    a, b = _descriptors(10_000, 0), _descriptors(10_000, 1)
    geometry = dict.fromkeys(("xyz_a", "scale_a", "xyz_b", "scale_b"))
    return lambda: _core.soft_intersections(a, b, posterior=False, **geometry, **_SJ)


@heavy
def _reference_votes() -> Callable[[], object]:
    sets = [_descriptors(8000, s) for s in range(4)]
    return lambda: _core.reference_votes(sets, k=5, exact=True, checks=64)


def _engine() -> _core.SearchEngine:
    engine = _core.SearchEngine(trees=4)
    for s in range(6):
        engine.add(_descriptors(4000, s))
    return engine


@heavy
def _SearchEngine__search() -> Callable[[], object]:
    engine, query = _engine(), _descriptors(8000, 9)
    return lambda: engine.search(query, exclude=None, allowed=None, posterior=False, **_SJ)


@heavy
def _SearchEngine__pairwise() -> Callable[[], object]:
    engine = _engine()
    return lambda: engine.pairwise(symmetric=False, posterior=True, **_SJ)


@heavy
def _SearchEngine__reference_votes() -> Callable[[], object]:
    engine = _engine()
    return lambda: engine.reference_votes(k=5, exact=True, checks=64)


@heavy
def _SearchEngine__build_forest() -> Callable[[], object]:
    # only the first call builds (later ones find the forest): 72,000 descriptors, ≈ 35 ms
    # on a quiet 2-core machine (24,000 took 11 ms, too quick to show anything)
    engine = _core.SearchEngine(trees=4)
    for s in range(6):
        engine.add(_descriptors(12_000, s))
    return engine.build_forest


@heavy
def _keypoint_log_likelihood() -> Callable[[], object]:
    query, train = _descriptors(1000, 0), _descriptors(40_000, 1)
    sample = np.repeat(np.arange(40, dtype=np.int64), 1000)
    cls = np.arange(40, dtype=np.int64) % 2
    opts = {"exclude_sample": None, "k": None, "background": 1.0, "checks": None}
    return lambda: _core.keypoint_log_likelihood(query, train, sample, cls, 2, **opts)


@heavy
def _vector_log_likelihood() -> Callable[[], object]:
    rng = np.random.default_rng(0)
    query, train = rng.normal(size=(1500, 256)), rng.normal(size=(1500, 256))
    cls = np.arange(1500, dtype=np.int64) % 2
    return lambda: _core.vector_log_likelihood(query, train, cls, 2, exclude=None, background=1.0)


@heavy
def _binary_log_likelihood() -> Callable[[], object]:
    query, train = _descriptors(3000, 0) & 1, _descriptors(3000, 1) & 1
    cls = np.arange(3000, dtype=np.int64) % 2
    return lambda: _core.binary_log_likelihood(query, train, cls, 2, exclude=None, background=1.0)


@heavy
def _AtlasKeypoints__match_all() -> Callable[[], object]:
    n = 2000
    atlases = _core.AtlasKeypoints(
        [_descriptors(n, s) for s in range(3)],
        [_points(n, s) for s in range(3)],
        [np.full(n, 2.0) for _ in range(3)],
        [np.ones(n, np.int32) for _ in range(3)],
    )
    test = (_descriptors(n, 9), _points(n, 9), np.full(n, 2.0))
    return lambda: atlases.match_all(
        *test, ratio=1.0, scale_factor=2.0, hough=True, hough_queries=0
    )


@heavy
def _TransferAtlases__transfer() -> Callable[[], object]:
    # ≈ 40 ms on a quiet 2-core Xeon: 96³ took 9–13 ms there, too quick to show anything
    shape = (160, 160, 160)
    labels = np.zeros(shape, np.int32)
    labels[30:120, 30:120, 30:120] = 1
    intensity = np.ones(shape, np.float32)
    atlases = _core.TransferAtlases([labels] * 2, [intensity] * 2)
    n = 2000
    rng = np.random.default_rng(0)
    atlas = rng.integers(0, 2, n).astype(np.uint32)
    shift = rng.integers(-3, 4, (n, 3)).astype(np.int32)
    label, weight, nu = np.ones(n, np.int32), np.ones(n), np.full(1, np.inf, np.float32)
    return lambda: atlases.transfer(intensity, atlas, label, shift, weight, nu, 0.5)


@pytest.mark.parametrize("name", sorted(HEAVY_CALLS))
def test_heavy_calls_release_the_gil(name: str) -> None:
    """While a heavy call runs, another Python thread keeps running."""
    call = HEAVY_CALLS[name]()
    ticks: list[float] = []  # when the other thread ran
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    worker = threading.Thread(target=count)
    worker.start()
    time.sleep(0.01)  # the counter is running
    # With the GIL held the counter runs only in the Python around the call (argument
    # conversion, a garbage collection at its start), never in its later part: ≥ 2 ticks
    # in the last 60% of one call of ≥ 15 ms prove the release. On a loaded machine the
    # counter thread may not be scheduled during one call: up to 20 calls.
    seen: list[tuple[float, int]] = []
    for _attempt in range(20):
        start = time.perf_counter()
        call()
        end = time.perf_counter()
        late = sum(start + 0.4 * (end - start) < t < end - 0.001 for t in ticks[-1000:])
        seen.append((round(end - start, 4), late))
        if end - start >= 0.015 and late >= 2:
            break
    stop.set()
    worker.join()
    assert max(e for e, _ in seen) >= 0.015, f"{name} too quick to show anything: {seen}"
    assert any(e >= 0.015 and d >= 2 for e, d in seen), f"{name}: (s, ticks) {seen}"


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, as in a terminal, even when the suite was started
    in the background (nohup, some CI runners), which passes SIGINT on ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
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


def test_no_library_module_imports_click() -> None:
    """The command line lives in keyfuse.cli alone: importing every other module of the
    package (the library a cluster worker runs) loads no click."""
    import pkgutil
    import subprocess
    import sys

    import keyfuse

    names = [
        m.name
        for m in pkgutil.walk_packages(keyfuse.__path__, "keyfuse.")
        if not m.name.startswith(("keyfuse.cli", "keyfuse.__main__"))
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print('click' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(names) > 30 and "keyfuse.batch_build" in names
    assert out.stdout.strip() == "False"
    # nor lazily, inside a function (keyfuse.cli's __init__ imports click)
    root = Path(keyfuse.__file__).parent
    lazy = [
        str(f.relative_to(root))
        for f in root.rglob("*.py")
        if f.parts[len(root.parts)] not in ("cli", "__main__.py")
        and re.search(r"^\s*(from|import) keyfuse\.cli\b", f.read_text(), flags=re.M)
    ]
    assert lazy == []


def test_request_stop_interrupts_a_call_on_another_thread() -> None:
    """Worker threads never see Ctrl-C: ``request_stop`` stops the keyfuse call they run
    (a batch on a thread pool uses it), and after ``clear_stop`` calls run normally."""
    vol = textured_volume((96, 96, 96), seed=3)
    start = time.perf_counter()
    full = kf.extract(vol)  # how long one whole extraction takes here
    whole = time.perf_counter() - start
    outcome: list[BaseException | None] = []

    def work() -> None:
        try:
            for _ in range(20):  # far longer than the test waits
                kf.extract(vol)
            outcome.append(None)
        except BaseException as exc:  # KeyboardInterrupt is what is expected
            outcome.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    time.sleep(0.05)
    stopped = time.perf_counter()
    _core.request_stop()
    try:
        worker.join(timeout=30)
        took = time.perf_counter() - stopped
    finally:
        _core.clear_stop()
    assert isinstance(outcome[0], KeyboardInterrupt), outcome
    assert took < max(0.5, 2 * whole), f"stopped after {took:.2f} s ({whole:.2f} s a call)"
    assert len(kf.extract(vol)) == len(full)  # the flag is withdrawn
