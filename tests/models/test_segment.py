"""Keypoint-transfer segmentation: synthetic atlases with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import keyfuse as kf
from keyfuse import _core
from keyfuse.errors import InvalidArgumentError, InvalidImageError
from keyfuse.segment import KeypointTransferSegmenter, normalize_intensity, pair_atlas_files

SHAPE = (40, 44, 36)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-40.0, -44.0, -36.0]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def make_atlas(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three ellipsoid organs (labels 1, 2, 3) with distinct textured intensities."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    labels = np.zeros(SHAPE, np.int32)
    for lab, (c, r) in enumerate(
        [((14, 15, 12), (7, 8, 6)), ((26, 28, 22), (8, 7, 7)), ((20, 32, 10), (4, 4, 4))], 1
    ):
        inside = sum(((v - cc) / rr) ** 2 for v, cc, rr in zip((z, y, x), c, r, strict=True)) <= 1
        labels[inside] = lab
    image = np.where(labels > 0, 300.0 + 200.0 * labels, 60.0)
    image = image + rng.normal(0, 5, SHAPE)
    return labels, image.astype(np.float32)


def synthetic_keypoints(
    labels: np.ndarray, affine: np.ndarray, n: int, seed: int, background: int = 10
) -> kf.KeypointSet:
    """Keypoints at random organ voxels (plus some in the background) with random
    SIFT-Rank descriptors."""
    rng = np.random.default_rng(seed)
    organ = np.argwhere(labels > 0)
    bg = np.argwhere(labels == 0)
    ijk = np.concatenate(
        [organ[rng.choice(len(organ), n, replace=False)], bg[rng.choice(len(bg), background)]]
    ).astype(np.float64)
    desc = np.stack([rng.permutation(64) for _ in range(len(ijk))]).astype(np.uint8)
    return kf.KeypointSet(
        ijk, np.full(len(ijk), 3.0), descriptors=desc, affine=affine, shape=labels.shape
    )


def translate(vol: np.ndarray, shift: tuple[int, int, int]) -> np.ndarray:
    """``out[v + shift] = vol[v]``, zero filled."""
    out = np.zeros_like(vol)
    src = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, vol.shape, strict=True))
    dst = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, vol.shape, strict=True))
    out[dst] = vol[src]
    return out


def shifted_case(shift=(3, -2, 4), origin_offset=(5.0, -3.0, 1.0)):
    labels, image = make_atlas()
    kps = synthetic_keypoints(labels, AFFINE, 60, seed=1)
    test_affine = AFFINE.copy()
    test_affine[:3, 3] += origin_offset
    test_img = kf.Image(translate(image, shift), test_affine)
    moved = kps.ijk + np.array(shift)
    inside = np.all((moved >= 0) & (moved < np.array(SHAPE)), axis=1)
    test_kps = kf.KeypointSet(
        moved[inside],
        kps.scale[inside],
        descriptors=kps.descriptors[inside],
        affine=test_affine,
        shape=SHAPE,
    )
    return labels, image, kps, test_img, test_kps, translate(labels, shift)


def test_translated_copy_is_segmented_exactly() -> None:
    labels, image, kps, test_img, test_kps, truth = shifted_case()
    seg = KeypointTransferSegmenter(progress=False)
    seg.fit([kf.Image(image, AFFINE)], [labels], keypoints=[kps])
    assert seg.labels_ == [1, 2, 3]
    out = seg.predict(test_img, keypoints=test_kps)
    assert out.labels.shape == SHAPE
    np.testing.assert_array_equal(out.affine, test_img.affine)
    for lab in (1, 2, 3):
        assert dice(out.labels == lab, truth == lab) > 0.99, lab
    assert set(out.probabilities) == {1, 2, 3}
    assert out.n_transfers > 0
    # wall and CPU seconds for the same stages
    assert set(out.cpu_timings) == set(out.timings) >= {"extract", "match", "transfer"}
    assert all(v >= 0.0 for v in out.cpu_timings.values())
    # the voted labels of organ keypoints are their true labels
    idx = np.rint(test_kps.ijk).astype(int)
    true_kp = truth[idx[:, 0], idx[:, 1], idx[:, 2]]
    voted = out.keypoint_labels
    assert np.all((voted == true_kp) | (voted == 0))
    assert np.all(voted[true_kp == 0] == 0)  # background keypoints found no labelled match


def test_limited_field_of_view_segments_unchanged() -> None:
    labels, image, kps, test_img, test_kps, truth = shifted_case()
    # crop the test image (origin moves accordingly) and keep the keypoints inside
    lo = np.array([16, 18, 10])
    hi = np.array([38, 42, 34])
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    aff = test_img.affine.copy()
    aff[:3, 3] = aff[:3, :3] @ lo + aff[:3, 3]
    crop_img = kf.Image(test_img.data[crop], aff)
    inside = np.all((test_kps.ijk >= lo) & (test_kps.ijk < hi), axis=1)
    sub = test_kps[np.flatnonzero(inside)]
    crop_kps = kf.KeypointSet(
        sub.ijk - lo, sub.scale, descriptors=sub.descriptors, affine=aff, shape=crop_img.shape
    )
    seg = KeypointTransferSegmenter(progress=False)
    seg.fit([kf.Image(image, AFFINE)], [labels], keypoints=[kps])
    out = seg.predict(crop_img, keypoints=crop_kps)
    assert out.labels.shape == crop_img.shape
    np.testing.assert_array_equal(out.affine, aff)
    for lab in np.unique(truth[crop]):
        if lab:
            assert dice(out.labels == lab, truth[crop] == lab) > 0.99


def test_background_keypoints_never_transfer() -> None:
    labels, image, kps, test_img, test_kps, _ = shifted_case()
    idx = np.rint(kps.ijk).astype(int)
    at_bg = labels[idx[:, 0], idx[:, 1], idx[:, 2]] == 0
    seg = KeypointTransferSegmenter(progress=False)
    # only the background keypoints of the atlas: they are all dropped, nothing transfers
    seg.fit([kf.Image(image, AFFINE)], [labels], keypoints=[kps[np.flatnonzero(at_bg)]])
    assert len(seg._atlases[0].keypoints) == 0
    out = seg.predict(test_img, keypoints=test_kps)
    assert out.n_transfers == 0
    assert not out.labels.any()
    assert not out.keypoint_labels.any()
    # with all keypoints: those stored all carry organ labels
    seg.fit([kf.Image(image, AFFINE)], [labels], keypoints=[kps])
    stored = seg._atlases[0]
    assert len(stored.keypoints) == int((~at_bg).sum())
    assert np.all(stored.keypoint_labels > 0)


def test_transfer_from_other_labels() -> None:
    """Organ 3 has no keypoints of its own; it is transferred by organ 2's keypoints."""
    labels, image, kps, test_img, test_kps, truth = shifted_case()
    idx = np.rint(kps.ijk).astype(int)
    not3 = labels[idx[:, 0], idx[:, 1], idx[:, 2]] != 3
    keep = kps[np.flatnonzero(not3)]
    plain = KeypointTransferSegmenter(progress=False, transfer_from=None)
    plain.fit([kf.Image(image, AFFINE)], [labels], keypoints=[keep])
    out = plain.predict(test_img, keypoints=test_kps)
    assert not (out.labels == 3).any()
    across = KeypointTransferSegmenter(progress=False, transfer_from={3: [2, 3]})
    across.fit([kf.Image(image, AFFINE)], [labels], keypoints=[keep])
    out = across.predict(test_img, keypoints=test_kps)
    assert dice(out.labels == 3, truth == 3) > 0.99
    assert dice(out.labels == 2, truth == 2) > 0.99


