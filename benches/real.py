"""Real scans, stored every way: the storage-orientation sweep of issue 10. Prints figures,
asserts nothing.

    .venv/bin/python benches/real.py [--resolution 2] [--quick]

1. The 48 axis orientations (every permutation and flip of the voxel axes) of the MNI152
   template: keypoints, world repeatability within one voxel, NN + ratio-0.8 match
   precision (a match is right when its two keypoints lie within one voxel in world
   space) and whether descriptors are bit-identical to the RAS storage, both as keyfuse
   extracts now (on the nearest-RAS re-storage) and as it did before (on the stored
   array, described in its own voxel axes).
2. Oblique storages: the template resampled (cubic) onto grids rotated by 5–45° about a
   fixed oblique axis, plain and mirrored, extracted as keyfuse does (resliced onto the
   world lattice) and on the stored grid (``reslice="never"``).

The 2009a template is symmetric left-right; it is cropped off-centre (as in the tests) so
that an x-flipped storage is a different array.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

import keyfuse as kf


def base_image(resolution: float) -> kf.Image:
    full = kf.datasets.mni152(resolution_mm=resolution)
    affine = full.affine.copy()
    affine[:3, 3] += full.affine[:3, :3] @ [1, 2, 0]
    return kf.Image(np.ascontiguousarray(full.data[1:, 2:, :-1]), affine)


def orientations() -> list[np.ndarray]:
    return [
        np.array(list(zip(perm, flips, strict=True)), dtype=float)
        for perm in itertools.permutations(range(3))
        for flips in itertools.product((1, -1), repeat=3)
    ]


def name(ornt: np.ndarray) -> str:
    """Axis code of the storage (nibabel's, e.g. 'LAS' for an x-flipped RAS array)."""
    from nibabel.orientations import aff2axcodes

    return "".join(aff2axcodes(inv_ornt_aff(ornt, (2, 2, 2))))


def restore(img: kf.Image, ornt: np.ndarray) -> kf.Image:
    data = np.ascontiguousarray(apply_orientation(img.data, ornt))
    return kf.Image(data, img.affine @ inv_ornt_aff(ornt, img.shape))


def extract_stored(img: kf.Image) -> kf.KeypointSet:
    """The behaviour before issue 10: extraction on the array as stored. The array with a
    diagonal affine is already in its nearest-RAS storage, so keyfuse describes it as
    stored; the keypoints then get the image's real affine."""
    grid = np.diag([*(float(s) for s in img.spacing), 1.0])
    k = kf.extract(kf.Image(np.asarray(img.data, np.float32), grid), device="cpu")
    return kf.KeypointSet(
        k.ijk,
        k.scale,
        orientation=k.orientation,
        descriptors=k.descriptors,
        polarity=k.polarity,
        response=k.response,
        eigenvalues=k.eigenvalues,
        flags=k.flags,
        affine=img.affine,
        shape=img.shape,
    )


def repeatability(ref: kf.KeypointSet, kps: kf.KeypointSet, tol: float) -> float:
    if len(kps) == 0:
        return 0.0
    d, _ = cKDTree(kps.xyz).query(ref.xyz)
    return float(np.mean(d <= tol))


def precision(kps: kf.KeypointSet, ref: kf.KeypointSet, tol: float) -> tuple[float, int]:
    m = kf.match(kps, ref, ratio=0.8, device="cpu")
    if len(m.ia) == 0:
        return 0.0, 0
    ok = np.linalg.norm(kps.xyz[m.ia] - ref.xyz[m.ib], axis=1) <= tol
    return float(np.mean(ok)), len(ok)


def oblique(img: kf.Image, angle: float, mirror: bool, shift: float = 0.0) -> kf.Image:
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    rot = Rotation.from_rotvec(np.deg2rad(angle) * axis).as_matrix()
    return kf.datasets.oblique(img, rot, mirror=mirror, shift=shift)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=float, default=2.0, help="template voxel size (mm)")
    ap.add_argument("--quick", action="store_true", help="8 orientations, 2 oblique angles")
    args = ap.parse_args()

    img = base_image(args.resolution)
    vox = float(img.spacing.max())
    ref = kf.extract(img, device="cpu")
    print(f"MNI152 at {args.resolution:g} mm, shape {img.shape}: {len(ref)} keypoints")
    orients = orientations()
    if args.quick:
        orients = orients[::6]
    print("\n1. storage orientations (tolerance 1 voxel)")
    print(
        f"{'storage':8} {'det':>4} | {'now: rep':>8} {'prec':>6} {'n':>4} {'bits':>5} | "
        f"{'before: rep':>11} {'prec':>6} {'n':>4}"
    )
    now_rep, now_prec, old_rep, old_prec, identical = [], [], [], [], 0
    t_now = t_old = 0.0
    for ornt in orients:
        other = restore(img, ornt)
        t0 = time.perf_counter()
        kps = kf.extract(other, device="cpu")
        t1 = time.perf_counter()
        old = extract_stored(other)
        t2 = time.perf_counter()
        t_now += t1 - t0
        t_old += t2 - t1
        same = len(kps) == len(ref) and np.array_equal(kps.descriptors, ref.descriptors)
        identical += same
        r, (p, n) = repeatability(ref, kps, vox), precision(kps, ref, vox)
        ro, (po, no) = repeatability(ref, old, vox), precision(old, ref, vox)
        now_rep.append(r)
        now_prec.append(p)
        old_rep.append(ro)
        old_prec.append(po)
        det = int(np.sign(np.linalg.det(other.affine[:3, :3])))
        print(
            f"{name(ornt):8} {det:>+4d} | {r:8.3f} {p:6.3f} {n:4d} {'yes' if same else 'no':>5} | "
            f"{ro:11.3f} {po:6.3f} {no:4d}"
        )
    print(
        f"now:    repeatability min {min(now_rep):.3f}, precision min {min(now_prec):.3f}, "
        f"bit-identical {identical}/{len(orients)}, {t_now / len(orients):.3f} s/extraction"
    )
    print(
        f"before: repeatability min {min(old_rep):.3f}, precision min {min(old_prec):.3f} "
        f"(median {np.median(old_prec):.3f}), {t_old / len(orients):.3f} s/extraction"
    )

    print("\n2. oblique storages (cubic resampling; tolerance 1 and 1.5 voxels)")
    print("   (mirror: stored mirrored along i; ½-vox: no rotation, grid shifted half a voxel)")
    print("   now: resliced onto the world lattice (½-vox: reslice='lattice');")
    print("   stored grid: reslice='never', the behaviour before")
    print(
        f"{'angle':>6} {'mirror':>6} | {'n':>4} {'rep@1':>6} {'rep@1.5':>7} {'prec@1':>6} "
        f"{'prec@1.5':>8} {'matches':>7} | stored grid: {'rep@1':>6} {'prec@1':>6}"
    )
    angles = (15.0, 45.0) if args.quick else (5.0, 15.0, 30.0, 45.0)
    inside = np.linalg.norm(ref.xyz - ref.xyz.mean(axis=0), axis=1) < 60
    for angle, mirror, shift in [(0.0, False, 0.5)] + [
        (a, m, 0.0) for a in angles for m in (False, True)
    ]:
        stored = oblique(img, angle, mirror, shift)
        kps = kf.extract(stored, device="cpu", reslice="lattice" if shift else "oblique")
        r1 = repeatability(ref[inside], kps, vox)
        r15 = repeatability(ref[inside], kps, 1.5 * vox)
        p1, n = precision(kps, ref, vox)
        p15, _ = precision(kps, ref, 1.5 * vox)
        old = kf.extract(stored, device="cpu", reslice="never")
        label = "½-vox" if shift else ("yes" if mirror else "no")
        print(
            f"{angle:6.0f} {label:>6} | {len(kps):4d} {r1:6.3f} "
            f"{r15:7.3f} {p1:6.3f} {p15:8.3f} {n:7d} | {'':13}"
            f"{repeatability(ref[inside], old, vox):6.3f} {precision(old, ref, vox)[0]:6.3f}"
        )


if __name__ == "__main__":
    main()
