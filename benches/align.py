"""Cross-subject alignment: kf.align against SimpleITK's intensity-based similarity
registration (Mattes MI, three resolutions), side by side on the same cases. Prints
figures, asserts nothing.

    .venv/bin/python benches/align.py [--resolution 2] [--pairs 3] [--angles 0,120] [--quick]

Cases: simulated subjects (``kf.datasets.simulate_cohort``: another anatomy, texture,
bias, contrast, noise and a random pose of up to 10°, ±5%, ±8 mm each; no group size
change), each moving scan aligned onto the MNI152 template (the atlas), onto a relative
(twin or sibling: shared family anatomy and texture) and onto an unrelated subject. The
true map moving world → fixed world is ``pose_fixed ∘ pose_moving⁻¹`` (the subjects' own
anatomical differences remain, for both methods alike). The same pairs are run again
with the moving scan stored rotated by 60°, 120° and 180° (its affine only: the same
voxels in another world pose). Error: RMS distance (mm) over the moving scan's brain
voxels between the estimated and the true map, for kf.align with the images (keypoint
estimate + final intensity fit) and for its keypoint estimate alone ("kp err", the
intensity fit's start). kf.align time is given for the alignment alone (keypoints
already extracted, as in an index) and with the extraction of both scans; SimpleITK's
for the registration.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy.spatial.transform import Rotation

import keyfuse as kf
from keyfuse.experiments.segmentation import to_sitk


def sitk_similarity(fixed: kf.Image, moving: kf.Image) -> np.ndarray:
    """SimpleITK similarity registration moving → fixed (4×4, world mm): Mattes MI (50
    bins, 20% random samples, fixed seed), regular-step gradient descent, shrink factors
    4/2/1 with smoothing 2/1/0 voxels, centred geometric initialisation."""
    import SimpleITK as sitk

    f = to_sitk(np.asarray(fixed.data, np.float32), fixed.affine, sitk.sitkFloat32)
    m = to_sitk(np.asarray(moving.data, np.float32), moving.affine, sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(
        f, m, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=200, relaxationFactor=0.5
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    out = reg.Execute(f, m)
    tr = sitk.Similarity3DTransform(
        out.GetNthTransform(0) if out.GetName() == "CompositeTransform" else out
    )
    a = np.asarray(tr.GetMatrix()).reshape(3, 3)
    c = np.asarray(tr.GetCenter())
    t = np.asarray(tr.GetTranslation())
    fixed_to_moving = np.eye(4)
    fixed_to_moving[:3, :3] = a
    fixed_to_moving[:3, 3] = c + t - a @ c
    return np.linalg.inv(fixed_to_moving)


def rms(mat: np.ndarray, truth: np.ndarray, xyz: np.ndarray) -> float:
    d = mat - truth
    return float(np.sqrt(((xyz @ d[:3, :3].T + d[:3, 3]) ** 2).sum(axis=1).mean()))


def turned(img: kf.Image, degrees: float) -> tuple[kf.Image, np.ndarray]:
    """The image stored rotated about an oblique axis through its centre (affine only)
    and the rotation (4×4, old world → new world)."""
    centre = img.affine[:3, :3] @ ((np.asarray(img.shape) - 1) / 2) + img.affine[:3, 3]
    rot = np.eye(4)
    rot[:3, :3] = Rotation.from_rotvec(
        np.deg2rad(degrees) * np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    ).as_matrix()
    rot[:3, 3] = centre - rot[:3, :3] @ centre
    return kf.Image(img.data, rot @ img.affine), rot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=float, default=2.0, help="voxel size (mm)")
    ap.add_argument("--pairs", type=int, default=3, help="pairs of each kind")
    ap.add_argument(
        "--angles", default="0,60,120,180", help="initial rotations of the moving scan (°)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="1 pair of each kind at 3 mm, no rotation (a smoke test)",
    )
    args = ap.parse_args()
    res, n_pairs = (3.0, 1) if args.quick else (args.resolution, args.pairs)
    angles = (0.0,) if args.quick else tuple(float(a) for a in args.angles.split(","))

    # families of two (MZ twins, DZ twins, siblings in turn); no group size change
    cohort = kf.datasets.simulate_cohort(
        None,
        n_families=n_pairs + 1,
        family_size=2,
        n_rescans=0,
        resolution_mm=res,
        group_effect=0.0,
        progress=False,
    )
    atlas = kf.datasets.mni152(resolution_mm=res)
    poses = [np.asarray(json.loads(r["transform"])).reshape(4, 4) for r in cohort.table]
    cases = []  # (kind, moving index, fixed image, fixed pose: subject -> fixed world)
    for p in range(n_pairs):
        i = 2 * p
        cases.append(("atlas", i, atlas, np.eye(4), "MNI152"))
        cases.append(("relative", i, cohort.image(i + 1), poses[i + 1], str(i + 1)))
        cases.append(("unrelated", i, cohort.image(i + 2), poses[i + 2], str(i + 2)))
    print(
        f"{len(cases)} cases at {res:g} mm (moving scan -> MNI152, -> a relative, -> an "
        f"unrelated subject), SimpleITK {_sitk_version()}"
    )
    print(
        f"{'kind':>9} {'pair':>10} {'rot°':>5} | {'kp err':>7} {'kf err':>7} {'align s':>8} "
        f"{'+extr s':>8} | {'sitk err':>8} {'sitk s':>7}"
    )
    rows: dict[tuple[str, float], list[tuple[float, ...]]] = {}
    fixed_kps: dict[int, kf.KeypointSet] = {}
    for kind, i, fixed, fixed_pose, fname in cases:
        brain = np.argwhere(cohort.label_map(i).data > 0).astype(np.float64)
        t0 = time.perf_counter()
        if id(fixed) not in fixed_kps:
            fixed_kps[id(fixed)] = kf.extract(fixed, device="cpu")
        t_fixed = time.perf_counter() - t0
        for ang in angles:
            moving, rot = turned(cohort.image(i), ang)
            truth = fixed_pose @ np.linalg.inv(poses[i]) @ np.linalg.inv(rot)
            xyz = brain @ moving.affine[:3, :3].T + moving.affine[:3, 3]
            t0 = time.perf_counter()
            kf_moving = kf.extract(moving, device="cpu")
            t1 = time.perf_counter()
            try:
                al = kf.align(
                    kf_moving, fixed_kps[id(fixed)], moving_image=moving, fixed_image=fixed
                )
                est, kp_est = al.matrix, al.extra["intensity"].start
            except kf.InvalidArgumentError:
                est = kp_est = np.eye(4)
            t2 = time.perf_counter()
            sitk_est = sitk_similarity(fixed, moving)
            t3 = time.perf_counter()
            row = (
                rms(est, truth, xyz),
                t2 - t1,
                t2 - t0 + t_fixed,
                rms(sitk_est, truth, xyz),
                t3 - t2,
                rms(kp_est, truth, xyz),
            )
            rows.setdefault((kind, ang), []).append(row)
            print(
                f"{kind:>9} {i:>3} -> {fname:<6} {ang:5.0f} | {row[5]:7.2f} {row[0]:7.2f} "
                f"{row[1]:8.2f} {row[2]:8.2f} | {row[3]:8.2f} {row[4]:7.2f}",
                flush=True,
            )
    print("\nmedian error (mm), cases within 5 mm, median time (s)")
    for (kind, ang), r in rows.items():
        a = np.asarray(r)
        print(
            f"  {kind:>9} {ang:4.0f}°: keypoints only {np.median(a[:, 5]):6.2f} mm, "
            f"kf.align {np.median(a[:, 0]):6.2f} mm "
            f"({(a[:, 0] < 5).sum()}/{len(a)}), {np.median(a[:, 1]):.2f} s "
            f"({np.median(a[:, 2]):.2f} s with extraction) | SimpleITK "
            f"{np.median(a[:, 3]):6.2f} mm ({(a[:, 3] < 5).sum()}/{len(a)}), "
            f"{np.median(a[:, 4]):.2f} s"
        )
    for kind in ("atlas", "relative", "unrelated"):
        allr = np.concatenate([np.asarray(r) for (k, _), r in rows.items() if k == kind])
        conv = allr[:, 3] < 5
        if conv.any():
            print(
                f"{kind}: where SimpleITK converged ({conv.sum()}/{len(allr)}) median error "
                f"kf.align {np.median(allr[conv, 0]):.2f} mm (keypoints only "
                f"{np.median(allr[conv, 5]):.2f} mm) vs SimpleITK "
                f"{np.median(allr[conv, 3]):.2f} mm; kf.align within 5 mm in "
                f"{(allr[:, 0] < 5).sum()}/{len(allr)}, SimpleITK in {conv.sum()}/{len(allr)}"
            )
    allr = np.concatenate([np.asarray(r) for r in rows.values()])
    print(
        f"speed-up (median SimpleITK time / median kf.align time): "
        f"{np.median(allr[:, 4]) / np.median(allr[:, 1]):.1f}x alignment alone, "
        f"{np.median(allr[:, 4]) / np.median(allr[:, 2]):.1f}x with extraction"
    )


def _sitk_version() -> str:
    import SimpleITK as sitk

    return str(sitk.Version.VersionString())


if __name__ == "__main__":
    main()
