"""CPU vs GPU in one run (issue 6, TARGETS.md: extraction ≤ 0.1 s per MNI 1 mm volume on an
H100, pairwise scoring of 1,000 subjects ≤ 5 s).

Prints, for the rayon (CPU) path and, when a CUDA device is usable, the GPU path:

* extraction time per MNI152 1 mm volume (data already in host memory; median of
  ``--repeats``): ``kf.extract`` on the CPU, and the part that runs on the GPU today, the
  DoG scale space with extrema (``keyfuse.gpu.scale_space``; ``kf.extract`` with
  ``device="cuda"`` raises ``DeviceUnavailableError`` until the descriptor stage has a GPU
  path);
* k-NN throughput: exact k = 2 search of ``--queries`` rank descriptors in a database of
  ``--database`` rows (queries/s and distance evaluations/s);
* one query set against ``--search-subjects`` subjects held on the GPU (GPU only);
* all-pairs soft-Jaccard scoring (k = 30) of ``--subjects`` synthetic subjects of
  ``--per-subject`` keypoints. The GPU scores the whole cohort exactly. The CPU cannot do
  1,000 subjects here in reasonable time, so it is measured on small cohorts and
  extrapolated: exact brute force × (N/n)² (quadratic), the default kd-forest × N/n (a
  fixed number of checks per query, so about linear; tree depth adds a log factor, so this
  is a lower bound) — both printed as "extrapolated".

Without a GPU it says "GPU: unavailable (<reason>)", skips the GPU lines and prints the
CPU figures. Everything goes through the public API (``kf.extract``, ``kf.Index``,
``keyfuse.neighbors.knn``, ``keyfuse.gpu.scale_space``); ``KEYFUSE_CUDA_KNN`` picks the
CUDA k-NN kernel (dp4a or mma).

Run: ``.venv/bin/python benches/gpu.py [--quick]`` (``--quick``: small sizes, the template
at 3 mm, one repeat).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import keyfuse as kf
from _synthetic import SharedGeometry
from keyfuse.device import cuda_info
from keyfuse.gpu import scale_space
from keyfuse.neighbors import knn


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _ranks(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.argsort(rng.random((n, 64)), axis=1).astype(np.uint8)


def _cohort(n_subjects: int, per: int, seed: int = 0) -> np.ndarray:
    """Subjects drawn around a few family prototypes (so neighbours are informative)."""
    rng = np.random.default_rng(seed)
    families = [_ranks(per, rng) for _ in range(max(1, n_subjects // 4))]
    out = np.empty((n_subjects * per, 64), np.uint8)
    for s in range(n_subjects):
        d = families[s % len(families)].copy()
        rows = np.arange(per)
        for _ in range(8):  # 8 random rank swaps per row: a noisy copy of the prototype
            a, b = rng.integers(0, 64, size=(2, per))
            tmp = d[rows, a].copy()
            d[rows, a] = d[rows, b]
            d[rows, b] = tmp
        out[s * per : (s + 1) * per] = d
    return out


def _each_knn_kernel() -> Iterator[str]:
    """Run the loop body once per CUDA k-NN kernel (``KEYFUSE_CUDA_KNN``), then restore."""
    try:
        for kernel in ("dp4a", "mma"):
            os.environ["KEYFUSE_CUDA_KNN"] = kernel
            yield kernel
    finally:
        os.environ.pop("KEYFUSE_CUDA_KNN", None)


def _index(descriptors: np.ndarray, n_subjects: int) -> kf.Index:
    """A kf.Index with the published kernel (K = 30, the one the GPU scores) of
    ``n_subjects`` equal slices of ``descriptors``; every subject shares one geometry."""
    per = len(descriptors) // n_subjects
    geometry = SharedGeometry(per)
    index = kf.Index(kernel="published")
    for s in range(n_subjects):
        index.add(f"s{s:06d}", geometry.keypoints(descriptors[s * per : (s + 1) * per]))
    return index


def bench_extract(gpu: bool, repeats: int, resolution: float) -> None:
    img = kf.datasets.mni152(resolution_mm=resolution)
    print(f"extraction, MNI152 {resolution:g} mm {img.shape} (median of {repeats}):")
    n_cpu = len(kf.extract(img, device="cpu"))
    t_cpu = _median_time(lambda: kf.extract(img, device="cpu"), repeats)
    print(f"  CPU  {t_cpu:8.3f} s   ({n_cpu} rows)")
    if not gpu:
        return
    # kf.extract(device="cuda") raises DeviceUnavailableError: the descriptor stage has no
    # GPU path, so only the scale space with its extrema is timed on the GPU
    octaves = scale_space(img)  # warm-up: context + kernels
    t_ss = _median_time(lambda: scale_space(img), repeats)
    n_ext = sum(len(o.extrema) for o in octaves)
    print(
        f"  GPU scale space + extrema only {t_ss:8.3f} s   ({n_ext} raw extrema; "
        f"{t_cpu / t_ss:.1f}× less than the whole CPU extraction; target ≤ 0.1 s at 1 mm)"
    )


def bench_knn(gpu: bool, n_db: int, n_q: int, repeats: int) -> None:
    rng = np.random.default_rng(1)
    db, q = _ranks(n_db, rng), _ranks(n_q, rng)
    print(f"k-NN, exact, k=2: {n_q} queries × {n_db} rows:")
    t = _median_time(lambda: knn(db, q, 2, device="cpu"), repeats)
    print(f"  CPU  {t:8.3f} s   {n_q / t:12.0f} queries/s   {n_q * n_db / t / 1e9:8.2f} G dist/s")
    if not gpu:
        return
    i_cpu, d_cpu = knn(db, q, 2, device="cpu")
    big = 20 * n_db
    db_big = _ranks(big, rng)
    for kernel in _each_knn_kernel():
        i_gpu, d_gpu = knn(db, q, 2, device="cuda")
        same = bool(np.array_equal(i_gpu, i_cpu) and np.array_equal(d_gpu, d_cpu))
        t = _median_time(lambda: knn(db, q, 2, device="cuda"), repeats)
        rate = n_q * n_db / t / 1e9
        print(
            f"  GPU {kernel:4s} {t:8.3f} s   {n_q / t:12.0f} queries/s   {rate:8.2f} G dist/s"
            f"   identical to CPU: {same}"
        )
        t = _median_time(lambda: knn(db_big, q, 2, device="cuda"), repeats)
        print(f"  GPU {kernel:4s} {t:8.3f} s   {n_q * big / t / 1e9:8.2f} G dist/s on {big} rows")


def bench_pairwise(gpu: bool, n_subjects: int, per: int, cpu_exact: int, cpu_forest: int) -> None:
    print(f"all-pairs soft Jaccard, k=30, {n_subjects} subjects × {per} keypoints:")
    small = _index(_cohort(cpu_exact, per), cpu_exact)
    t = time.perf_counter()
    cpu_s = small.pairwise(exact=True, device="cpu")
    t = time.perf_counter() - t
    scale = (n_subjects / cpu_exact) ** 2
    print(
        f"  CPU exact   {t:8.3f} s for {cpu_exact} subjects → extrapolated "
        f"{t * scale:10.1f} s for {n_subjects} ({t * scale / n_subjects:.3f} s/image)"
    )
    forest = _index(_cohort(cpu_forest, per, seed=1), cpu_forest)
    t = time.perf_counter()
    forest.pairwise(exact=False, device="cpu")  # the first approximate search builds the forest
    t = time.perf_counter() - t
    scale = n_subjects / cpu_forest
    print(
        f"  CPU forest  {t:8.3f} s for {cpu_forest} subjects → extrapolated "
        f"{t * scale:10.1f} s for {n_subjects} ({t * scale / n_subjects:.3f} s/image)"
    )
    if not gpu:
        return
    err = float(np.abs(small.pairwise(device="cuda") - cpu_s).max())
    data = _cohort(n_subjects, per, seed=2)
    results = {}
    for kernel in _each_knn_kernel():
        # a fresh index per kernel: the first GPU call uploads the descriptors, as the
        # one-shot scoring of a new cohort would
        cohort = _index(data, n_subjects)
        t = time.perf_counter()
        results[kernel] = cohort.pairwise(device="cuda")
        t = time.perf_counter() - t
        print(
            f"  GPU exact ({kernel:4s}) {t:8.3f} s for {n_subjects} subjects "
            f"({t / n_subjects:.4f} s/image, upload included)   target ≤ 5 s"
        )
    same = bool(np.array_equal(results["dp4a"], results["mma"]))
    print(f"  max |GPU − CPU| on {cpu_exact} subjects: {err:.2e}; dp4a == mma: {same}")


def bench_search(gpu: bool, n_subjects: int, per: int, repeats: int) -> None:
    """One query set against a large GPU-resident cohort (TARGETS.md: 25,000 subjects)."""
    if not gpu:
        return
    print(f"one query ({per} keypoints) against {n_subjects} subjects × {per} keypoints, GPU:")
    rng = np.random.default_rng(5)
    # random bytes in 0..63: the brute-force cost does not depend on the content
    data = rng.integers(0, 64, size=(n_subjects * per, 64), dtype=np.uint8)
    index = _index(data, n_subjects)
    query = SharedGeometry(per).keypoints(data[:per])
    first = index.subjects[0]
    t = time.perf_counter()
    index.scores(query, exclude=first, device="cuda")  # uploads the descriptors once
    print(f"  upload + first search {time.perf_counter() - t:8.3f} s ({data.nbytes / 1e9:.1f} GB)")
    for kernel in _each_knn_kernel():
        index.scores(query, exclude=first, device="cuda")
        t = _median_time(lambda: index.scores(query, exclude=first, device="cuda"), repeats)
        print(f"  search ({kernel:4s}) {t:8.3f} s per query   (CPU target ≤ 0.3 s, approximate)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--per-subject", type=int, default=2000)
    ap.add_argument("--cpu-exact-subjects", type=int, default=6)
    ap.add_argument("--cpu-forest-subjects", type=int, default=16)
    ap.add_argument("--database", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--search-subjects", type=int, default=25_000)
    ap.add_argument("--resolution", type=float, default=1.0, help="MNI152 voxel size (mm)")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.per_subject, args.subjects, args.resolution = 1, 300, 50, 3.0
        args.cpu_exact_subjects, args.cpu_forest_subjects = 4, 6
        args.database, args.queries, args.search_subjects = 5000, 500, 200
    info = cuda_info()
    gpu = bool(info["available"])
    if gpu:
        print(f"GPU: {info['device_name']} (sm_{''.join(map(str, info['compute_capability']))})")
    else:
        print(f"GPU: unavailable ({info['reason']}): GPU figures skipped, CPU figures only")
    if not args.skip_extract:
        bench_extract(gpu, args.repeats, args.resolution)
    bench_knn(gpu, args.database, args.queries, args.repeats)
    bench_pairwise(
        gpu, args.subjects, args.per_subject, args.cpu_exact_subjects, args.cpu_forest_subjects
    )
    bench_search(gpu, args.search_subjects, args.per_subject, args.repeats)


if __name__ == "__main__":
    main()
