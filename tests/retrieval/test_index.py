"""The cohort index (keyfuse.Index): search, restriction, pairwise, storage, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import keyfuse as kf


def rerank(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values, axis=1), axis=1).astype(np.uint8)


def make_cohort(n_families: int = 4, size: int = 3, n: int = 250, seed: int = 0):
    """Families of keypoint sets: members are noisy copies of a family prototype."""
    rng = np.random.default_rng(seed)
    out = []
    for f in range(n_families):
        proto = rng.random((n, 64)) * 64
        xyz = rng.uniform(-70, 70, (n, 3))
        for m in range(size):
            desc = rerank(proto + 4.0 * rng.standard_normal(proto.shape))
            kps = kf.KeypointSet(
                xyz + rng.normal(0, 1, xyz.shape),
                rng.uniform(1.5, 4, n),
                orientation=np.tile(np.eye(3, dtype=np.float32), (n, 1, 1)),
                descriptors=desc,
                polarity=rng.choice([-1, 1], n),
                response=rng.random(n),
                eigenvalues=rng.random((n, 3)),
                affine=np.diag([1.0, 1.0, 1.0, 1.0]),
                shape=(64, 64, 64),
            )
            out.append((f"f{f}m{m}", kps, {"family": f"F{f}", "sex": "F" if f % 2 else "M"}))
    return out


@pytest.fixture(scope="module")
def cohort():
    return make_cohort()


@pytest.fixture()
def index(cohort) -> kf.Index:
    ix = kf.Index(geometry="exact")  # saved bit for bit (compact: test_index_geometry.py)
    for sid, kps, labels in cohort:
        ix.add(sid, kps, vector=np.arange(4.0) + len(ix), **labels)
    return ix


def test_search_finds_family(index: kf.Index, cohort) -> None:
    for sid, _, labels in cohort:
        hits = index.search(sid, k=2)  # an indexed id: itself excluded
        assert len(hits) == 2 and sid not in hits.ids
        assert all(index.labels[h]["family"] == labels["family"] for h in hits.ids)
        assert hits.scores[0] >= hits.scores[1]
    # a KeypointSet query finds itself first with J = 1
    sid, kps, _ = cohort[4]
    top = index.search(kps, k=1)[0]
    assert top.subject_id == sid and top.score == pytest.approx(1.0)
    subject_id, score = top  # hits unpack as (id, score)
    assert (subject_id, score) == (sid, top.score)


def test_search_restrict_and_exclude(index: kf.Index, cohort) -> None:
    _, kps, _ = cohort[0]  # family F0, sex M
    hits = index.search(kps, k=None, restrict={"sex": "F"})
    assert len(hits) == 6 and all(index.labels[h]["sex"] == "F" for h in hits.ids)
    hits = index.search(kps, k=None, restrict={"family": ["F1", "F2"]})
    assert {index.labels[h]["family"] for h in hits.ids} == {"F1", "F2"}
    hits = index.search(kps, k=None, restrict=lambda lab: lab["family"] == "F3")
    assert len(hits) == 3
    hits = index.search(kps, k=None, restrict=["f0m1", "f2m0"])
    assert set(hits.ids) == {"f0m1", "f2m0"}
    hits = index.search(kps, k=3, exclude="f0m0")
    assert "f0m0" not in hits.ids
    with pytest.raises(kf.InvalidArgumentError):
        index.search(kps, restrict=["nobody"])
    with pytest.raises(kf.InvalidArgumentError):
        index.search(kps, exclude="nobody")


def test_duplicate_ids_raise(index: kf.Index, cohort) -> None:
    with pytest.raises(kf.InvalidArgumentError):
        index.add("f0m0", cohort[0][1])
    with pytest.raises(kf.InvalidArgumentError):
        index.add("x", cohort[0][1], bad=object())
    assert len(index) == 12


def test_pairwise_exact_and_approximate(index: kf.Index) -> None:
    s = index.pairwise(exact=True)
    assert s.shape == (12, 12) and np.all(np.diag(s) == 1)
    fam = np.repeat(np.arange(4), 3)
    same = fam[:, None] == fam[None, :]
    off = ~np.eye(12, dtype=bool)
    assert s[same & off].min() > s[~same].max()
    approx = index.pairwise(exact=False)
    assert approx[same & off].min() > approx[~same].max()
    sym = index.pairwise(symmetric=True, exact=True)
    assert np.array_equal(sym, sym.T)
    row = index.scores("f1m0", exact=True)
    assert np.allclose(row[np.arange(12) != 3], s[3][np.arange(12) != 3])
    votes = index.reference_votes(exact=True)
    assert votes.shape == (12, 12) and (votes[same & off].min() > votes[~same].max())


def test_labels_and_accessors(index: kf.Index, cohort) -> None:
    assert index.subjects[:2] == ["f0m0", "f0m1"] and "f3m2" in index
    table = index.labels_table()
    assert table.column_names == ["subject_id", "family", "sex"]
    assert table.num_rows == 12
    assert index.label("family")[3] == "F1"
    assert np.array_equal(index.vector("f0m2"), np.arange(4.0) + 2)
    assert index.keypoints("f1m1") is cohort[4][1]
    assert index.memory_bytes() >= 12 * 250 * 64


def test_save_load_round_trip(index: kf.Index, tmp_path: Path) -> None:
    path = tmp_path / "cohort.kfi"
    index.save(path)
    back = kf.Index.load(path)
    assert back.subjects == index.subjects and back.labels == index.labels
    for sid in index.subjects:
        assert back.keypoints(sid) == index.keypoints(sid)
        assert np.array_equal(back.vector(sid), index.vector(sid))
    assert np.array_equal(back.pairwise(exact=True), index.pairwise(exact=True))
    index.save(path)  # overwriting an index is allowed
    assert len(kf.Index.load(path)) == 12


def test_opened_index_reads_keypoints_back_lazily(
    index: kf.Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An opened index holds only descriptors: a subject's keypoints are read back from
    its part on demand, also across Parquet row groups (tiny groups here), and a
    directory removed after opening gives a clear error while searching still works."""
    import shutil

    import keyfuse.index_storage as kfs

    # subjects of 250 rows span 3-4 groups, written and streamed back in groups of 97
    monkeypatch.setattr(kfs, "ROW_GROUP", 97)
    path = tmp_path / "lazy.kfi"
    index.save(path)
    back = kf.Index.load(path)
    for sid in index.subjects:
        assert back.keypoints(sid) == index.keypoints(sid)
    query = index.keypoints(index.subjects[4])
    expected = back.scores(query, exact=True)
    shutil.rmtree(path)
    with pytest.raises(kf.IndexCorruptError, match="changed or removed"):
        back.keypoints(index.subjects[0])
    assert np.array_equal(back.scores(query, exact=True), expected)


