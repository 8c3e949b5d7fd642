"""Benchmark of ``kf.extract`` on the MNI152 template and on a copy rotated 15° about the
third voxel axis and scaled 1.1 (issue 2, TARGETS.md).

Prints, for keyfuse and (from the stored reference key files) for featExtract on the same
two volumes: wall time (median of a few runs, keyfuse only), peak memory (the high-water
mark ``VmHWM`` of a fresh subprocess per measurement, since tracemalloc cannot see Rust
allocations),
the MNI time in yardsticks (one ``scipy.ndimage.gaussian_filter(σ=1.6)`` of the same volume
in the same process, median of as many runs: a ratio that survives a loaded machine; also
the extraction's CPU seconds over the yardstick's, which no load or core count changes),
keypoint counts, repeatability and nearest-neighbour + ratio-0.8 match precision.

Definitions
-----------
* keypoint = one detection (distinct location); rows = oriented features.
* repeatability = fraction of the original volume's keypoints whose location, mapped
  through the known transform q = A·p + t, has a keypoint of the rotated volume within
  2 voxels (distances in the rotated grid's voxels).
* matches = for every row of the original set, its nearest row of the rotated set in
  descriptor space (Euclidean on the 64 ranks), kept when d1/d2 ≤ 0.8 (d2 = distance to the
  nearest row that belongs to a different keypoint, so a keypoint's own extra orientations
  cannot veto its match; the "plain 2nd-NN" lines use the second-nearest row instead);
  a match is correct when the mapped location of the original row lies within 2 voxels
  of the matched row's location.

Run: ``make bench`` or ``.venv/bin/python benches/extract.py [--repeats 5] [--quick]
[--peers DIR]`` (``--quick``: the template resampled to 3 mm, one run each, no featExtract
comparison).

``--peers DIR``: the reference tools built from their public sources with
``../shared/tools/build-peers SIFTRANK_SRC SIFT3D_SRC DIR`` (featExtract of 3DSIFT-Rank,
kpSift3D of SIFT3D) run on the same two volumes in the same run, each as a whole process
(wall, CPU and peak RSS of the child), and their keypoints are scored like keyfuse's. The
keyfuse column then also gives the whole-process figures of ``keyfuse extract``. kpSift3D
describes with its own 768-bin histograms, matched in their own space.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import ndimage

import keyfuse as kf
from _peers import find_peer, run_process

ROOT = Path(__file__).resolve().parents[1]
REF = next(
    (
        p / "data" / "reference-keys"
        for p in (ROOT / "shared", ROOT.parent / "shared")
        if (p / "data" / "reference-keys").is_dir()
    ),
    None,
)

# One measurement in a fresh interpreter: load the volume, time kf.extract `repeats`
# times, report the times, the row/keypoint counts and the process's peak RSS.
_CHILD = r"""
import json, resource, sys, time
import numpy as np
import keyfuse as kf
src, res, repeats = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])

def peak_kb():
    # VmHWM: this process's own high-water mark (ru_maxrss keeps the parent's RSS at
    # fork time across exec, which the parent benchmark's volumes inflate)
    try:
        with open("/proc/self/status") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

if src == "mni":
    img = kf.datasets.mni152(resolution_mm=res)
else:
    img = kf.Image(np.load(src), np.diag([res, res, res, 1.0]))
rss0 = peak_kb()
times, cpu = [], []
for _ in range(repeats):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    kps = kf.extract(img, device="cpu")
    times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
rss = peak_kb()
# the yardstick, after the memory figures (scipy's import alone is ~30 MB): one
# scipy.ndimage.gaussian_filter(sigma=1.6) on the same volume, in this process
from scipy import ndimage
data = np.asarray(img.data, dtype=np.float32)
yard, yard_cpu = [], []
for _ in range(repeats):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    ndimage.gaussian_filter(data, 1.6)
    yard.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    yard_cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
print(json.dumps({"times": times, "cpu": cpu, "rss_before_kb": rss0, "rss_kb": rss,
                  "yardstick": yard, "yardstick_cpu": yard_cpu}))
