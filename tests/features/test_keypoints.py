"""KeypointSet containers, the .kfk binary file and featExtract .key interoperability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import keyfuse as kf


def random_set(n: int = 25, seed: int = 0) -> kf.KeypointSet:
    rng = np.random.default_rng(seed)
    rot = np.linalg.qr(rng.standard_normal((n, 3, 3)))[0]
    affine = np.array([[0, -1.5, 0, 90], [1.2, 0, 0, -40], [0, 0, 2.0, 10], [0, 0, 0, 1.0]])
    return kf.KeypointSet(
        rng.uniform(0, 60, (n, 3)),
        rng.uniform(1, 8, n),
        rot,
        np.array([rng.permutation(64) for _ in range(n)], dtype=np.uint8),
        rng.choice([-1, 1], n),
        rng.standard_normal(n),
        -np.sort(-rng.uniform(0, 1, (n, 3)), axis=1),
        affine=affine,
        shape=(64, 64, 30),
    )


def test_world_coordinates_follow_the_affine() -> None:
    import nibabel.affines

    kps = random_set()
    np.testing.assert_allclose(kps.xyz, nibabel.affines.apply_affine(kps.affine, kps.ijk))


def test_kfk_round_trip_is_exact(tmp_path: Path) -> None:
    kps = random_set()
    kps.save(tmp_path / "a.kfk")
    back = kf.KeypointSet.load(tmp_path / "a.kfk")
    assert back == kps
    assert back.shape == (64, 64, 30)
    # compact: 145 bytes per keypoint (64 of them the descriptor) plus a small header
    assert (tmp_path / "a.kfk").stat().st_size < 400 + 145 * len(kps)


def test_empty_set_round_trips(tmp_path: Path) -> None:
    empty = kf.KeypointSet.empty(np.eye(4), (5, 5, 5))
    empty.save(tmp_path / "e.kfk")
    assert len(kf.KeypointSet.load(tmp_path / "e.kfk")) == 0
    kf.write_key(empty, tmp_path / "e.key")
    assert len(kf.read_key(tmp_path / "e.key")) == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_kfk_raises(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "a.kfk"
    random_set().save(path)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = bytearray(b"not a keypoint file at all")
    path.write_bytes(bytes(raw))
    with pytest.raises(kf.CorruptDataError):
        kf.KeypointSet.load(path)


def test_missing_files_raise_io_errors(tmp_path: Path) -> None:
    with pytest.raises(kf.KeyfuseIOError):
        kf.KeypointSet.load(tmp_path / "nope.kfk")
    with pytest.raises(FileNotFoundError.__mro__[1]):  # OSError
        kf.read_key(tmp_path / "nope.key")


def test_failed_save_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.kfk"
    kps = random_set()
    kps.save(path)
    before = path.read_bytes()
    broken = random_set()
    broken.descriptors = None  # type: ignore[assignment]
    with pytest.raises(Exception):  # noqa: B017 - any failure mid-write
        broken.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.kfk"]


def test_reads_the_reference_key_file(data_dir: Path) -> None:
    kps = kf.read_key(data_dir / "mni152_t1_1mm.featExtract.key")
    assert len(kps) == 2473
    assert kps.shape == (197, 233, 189)
    # first row of the file: 98.5 48.607330 32.963707 4.320208, flag 0 (minimum)
    np.testing.assert_allclose(kps.ijk[0], [98.0, 48.10733, 32.463707], atol=1e-6)
    assert kps.scale[0] == pytest.approx(4.320208 / kf.keypoints.KEY_SCALE_PER_SIGMA)
    assert kps.polarity[0] == -1
    # every reference descriptor is a permutation of 0..63
    assert np.all(np.sort(kps.descriptors, axis=1) == np.arange(64))
    # orientations are rotations
    gram = np.einsum("nij,nkj->nik", kps.orientation, kps.orientation)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(3), gram.shape), atol=1e-4)


def test_reads_the_old_featextract_format(data_dir: Path) -> None:
    kps = kf.read_key(data_dir / "OAS1_0001.featExtract-1.1.key")
    assert len(kps) == 2960
    assert np.all(np.sort(kps.descriptors, axis=1) == np.arange(64))


@pytest.mark.parametrize("world", [False, True])
def test_key_round_trip(tmp_path: Path, world: bool) -> None:
    kps = random_set()
    kf.write_key(kps, tmp_path / "a.key", world=world)
    back = kf.read_key(tmp_path / "a.key", affine=None if world else kps.affine)
    np.testing.assert_allclose(back.ijk, kps.ijk, atol=1e-5)
    np.testing.assert_allclose(back.xyz, kps.xyz, atol=1e-4)
    np.testing.assert_array_equal(back.descriptors, kps.descriptors)
    np.testing.assert_array_equal(back.polarity, kps.polarity)
    np.testing.assert_allclose(back.orientation, kps.orientation, atol=1e-6)


def test_written_key_matches_the_reference_layout(tmp_path: Path, data_dir: Path) -> None:
    ref = kf.read_key(data_dir / "mni152_t1_1mm.featExtract.key")
    kf.write_key(ref, tmp_path / "copy.key")
    ours = (tmp_path / "copy.key").read_text().splitlines()
    theirs = (data_dir / "mni152_t1_1mm.featExtract.key").read_text().splitlines()
    assert ours[:6] == theirs[:6]  # header, count and column line verbatim
    # rows: 81 tab-terminated fields; numbers equal to the printed precision
    assert ours[6].endswith("\t") and len(ours[6].split("\t")) == 82
    for mine, ref_row in zip(ours[6:50], theirs[6:50], strict=True):
        a = np.array(mine.split(), dtype=float)
        b = np.array(ref_row.split(), dtype=float)
        np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello\n",
        "Features: 1\nScale-space location[x y z scale] ...\n1 2 3\n",
        "Features: 2\nScale-space location[x y z scale] ...\n" + "1\t" * 81 + "\n",
    ],
)
def test_corrupt_key_files_raise(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(text)
    with pytest.raises(kf.CorruptDataError):
        kf.read_key(path)


def test_subsets_and_concatenation() -> None:
    kps = random_set(10)
    first, rest = kps[:3], kps[np.arange(3, 10)]
    assert len(first) == 3 and len(rest) == 7
    assert kf.KeypointSet.concatenate([first, rest]) == kps
    assert len(kps[kps.polarity > 0]) == int((kps.polarity > 0).sum())


def test_bad_shapes_raise() -> None:
    with pytest.raises(kf.InvalidArgumentError):
        kf.KeypointSet(np.zeros((4, 3)), np.ones(3))
    with pytest.raises(kf.InvalidArgumentError):
        kf.KeypointSet(np.zeros((2, 3)), np.ones(2), descriptors=np.full((2, 64), 300))