def test_opened_index_notices_a_rewritten_directory(
    index: kf.Index, cohort, tmp_path: Path
) -> None:
    """Keypoints are read back lazily: when another index was saved over the directory
    since it was opened, the read is refused instead of returning someone else's rows."""
    path = tmp_path / "shared.kfi"
    index.save(path)
    opened = kf.Index.load(path)
    other = kf.Index()
    for sid, kps, labels in reversed(cohort):
        other.add(sid, kps, **labels)
    other.save(path)
    with pytest.raises(kf.IndexCorruptError, match="changed"):
        opened.keypoints(index.subjects[0])


def test_subject_without_keypoints_round_trips(cohort, tmp_path: Path) -> None:
    empty = kf.KeypointSet(np.zeros((0, 3)), np.zeros(0), descriptors=np.zeros((0, 64), np.uint8))
    ix = kf.Index(geometry="exact")
    with pytest.warns(UserWarning, match="no keypoints"):
        ix.add("blank", empty)
    ix.add(cohort[0][0], cohort[0][1])
    ix.save(tmp_path / "with-blank.kfi")
    back = kf.Index.load(tmp_path / "with-blank.kfi")
    assert len(back.keypoints("blank")) == 0
    assert back.keypoints(cohort[0][0]) == cohort[0][1]


def _same_bits(a: kf.KeypointSet, b: kf.KeypointSet) -> bool:
    fields = ("ijk", "scale", "orientation", "descriptors", "polarity", "response")
    return all(
        np.asarray(getattr(a, f)).dtype == np.asarray(getattr(b, f)).dtype
        and np.asarray(getattr(a, f)).tobytes() == np.asarray(getattr(b, f)).tobytes()
        for f in (*fields, "eigenvalues", "flags")
    )