"""


def rotated_volume(data: np.ndarray, angle_deg: float = 15.0, scale: float = 1.1):
    """Rotate about the third voxel axis and scale; the grid is enlarged so that nothing
    is cropped and the content is centred. Returns (volume, A, t) with q = A·p + t."""
    a = math.radians(angle_deg)
    A = scale * np.array(
        [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]]
    )
    return affine_volume(data, A)


def corrupted_volume(data: np.ndarray, seed: int = 0):
    """The harder pair: rotated about all three axes (12°, −9°, 7°), scaled 0.92, then a
    smooth multiplicative bias field (±15%, linear in each axis' direction) and Gaussian
    noise of 2% of the 99th intensity percentile. Returns (volume, A, t) as above."""
    rot = np.eye(3)
    for axis, deg in ((0, 12.0), (1, -9.0), (2, 7.0)):
        c, s_ = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        r = np.eye(3)
        i, j = [x for x in range(3) if x != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s_, s_, c
        rot = r @ rot
    out, A, t = affine_volume(data, 0.92 * rot)
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, m) for m in out.shape], indexing="ij")
    bias = 1.0 + 0.15 * (0.6 * grid[0] - 0.5 * grid[1] + 0.4 * grid[2]) / 1.5
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(out.shape, dtype=np.float32)
    sd = 0.02 * float(np.percentile(data, 99))
    return (out * bias.astype(np.float32) + sd * noise).astype(np.float32), A, t


def affine_volume(data: np.ndarray, A: np.ndarray):
    """Resample ``data`` under q = A·p + t (trilinear) on a grid enlarged so that nothing
    is cropped, the content centred. Returns (volume, A, t)."""
    n = np.array(data.shape)
    corners = np.array(np.meshgrid(*[[0, m - 1] for m in n], indexing="ij")).reshape(3, -1)
    q = A @ corners
    span = q.max(axis=1) - q.min(axis=1)
    new_shape = np.ceil(span).astype(int) + 1
    t = (new_shape - 1 - span) / 2 - q.min(axis=1)
    inv = np.linalg.inv(A)
    out = ndimage.affine_transform(
        data, inv, offset=-inv @ t, output_shape=tuple(new_shape), order=1, cval=0.0
    )
    return out.astype(np.float32), A, t


def measure(src: str, resolution: float, repeats: int, threads: int | None = None) -> dict:
    """Run the child measurement in a fresh interpreter; `threads` caps rayon's pool."""
    env = dict(os.environ)
    if threads is not None:
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, src, str(resolution), str(repeats)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


class Keys(Protocol):
    """What the scores need of a keypoint set: voxel positions and descriptors."""

    @property
    def ijk(self) -> np.ndarray: ...
    @property
    def descriptors(self) -> np.ndarray: ...
    def __len__(self) -> int: ...


@dataclass
class PeerKeys:
    """A peer tool's keypoints (voxel coordinates of the input grid) and descriptors."""

    ijk: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.ijk)


@dataclass
class Run:
    """One whole-process run of an extractor."""

    wall: float
    cpu: float
    rss_mb: float
    keys: Keys


def read_sift3d(desc_csv: Path) -> PeerKeys:
    """kpSift3D's descriptor CSV: x, y, z (input voxels) then the histogram bins."""
    m = np.loadtxt(desc_csv, delimiter=",", ndmin=2, dtype=np.float32)
    return PeerKeys(m[:, :3].astype(np.float64), m[:, 3:])


def peer_runs(peers: Path, volumes: dict[str, Path], tmp: Path) -> dict[str, dict[str, Run]]:
    """Run keyfuse's CLI and each peer found on every volume: {tool: {volume: Run}}."""
    keyfuse_cli = Path(sys.executable).with_name("keyfuse")
    tools: dict[str, Callable[[Path, Path], tuple[list[str], Callable[[], Keys]]]] = {
        "keyfuse": lambda v, out: (
            [str(keyfuse_cli), "extract", str(v), "-o", str(out), "-q", "--device", "cpu"],
            lambda: kf.KeypointSet.load(next(out.glob("*.kfk"))),
        ),
    }
    fe = find_peer(peers, "featExtract")
    if fe is not None:
        tools["featExtract"] = lambda v, out: (
            [str(fe), str(v), str(out / "k.key")],
            lambda: kf.read_key(out / "k.key"),
        )
    s3 = find_peer(peers, "kpSift3D")
    if s3 is not None:
        tools["kpSift3D"] = lambda v, out: (
            [str(s3), "--desc", str(out / "desc.csv"), str(v)],
            lambda: read_sift3d(out / "desc.csv"),
        )
    runs: dict[str, dict[str, Run]] = {}
    for tool, make in tools.items():
        runs[tool] = {}
        for name, vol in volumes.items():
            out = tmp / f"{tool}-{name}"
            out.mkdir()
            cmd, load = make(vol, out)
            wall, cpu, rss = run_process(cmd, str(out))
            runs[tool][name] = Run(wall, cpu, rss, load())
    return runs