def test_auto_transfer_from_adjacent_labels() -> None:
    """By default a small organ without keypoints of its own in the test image is carried
    by the keypoints of the organ it touches; where it has its own keypoints the weaker
    across transfers change nothing."""
    labels, _ = make_atlas()
    z, y, x = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    labels[labels == 3] = 0
    labels[(z - 26) ** 2 + (y - 28) ** 2 + (x - 28) ** 2 <= 9] = 3  # on organ 2's edge
    rng = np.random.default_rng(5)
    image = (np.where(labels > 0, 300.0 + 200.0 * labels, 60.0) + rng.normal(0, 5, SHAPE)).astype(
        np.float32
    )
    kps = synthetic_keypoints(labels, AFFINE, 80, seed=2)
    shift = (2, -1, -3)
    test_img = kf.Image(translate(image, shift), AFFINE)
    truth = translate(labels, shift)
    moved = kf.KeypointSet(
        kps.ijk + shift, kps.scale, descriptors=kps.descriptors, affine=AFFINE, shape=SHAPE
    )
    idx = np.rint(moved.ijk).astype(int)
    no3 = moved[np.flatnonzero(truth[idx[:, 0], idx[:, 1], idx[:, 2]] != 3)]
    auto = KeypointTransferSegmenter(progress=False)
    auto.fit([kf.Image(image, AFFINE)], [labels], keypoints=[kps])
    assert 3 in auto._organs_for()[2]  # organ 2 carries organ 3 (they touch)
    assert 3 not in auto._organs_for()[1]
    own = KeypointTransferSegmenter(progress=False, transfer_from=None)
    own.fit([kf.Image(image, AFFINE)], [labels], keypoints=[kps])
    # test keypoints of organ 3 removed: only the default finds it
    assert not (own.predict(test_img, keypoints=no3).labels == 3).any()
    out = auto.predict(test_img, keypoints=no3)
    assert dice(out.labels == 3, truth == 3) > 0.99
    assert dice(out.labels == 2, truth == 2) > 0.99
    # with its own keypoints: the same segmentation as without across transfers
    a = auto.predict(test_img, keypoints=moved)
    b = own.predict(test_img, keypoints=moved)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert dice(a.labels == 3, truth == 3) > 0.99
    with pytest.raises(InvalidArgumentError):
        KeypointTransferSegmenter(transfer_from="all")
    with pytest.raises(InvalidArgumentError):
        KeypointTransferSegmenter(across_weight=2.0)


