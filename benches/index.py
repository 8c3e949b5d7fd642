"""Index search benchmark: one query against N subjects × 2,000 keypoints; prints figures.

    .venv/bin/python benches/index.py [--sizes 1000 5000 25000] [--keypoints 2000] [--quick]

Target: a query against 25,000 subjects (50 M descriptors) in ≤ 0.3 s with recall@1 ≥ 0.95
against exact search and ≤ 6 GB of index RAM. For every size it prints: generation time,
kd-forest build time (the first approximate search builds it), the index's search memory
(``kf.Index.memory_bytes``) and the process's peak RSS, the median query time (a query is a
noisy "rescan" of an indexed subject with all its keypoints), whether the top hit is the
rescanned subject, and recall@1 of the approximate search against exact brute force on the
same queries (cut to ``--recall-keypoints`` keypoints each, since exact search over tens of
millions of descriptors takes seconds per query keypoint batch).

Subjects come in families of 4 sharing 60% of their keypoints. Only their descriptors
differ: every subject shares one set of geometry arrays, so of the keypoints that a
``kf.Index`` keeps for subjects added in this process only the descriptors and world
coordinates add to the peak RSS beyond the search memory (see docs/decisions.md).

Then (``--opened N``) a ``kf.Index`` of N subjects with full keypoint geometry is saved and
opened in a fresh process: its load time, peak memory (an opened index keeps only the
descriptors) and the time to read one subject's keypoints back from disk.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

import keyfuse as kf
from _synthetic import SharedGeometry, rerank


def build(
    n_subjects: int, n_kp: int, trees: int, checks: int, seed: int = 0
) -> tuple[kf.Index, dict[int, np.ndarray], SharedGeometry]:
    """An index of synthetic subjects, and the descriptor values ("anatomy") of a few of
    them, to rescan them later."""
    rng = np.random.default_rng(seed)
    geometry = SharedGeometry(n_kp, seed)
    index = kf.Index(trees=trees, checks=checks)
    proto = np.zeros((0, 64), np.float32)
    keep: dict[int, np.ndarray] = {}
    n_sh = int(0.6 * n_kp)
    for s in range(n_subjects):
        if s % 4 == 0:
            proto = rng.random((n_kp, 64), dtype=np.float32) * 64
        own = rng.random((n_kp - n_sh, 64), dtype=np.float32) * 64
        vals = np.concatenate([proto[rng.choice(n_kp, n_sh, replace=False)], own])
        vals += 8.0 * rng.standard_normal(vals.shape, dtype=np.float32)
        index.add(f"s{s:06d}", geometry.keypoints(rerank(vals)))
        if s % max(1, n_subjects // 20) == 0:
            keep[s] = vals
    return index, keep, geometry


def search_figures(n: int, args: argparse.Namespace, rng: np.random.Generator) -> None:
    t0 = time.perf_counter()
    index, keep, geometry = build(n, args.keypoints, args.trees, args.checks)
    t_gen = time.perf_counter() - t0
    # the kd-forest is built by the first approximate search: time one with a single
    # query keypoint
    w0, c0 = time.perf_counter(), time.process_time()
    index.scores(geometry.keypoints(rerank(keep[0]))[:1], exact=False)
    t_build, c_build = time.perf_counter() - w0, time.process_time() - c0
    mem = index.memory_bytes() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    subjects = sorted(keep)[: args.queries]
    walls, cpus, correct, agree = [], [], 0, 0
    for s in subjects:
        vals = keep[s] + 5.0 * rng.standard_normal(keep[s].shape, dtype=np.float32)
        query = geometry.keypoints(rerank(vals))
        w, c = time.perf_counter(), time.process_time()
        scores = index.scores(query, exact=False)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        correct += int(np.argmax(scores) == s)
        sub = query[np.sort(rng.choice(len(query), args.recall_keypoints, replace=False))]
        agree += int(
            np.argmax(index.scores(sub, exact=False)) == np.argmax(index.scores(sub, exact=True))
        )
    m = len(subjects)
    print(
        f"N={n:6d} ({index.n_keypoints / 1e6:.1f} M descriptors): generate {t_gen:.0f} s, "
        f"forest {t_build:.1f} s wall / {c_build:.1f} s CPU; index {mem:.2f} GiB, "
        f"peak RSS {rss:.2f} GiB\n"
        f"          query {np.median(walls):.3f} s wall, {np.median(cpus):.3f} s CPU "
        f"(median of {m}); top-1 = rescanned subject {correct}/{m}; recall@1 vs exact "
        f"({args.recall_keypoints}-keypoint queries) {agree}/{m}",
        flush=True,
    )


# Run in a fresh interpreter: open a saved index, report its load time and memory.
# (peak memory from VmHWM: ru_maxrss would keep the parent's peak across exec)
_OPEN_SCRIPT = """
import sys, time
import keyfuse as kf
t = time.perf_counter()
ix = kf.Index.load(sys.argv[1])
load = time.perf_counter() - t
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]
rss = int(hwm.split()[1]) / 2**20
t = time.perf_counter()
kps = ix.keypoints(ix.subjects[len(ix) // 2])
one = time.perf_counter() - t
print(f"{load:.2f} {rss:.3f} {ix.memory_bytes() / 2**30:.3f} {one * 1e3:.1f} {len(kps)}")
"""


def opened_index(n: int, n_kp: int) -> None:
    """Save a kf.Index of n synthetic subjects (with full keypoint geometry), then open it
    in a fresh process: an opened index keeps only the descriptors in memory."""
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/cohort.kfi"
        ix = kf.Index()
        t0 = time.perf_counter()
        for s in range(n):
            desc = rerank(rng.random((n_kp, 64), dtype=np.float32))
            xyz = rng.uniform(-80, 80, (n_kp, 3))
            ix.add(f"s{s:06d}", kf.KeypointSet(xyz, rng.uniform(1, 6, n_kp), descriptors=desc))
        ix.save(path)
        del ix
        built = time.perf_counter() - t0
        out = subprocess.run(
            [sys.executable, "-c", _OPEN_SCRIPT, path], capture_output=True, text=True, check=True
        ).stdout.split()
        load, rss, memory, one, rows = out
        print(
            f"opened kf.Index, {n} subjects × {n_kp} keypoints ({n * n_kp / 1e6:.1f} M; built and "
            f"saved in {built:.0f} s): load {load} s, process peak RSS {rss} GiB (index "
            f"{memory} GiB); one subject's keypoints read back in {one} ms ({rows} rows)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--keypoints", type=int, default=2000)
    ap.add_argument("--trees", type=int, default=8)
    ap.add_argument("--checks", type=int, default=64)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--recall-keypoints", type=int, default=200)
    ap.add_argument(
        "--opened",
        type=int,
        default=2000,
        metavar="N",
        help="also save a kf.Index of N subjects and open it in a fresh process (0: skip)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, seconds)")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.keypoints, args.queries = [60], 200, 3
        args.recall_keypoints, args.opened = 50, 20
    rng = np.random.default_rng(123)
    print(
        f"# keyfuse index search: {args.keypoints} keypoints/subject, {args.trees} trees, "
        f"{args.checks} checks, kf.Index's default kernel ({kf.Index().kernel}, "
        f"K={kf.Index().k})"
    )
    for n in args.sizes:
        search_figures(n, args, rng)
    if args.opened:
        opened_index(args.opened, args.keypoints)


if __name__ == "__main__":
    main()