def unique_points(kps: Keys) -> np.ndarray:
    """Indices of the first row of each distinct keypoint location."""
    _, first = np.unique(np.round(kps.ijk, 4), axis=0, return_index=True)
    return np.sort(first)


def repeatability(a: Keys, b: Keys, A: np.ndarray, t: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    pa = a.ijk[unique_points(a)] @ A.T + t
    pb = b.ijk[unique_points(b)]
    if len(pa) == 0 or len(pb) == 0:
        return float("nan")
    d, _ = cKDTree(pb).query(pa)
    return float(np.mean(d <= 2.0))


def ratio_matches(
    a: Keys,
    b: Keys,
    A: np.ndarray,
    t: np.ndarray,
    ratio: float = 0.8,
    per_keypoint: bool = True,
) -> tuple[int, float]:
    """(number of NN + ratio matches, fraction correct within 2 voxels).

    ``per_keypoint``: the second neighbour is the nearest row of a *different* keypoint
    (else simply the second-nearest row, which may be another orientation of the same
    keypoint and then vetoes a correct match)."""
    if len(a) == 0 or len(b) < 2:
        return 0, float("nan")
    da = a.descriptors.astype(np.float32)
    db = b.descriptors.astype(np.float32)
    # keypoint id of each row of b (rows of one detection share a location)
    _, bid = np.unique(np.round(b.ijk, 4), axis=0, return_inverse=True)
    bid = bid.ravel()
    n_ok = n_all = 0
    nb2 = (db * db).sum(1)
    for s in range(0, len(da), 1024):
        q = da[s : s + 1024]
        d2 = (q * q).sum(1)[:, None] + nb2[None, :] - 2.0 * q @ db.T
        d2 = np.maximum(d2, 0.0)
        j1 = d2.argmin(1)
        rows = np.arange(len(q))
        d1 = d2[rows, j1]
        other = d2.copy()
        if per_keypoint:
            other[bid[None, :] == bid[j1][:, None]] = np.inf  # rows of the same keypoint
        else:
            other[rows, j1] = np.inf
        dd2 = other.min(1)
        keep = np.sqrt(d1) <= ratio * np.sqrt(dd2)
        mapped = a.ijk[s : s + 1024] @ A.T + t
        err = np.linalg.norm(mapped - b.ijk[j1], axis=1)
        n_all += int(keep.sum())
        n_ok += int((keep & (err <= 2.0)).sum())
    return n_all, (n_ok / n_all if n_all else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per volume (median)")
    ap.add_argument(
        "--resolution", type=float, default=1.0, help="voxel size of the template in mm"
    )
    ap.add_argument(
        "--quick", action="store_true", help="the template at 3 mm, one run (a smoke test)"
    )
    ap.add_argument(
        "--peers",
        type=Path,
        default=None,
        help="build folder of ../shared/tools/build-peers: run the reference tools side by side",
    )
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.resolution = 1, 3.0
    res = args.resolution
    # the reference key files were extracted from the 1 mm template
    ref_dir = REF if res == 1.0 else None

    mni = kf.datasets.mni152(resolution_mm=res)
    rot, A, t = rotated_volume(np.asarray(mni.data, dtype=np.float32))
    rot_affine = np.diag([res, res, res, 1.0])
    print(f"MNI152 {res:g} mm {mni.shape}; rotated 15° ×1.1 → {rot.shape}")
    if ref_dir is not None:
        ref_t = json.loads((ref_dir / "mni152_t1_1mm_rot15z_s1.1.transform.json").read_text())
        dA = np.abs(np.array(ref_t["A"]) - A).max()
        dt = np.abs(np.array(ref_t["t"]) - t).max()
        print(
            f"  vs reference transform.json: max|ΔA| = {dA:.2e}, max|Δt| = {dt:.2e}, "
            f"shape {tuple(ref_t['new_shape'])} vs {rot.shape}"
        )

    with tempfile.TemporaryDirectory() as tmp:
        rot_path = str(Path(tmp) / "rot.npy")
        np.save(rot_path, rot)
        m_orig = measure("mni", res, args.repeats)
        m_rot = measure(rot_path, res, args.repeats)
        m_one = measure("mni", res, args.repeats, threads=1)

    k_orig = kf.extract(mni, device="cpu")
    k_rot = kf.extract(kf.Image(rot, rot_affine), device="cpu")

    print()
    print(f"{'':34s}{'keyfuse':>14s}{'featExtract':>14s}{'target':>12s}")

    def row(name: str, ours: str, ref: str = "", target: str = "") -> None:
        if res != 1.0:  # featExtract's figures and the targets are for the 1 mm template
            ref = target = ""
        print(f"{name:34s}{ours:>14s}{ref:>14s}{target:>12s}")

    med = lambda m: float(np.median(m["times"]))  # noqa: E731
    row("time MNI (s, median)", f"{med(m_orig):.3f}", "1.85*", "≤ 0.6")
    # the ratio to one scipy Gaussian (σ = 1.6) on the same volume survives machine noise
    ratio = med(m_orig) / float(np.median(m_orig["yardstick"]))
    row("  in yardsticks (scipy σ 1.6)", f"{ratio:.2f}", "", "≤ 2.5")
    # CPU seconds over the yardstick's (one thread): the work, whatever the load and cores
    cpu_ratio = float(np.median(m_orig["cpu"])) / float(np.median(m_orig["yardstick_cpu"]))
    row("  CPU in yardsticks' CPU", f"{cpu_ratio:.2f}")
    # the first call of a process allocates the scale space afresh; later calls reuse the
    # buffers of the workspace pool (KF_EXTRACT_POOL_MB), so it is shown apart
    row("  first call: wall / CPU (s)", f"{m_orig['times'][0]:.3f}/{m_orig['cpu'][0]:.2f}")
    row("time rotated (s, median)", f"{med(m_rot):.3f}", "4.35*", "≤ 1.4")
    cpu = lambda m: float(np.median(m["cpu"]))  # noqa: E731
    row("  CPU time MNI / rotated (s)", f"{cpu(m_orig):.2f}/{cpu(m_rot):.2f}")
    row("peak RSS MNI (MB)", f"{m_orig['rss_kb'] / 1024:.0f}", "197*", "≤ 250")
    row("  of which before extract (MB)", f"{m_orig['rss_before_kb'] / 1024:.0f}")
    row("peak RSS rotated (MB)", f"{m_rot['rss_kb'] / 1024:.0f}")

    ref_orig = ref_rot = None
    if ref_dir is not None:
        ref_orig = kf.read_key(ref_dir / "mni152_t1_1mm.featExtract.key")
        ref_rot = kf.read_key(ref_dir / "mni152_t1_1mm_rot15z_s1.1.featExtract.key")

    def cnt(k: kf.KeypointSet | None) -> str:
        return "" if k is None else f"{len(unique_points(k))}/{len(k)}"

    row("keypoints/rows MNI", cnt(k_orig), cnt(ref_orig))
    row("keypoints/rows rotated", cnt(k_rot), cnt(ref_rot))

    def figures(a: kf.KeypointSet, b: kf.KeypointSet) -> tuple[float, ...]:
        """repeatability, matches and their precision, the same with the plain 2nd NN"""
        return (
            repeatability(a, b, A, t),
            *ratio_matches(a, b, A, t),
            *ratio_matches(a, b, A, t, per_keypoint=False),
        )

    ours = figures(k_orig, k_rot)
    refs = (
        figures(ref_orig, ref_rot)
        if ref_orig is not None and ref_rot is not None
        else (None,) * len(ours)
    )
    lines = (
        ("repeatability (2 vox)", "{:.1%}", "≥ 90%"),
        ("NN+ratio 0.8 matches", "{}", "≥ 700"),
        ("  correct (2 vox)", "{:.1%}", "≥ 92%"),
        ("  plain 2nd-NN: matches", "{}", ""),
        ("  plain 2nd-NN: correct", "{:.1%}", ""),
    )
    for (name, pattern, target), mine, ref in zip(lines, ours, refs, strict=True):
        row(name, pattern.format(mine), "" if ref is None else pattern.format(ref), target)
    # the harder pair (3-axis rotation, rescaling, bias field, noise): keyfuse only
    bad, A3, t3 = corrupted_volume(np.asarray(mni.data, dtype=np.float32))
    k_bad = kf.extract(kf.Image(bad, rot_affine), device="cpu")
    rep3 = repeatability(k_orig, k_bad, A3, t3)
    n3, p3 = ratio_matches(k_orig, k_bad, A3, t3)
    print(f"3-axis rotated ×0.92, bias ±15%, noise 2% → {bad.shape}:")
    row("  repeatability (2 vox)", f"{rep3:.1%}")
    row("  NN+ratio 0.8 matches / correct", f"{n3}/{p3:.1%}")
    throughput(med(m_one), res)
    if args.peers is not None:
        side_by_side(args.peers, mni, rot, rot_affine, A, t)
    print(
        "machine load average (1 min): "
        f"{os.getloadavg()[0]:.1f} — wall times on a loaded machine are inflated"
    )
    print("* featExtract times/memory: TARGETS.md (measured by the project, not re-run here)")


def throughput(one_thread_s: float, resolution: float, cohort: int = 100_000) -> None:
    """Cohort extraction throughput from the one-thread time: scans run one per core (the
    batch functions' workers), so a machine's rate is the per-core rate times its cores."""
    per_core = 3600.0 / one_thread_s
    print()
    print(f"throughput, MNI152 {resolution:g} mm, one thread per scan ({one_thread_s:.2f} s):")
    print(f"  {per_core:,.0f} scans per hour per core")
    for cores in (2, 64):
        hours = cohort / (per_core * cores)
        print(f"  {cohort:,} scans on {cores} cores: {hours:,.1f} h ({hours * 60:,.0f} min)")


def side_by_side(
    peers: Path,
    mni: kf.Image,
    rot: np.ndarray,
    rot_affine: np.ndarray,
    A: np.ndarray,
    t: np.ndarray,
) -> None:
    """keyfuse's CLI and the reference tools on the same two volumes, in this run."""
    import nibabel as nib

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        volumes = {"mni": tmp / "mni.nii", "rot": tmp / "rot.nii"}
        nib.save(nib.Nifti1Image(np.asarray(mni.data, np.float32), mni.affine), volumes["mni"])
        nib.save(nib.Nifti1Image(rot, rot_affine), volumes["rot"])
        runs = peer_runs(peers, volumes, tmp)
    tools = list(runs)
    print()
    print("side by side, each a whole process on the same volumes (this run):")
    print(f"{'':34s}" + "".join(f"{name:>14s}" for name in tools))

    def line(name: str, cells: list[str]) -> None:
        print(f"{name:34s}" + "".join(f"{c:>14s}" for c in cells))

    for vol in ("mni", "rot"):
        r = [runs[tl][vol] for tl in tools]
        line(f"wall / CPU s ({vol})", [f"{x.wall:.2f}/{x.cpu:.2f}" for x in r])
        line(f"peak RSS MB ({vol})", [f"{x.rss_mb:.0f}" for x in r])
        line(f"keypoints/rows ({vol})", [f"{len(unique_points(x.keys))}/{len(x.keys)}" for x in r])
    figs = [
        (
            repeatability(runs[tl]["mni"].keys, runs[tl]["rot"].keys, A, t),
            *ratio_matches(runs[tl]["mni"].keys, runs[tl]["rot"].keys, A, t),
        )
        for tl in tools
    ]
    line("repeatability (2 vox)", [f"{f[0]:.1%}" for f in figs])
    line("NN+ratio 0.8 matches", [f"{f[1]}" for f in figs])
    line("  correct (2 vox)", [f"{f[2]:.1%}" for f in figs])


if __name__ == "__main__":
    main()