def test_intensity_likelihood_rejects_mismatched_tissue() -> None:
    labels, image, kps, test_img, test_kps, truth = shifted_case()
    # the test image's organ 1 looks like background: with the intensity term on it is
    # not transferred there; with it off (nu=None) it is
    data = test_img.data.copy()
    data[truth == 1] = 60.0
    dark = kf.Image(data, test_img.affine)
    on = KeypointTransferSegmenter(progress=False, nu={1: 20.0})
    on.fit([kf.Image(image, AFFINE)], [labels], keypoints=[kps])
    assert (on.predict(dark, keypoints=test_kps).labels == 1).sum() == 0
    off = KeypointTransferSegmenter(progress=False, nu=None)
    off.fit([kf.Image(image, AFFINE)], [labels], keypoints=[kps])
    assert dice(off.predict(dark, keypoints=test_kps).labels == 1, truth == 1) > 0.99


def test_bad_inputs_raise() -> None:
    labels, image = make_atlas()
    seg = KeypointTransferSegmenter(progress=False)
    with pytest.raises(InvalidArgumentError):
        seg.fit([image], [labels[:-1]])
    with pytest.raises(InvalidArgumentError):
        seg.fit([image, image], [labels])
    with pytest.raises(InvalidArgumentError):
        seg.fit([image], [np.zeros_like(labels)], keypoints=[kf.KeypointSet.empty()])
    with pytest.raises(InvalidArgumentError):
        seg.fit([image], [labels - 1], keypoints=[kf.KeypointSet.empty()])
    with pytest.raises(InvalidArgumentError):
        seg.predict(image)  # not fitted
    with pytest.raises(InvalidArgumentError):
        KeypointTransferSegmenter(background_fraction=1.5)
    with pytest.raises(InvalidArgumentError):
        KeypointTransferSegmenter(nu=-1.0)
    seg.fit([image], [labels], keypoints=[kf.KeypointSet.empty()])
    with pytest.raises(InvalidImageError):
        seg.predict(np.zeros((4, 4)))
    bad = image.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InvalidImageError):
        seg.predict(bad, keypoints=kf.KeypointSet.empty())
    with pytest.raises(InvalidArgumentError):
        _core.vote_labels(
            2,
            np.array([5], np.uint32),
            np.array([1], np.int32),
            np.zeros(1, np.float32),
            np.ones(1, np.float32),
        )


