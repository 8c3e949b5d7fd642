"""The final intensity fit of kf.align (keyfuse.align_refine) on a real volume."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

import keyfuse as kf
from keyfuse.align_refine import global_fit, moment_starts, refine_intensity


def _map_rms(mat: np.ndarray, truth: np.ndarray, xyz: np.ndarray) -> float:
    diff = xyz @ (mat - truth)[:3, :3].T + (mat - truth)[:3, 3]
    return float(np.sqrt((diff**2).sum(axis=1).mean()))


def _similarity(
    deg: float, axis: tuple[float, ...], shift: tuple[float, ...], scale: float, centre: np.ndarray
) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = (
        scale
        * Rotation.from_rotvec(
            np.deg2rad(deg) * np.asarray(axis) / np.linalg.norm(axis)
        ).as_matrix()
    )
    m[:3, 3] = centre + np.asarray(shift) - m[:3, :3] @ centre
    return m


@pytest.fixture(scope="module")
def atlas4() -> kf.Image:
    return kf.datasets.mni152(resolution_mm=4.0)


def _scan(
    atlas: kf.Image, deg: float = 25.0, scale: float = 1.04
) -> tuple[kf.Image, np.ndarray, np.ndarray]:
    """The atlas in another contrast (gamma 1.3, a smooth multiplicative bias) stored
    under a known similarity (``deg``°, ``scale``, 8 mm); (scan, truth scan world → atlas
    world, brain voxels of the scan in its world)."""
    d = np.asarray(atlas.data, np.float64)
    d = d / d.max()
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in d.shape], indexing="ij")
    bias = np.exp(0.15 * grid[0] - 0.1 * grid[2])
    data = (d**1.3 * bias * 1000).astype(np.float32)
    aff = np.asarray(atlas.affine, np.float64)
    centre = aff[:3, :3] @ ((np.asarray(d.shape) - 1) / 2) + aff[:3, 3]
    pose = _similarity(deg, (1, -2, 1), (6.0, -4.0, 3.0), scale, centre)  # atlas → scan
    scan = kf.Image(data, pose @ aff)
    brain = np.argwhere(ndimage.binary_erosion(d > 0.2))
    xyz = brain @ scan.affine[:3, :3].T + scan.affine[:3, 3]
    return scan, np.linalg.inv(pose), xyz


@pytest.fixture(scope="module")
def scan4(atlas4: kf.Image) -> tuple[kf.Image, np.ndarray, np.ndarray]:
    return _scan(atlas4)


def test_refinement_lowers_a_known_misalignment(atlas4, scan4) -> None:
    """A 3 mm / 2° / 2% error of the starting transform (4 mm voxels, another contrast)
    falls below 1 mm (a quarter voxel; the bias field is left for NCC to absorb), and the
    correlation rises."""
    scan, truth, xyz = scan4
    centre = xyz.mean(axis=0)
    for deg, shift, scale in ((2.0, (2.0, -2.0, 1.0), 1.02), (-2.0, (-1.5, 2.5, -1.0), 0.98)):
        init = _similarity(deg, (0.3, 1.0, -0.5), shift, scale, centre)
        init = truth @ init  # a perturbed scan → atlas map
        before = _map_rms(init, truth, xyz)
        fit = refine_intensity(scan, atlas4, init)
        after = _map_rms(fit.matrix, truth, xyz)
        assert before > 2.5, before
        assert fit.accepted and fit.ncc_after > fit.ncc_before
        assert after < 1.0, (before, after)


def test_refinement_never_leaves_the_trust_region(atlas4, scan4) -> None:
    """Onto an image with no common structure (smoothed noise) the fit finds nothing to
    improve on the right transform beyond the guard: it returns the start unchanged, or
    a transform within the trust region of it."""
    scan, truth, xyz = scan4
    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.standard_normal(atlas4.shape), 1.5).astype(np.float32)
    decoy = kf.Image(noise - noise.min(), atlas4.affine)
    fit = refine_intensity(scan, decoy, truth, trust_mm=4.0)
    if fit.accepted:
        assert fit.shift_mm <= 4.0 and fit.ncc_after > fit.ncc_before
        assert _map_rms(fit.matrix, truth, xyz) <= 4.0 * 1.5
    else:
        assert np.array_equal(fit.matrix, truth)
    # far outside the trust region, an accepted fit can move only so far
    far = truth @ _similarity(20.0, (1, 0, 0), (15.0, 0, 0), 1.0, xyz.mean(axis=0))
    fit = refine_intensity(scan, atlas4, far, trust_mm=3.0)
    assert fit.shift_mm <= 3.0 or not fit.accepted
    assert _map_rms(fit.matrix, far, xyz) <= 3.0 * 1.5


def test_align_with_images_refines_by_intensity() -> None:
    """kf.align on the images themselves (2 mm; a 25° turn, scale 1.04, another
    contrast) starts from the keypoint estimate and ends within 0.5 mm (the keypoints
    alone: 0.25 mm here, the fit 0.29: the bias field is not in NCC's model); on
    keypoints alone it stays as it was. (At 4 mm the 8 and 12 keypoints do not
    align, and the guard refuses the fit's 65 mm move from that start.)"""
    atlas = kf.datasets.mni152(resolution_mm=2.0)
    scan, truth, xyz = _scan(atlas)
    scan_kps = kf.extract(scan, device="cpu")
    atlas_kps = kf.extract(atlas, device="cpu")
    kp_only = kf.align(scan_kps, atlas_kps)
    assert "intensity" not in kp_only.extra
    fused = kf.align(scan_kps, atlas_kps, moving_image=scan, fixed_image=atlas)
    assert np.array_equal(kf.align(scan, atlas).matrix, fused.matrix)
    assert fused.extra["intensity"].accepted
    err_kp, err = _map_rms(kp_only.matrix, truth, xyz), _map_rms(fused.matrix, truth, xyz)
    assert err < 0.5 and err_kp < 0.5, (err_kp, err)
    assert np.array_equal(kf.align(scan, atlas, intensity=False).matrix, kp_only.matrix)


def test_align_starts_from_the_moments_when_the_keypoint_fit_is_refused(atlas4) -> None:
    """At 4 mm the 8–12 keypoints do not align the scan and the guard refuses the fit
    from their estimate; the fit from the foreground-moment starts (no keypoints
    needed) correlates better and is kept: a 3° / 8 mm pose in another contrast is
    recovered to within a voxel."""
    scan, truth, xyz = _scan(atlas4, deg=3.0, scale=1.0)
    kp = kf.align(scan, atlas4, intensity=False)
    assert _map_rms(kp.matrix, truth, xyz) > 8.0  # the keypoint estimate is wrong
    al = kf.align(scan, atlas4)
    fit = al.extra["intensity"]
    assert fit.accepted and not np.allclose(fit.start, kp.matrix)  # another start won
    assert _map_rms(al.matrix, truth, xyz) < 4.0


@pytest.mark.parametrize("deg", [90.0, 180.0])
def test_global_fit_recovers_any_rotation(atlas4, deg: float) -> None:
    """Without keypoints, the principal-axes starts find the pose whatever the initial
    rotation (about an oblique axis, scale 1.05, another contrast), to within a voxel,
    where a local fit from the centroids alone cannot."""
    scan, truth, xyz = _scan(atlas4, deg=deg, scale=1.05)
    fit = global_fit(scan, atlas4, trust_mm=20.0)
    assert fit.accepted and _map_rms(fit.matrix, truth, xyz) < 2.0
    local = refine_intensity(scan, atlas4, moment_starts(scan, atlas4)[0], trust_mm=20.0)
    assert _map_rms(local.matrix, truth, xyz) > 20.0


def test_intensity_refinement_bad_input(atlas4) -> None:
    kps = kf.extract(atlas4, device="cpu")
    with pytest.raises(kf.InvalidArgumentError, match="needs both 3-D images"):
        kf.align(kps, kps, intensity=True)
    flat = kf.Image(np.ones((8, 8), np.float32), spacing=(1.0, 1.0))
    with pytest.raises(kf.InvalidArgumentError):
        refine_intensity(flat, flat, np.eye(4))
    with pytest.raises(kf.InvalidArgumentError, match="4×4"):
        refine_intensity(atlas4, atlas4, np.full((4, 4), np.nan))
    blank = kf.Image(np.zeros(atlas4.shape, np.float32), atlas4.affine)
    with pytest.raises(kf.InvalidArgumentError):
        refine_intensity(atlas4, blank, np.eye(4))
