"""CPU vs GPU in one run (issue 6, TARGETS.md: extraction ≤ 0.1 s per MNI 1 mm volume on an
H100, pairwise scoring of 1,000 subjects ≤ 5 s).

Prints, for the rayon (CPU) path and, when a CUDA device is usable, the GPU path:

* extraction time per MNI152 1 mm volume (data already in host memory; median of
  ``--repeats``). Until ``_core.gpu_extract3d`` exists the GPU line times the part that
  runs on the GPU today: the DoG scale space with extrema (``_core.gpu_scale_space``);
* k-NN throughput: exact k = 2 search of ``--queries`` rank descriptors in a database of
  ``--database`` rows (queries/s and distance evaluations/s);
* one query set against ``--search-subjects`` subjects held on the GPU (GPU only);
* all-pairs soft-Jaccard scoring (k = 30) of ``--subjects`` synthetic subjects of
  ``--per-subject`` keypoints. The GPU scores the whole cohort exactly. The CPU cannot do
  1,000 subjects here in reasonable time, so it is measured on small cohorts and
  extrapolated: exact brute force × (N/n)² (quadratic), the default kd-forest × N/n (a
  fixed number of checks per query, so about linear; tree depth adds a log factor, so this
  is a lower bound) — both printed as "extrapolated".

Without a GPU it prints the CPU figures and "GPU: unavailable (<reason>)".

Run: ``.venv/bin/python benches/gpu.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import keyfuse as kf
from keyfuse import _core
from keyfuse.device import cuda_info


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _ranks(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.argsort(rng.random((n, 64)), axis=1).astype(np.uint8)


def _cohort(n_subjects: int, per: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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
    return out, np.full(n_subjects, per, dtype=np.int64)


def bench_extract(gpu: bool, repeats: int) -> None:
    img = kf.datasets.mni152(resolution_mm=1)
    data = np.ascontiguousarray(img.data, dtype=np.float32)
    print(f"extraction, MNI152 1 mm {img.shape} (median of {repeats}):")
    n_cpu = len(kf.extract(img, device="cpu"))
    t_cpu = _median_time(lambda: kf.extract(img, device="cpu"), repeats)
    print(f"  CPU  {t_cpu:8.3f} s   ({n_cpu} rows)")
    if not gpu:
        return
    if hasattr(_core, "gpu_extract3d"):
        n_gpu = len(kf.extract(img, device="cuda"))
        t_gpu = _median_time(lambda: kf.extract(img, device="cuda"), repeats)
        print(f"  GPU  {t_gpu:8.3f} s   ({n_gpu} rows)   target ≤ 0.1 s")
    _core.gpu_scale_space(data)  # warm-up: context + kernels
    t_ss = _median_time(lambda: _core.gpu_scale_space(data), repeats)
    octaves = _core.gpu_scale_space(data)
    n_ext = sum(len(o["extrema"]) for o in octaves)  # type: ignore[arg-type]
    print(f"  GPU scale space + extrema only {t_ss:8.3f} s   ({n_ext} raw extrema)")


def bench_knn(gpu: bool, n_db: int, n_q: int, repeats: int) -> None:
    rng = np.random.default_rng(1)
    db, q = _ranks(n_db, rng), _ranks(n_q, rng)
    print(f"k-NN, exact, k=2: {n_q} queries × {n_db} rows:")
    t = _median_time(lambda: _core.knn_exact(db, q, 2), repeats)
    print(f"  CPU  {t:8.3f} s   {n_q / t:12.0f} queries/s   {n_q * n_db / t / 1e9:8.2f} G dist/s")
    if not gpu:
        return
    i_cpu, d_cpu = _core.knn_exact(db, q, 2)
    big = 20 * n_db
    db_big = _ranks(big, rng)
    for kernel in ("dp4a", "mma"):
        os.environ["KEYFUSE_CUDA_KNN"] = kernel
        i_gpu, d_gpu = _core.gpu_knn(db, q, 2)
        same = bool(np.array_equal(i_gpu, i_cpu) and np.array_equal(d_gpu, d_cpu))
        t = _median_time(lambda: _core.gpu_knn(db, q, 2), repeats)
        rate = n_q * n_db / t / 1e9
        print(
            f"  GPU {kernel:4s} {t:8.3f} s   {n_q / t:12.0f} queries/s   {rate:8.2f} G dist/s"
            f"   identical to CPU: {same}"
        )
        t = _median_time(lambda: _core.gpu_knn(db_big, q, 2), repeats)
        print(f"  GPU {kernel:4s} {t:8.3f} s   {n_q * big / t / 1e9:8.2f} G dist/s on {big} rows")
    os.environ.pop("KEYFUSE_CUDA_KNN", None)


def bench_pairwise(gpu: bool, n_subjects: int, per: int, cpu_exact: int, cpu_forest: int) -> None:
    print(f"all-pairs soft Jaccard, k=30, {n_subjects} subjects × {per} keypoints:")
    small, sizes = _cohort(cpu_exact, per)
    cohort = _core.Cohort()
    for s in range(cpu_exact):
        cohort.add(small[s * per : (s + 1) * per])
    t = time.perf_counter()
    cpu_s = cohort.pairwise(k=30, exact=True)
    t = time.perf_counter() - t
    scale = (n_subjects / cpu_exact) ** 2
    print(
        f"  CPU exact   {t:8.3f} s for {cpu_exact} subjects → extrapolated "
        f"{t * scale:10.1f} s for {n_subjects} ({t * scale / n_subjects:.3f} s/image)"
    )
    mid, _ = _cohort(cpu_forest, per, seed=1)
    forest = _core.Cohort()
    for s in range(cpu_forest):
        forest.add(mid[s * per : (s + 1) * per])
    t = time.perf_counter()
    forest.build_forest()
    forest.pairwise(k=30)
    t = time.perf_counter() - t
    scale = n_subjects / cpu_forest
    print(
        f"  CPU forest  {t:8.3f} s for {cpu_forest} subjects → extrapolated "
        f"{t * scale:10.1f} s for {n_subjects} ({t * scale / n_subjects:.3f} s/image)"
    )
    if not gpu:
        return
    gpu_s = _core.gpu_cohort_pairwise(small, sizes, k=30)
    err = float(np.abs(np.asarray(gpu_s) - np.asarray(cpu_s)).max())
    data, sizes_all = _cohort(n_subjects, per, seed=2)
    results = {}
    for kernel in ("dp4a", "mma"):
        os.environ["KEYFUSE_CUDA_KNN"] = kernel
        t = time.perf_counter()
        results[kernel] = _core.gpu_cohort_pairwise(data, sizes_all, k=30)
        t = time.perf_counter() - t
        print(
            f"  GPU exact ({kernel:4s}) {t:8.3f} s for {n_subjects} subjects "
            f"({t / n_subjects:.4f} s/image)   target ≤ 5 s"
        )
    os.environ.pop("KEYFUSE_CUDA_KNN", None)
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
    sizes = np.full(n_subjects, per, dtype=np.int64)
    t = time.perf_counter()
    cohort = _core.GpuCohort(data, sizes)
    print(f"  upload {time.perf_counter() - t:8.3f} s ({data.nbytes / 1e9:.1f} GB)")
    q = data[:per]
    for kernel in ("dp4a", "mma"):
        os.environ["KEYFUSE_CUDA_KNN"] = kernel
        cohort.search(q, exclude=0)
        t = _median_time(lambda: cohort.search(q, exclude=0), repeats)
        print(f"  search ({kernel:4s}) {t:8.3f} s per query   (CPU target ≤ 0.3 s, approximate)")
    os.environ.pop("KEYFUSE_CUDA_KNN", None)


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
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.per_subject, args.subjects = 1, 300, 50
        args.cpu_exact_subjects, args.cpu_forest_subjects = 4, 6
        args.database, args.queries, args.search_subjects = 5000, 500, 200
    info = cuda_info()
    gpu = bool(info["available"])
    if gpu:
        print(f"GPU: {info['device_name']} (sm_{''.join(map(str, info['compute_capability']))})")
    else:
        print(f"GPU: unavailable ({info['reason']})")
    if not args.skip_extract:
        bench_extract(gpu, args.repeats)
    bench_knn(gpu, args.database, args.queries, args.repeats)
    bench_pairwise(
        gpu, args.subjects, args.per_subject, args.cpu_exact_subjects, args.cpu_forest_subjects
    )
    bench_search(gpu, args.search_subjects, args.per_subject, args.repeats)


if __name__ == "__main__":
    main()
