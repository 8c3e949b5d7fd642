"""Process-level behaviour: the GIL is released during heavy calls, forked workers work."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np

import keyfuse as kf
from conftest import textured_volume


def test_extraction_releases_the_gil() -> None:
    vol = textured_volume((72, 72, 72), seed=1)
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    kf.extract(vol[:24, :24, :24])  # warm up
    worker = threading.Thread(target=count)
    worker.start()
    start = time.perf_counter()
    kf.extract(vol)
    elapsed = time.perf_counter() - start
    stop.set()
    worker.join()
    # with the GIL held the counter could not advance during the call
    assert ticks >= max(3, int(0.2 * elapsed / 0.001))


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