def test_core_transfer_matches_numpy_reference() -> None:
    """The Rust accumulation equals a direct numpy sum of shifted, weighted maps."""
    labels, image = make_atlas(3)
    intensity = normalize_intensity(image)
    atlases = _core.TransferAtlases([labels], [intensity])
    rng = np.random.default_rng(0)
    n = 25
    shifts = rng.integers(-4, 5, (n, 3)).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, n)
    lab = rng.integers(1, 4, n).astype(np.int32)
    test = translate(intensity, (1, 2, -1)) + rng.normal(0, 20, SHAPE).astype(np.float32)
    nu = np.array([40.0, 60.0, 80.0], np.float32)
    out, probs, total, _ = atlases.transfer(
        test.astype(np.float32), np.zeros(n, np.uint32), lab, shifts, weights, nu, 0.15
    )
    ref = np.zeros((3, *SHAPE))
    for s, w, lb in zip(shifts, weights, lab, strict=True):
        mask = translate((labels == lb).astype(float), tuple(s))
        moved = translate(intensity, tuple(s))
        g = np.exp(-((test - moved) ** 2) / (2 * nu[lb - 1] ** 2))
        ref[lb - 1] += w * mask * g
    for k in range(3):
        ref[k] /= weights[lab == k + 1].sum()
    np.testing.assert_allclose(total, [weights[lab == k].sum() for k in (1, 2, 3)])
    np.testing.assert_allclose(probs, ref, atol=3e-3)
    best = ref.argmax(0) + 1
    expect = np.where(ref.max(0) >= 0.15, best, 0)
    agree = (out == expect) | (np.abs(ref.max(0) - 0.15) < 5e-3)
    assert agree.mean() > 0.999


def textured_atlas() -> tuple[np.ndarray, np.ndarray]:
    """A large ellipsoid split into three organs, filled with a blobby texture."""
    from scipy import ndimage

    z, y, x = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    c = np.array(SHAPE) / 2
    inside = ((z - c[0]) / 17) ** 2 + ((y - c[1]) / 19) ** 2 + ((x - c[2]) / 15) ** 2 <= 1
    labels = np.where(inside, np.where(z < c[0], 1, np.where(y < c[1], 2, 3)), 0)
    noise = np.random.default_rng(3).standard_normal(SHAPE)
    tex = ndimage.gaussian_filter(noise, 2.5) + 0.5 * ndimage.gaussian_filter(noise, 1.2)
    tex = 100.0 * (tex - tex.min()) / (tex.max() - tex.min())
    return labels.astype(np.int32), (tex * (1 + 0.3 * labels)).astype(np.float32)


def test_real_keypoints_segment_a_translated_copy() -> None:
    """End to end with extracted keypoints and kf.match."""
    labels, image = textured_atlas()
    shift = (2, 3, -3)
    # 2 mm voxels: extraction at 1 mm-equivalent scales by default
    seg = KeypointTransferSegmenter(progress=False, device="cpu")
    seg.fit([kf.Image(image, AFFINE)], [labels])
    assert len(seg._atlases[0].keypoints) > 30
    out = seg.predict(kf.Image(translate(image, shift), AFFINE))
    truth = translate(labels, shift)
    scores = [dice(out.labels == lab, truth == lab) for lab in (1, 2, 3)]
    assert min(scores) > 0.95, scores


