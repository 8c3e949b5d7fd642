"""Scale benchmark of the sharded, memory-mapped index (issue 11); prints figures.

    .venv/bin/python benches/scale.py [--sizes 1000 5000] [--keypoints 2000] [--quick]
    .venv/bin/python benches/scale.py --sizes --pairwise 5000 --pairwise-keypoints 200
    .venv/bin/python benches/scale.py --sizes 5000 25000 --no-dask --keep DIR  # twice: reused

Synthetic cohorts with the descriptor statistics of real ones: the descriptor pool is
extracted from the MNI152 template (nilearn's copy, ``kf.datasets.mni152``); a family
prototype samples it and perturbs each descriptor (rank noise, re-ranked), members share
60% of the prototype's keypoints (perturbed again) and have 40% of their own, so recall
can be judged. Per size: build time (appends of 100 subjects, shards sealed and their
kd-forests built and saved on the way), then in a fresh process: open time, peak RSS
(VmHWM) after the approximate queries and again after the exact ones, each with the
anonymous and file-backed resident memory at that moment (RssAnon: forests, owners,
buffers, the interpreter; RssFile: touched pages of the memory-mapped descriptor files,
clean and reclaimable, and of the libraries), approximate query
p50/p95 in wall and CPU seconds (a query is a noisy rescan of an indexed subject with all
its keypoints), top-1 = the rescanned subject, recall@1 of the approximate search
against exact on the same queries cut to ``--recall-keypoints`` keypoints, and the index
bytes on disk against the 1 mm float32 images it describes (182×218×182×4 bytes each;
every synthetic subject shares one geometry, which compresses to almost nothing: the
ratio on real keypoints is benches/disk.py's).
Last, a linear trend of each figure fitted over the sizes and read at 100,000 subjects,
and (smallest size) a 2-worker local Dask cluster against the in-process search.
``--pairwise N``: all-pairs soft Jaccard of N subjects (``--pairwise-keypoints`` each, in
shards of ``--pairwise-shard-size``), in process and on a 2-process local cluster: equal
or not, and pairs per second per worker.

Targets (issue 11): 100k query p50 ≤ 0.5 s, p95 ≤ 1 s, RSS ≤ 16 GB, open ≤ 10 s,
recall@1 ≥ 0.95; 25k p50 ≤ 0.2 s within 6 GB; index ≥ 150× smaller than the images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import keyfuse as kf
from _synthetic import SharedGeometry, rerank
from keyfuse.index_shards import DEFAULT_SHARD_SIZE

IMAGE_BYTES = 182 * 218 * 182 * 4  # one 1 mm MNI-sized float32 volume


def real_pool(resolution_mm: float) -> np.ndarray:
    """Descriptors extracted from the MNI152 template, as float rank values."""
    kps = kf.extract(kf.datasets.mni152(resolution_mm=resolution_mm))
    return np.asarray(kps.descriptors, np.float32)


def build(path: Path, n: int, n_kp: int, pool: np.ndarray, args: argparse.Namespace) -> dict:
    """Build the index; returns the rescans (queries) of some subjects and timings."""
    rng = np.random.default_rng(0)
    geometry = SharedGeometry(n_kp, 0)
    ix = kf.Index(path, mode="w", shard_size=args.shard_size, checks=args.checks, trees=args.trees)
    n_sh = int(0.6 * n_kp)
    proto = np.zeros((0, 64), np.float32)
    queries, truth, batch = [], [], []
    t0 = time.perf_counter()
    every = max(1, n // args.queries)
    for s in range(n):
        if s % 4 == 0:
            proto = pool[rng.integers(0, len(pool), n_kp)] + 3.0 * rng.standard_normal(
                (n_kp, 64), dtype=np.float32
            )
        own = pool[rng.integers(0, len(pool), n_kp - n_sh)] + 3.0 * rng.standard_normal(
            (n_kp - n_sh, 64), dtype=np.float32
        )
        vals = np.concatenate([proto[rng.choice(n_kp, n_sh, replace=False)], own])
        vals += 2.0 * rng.standard_normal(vals.shape, dtype=np.float32)
        batch.append((f"s{s:06d}", geometry.keypoints(rerank(vals)), None, {"family": s // 4}))
        if s % every == 0 and len(queries) < args.queries:
            queries.append(rerank(vals + 1.5 * rng.standard_normal(vals.shape, dtype=np.float32)))
            truth.append(s)
        if len(batch) == 100 or s == n - 1:
            ix.add_many(batch)
            batch = []
    built = time.perf_counter() - t0
    np.save(path.parent / "queries.npy", np.stack(queries))
    np.save(path.parent / "truth.npy", np.asarray(truth))
    return {"build_s": built, "shards": len(ix.shards)}


# a fresh interpreter: open the index, time queries, peak memory from VmHWM
_QUERY = """
import json, sys, time
import numpy as np
import keyfuse as kf
sys.path.insert(0, sys.argv[3])
from _synthetic import SharedGeometry
import pyarrow.parquet  # imported before timing the open
path, cut, trees, checks = sys.argv[1], int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
t = time.perf_counter()
if sys.argv[6] != "default":
    import keyfuse.index_shards
    keyfuse.index_shards.MAPPED_BUDGET = int(float(sys.argv[6]) * 2**30)
