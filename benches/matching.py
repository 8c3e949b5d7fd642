"""Matching and scoring benchmarks: prints figures, asserts nothing.

    .venv/bin/python benches/matching.py [--subjects 1000] [--keypoints 2000] [--quick]
        [--peers DIR]

1. pairwise soft-Jaccard of 20 keypoint sets (target ≤ 0.15 s, bit-identical every run);
   where the AMX kernel runs, the same pairwise with the AVX2 kernel in another process
   (target: within 3×); the reference matcher's voting (featMatchMultiple re-implemented)
   on the same sets;
2. all-pairs scoring for a cohort of ``--subjects`` (target ≤ 0.05 s per image);
3. two-set kf.match (plain and Hough) and kf.align at 2,000 keypoints.

``--peers DIR`` (the build folder of ``../shared/tools/build-peers``): the reference
all-pairs matcher ``featMatchMultiple`` and keyfuse score the same ``.key`` files of a
simulated cohort (keyfuse's keypoints, extracted here), each as a whole process that reads
the files and writes the N×N matrix: wall, CPU, peak RSS and family AUC / mAP side by side.

Keypoint sets are synthetic but structured like a cohort: families share a prototype set
of rank descriptors, each member keeps a fraction of them (perturbed: Gaussian noise on the
ranks, re-ranked) and adds its own. Wall and CPU (all threads) seconds are both printed:
this machine is shared, and CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import keyfuse as kf
from _peers import find_peer, run_process
from _synthetic import rerank


def synth_cohort(
    n_subjects: int, n_kp: int, family_size: int = 4, shared: float = 0.6, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray]:
    """Descriptor sets and family ids (see the module docstring)."""
    rng = np.random.default_rng(seed)
    sets, fam = [], []
    proto = np.zeros((0, 64), np.float32)
    for s in range(n_subjects):
        f = s // family_size
        if s % family_size == 0:
            proto = rng.random((n_kp, 64), dtype=np.float32) * 64
        n_sh = int(shared * n_kp)
        own = rng.random((n_kp - n_sh, 64), dtype=np.float32) * 64
        mine = np.concatenate([proto[rng.choice(n_kp, n_sh, replace=False)], own])
        sets.append(rerank(mine + 8.0 * rng.standard_normal(mine.shape, dtype=np.float32)))
        fam.append(f)
    return sets, np.asarray(fam)


def to_kps(desc: np.ndarray, seed: int) -> kf.KeypointSet:
    rng = np.random.default_rng(seed)
    n = len(desc)
    return kf.KeypointSet(rng.uniform(-70, 70, (n, 3)), rng.uniform(1.5, 5, n), descriptors=desc)


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[Any, float, float]:
    """(result, median wall s, median CPU s)."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return out, float(np.median(walls)), float(np.median(cpus))