def test_segment_command(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from keyfuse.cli import cli

    labels, image = textured_atlas()
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    kf.Image(image, AFFINE).save(tmp_path / "img" / "s1.nii.gz")
    kf.Image(labels.astype(np.int16), AFFINE).save(tmp_path / "lab" / "s1_labels.nii.gz")
    kf.Image(translate(image, (1, 1, 1)), AFFINE).save(tmp_path / "new.nii.gz")
    assert pair_atlas_files(tmp_path / "img", tmp_path / "lab")[0][1].name == "s1_labels.nii.gz"
    result = CliRunner().invoke(
        cli,
        [
            "segment", "--atlases", str(tmp_path / "img"),
            "--labels", str(tmp_path / "lab"),
            str(tmp_path / "new.nii.gz"),
            "-o", str(tmp_path / "out.nii.gz"),
            "--probabilities", str(tmp_path / "prob.nii.gz"),
            "--extract-param", "sigma0=0.8", "--extract-param", "initial_blur=0.25",
            "--across-weight", "0.1", "--quiet", "--device", "cpu",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = kf.load_image(tmp_path / "out.nii.gz")
    np.testing.assert_allclose(out.affine, AFFINE)
    assert out.shape == SHAPE
    assert dice(out.data == 1, translate(labels, (1, 1, 1)) == 1) > 0.95
    import nibabel as nib

    assert nib.load(tmp_path / "prob.nii.gz").shape == (*SHAPE, 3)
    bad = CliRunner().invoke(
        cli,
        ["segment", "--atlases", str(tmp_path / "img"), "--labels", str(tmp_path / "img"),
         str(tmp_path / "new.nii.gz"), "-o", str(tmp_path / "x.nii.gz")],
    )  # fmt: skip
    assert bad.exit_code != 0
    bad = CliRunner().invoke(
        cli,
        ["segment", "--atlases", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
         str(tmp_path / "new.nii.gz"), "-o", str(tmp_path / "x.nii.gz"),
         "--extract-param", "sigma0"],
    )  # fmt: skip
    assert bad.exit_code != 0


def test_match_all_equals_match_per_atlas() -> None:
    """The segmenter's one-call matcher gives exactly kf.match's matches per atlas."""
    rng = np.random.default_rng(3)

    def kps(n: int) -> kf.KeypointSet:
        ijk = rng.uniform(0, 30, (n, 3)).round()  # coarse: spatial ties occur
        desc = np.stack([rng.permutation(64) for _ in range(n)]).astype(np.uint8)
        return kf.KeypointSet(
            ijk, rng.uniform(1.0, 4.0, n), descriptors=desc, affine=np.diag([2.0, 2.0, 2.0, 1.0])
        )

    test = kps(200)
    atlases = [kps(150), kps(300), kps(1)]
    labels = [rng.integers(1, 4, len(a)).astype(np.int32) for a in atlases]
    core = _core.AtlasKeypoints(
        [a.descriptors for a in atlases],
        [np.ascontiguousarray(a.xyz) for a in atlases],
        [np.ascontiguousarray(a.scale, dtype=np.float64) for a in atlases],
        labels,
    )
    assert len(core) == 3 and core.n_keypoints(1) == 300
    for hough in (True, False):
        q, atlas, index, lab, d2, p, shift = core.match_all(
            test.descriptors,
            np.ascontiguousarray(test.xyz),
            np.ascontiguousarray(test.scale, dtype=np.float64),
            ratio=0.9,
            scale_factor=2.0,
            hough=hough,
            hough_queries=0,
        )
        for i, a in enumerate(atlases):
            m = kf.match(test, a, hough=hough)
            sel = atlas == i
            np.testing.assert_array_equal(q[sel], m.ia)
            np.testing.assert_array_equal(index[sel], m.ib)
            np.testing.assert_array_equal(lab[sel], labels[i][m.ib])
            np.testing.assert_array_equal(np.sqrt(d2[sel].astype(np.float64)), m.distance)
            np.testing.assert_array_equal(p[sel], m.p)
            np.testing.assert_array_equal(shift[sel], -m.translation)
    with pytest.raises(InvalidArgumentError):
        _core.AtlasKeypoints([atlases[0].descriptors], [atlases[0].xyz], [], [labels[0]])


def test_both_background_rules_segment_a_shifted_copy() -> None:
    """The two background rules (docs/decisions.md) agree where every organ is
    transferred cleanly; an unknown rule is refused."""
    labels, image, kps, test_img, test_kps, truth = shifted_case()
    for rule in ("per_label", "max_vote"):
        seg = KeypointTransferSegmenter(progress=False, background_rule=rule)
        seg.fit([kf.Image(image, AFFINE)], [labels], keypoints=[kps])
        out = seg.predict(test_img, keypoints=test_kps)
        for organ in np.unique(truth[truth > 0]):
            assert dice(out.labels == organ, truth == organ) > 0.99, (rule, organ)
    with pytest.raises(InvalidArgumentError, match="background_rule"):
        KeypointTransferSegmenter(background_rule="max")


def test_concurrent_normalisation_reraises_and_times_itself() -> None:
    from keyfuse.segment_timing import Concurrent, StageClock

    def fail() -> None:
        raise InvalidImageError("from the worker")

    with pytest.raises(InvalidImageError, match="from the worker"):
        Concurrent(fail).result()
    data = np.random.default_rng(0).random((30, 30, 30)).astype(np.float32)
    work = Concurrent(lambda: normalize_intensity(data))
    clock = StageClock(work)
    clock.start()
    out = work.result()
    clock.stop("wait")
    np.testing.assert_array_equal(out, normalize_intensity(data))
    assert work.wall > 0.0 and work.cpu >= 0.0 and clock.cpu["wait"] >= 0.0
    # predict reports the worker's own seconds and the wait for it
    labels, image, kps, test_img, test_kps, _ = shifted_case()
    seg = KeypointTransferSegmenter(progress=False)
    seg.fit([kf.Image(image, AFFINE)], [labels], keypoints=[kps])
    res = seg.predict(test_img, keypoints=test_kps)
    assert {"extract", "normalise", "wait", "match", "vote", "transfer"} <= set(res.timings)
    assert set(res.timings) == set(res.cpu_timings)
