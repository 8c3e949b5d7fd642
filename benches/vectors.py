"""Vector and fused search benchmark; prints figures.

    .venv/bin/python benches/vectors.py [--vectors 100000] [--dim 512] [--quick]

Targets (issue 14): ``index.search(v, by="vector")`` answers in ≤ 20 ms per query with
100,000 × 512-d vectors (exact nearest neighbours, checked against a float64 numpy brute
force), and ``by="fused"`` (the fusion paper's eq. 4) adds ≤ 10% to the time of
``by="keypoints"`` (the soft-Jaccard search) on the same index and queries.

Part 1: an index of ``--vectors`` subjects, each with a 512-d vector (and a 2-keypoint set,
which the vector search ignores); median and 95th-percentile time of a k=10 search, for
Euclidean and cosine, the first query also timing the one-off build of the vector matrix.
Part 2: ``--subjects`` subjects × ``--keypoints`` keypoints and a vector each; median time
of a query (a noisy rescan of an indexed subject) by keypoints and by the fused model,
side by side with their ratio. The default sizes give one index searched exactly (60,000
keypoints), one searched with the kd-forest (200,000) and the same 200 subjects on disk in
shards of ``--shard-size`` keypoints (kd-forest). The fused keypoint term is the log of the
keypoint search's own soft Jaccard (the same k-NN pass), so the fused search costs that
pass plus the vector term.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import keyfuse as kf
from _synthetic import SharedGeometry, rerank


def vector_figures(n: int, dim: int, queries: int, rng: np.random.Generator) -> None:
    geometry = SharedGeometry(2, 0)
    kps = geometry.keypoints(rerank(rng.random((2, 64))))
    mat = rng.standard_normal((n, dim), dtype=np.float32)
    index = kf.Index()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in range(0, n, 5000):
            index.add_many(
                (f"s{i:06d}", kps, mat[i], {}) for i in range(start, min(n, start + 5000))
            )
    t_add = time.perf_counter() - t0
    qs = rng.standard_normal((queries, dim), dtype=np.float32)
    t0 = time.perf_counter()
    index.search(qs[0], k=10, by="vector")
    first = time.perf_counter() - t0
    print(f"vector search: {n:,} × {dim}-d (index built in {t_add:.1f} s)")
    print(
        f"  first query (builds the float32 matrix and its int8 copy once): {1000 * first:.1f} ms"
    )
    m64 = mat.astype(np.float64)
    for metric in ("euclidean", "cosine"):
        times = []
        exact = 0
        for i, q in enumerate(qs):
            t0 = time.perf_counter()
            hits = index.search(q, k=10, by="vector", metric=metric)
            times.append(time.perf_counter() - t0)
            if i < 5:
                if metric == "cosine":
                    s = m64 @ q / (np.linalg.norm(m64, axis=1) * np.linalg.norm(q))
                else:
                    s = -np.linalg.norm(m64 - q, axis=1)
                want = np.lexsort((np.arange(n), -s))[:10]
                exact += hits.ids == [f"s{j:06d}" for j in want]
        t = 1000 * np.asarray(times)
        print(
            f"  {metric:<9}  median {np.median(t):6.2f} ms  p95 {np.percentile(t, 95):6.2f} ms"
            f"  (target ≤ 20 ms)  equal to brute force: {exact}/{min(5, len(qs))}"
        )


def fused_figures(
    n: int,
    n_kp: int,
    dim: int,
    queries: int,
    rng: np.random.Generator,
    shard_size: int | None = None,
) -> None:
    """Keypoint vs fused search on one index, medians side by side (``shard_size``: an
    on-disk index in shards of that many keypoints, else one in memory)."""
    geometry = SharedGeometry(n_kp, 1)
    tmp = tempfile.TemporaryDirectory(prefix="kf-vectors-") if shard_size else None
    index = (
        kf.Index(Path(tmp.name) / "ix.kfi", mode="x", shard_size=shard_size)
        if tmp is not None
        else kf.Index()
    )
    anat = []
    for start in range(0, n, 50):
        rows = []
        for s in range(start, min(n, start + 50)):
            vals = rng.random((n_kp, 64), dtype=np.float32) * 64
            rows.append((f"s{s:05d}", geometry.keypoints(rerank(vals)), rng.random(dim), {}))
            anat.append(vals)
        index.add_many(rows)
    pick = rng.choice(n, queries, replace=False)
    qs = [
        (
            geometry.keypoints(rerank(anat[p] + 6 * rng.standard_normal(anat[p].shape))),
            index.vector(f"s{p:05d}") + 0.05 * rng.standard_normal(dim),
        )
        for p in pick
    ]
    index.search(qs[0], k=10, by="fused")  # caches (forests, vector matrix)
    index.search(qs[0], k=10)
    t_kp, t_fu, found = [], [], 0
    for i, (p, q) in enumerate(zip(pick, qs, strict=True)):
        # alternate which goes first, so neither always meets a warmer cache
        for by in ("keypoints", "fused") if i % 2 == 0 else ("fused", "keypoints"):
            t0 = time.perf_counter()
            hits = index.search(q, k=10, by=by)
            (t_kp if by == "keypoints" else t_fu).append(time.perf_counter() - t0)
            if by == "fused":
                found += hits.ids[0] == f"s{p:05d}"
    kp, fu = 1000 * np.median(t_kp), 1000 * np.median(t_fu)
    mode = "exact" if index.n_keypoints < index.exact_below else "kd-forest"
    layout = f"{len(index.shards)} shards on disk" if tmp is not None else "in memory"
    print(
        f"fused vs keypoint search: {n} subjects × {n_kp} keypoints ({mode}, {layout}), "
        f"{dim}-d vectors, {len(pick)} queries"
    )
    print(
        f"  median keypoints {kp:6.1f} ms  fused {fu:6.1f} ms  ratio {fu / kp:.3f} "
        f"(target ≤ 1.10)  fused rank-1 = rescanned subject: {found}/{len(pick)}"
    )
    if tmp is not None:
        del index
        tmp.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--subjects", type=int, nargs="+", default=[60, 200])
    ap.add_argument("--keypoints", type=int, default=1000)
    ap.add_argument(
        "--shard-size",
        type=int,
        default=60_000,
        help="also an on-disk index of the largest --subjects in shards of this many "
        "keypoints (0: skip)",
    )
    ap.add_argument("--vector-part", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test, seconds)")
    args = ap.parse_args()
    if args.quick:
        args.vectors, args.queries, args.subjects, args.keypoints = 5000, 10, [30], 200
        args.shard_size = 2000
    rng = np.random.default_rng(7)
    if args.vector_part:
        vector_figures(args.vectors, args.dim, args.queries, rng)
    nq = min(args.queries, 20)
    for n in args.subjects:
        fused_figures(n, args.keypoints, args.dim, nq, rng)
    if args.shard_size:
        n = max(args.subjects)
        fused_figures(n, args.keypoints, args.dim, nq, rng, shard_size=args.shard_size)


if __name__ == "__main__":
    main()