def family_auc(s: np.ndarray, fam: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    sym = 0.5 * (s + s.T)
    iu = np.triu_indices(len(fam), 1)
    return float(roc_auc_score((fam[:, None] == fam[None, :])[iu], sym[iu]))


def index_of(sets: list[np.ndarray], **kw: Any) -> kf.Index:
    ix = kf.Index(**kw)
    for i, d in enumerate(sets):
        ix.add(f"s{i:05d}", to_kps(d, i))
    return ix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--keypoints", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, seconds)")
    ap.add_argument(
        "--peers",
        type=Path,
        default=None,
        help="build folder of ../shared/tools/build-peers: featMatchMultiple side by side",
    )
    ap.add_argument(
        "--peer-families", type=int, default=5, help="--peers cohort: families of 4 scans at 2 mm"
    )
    args = ap.parse_args()
    if args.peers is not None:
        side_by_side(args.peers, args.peer_families)
        return
    if args.quick:
        args.subjects, args.keypoints = 40, 200
    n_kp = args.keypoints

    from keyfuse.device import cpu_knn_kernel

    print(
        f"# keyfuse matching benchmark ({n_kp} keypoints per set; exact k-NN kernel: "
        f"{cpu_knn_kernel()})"
    )
    sets, fam = synth_cohort(20, n_kp)
    ix = index_of(sets)
    (s_e, w, c) = timed(lambda: ix.pairwise(), repeat=5)
    again = ix.pairwise()
    print(
        f"pairwise 20 sets, Index defaults (exact k-NN at {20 * n_kp} keypoints): {w:.3f} s "
        f"wall, {c:.3f} s CPU  (target ≤ 0.15 s)  bit-identical rerun: "
        f"{np.array_equal(s_e, again)}  family AUC {family_auc(s_e, fam):.3f}"
    )
    print(f"  exact k-NN: {(20 * n_kp) ** 2 / c:.3g} descriptor pairs per CPU second (whole call)")
    if cpu_knn_kernel() == "amx":
        avx2 = avx2_pairwise(n_kp)
        print(
            f"  same, AVX2 kernel (AMX off, another process): {avx2['wall']:.3f} s wall, "
            f"{avx2['cpu']:.3f} s CPU = {avx2['wall'] / w:.2f}× / {avx2['cpu'] / c:.2f}× the AMX "
            f"kernel's (target ≤ 3×)  identical scores: {np.array_equal(avx2['scores'], s_e)}"
        )
    (s_a, w, c) = timed(lambda: ix.pairwise(exact=False), repeat=5)
    off = 2 * np.eye(20)
    agree = np.mean(np.argmax(s_a - off, 1) == np.argmax(s_e - off, 1))
    print(
        f"pairwise 20 sets, kd-forest (8 trees/64 checks, as featMatchMultiple): {w:.3f} s "
        f"wall, {c:.3f} s CPU  bit-identical rerun: "
        f"{np.array_equal(s_a, ix.pairwise(exact=False))}  family AUC "
        f"{family_auc(s_a, fam):.3f}  top-1 agreement forest/exact {agree:.2f}"
    )
    fast = index_of(sets, trees=4, checks=32)
    (s_f, w, c) = timed(lambda: fast.pairwise(exact=False), repeat=5)
    print(
        f"pairwise 20 sets, kd-forest 4 trees/32 checks: {w:.3f} s wall, {c:.3f} s CPU"
        f"  family AUC {family_auc(s_f, fam):.3f}"
    )
    (v, w, c) = timed(lambda: ix.reference_votes())
    from keyfuse.matching import votes_to_jaccard

    jv = votes_to_jaccard(v, [n_kp] * 20)
    print(
        f"reference voting (featMatchMultiple, 8 trees/64 checks, k=5): {w:.3f} s wall, "
        f"{c:.3f} s CPU  family AUC {family_auc(jv, fam):.3f}  (reference tool: 1.39 s, "
        "not reproducible)"
    )

    a, b = to_kps(sets[0], 0), to_kps(sets[1], 1)
    (_, w, c) = timed(lambda: kf.match(a, b))
    print(
        f"kf.match {n_kp}×{n_kp} (exact NN, ratio 0.9): {w * 1e3:.1f} ms wall, {c * 1e3:.1f} ms CPU"
    )
    (_, w, c) = timed(lambda: kf.match(a, b, hough=True))
    print(f"kf.match hough=True               : {w * 1e3:.1f} ms wall, {c * 1e3:.1f} ms CPU")
    mov = kf.KeypointSet(a.xyz * 1.05 + 3.0, a.scale, descriptors=sets[0])
    (al, w, c) = timed(lambda: kf.align(mov, a))
    print(
        f"kf.align {n_kp} keypoints            : {w * 1e3:.1f} ms wall, {c * 1e3:.1f} ms CPU  {al}"
    )

    n = args.subjects
    t0 = time.perf_counter()
    sets, fam = synth_cohort(n, n_kp, seed=1)
    big = index_of(sets)
    print(
        f"\n# all-pairs scoring, {n} subjects × {n_kp} keypoints (generated in "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    # the kd-forest is built by the first approximate search: time one of a single keypoint
    w0, c0 = time.perf_counter(), time.process_time()
    big.scores(to_kps(sets[0], 0)[:1], exact=False)
    wb, cb = time.perf_counter() - w0, time.process_time() - c0
    (s, w, c) = timed(lambda: big.pairwise(exact=False), repeat=1)
    print(
        f"forest build {wb:.2f} s wall ({cb:.2f} s CPU); pairwise {w:.2f} s wall, {c:.2f} s CPU "
        f"= {w / n * 1e3:.1f} ms wall, {c / n * 1e3:.1f} ms CPU per image (target ≤ 50 ms)"
    )
    print(
        f"family AUC {family_auc(s, fam):.4f}; top-1 hit is a relative for "
        f"{np.mean(fam[np.argmax(s - np.eye(n) * 2, axis=1)] == fam):.3f} of subjects"
    )
    big.checks = 32  # the same index and forest, fewer distance evaluations per keypoint
    (s_f, w, c) = timed(lambda: big.pairwise(exact=False), repeat=1)
    print(
        f"same cohort with 32 checks: {w / n * 1e3:.1f} ms wall, {c / n * 1e3:.1f} ms CPU per "
        f"image, family AUC {family_auc(s_f, fam):.4f}"
    )
    (v, w, c) = timed(lambda: big.reference_votes(exact=False), repeat=1)
    jv = votes_to_jaccard(v, [n_kp] * n)
    print(
        f"reference voting on the same cohort: {w:.2f} s wall, {c:.2f} s CPU, "
        f"family AUC {family_auc(jv, fam):.4f}"
    )


# the exact pairwise of the same synthetic sets with the AMX kernel turned off
_AVX2_PAIRWISE = r"""
import json, sys
import numpy as np
from matching import index_of, synth_cohort, timed
ix = index_of(synth_cohort(20, int(sys.argv[1]))[0])
ix.pairwise()
scores, wall, cpu = timed(lambda: ix.pairwise(), repeat=5)
np.save(sys.argv[2], scores)
print(json.dumps({"wall": wall, "cpu": cpu}))
"""


def avx2_pairwise(n_kp: int) -> dict[str, Any]:
    """Wall and CPU seconds (median of 5) and scores of the exact pairwise of 20 synthetic
    sets in a process whose exact k-NN runs the AVX2 kernel (`KEYFUSE_NO_AMX`)."""
    import json
    import os
    import subprocess

    with tempfile.TemporaryDirectory(prefix="keyfuse-avx2-") as tmp:
        out = Path(tmp) / "scores.npy"
        run = subprocess.run(
            [sys.executable, "-c", _AVX2_PAIRWISE, str(n_kp), str(out)],
            env={**os.environ, "KEYFUSE_NO_AMX": "1"},
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return {**json.loads(run.stdout.splitlines()[-1]), "scores": np.load(out)}


# keyfuse's whole process for the side-by-side: read the .key files, score all pairs
# exactly, write the matrix (the same work featMatchMultiple does)
_KEYFUSE_ALL_PAIRS = r"""
import sys
import numpy as np
import keyfuse as kf
out, paths = sys.argv[1], sys.argv[2:]
index = kf.Index()
for i, p in enumerate(paths):
    index.add(f"s{i:04d}", kf.read_key(p))
np.save(out, np.asarray(index.pairwise(exact=True)))
"""


def side_by_side(peers: Path, n_families: int) -> None:
    """keyfuse and featMatchMultiple on the same .key files of a simulated cohort."""
    from keyfuse.demo import DemoConfig, stage_extract, stage_simulate
    from keyfuse.matching import votes_to_jaccard

    fmm = find_peer(peers, "featMatchMultiple")
    if fmm is None:
        raise SystemExit(f"no featMatchMultiple under {peers} (run ../shared/tools/build-peers)")
    with tempfile.TemporaryDirectory(prefix="keyfuse-peers-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = DemoConfig(
            out=tmp / "cohort",
            n_families=n_families,
            family_size=4,
            n_rescans=0,
            resolution_mm=2.0,
            device="cpu",
        )
        cohort = stage_simulate(cfg)
        sets = [kf.KeypointSet.load(k) for k in stage_extract(cfg, cohort)]
        keys = []
        for i, kps in enumerate(sets):
            keys.append(tmp / f"s{i:04d}.key")
            kf.write_key(kps, keys[-1])
        n_kp = np.array([len(k) for k in sets], dtype=np.float64)
        print(
            f"side by side on {len(sets)} simulated scans at 2 mm ({n_families} families of "
            f"4), {int(n_kp.sum())} keypoints, the same .key files for both tools:"
        )
        runs = {
            "keyfuse (exact)": run_process(
                [sys.executable, "-c", _KEYFUSE_ALL_PAIRS, str(tmp / "kf.npy"), *map(str, keys)],
                tmp,
            ),
            "featMatchMultiple": run_process([str(fmm), *map(str, keys)], tmp),
        }
        matrices = {
            "keyfuse (exact)": np.load(tmp / "kf.npy"),
            "featMatchMultiple": votes_to_jaccard(
                np.loadtxt(tmp / "matching_votes.txt", ndmin=2), n_kp
            ),
        }
        print(f"{'':22s}{'wall s':>8s}{'CPU s':>8s}{'RSS MB':>8s}{'fam. AUC':>10s}{'mAP':>8s}")
        for name, (wall, cpu, rss) in runs.items():
            rep = kf.evaluate.family_report(cohort, matrices[name])
            print(
                f"{name:22s}{wall:8.2f}{cpu:8.2f}{rss:8.0f}{rep['family_auc']:10.4f}{rep['map']:8.3f}"
            )


if __name__ == "__main__":
    main()