def test_geometry_round_trips_bit_for_bit(
    cohort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Format 4 stores a value that the subject's previous row repeats, and the
    orientation's third row where it is the cross product of the first two, as nulls;
    format 5 codes the first two rows' largest components: real keypoints (MNI152 at
    3 mm: several orientations a detection) and others (a third row that is no cross
    product, rows that are no unit vectors, NaN, infinities, signed zeros, a repeat
    across subjects) read back bit for bit, also across Parquet row groups."""
    import pyarrow.parquet as pq

    import keyfuse.index_storage as kfs

    monkeypatch.setattr(kfs, "ROW_GROUP", 97)
    real = kf.extract(kf.datasets.mni152(resolution_mm=3.0))
    odd = cohort[0][1]
    rng = np.random.default_rng(3)
    o = rng.standard_normal((len(odd), 3, 3)).astype(np.float32)
    o[1] = o[0]
    o[2, 2] = -0.0
    o[3, 2] = 0.0
    o[4, 0] = [-0.0, 0.0, -0.0]
    o[5, 1] = [np.nan, 0.5, -np.inf]
    o[6, 0] = [np.inf, -np.inf, 1.0]
    o[7, :2] = np.asarray(real.orientation)[0, :2]
    o[7, 0, 2] = np.nextafter(o[7, 0, 2], np.float32(2))  # a unit row one ulp off
    ijk = np.asarray(odd.ijk).copy()
    ijk[5:9] = ijk[4]
    ijk[10, 1] = np.nan
    ijk[0] = np.asarray(real.ijk)[-1]  # the previous subject's last row: stored again
    odd = kf.KeypointSet(
        ijk, odd.scale, o, odd.descriptors, odd.polarity, odd.response, odd.eigenvalues
    )
    path = tmp_path / "exact.kfi"
    ix = kf.Index.create(path, geometry="exact")
    ix.add_many([("real", real, None, {}), ("odd", odd, None, {})])
    back = kf.Index(path)
    assert _same_bits(back.keypoints("real"), real) and _same_bits(back.keypoints("odd"), odd)
    part = pq.read_table(next(path.glob("keypoints-*.parquet")))
    # every real third row is a cross product; detections of several orientations repeat
    assert part.column("orientation_8").slice(0, len(real)).null_count == len(real)
    assert 0 < part.column("ijk_0").null_count < len(real)
    # real unit rows: the largest component is rebuilt from a code of a few bits
    code = part.column("orientation_r1_code").slice(0, len(real)).drop_null().to_numpy()
    assert len(code) and code.max() < 2**10


def test_on_disk_appends(cohort, tmp_path: Path) -> None:
    path = tmp_path / "live"
    ix = kf.Index.create(path)
    for sid, kps, labels in cohort[:5]:
        ix.add(sid, kps, **labels)
    ix.add_many([(sid, kps, None, labels) for sid, kps, labels in cohort[5:]])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["n_subjects"] == 12 and len(manifest["parts"]) == 6
    # an orphan part (a crashed append) is ignored
    (path / "keypoints-000099.parquet").write_bytes(b"garbage")
    back = kf.Index(path, mode="r+")
    assert back.subjects == ix.subjects
    with pytest.raises(kf.InvalidArgumentError):
        back.add("f0m0", cohort[0][1])
    assert json.loads((path / "manifest.json").read_text())["n_subjects"] == 12
    with pytest.raises(kf.KeyfuseIOError):
        kf.Index.load(tmp_path / "nothing-here")


def _saved(index: kf.Index, tmp_path: Path) -> Path:
    path = tmp_path / "ix"
    index.save(path)
    return path


def test_truncated_file_raises(index: kf.Index, tmp_path: Path) -> None:
    path = _saved(index, tmp_path)
    f = path / "keypoints-000001.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(kf.IndexCorruptError):
        kf.Index.load(path)


def test_corrupted_byte_raises(index: kf.Index, tmp_path: Path) -> None:
    path = _saved(index, tmp_path)
    f = path / "subjects-000001.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(kf.IndexCorruptError):
        kf.Index.load(path)


def test_missing_file_and_bad_manifest_raise(index: kf.Index, tmp_path: Path) -> None:
    path = _saved(index, tmp_path)
    (path / "keypoints-000001.parquet").unlink()
    with pytest.raises(kf.IndexCorruptError):
        kf.Index.load(path)
    (path / "manifest.json").write_text('{"format": "keyfuse-index", "vers')
    with pytest.raises(kf.IndexCorruptError):
        kf.Index(path)
    (path / "manifest.json").write_text('{"format": "keyfuse-index", "version": 99, "parts": []}')
    with pytest.raises(kf.IndexCorruptError):
        kf.Index(path)


def test_empty_index(tmp_path: Path) -> None:
    ix = kf.Index.create(tmp_path / "empty")
    assert len(ix) == 0 and ix.pairwise().shape == (0, 0)
    assert len(kf.Index.load(tmp_path / "empty")) == 0
    with pytest.raises(kf.InvalidArgumentError):
        kf.Index(k=0)