ix = kf.Index(path, trees=trees, checks=checks)
opened = time.perf_counter() - t
queries = np.load(path + "/../queries.npy"); truth = np.load(path + "/../truth.npy")
geo = SharedGeometry(queries.shape[1], 0)
ix.scores(geo.keypoints(queries[0])[:1], exact=False)  # forests loaded (not built)
walls, cpus, top1 = [], [], 0
for q, s in zip(queries, truth):
    kps = geo.keypoints(q)
    t, c = time.perf_counter(), time.process_time()
    sc = ix.scores(kps, exact=False)
    walls.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)
    top1 += int(np.argmax(sc) == s)
def status(key):
    line = [ln for ln in open("/proc/self/status") if ln.startswith(key + ":")][0]
    return int(line.split()[1]) / 2**20
def hwm():
    return status("VmHWM")
print(json.dumps({"open_s": opened, "p50": float(np.median(walls)),
    "p95": float(np.percentile(walls, 95)), "cpu_p50": float(np.median(cpus)),
    "top1": top1 / len(truth), "rss_search_gib": hwm(), "anon_search_gib": status("RssAnon"),
    "file_search_gib": status("RssFile"), "m": len(truth)}), flush=True)
# exact answers do not depend on the search parameters: kept beside the index and reused
cache = path + f"/../exact-top1-{cut}.npy"
try:
    exact_top = np.load(cache)
except OSError:
    exact_top = None
agree, rng, tops = 0, np.random.default_rng(1), []
for i, q in enumerate(queries):
    sub = geo.keypoints(q)[np.sort(rng.choice(len(q), cut, replace=False))]
    tops.append(exact_top[i] if exact_top is not None else np.argmax(ix.scores(sub, exact=True)))
    agree += int(np.argmax(ix.scores(sub, exact=False)) == tops[i])
np.save(cache, np.asarray(tops))
print(json.dumps({"recall": agree / len(truth), "rss_gib": hwm(), "anon_gib": status("RssAnon"),
    "file_gib": status("RssFile")}))
