"""Index search benchmark: one query against N subjects × 2,000 keypoints; prints figures.

    .venv/bin/python benches/index.py [--sizes 1000 5000 25000] [--keypoints 2000]

Target: a query against 25,000 subjects (50 M descriptors) in ≤ 0.3 s with recall@1 ≥ 0.95
against exact search and ≤ 6 GB of index RAM. For every size it prints: generation and
kd-forest build time, engine memory and process peak RSS, the median query time (a query is
a noisy "rescan" of an indexed subject with all its keypoints), whether the top hit is the
rescanned subject, and recall@1 of the approximate search against exact brute force on the
same queries (cut to ``--recall-keypoints`` keypoints each, since exact search over tens of
millions of descriptors takes seconds per query keypoint batch).

Then (``--opened N``) a ``kf.Index`` of N subjects with full keypoint geometry is saved and
opened in a fresh process: its load time, peak memory (an opened index keeps only the
descriptors) and the time to read one subject's keypoints back from disk.

The search figures drive the Rust search engine of ``kf.Index`` (``keyfuse._core.Cohort``) directly:
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
    ap.add_argument(
        "--opened",
        type=int,
        default=2000,
        metavar="N",
        help="also save a kf.Index of N subjects and open it in a fresh process (0: skip)",
    )
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
    if args.opened:
        opened_index(args.opened, args.keypoints)


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
print(f"{load:.2f} {rss:.3f} {ix._engine.memory_bytes() / 2**30:.3f} {one * 1e3:.1f} {len(kps)}")
"""


def opened_index(n: int, n_kp: int) -> None:
    """Save a kf.Index of n synthetic subjects (with full keypoint geometry), then open it
    in a fresh process: an opened index keeps only the descriptors in memory."""
    import subprocess
    import sys
    import tempfile

    import keyfuse as kf

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
        load, rss, engine, one, rows = out
        print(
            f"opened kf.Index, {n} subjects × {n_kp} keypoints ({n * n_kp / 1e6:.1f} M; built and "
            f"saved in {built:.0f} s): load {load} s, process peak RSS {rss} GiB (engine "
            f"{engine} GiB); one subject's keypoints read back in {one} ms ({rows} rows)"
        )


if __name__ == "__main__":
    main()
