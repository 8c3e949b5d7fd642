"""Streaming index build benchmark: peak memory of ``kf.batch.build_index`` against the
number of keypoint files; prints figures.

    .venv/bin/python benches/build.py [--sizes 500 1000 2000] [--keypoints 2000] [--quick]

Target (issue 11): building an index from N keypoint files takes bounded memory
(≤ 2 GB RSS whatever N). The loader reads and appends ``--chunk`` files at a time; the
on-disk ``kf.Index`` it appends to keeps only where each subject's rows lie, with the open
shard's descriptors mapped from its segment files, so the peak should not grow with N.

The synthetic subjects (random rank descriptors, random geometry) are written once as
``.kfk`` files; each size is then built in a fresh process, which reports: the build's
wall time, its peak RSS (VmHWM), the RSS before the build (interpreter and libraries,
measured after a one-file warm-up build) and the growth (peak − before). Then the built
index is opened in another fresh process: its peak RSS and what its engine holds. Last,
the peak RSS of a Dask worker process extracting one 1 mm T1 (the memory to give each
worker).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import keyfuse as kf
from _synthetic import rerank

_BUILD = """
import sys, time
from pathlib import Path
import numpy as np
import keyfuse as kf
from keyfuse.batch import build_index
from keyfuse.index import Index  # the libraries the build needs, loaded before measuring

def rss_gib(field):
    line = [ln for ln in open("/proc/self/status") if ln.startswith(field)][0]
    return int(line.split()[1]) / 2**20

files = sorted(Path(sys.argv[1]).glob("*.kfk"))[: int(sys.argv[2])]
# warm-up: one file into a throwaway index loads every library the build uses
build_index(files[:1], sys.argv[3] + ".warmup", progress=False)
before = rss_gib("VmRSS")
t = time.perf_counter()
res = build_index(files, sys.argv[3], chunk=int(sys.argv[4]), scheduler="threads",
                  n_workers=2, progress=False)
wall = time.perf_counter() - t
peak = rss_gib("VmHWM")
print(f"{len(res.added)} {wall:.2f} {peak:.3f} {before:.3f}")
"""

_OPEN = """
import sys
import keyfuse as kf
ix = kf.Index(sys.argv[1])
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]
print(f"{int(hwm.split()[1]) / 2**20:.3f} {ix.memory_bytes() / 2**30:.3f}")
"""


def write_cohort(d: Path, n: int, n_kp: int) -> float:
    """n synthetic subjects as .kfk files; returns the seconds it took."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for s in range(n):
        kf.KeypointSet(
            rng.uniform(0, 180, (n_kp, 3)),
            rng.uniform(1.5, 5, n_kp),
            descriptors=rerank(rng.random((n_kp, 64), dtype=np.float32)),
            affine=np.eye(4),
            shape=(182, 218, 182),
        ).save(d / f"s{s:06d}.kfk")
    return time.perf_counter() - t0


def _hwm_gib() -> float:
    line = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


def worker_memory(resolution_mm: float) -> None:
    """Peak RSS of a one-thread Dask worker process that extracts one MNI152 T1: the
    memory to give each worker of a cluster (README "Running on a cluster")."""
    from distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        img = kf.datasets.mni152(resolution_mm=resolution_mm)
        img.save(f"{tmp}/t1.nii.gz")
        with (
            LocalCluster(
                n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            idle = next(iter(client.run(_hwm_gib).values()))
            res = kf.batch.extract_batch(
                f"{tmp}/t1.nii.gz", f"{tmp}/keys", scheduler=client, device="cpu", progress=False
            )
            peak = next(iter(client.run(_hwm_gib).values()))
    print(
        f"Dask worker (1 process, 1 thread) extracting one {resolution_mm:g} mm T1 "
        f"{img.shape}: peak RSS {peak:.3f} GiB (idle worker {idle:.3f} GiB; "
        f"{res.seconds:.1f} s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--keypoints", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, seconds)")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.keypoints, args.chunk = [20, 60], 300, 8
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        keys.mkdir()
        made = write_cohort(keys, max(args.sizes), args.keypoints)
        disk = sum(p.stat().st_size for p in keys.iterdir()) / 2**20
        print(
            f"{max(args.sizes)} synthetic subjects × {args.keypoints} keypoints written as "
            f".kfk in {made:.1f} s ({disk:.1f} MiB); chunk {args.chunk}, 2 reader threads"
        )
        for n in args.sizes:
            out = Path(tmp) / f"cohort-{n}.kfi"
            run = subprocess.run(
                [sys.executable, "-c", _BUILD, str(keys), str(n), str(out), str(args.chunk)],
                capture_output=True,
                text=True,
                check=True,
            )
            added, wall, peak, before = run.stdout.split()
            opened = subprocess.run(
                [sys.executable, "-c", _OPEN, str(out)], capture_output=True, text=True, check=True
            ).stdout.split()
            print(
                f"N={n:6d}: built {added} subjects in {float(wall):.1f} s "
                f"({int(added) / max(float(wall), 1e-9):.1f} files/s); peak RSS {peak} GiB = "
                f"{before} before + {float(peak) - float(before):.3f} for the build; "
                f"opened: peak RSS {opened[0]} GiB (engine {opened[1]} GiB)",
                flush=True,
            )
            import shutil

            shutil.rmtree(out)
    worker_memory(4.0 if args.quick else 1.0)


if __name__ == "__main__":
    main()