"""


def query_process(path: Path, args: argparse.Namespace, here: str) -> str:
    """Run _QUERY in a fresh interpreter; its lines are echoed as they come (the exact
    recall queries of a large index take long) and returned."""
    argv = [sys.executable, "-c", _QUERY, str(path), str(args.recall_keypoints), here]
    argv += [str(args.trees), str(args.checks), args.mapped_budget]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            print(f"  {line.strip()}", flush=True)
            lines.append(line)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    return "".join(lines)


def dask_check(path: Path) -> None:
    """A 2-worker local cluster against the in-process search: equal, and throughput."""
    try:
        import distributed
    except ImportError:
        print("dask: distributed not installed, skipped")
        return
    ix = kf.Index(path)
    queries = np.load(path.parent / "queries.npy")
    geo = SharedGeometry(queries.shape[1], 0)
    kps = [geo.keypoints(q) for q in queries]
    t = time.perf_counter()
    local = [ix.scores(k, exact=False) for k in kps]
    t_local = time.perf_counter() - t
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        ix.scores(kps[0], exact=False, scheduler=client)  # shards opened on the workers
        t = time.perf_counter()
        remote = [ix.scores(k, exact=False, scheduler=client) for k in kps]
        t_remote = time.perf_counter() - t
    same = all(np.array_equal(a, b) for a, b in zip(local, remote, strict=True))
    print(
        f"dask 2-worker local cluster: identical to in-process {same}; "
        f"{len(kps) / t_remote / 2:.2f} queries/s per worker "
        f"(in process {len(kps) / t_local:.2f} queries/s)"
    )


def pairwise_check(n: int, n_kp: int, pool: np.ndarray, args: argparse.Namespace) -> None:
    """All-pairs of ``n`` subjects in process and on a 2-process local cluster."""
    try:
        import distributed
    except ImportError:
        print("pairwise: distributed not installed, skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.kfi"
        sub = argparse.Namespace(**{**vars(args), "shard_size": args.pairwise_shard_size})
        b = build(path, n, n_kp, pool, sub)
        ix = kf.Index(path, trees=args.trees)
        probe = ix.keypoints(next(iter(ix)))[:10]
        ix.scores(probe, exact=False)  # forests loaded
        t = time.perf_counter()
        local = ix.pairwise(exact=False)
        t_local = time.perf_counter() - t
        with (
            distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            ix.scores(probe, exact=False, scheduler=client)  # shards opened on the workers
            t = time.perf_counter()
            remote = ix.pairwise(exact=False, scheduler=client)
            t_remote = time.perf_counter() - t
        pairs = n * n
        print(
            f"pairwise N={n} × {n_kp} keypoints ({b['shards']} shards of ≤ "
            f"{args.pairwise_shard_size}): in process {t_local:.1f} s = {pairs / t_local:,.0f} "
            f"pairs/s; 2-process local cluster {t_remote:.1f} s = "
            f"{pairs / t_remote / 2:,.0f} pairs/s per worker; identical "
            f"{np.array_equal(local, remote)}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 5000])
    ap.add_argument("--keypoints", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    ap.add_argument("--checks", type=int, default=kf.Index().checks)
    ap.add_argument(
        "--mapped-budget",
        default="default",
        help="GiB of mapped pages a query process keeps (keyfuse.index_shards.MAPPED_BUDGET)",
    )
    ap.add_argument("--trees", type=int, default=kf.Index().trees)
    ap.add_argument("--pairwise", type=int, default=0)
    ap.add_argument("--pairwise-keypoints", type=int, default=200)
    ap.add_argument("--pairwise-shard-size", type=int, default=250_000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--recall-keypoints", type=int, default=200)
    ap.add_argument("--resolution", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-dask", action="store_true", help="skip the 2-worker cluster check")
    ap.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="build each size's index in KEEP/N and keep it; an index already there is "
        "reused (its build time is not measured): query the same indexes again",
    )
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.keypoints, args.shard_size = [40, 80], 150, 3000
        args.queries, args.recall_keypoints, args.resolution = 8, 50, 2.0
    t = time.perf_counter()
    pool = real_pool(args.resolution)
    print(f"descriptor pool: {len(pool)} MNI152 descriptors ({time.perf_counter() - t:.1f} s)")
    rows = []
    here = str(Path(__file__).resolve().parent)
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = (Path(tmp) if args.keep is None else args.keep / str(n)) / "cohort.kfi"
            if (path / "manifest.json").exists() and (path.parent / "truth.npy").exists():
                b = {"build_s": float("nan"), "shards": len(kf.Index(path).shards)}
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                b = build(path, n, args.keypoints, pool, args)
            out = query_process(path, args, here)
            # after the first search: the open shard's forest is cached beside it
            disk = sum(f.stat().st_size for f in path.iterdir())
            search, exact = (json.loads(line) for line in out.strip().splitlines()[-2:])
            r = {**b, **search, **exact, "n": n, "disk": disk}
            rows.append(r)
            print(
                f"N={n:6d} × {args.keypoints} ({n * args.keypoints / 1e6:.1f} M keypoints, "
                f"{r['shards']} shards): build {r['build_s']:.1f} s, open {r['open_s']:.2f} s, "
                f"query p50 {r['p50']:.3f} s p95 {r['p95']:.3f} s (CPU {r['cpu_p50']:.3f} s), peak "
                f"RSS {r['rss_search_gib']:.2f} GiB searching (now RssAnon "
                f"{r['anon_search_gib']:.2f} + RssFile {r['file_search_gib']:.2f}), "
                f"{r['rss_gib']:.2f} GiB after the exact recall queries (every descriptor page "
                f"touched; RssAnon {r['anon_gib']:.2f} + RssFile {r['file_gib']:.2f}), "
                f"top-1 {r['top1']:.2f}, "
                f"recall@1 vs exact "
                f"{r['recall']:.2f} ({r['m']} queries of {args.recall_keypoints} keypoints); "
                f"disk {disk / 1e6:.1f} MB = 1/{n * IMAGE_BYTES / disk:.0f} of the images",
                flush=True,
            )
            if n == args.sizes[0] and not args.no_dask:
                dask_check(path)
    if args.pairwise:
        pairwise_check(args.pairwise, args.pairwise_keypoints, pool, args)
    if len(rows) >= 2:
        ns = np.array([r["n"] for r in rows], float)
        fit = {}
        keys = ("build_s", "open_s", "p50", "p95", "rss_search_gib", "rss_gib")
        for key in (*keys, "anon_search_gib", "file_search_gib", "anon_gib", "file_gib"):
            if not np.isfinite([r[key] for r in rows]).all():
                continue  # build times of reused indexes
            b1, b0 = np.polyfit(ns, [r[key] for r in rows], 1)
            fit[key] = b0 + b1 * 100_000
        print(
            "linear trend at 100,000 subjects: "
            + ", ".join(f"{k} {v:.2f}" for k, v in fit.items())
            + " (targets: p50 ≤ 0.5 s, p95 ≤ 1 s, RSS ≤ 16 GB, open ≤ 10 s)"
        )


if __name__ == "__main__":
    main()
