"""Index search benchmark: one query against N subjects × 2,000 keypoints; prints figures.

    .venv/bin/python benches/index.py [--sizes 1000 5000 25000] [--keypoints 2000]

Target: a query against 25,000 subjects (50 M descriptors) in ≤ 0.3 s with recall@1 ≥ 0.95
against exact search and ≤ 6 GB of index RAM. For every size it prints: generation and
kd-forest build time, engine memory and process peak RSS, the median query time (a query is
a noisy "rescan" of an indexed subject with all its keypoints), whether the top hit is the
rescanned subject, and recall@1 of the approximate search against exact brute force on the
same queries (cut to ``--recall-keypoints`` keypoints each, since exact search over tens of
millions of descriptors takes seconds per query keypoint batch).

The bench drives the Rust search engine of ``kf.Index`` (``keyfuse._core.Cohort``) directly:
at this scale holding every keypoint's full geometry as Python objects is not the point
being measured. Subjects come in families of 4 sharing 60% of their keypoints.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from keyfuse import _core
from keyfuse.matching import _kernel_defaults

# kf.Index's default soft-Jaccard kernel
_post, _k, _cap = _kernel_defaults("posterior", None, None)
KERNEL = {"k": _k, "posterior": _post, "alpha2_cap_fraction": _cap}


def rerank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, axis=1)
    out = np.empty(x.shape, dtype=np.uint8)
    np.put_along_axis(out, order, np.arange(x.shape[1], dtype=np.uint8)[None], axis=1)
    return out


def build(n_subjects: int, n_kp: int, trees: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    engine = _core.Cohort(trees=trees)
    protos: dict[int, np.ndarray] = {}
    keep: dict[int, np.ndarray] = {}
    n_sh = int(0.6 * n_kp)
    for s in range(n_subjects):
        if s % 4 == 0:
            protos = {0: rng.random((n_kp, 64), dtype=np.float32) * 64}
        own = rng.random((n_kp - n_sh, 64), dtype=np.float32) * 64
        vals = np.concatenate([protos[0][rng.choice(n_kp, n_sh, replace=False)], own])
        vals += 8.0 * rng.standard_normal(vals.shape, dtype=np.float32)
        engine.add(rerank(vals))
        if s % max(1, n_subjects // 20) == 0:
            keep[s] = vals  # the "anatomy" of a few subjects, to rescan them later
    return engine, keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--keypoints", type=int, default=2000)
    ap.add_argument("--trees", type=int, default=8)
    ap.add_argument("--checks", type=int, default=64)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--recall-keypoints", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(123)
    print(
        f"# keyfuse index search: {args.keypoints} keypoints/subject, {args.trees} trees, "
        f"{args.checks} checks, kf.Index's default kernel (posterior, K={KERNEL['k']})"
    )
    for n in args.sizes:
        t0 = time.perf_counter()
        engine, keep = build(n, args.keypoints, args.trees)
        t_gen = time.perf_counter() - t0
        w0, c0 = time.perf_counter(), time.process_time()
        engine.build_forest()
        t_build, c_build = time.perf_counter() - w0, time.process_time() - c0
        mem = engine.memory_bytes() / 2**30
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        subjects = sorted(keep)[: args.queries]
        walls, cpus, correct, agree = [], [], 0, 0
        for s in subjects:
            vals = keep[s] + 5.0 * rng.standard_normal(keep[s].shape, dtype=np.float32)
            q = rerank(vals)
            w, c = time.perf_counter(), time.process_time()
            scores = engine.search(q, exact=False, checks=args.checks, **KERNEL)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
            correct += int(np.argmax(scores) == s)
            sub = np.ascontiguousarray(q[rng.choice(len(q), args.recall_keypoints, replace=False)])
            ap_top = np.argmax(engine.search(sub, exact=False, checks=args.checks, **KERNEL))
            ex_top = np.argmax(engine.search(sub, exact=True, **KERNEL))
            agree += int(ap_top == ex_top)
        m = len(subjects)
        print(
            f"N={n:6d} ({engine.n_points / 1e6:.1f} M descriptors): generate {t_gen:.0f} s, "
            f"forest {t_build:.1f} s wall / {c_build:.1f} s CPU; engine {mem:.2f} GiB, "
            f"peak RSS {rss:.2f} GiB\n"
            f"          query {np.median(walls):.3f} s wall, {np.median(cpus):.3f} s CPU "
            f"(median of {m}); top-1 = rescanned subject {correct}/{m}; recall@1 vs exact "
            f"({args.recall_keypoints}-keypoint queries) {agree}/{m}",
            flush=True,
        )
        del engine


if __name__ == "__main__":
    main()
