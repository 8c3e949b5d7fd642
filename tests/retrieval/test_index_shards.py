"""Sharded, memory-mapped indexes (keyfuse.index_shards): identical answers sharded or
not, atomic appends, damage detected and repaired, Dask search (keyfuse.index_dask)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_index import make_cohort

import keyfuse as kf
from keyfuse import _core
from keyfuse.index_dask import read_pairwise


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(n_families=4, size=3, n=120)


def _fill(ix: kf.Index, cohort, batch: int = 1) -> kf.Index:
    for a in range(0, len(cohort), batch):
        ix.add_many([(sid, kps, None, lab) for sid, kps, lab in cohort[a : a + batch]])
    return ix


@pytest.fixture(scope="module")
def memory_index(cohort) -> kf.Index:
    return _fill(kf.Index(), cohort)


@pytest.fixture()
def sharded(cohort, tmp_path: Path) -> Path:
    """The cohort on disk in shards of at most 300 keypoints (subjects of 120: 2 per
    shard), appended in batches of 5 (so shards are sealed in the middle of a batch)."""
    path = tmp_path / "sharded.kfi"
    _fill(kf.Index(path, mode="x", shard_size=300, geometry="exact"), cohort, batch=5)
    return path


def test_sharded_exact_scores_are_bit_identical(memory_index, cohort, sharded) -> None:
    ix = kf.Index(sharded)
    sealed = [s for s in ix.shards if s["sealed"]]
    assert len(sealed) == 5 and len(ix.shards) == 6  # the last one open (240 keypoints)
    assert all(s["keypoints"] <= 300 for s in ix.shards)
    assert ix.shard_size == 300 and len(ix) == len(cohort)
    assert ix.memory_bytes() < memory_index.memory_bytes()  # descriptors mapped, not read
    for sid, kps, _ in cohort[::4]:
        assert np.array_equal(ix.scores(kps, exact=True), memory_index.scores(kps, exact=True))
        assert ix.search(sid, k=3) == memory_index.search(sid, k=3)
    assert np.array_equal(ix.pairwise(exact=True), memory_index.pairwise(exact=True))
    sym = ix.pairwise(symmetric=True, exact=True)
    assert np.array_equal(sym, memory_index.pairwise(symmetric=True, exact=True))
    # the shard path equals the unsharded Rust cohort engine, bit for bit
    engine = _core.SearchEngine(trees=8)
    for _, kps, _ in cohort:
        engine.add(np.ascontiguousarray(kps.descriptors))
    from keyfuse.matching import _ALPHA2_FLOOR

    want = engine.pairwise(
        k=ix.k, exact=True, checks=ix.checks, alpha2_floor=_ALPHA2_FLOOR,
        alpha2_cap_fraction=ix.alpha2_cap_fraction, symmetric=True, posterior=ix.posterior,
    )  # fmt: skip
    assert np.array_equal(sym, want)
    assert ix.keypoints(cohort[7][0]) == cohort[7][1]


def test_forests_are_persisted_and_approximate_search_is_stable(sharded, cohort) -> None:
    files = sorted(p.name for p in sharded.glob("shard-*"))
    assert files == [f"shard-{i:06d}.{e}" for i in range(1, 6) for e in ("kff", "kfs")]
    stamp = {f: (sharded / f).stat().st_mtime_ns for f in files}
    a = kf.Index(sharded).pairwise(exact=False)
    b = kf.Index(sharded).pairwise(exact=False)
    assert np.array_equal(a, b)
    assert {f: (sharded / f).stat().st_mtime_ns for f in files} == stamp  # never rebuilt
    # the open shard's forest is cached beside its segments, then loaded, not rebuilt
    (cache,) = sharded.glob("open-*-*.kff")
    t = cache.stat().st_mtime_ns
    assert np.array_equal(kf.Index(sharded).pairwise(exact=False), a)
    assert cache.stat().st_mtime_ns == t
    same = [
        a[i, j] > 0.2
        for i in range(12)
        for j in range(12)
        if i != j and i // 3 == j // 3
    ]  # fmt: skip
    assert np.mean(same) > 0.9  # families still found by the forest


@pytest.mark.parametrize("damage", ["flip", "truncate", "forest", "descriptor"])
def test_damaged_shard_is_named_and_repaired_or_dropped(sharded, cohort, damage: str) -> None:
    """A forest is rebuilt from its shard; a shard holds the only copy of its descriptors
    (format 3), so a damaged one is dropped with its subjects only when asked, and every
    other subject then scores as in an index of just them."""
    from keyfuse.index_verify import verify_index

    target = sharded / ("shard-000002.kff" if damage == "forest" else "shard-000002.kfs")
    raw = bytearray(target.read_bytes())
    if damage == "truncate":
        raw = raw[:-64]
    else:
        raw[{"forest": len(raw) // 2, "flip": 100, "descriptor": -5}[damage]] ^= 0x40
    target.write_bytes(bytes(raw))
    if damage == "forest":
        ix = kf.Index(sharded)  # opening does not read forests
        with pytest.raises(kf.IndexCorruptError, match="shard-000002"):
            ix.scores(cohort[0][1], exact=False)
    elif damage != "descriptor":  # a descriptor byte is found by verify (below) only
        with pytest.raises(kf.IndexCorruptError, match="shard-000002"):
            kf.Index(sharded)
    report = verify_index(sharded)
    assert not report.ok and any("shard-000002" in p for p in report.problems)
    keep = cohort
    if damage != "forest":
        stuck = verify_index(sharded, repair=True)  # nothing dropped unless asked
        assert not stuck.ok and not stuck.dropped and "--drop-damaged" in stuck.problems[-1]
        assert (sharded / "shard-000002.kfs").exists()
        fixed = verify_index(sharded, repair=True, drop_damaged=True)
        assert fixed.dropped == [cohort[2][0], cohort[3][0]]  # shard 2: subjects 2 and 3
        assert not (sharded / "shard-000002.kfs").exists()
        keep = cohort[:2] + cohort[4:]
    else:
        fixed = verify_index(sharded, repair=True)
    assert fixed.repaired and fixed.ok and verify_index(sharded).ok
    ix = kf.Index(sharded)
    assert list(ix) == [c[0] for c in keep]
    want = _fill(kf.Index(), keep)
    assert np.array_equal(ix.pairwise(exact=True), want.pairwise(exact=True))
    assert np.array_equal(
        ix.scores(cohort[3][1], exact=True), want.scores(cohort[3][1], exact=True)
    )
    assert ix.keypoints(cohort[9][0]) == cohort[9][1]  # descriptors from the shards
    if damage != "forest":  # a dropped subject can be appended again
        _fill(kf.Index(sharded, mode="r+"), cohort[2:3])
        assert list(kf.Index(sharded))[-1] == cohort[2][0]


def _as_old_layout(path: Path, cohort, version: int) -> None:
    """Rewrite an index's parts as formats 1-4 wrote them: formats 1-3 one
    fixed-size-list column per geometry component, every value stored (version 2 also
    with a descriptor column); format 4 the orientation's nine components as flat
    columns."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from keyfuse.index_storage import _KP_COLUMNS, _encodings, _keypoints_table

    kps_of = {sid: kps for sid, kps, _ in cohort}
    m = json.loads((path / "manifest.json").read_text())
    for part in m["parts"]:
        info = part["files"]["keypoints"]
        f = path / info["name"]
        ids = pq.read_table(path / part["files"]["subjects"]["name"])["subject_id"].to_pylist()
        cols = {"subject": pq.read_table(f).column("subject")}
        if version == 4:
            t = _keypoints_table([(s, kps_of[s], None, {}, None) for s in ids], coded=False)
            assert "orientation_0" in t.column_names and "orientation_r0_code" not in t.column_names
            pq.write_table(t, f, **_encodings(t))
            info["bytes"] = f.stat().st_size
            info["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
            continue
        for name, dtype, width in _KP_COLUMNS:
            flat = np.concatenate(
                [np.asarray(getattr(kps_of[s], name), dtype).reshape(-1, width) for s in ids]
            )
            if name == "descriptors":
                if version == 2:
                    cols[name] = pa.FixedSizeBinaryArray.from_buffers(
                        pa.binary(64), len(flat), [None, pa.py_buffer(flat)]
                    )
            elif width == 1:
                cols[name] = pa.array(flat.ravel())
            else:
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), width)
        pq.write_table(pa.table(cols), f, compression="zstd")
        info["bytes"] = f.stat().st_size
        info["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    m["version"] = version
    m.pop("geometry")  # written from format 6 on
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("version", [3, 4])
def test_format_v3_v4_index_is_read(cohort, tmp_path: Path, version: int) -> None:
    """Format 3 parts (fixed-size-list geometry, no descriptors) and format 4 parts (flat
    columns, the orientation's nine components) read back exactly, and an append adds
    format-5 parts beside them."""
    from keyfuse.index_storage import FORMAT_VERSION

    path = tmp_path / "old.kfi"
    _fill(kf.Index(path, mode="x", shard_size=300, geometry="exact"), cohort[:-1], batch=5)
    _as_old_layout(path, cohort[:-1], version)
    ix = kf.Index(path, mode="r+")
    for sid, kps, _ in cohort[:-1]:
        assert ix.keypoints(sid) == kps
    _fill(ix, cohort[-1:])
    back = kf.Index(path)
    assert all(back.keypoints(sid) == kps for sid, kps, _ in cohort)
    m = json.loads((path / "manifest.json").read_text())
    assert m["version"] == 5 and m["geometry"] == "exact" and FORMAT_VERSION == 6
    want = _fill(kf.Index(), cohort).pairwise(exact=True)
    assert np.array_equal(back.pairwise(exact=True), want)


def test_format_v2_index_with_descriptors_in_parts(sharded, cohort) -> None:
    """Format 2 kept every descriptor in the parts too: it opens, and a damaged shard is
    rebuilt from them."""
    from keyfuse.index_verify import verify_index

    _as_old_layout(sharded, cohort, 2)
    f = sharded / "shard-000003.kfs"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 1
    f.write_bytes(bytes(raw))
    fixed = verify_index(sharded, repair=True)
    assert fixed.ok and not fixed.dropped
    assert "shard shard-000003.kfs: rebuilt from the Parquet parts" in fixed.repaired
    ix = kf.Index(sharded)
    assert ix.keypoints(cohort[5][0]) == cohort[5][1]
    want = _fill(kf.Index(), cohort)
    assert np.array_equal(kf.Index(sharded).pairwise(exact=True), want.pairwise(exact=True))


def test_flipped_descriptor_byte_is_found_by_verify(sharded) -> None:
    """Opening checks sizes and headers only; verify reads every byte."""
    from keyfuse.index_verify import verify_index

    f = sharded / "shard-000003.kfs"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 1
    f.write_bytes(bytes(raw))
    kf.Index(sharded)  # cheap open
    report = verify_index(sharded)
    assert not report.ok and "shard-000003.kfs" in " ".join(report.problems)


def test_full_disk_during_append_leaves_the_previous_index(
    sharded, cohort, monkeypatch: pytest.MonkeyPatch
) -> None:
    ix = kf.Index(sharded, mode="r+")
    before = ix.pairwise(exact=True)
    manifest = (sharded / "manifest.json").read_bytes()
    extra = make_cohort(n_families=1, size=3, n=120, seed=5)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_core, "write_shard", full)
    with pytest.raises(OSError, match="No space"):
        ix.add_many([(f"x{sid}", kps, None, lab) for sid, kps, lab in extra])
    monkeypatch.undo()
    assert (sharded / "manifest.json").read_bytes() == manifest
    assert not list(sharded.glob("*.tmp")) and not (sharded / "shard-000006.kfs").exists()
    again = kf.Index(sharded)
    assert len(again) == len(cohort)
    assert np.array_equal(again.pairwise(exact=True), before)


def test_search_during_append_sees_old_or_new(sharded, cohort) -> None:
    """The manifest is the commit point: an index opened while files of an append are
    written aside (not yet committed) sees the old index."""
    import keyfuse.index as kfi

    ix = kf.Index(sharded, mode="r+")
    seen: list[int] = []
    real = kfi.write_manifest

    def spy(*args, **kwargs):
        seen.append(len(kf.Index(sharded)))  # everything but the manifest is written
        real(*args, **kwargs)

    extra = make_cohort(n_families=1, size=3, n=120, seed=6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kfi, "write_manifest", spy)
        ix.add_many([(f"y{sid}", kps, None, lab) for sid, kps, lab in extra])
    assert seen == [len(cohort)]
    assert len(kf.Index(sharded)) == len(cohort) + 3


def test_format_v1_index_is_read(cohort, tmp_path: Path) -> None:
    path = tmp_path / "old.kfi"
    _fill(kf.Index(path, mode="x"), cohort[:4], batch=4)
    m = json.loads((path / "manifest.json").read_text())
    m["version"] = 1
    del m["shards"], m["shard_size"]
    (path / "manifest.json").write_text(json.dumps(m))
    ix = kf.Index(path, mode="r+")
    assert len(ix) == 4 and not any(s["sealed"] for s in ix.shards)
    _fill(ix, cohort[4:5])  # no seal: the open shard's first segment holds all 5
    assert len(kf.Index(path)) == 5
    _fill(kf.Index(path, mode="r+", shard_size=250), cohort[5:7])
    back = kf.Index(path)
    assert len(back) == 7 and sum(s["sealed"] for s in back.shards) >= 1
    want = _fill(kf.Index(), cohort[:7]).pairwise(exact=True)
    assert np.array_equal(back.pairwise(exact=True), want)


def test_pairwise_blocks_resume_and_dask_equals_in_process(
    sharded, cohort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keyfuse.index_dask as kd

    distributed = pytest.importorskip("distributed")
    ix = kf.Index(sharded)
    full = ix.pairwise(exact=True)
    monkeypatch.setattr(kd, "BLOCK_ROWS", 5)
    out = tmp_path / "pw"
    assert ix.pairwise(exact=True, out=out) == out
    assert len(list(out.glob("rows-*.parquet"))) == 3
    assert np.array_equal(read_pairwise(out), full)
    (out / "rows-0000005-0000010.parquet").unlink()  # interrupted: one block missing
    stamp = (out / "rows-0000000-0000005.parquet").stat().st_mtime_ns
    ix.pairwise(exact=True, out=out)
    assert (out / "rows-0000000-0000005.parquet").stat().st_mtime_ns == stamp
    assert np.array_equal(read_pairwise(out), full)
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            dashboard_address=None,
            memory_limit="3GiB",
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        # a worker keeps mapped pages within 30% of its own limit, not 50% of the machine's
        import keyfuse.index_shards as ish

        budgets = [
            client.submit(kd.worker_mapped_budget, pure=False, workers=[w]).result()
            for w in client.scheduler_info()["workers"]
        ]
        assert len(budgets) == 2 and set(budgets) == {min(ish.MAPPED_BUDGET, int(0.3 * 3 * 2**30))}
        assert kd.worker_mapped_budget() == ish.MAPPED_BUDGET  # in the client
        for _, kps, _ in cohort[:3]:
            for exact in (True, False):
                want = ix.scores(kps, exact=exact)
                assert np.array_equal(ix.scores(kps, exact=exact, scheduler=client), want)
        assert np.array_equal(ix.pairwise(exact=False, scheduler=client), ix.pairwise(exact=False))
        top = ix.pairwise(exact=True, out=tmp_path / "top", top_k=2, scheduler=client)
        # an address: one Client for it in this process, reused by every call
        addr = cluster.scheduler_address
        assert np.array_equal(ix.scores(cohort[0][1], scheduler=addr), ix.scores(cohort[0][1]))
        first = kd._clients[addr]
        assert np.array_equal(ix.pairwise(scheduler=addr), ix.pairwise())
        assert kd._clients[addr] is first and first.status == "running"
        first.close()
    # "local": one cluster for this process, started by the first search and reused
    want = ix.scores(cohort[1][1], exact=False)
    assert np.array_equal(ix.scores(cohort[1][1], exact=False, scheduler="local"), want)
    local = kd._clients["local"]
    assert np.array_equal(ix.scores(cohort[1][1], exact=False, scheduler="local"), want)
    assert kd._clients["local"] is local and local.status == "running"
    import pyarrow.parquet as pq

    t = pq.read_table(sorted(top.glob("rows-*.parquet"))[0])
    best = np.asarray(t.column("top").combine_chunks().flatten()).reshape(-1, 2)
    masked = full.copy()
    np.fill_diagonal(masked, -np.inf)
    assert np.array_equal(best[:, 0], np.argmax(masked[: len(best)], axis=1))


def test_cli_info_verify_query_and_blocks(sharded, cohort, tmp_path: Path) -> None:
    from click.testing import CliRunner

    import keyfuse.cli as kcli

    run = CliRunner()
    res = run.invoke(kcli.cli, ["index", "info", str(sharded)])
    assert res.exit_code == 0 and "6 (5 sealed" in res.output
    res = run.invoke(kcli.cli, ["index", "verify", str(sharded)])
    assert res.exit_code == 0 and ": ok" in res.output
    f = sharded / "shard-000004.kff"
    f.write_bytes(f.read_bytes()[:-3])
    res = run.invoke(kcli.cli, ["index", "verify", str(sharded)])
    assert res.exit_code == 1 and "shard-000004" in res.output
    res = run.invoke(kcli.cli, ["index", "verify", "--repair", str(sharded)])
    assert (
        res.exit_code == 0 and "repaired: shard shard-000004.kfs: kd-forest rebuilt" in res.output
    )
    res = run.invoke(kcli.cli, ["index", "verify", "--drop-damaged", str(sharded)])
    assert res.exit_code == 2 and "needs --repair" in res.output
    sid = cohort[2][0]
    plain = run.invoke(kcli.cli, ["query", str(sharded), sid, "-k", "3", "--csv"])
    dask = run.invoke(kcli.cli, ["query", str(sharded), sid, "-k", "3", "--csv", "--dask", "sync"])
    assert plain.exit_code == 0 and dask.output == plain.output
    out = tmp_path / "blocks"
    res = run.invoke(kcli.cli, ["pairwise", str(sharded), "-o", str(out), "--blocks", "-q"])
    assert res.exit_code == 0, res.output
    assert np.array_equal(read_pairwise(out), kf.Index(sharded).pairwise())


def test_open_shard_is_mapped_from_segments(sharded, cohort, monkeypatch) -> None:
    """The open shard's descriptors are mapped from its segment files (the Parquet parts
    are not streamed on open); a truncated segment is named."""
    import keyfuse.index_storage_io as sio

    def no_stream(*args, **kwargs):
        raise AssertionError("descriptors streamed from Parquet")

    with monkeypatch.context() as mp:
        mp.setattr(sio, "_stream_part", no_stream)
        ix = kf.Index(sharded)
        assert ix.scores(cohort[11][1], exact=True)[11] == 1.0  # itself, in the open shard
    segments = json.loads((sharded / "manifest.json").read_text())["segments"]
    assert [s["first_subject"] for s in segments] == [10]
    f = sharded / segments[0]["name"]
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(kf.IndexCorruptError, match=segments[0]["name"]):
        kf.Index(sharded)


def test_open_shard_is_searched_in_its_files(cohort, tmp_path: Path, monkeypatch) -> None:
    """The open shard is memory-mapped like a sealed shard: one segment in place, several
    read into RAM by default or, with JOIN_OPEN_SEGMENTS, joined into one cache file
    beside them (reused on reopening, dropped by the next append); the answers equal an
    in-memory index's; past the mapped-pages budget a search leaves none of the shard's
    mapped pages resident in the process."""
    import keyfuse.index_shards as ish

    path = tmp_path / "open.kfi"
    one = _fill(kf.Index(path, mode="x", geometry="exact"), cohort[:3], batch=3)
    assert one._engine._open_shard().is_mapped and not list(path.glob("open-*-*.kfs"))
    two = _fill(one, cohort[3:5], batch=2)  # two segments: read, nothing written beside
    assert not two._engine._open_shard().is_mapped and not list(path.glob("open-*-*.kfs"))
    assert two.memory_bytes() >= 5 * 120 * 64
    monkeypatch.setattr(ish, "JOIN_OPEN_SEGMENTS", True)
    ix = _fill(two, cohort[5:7], batch=2)  # three segments
    mem = _fill(kf.Index(), cohort[:7])
    for _, kps, _ in cohort[:7:2]:
        for exact in (True, False):
            assert np.array_equal(ix.scores(kps, exact=exact), mem.scores(kps, exact=exact))
    segments = json.loads((path / "manifest.json").read_text())["segments"]
    assert len(segments) == 3 and len(ix.shards) == 1
    eng = ix._engine._open_shard()
    joined = path / f"{Path(segments[-1]['name']).stem}-{7 * 120}.kfs"
    assert eng.is_mapped and list(path.glob("open-*-*.kfs")) == [joined]
    assert np.array_equal(eng.descriptors(0, None), ix._engine.descriptors())
    assert eng.resident_bytes() >= 7 * 120 * 64  # every page just read
    ix.scores(cohort[0][1])  # within the budget: kept
    assert eng.resident_bytes() >= 7 * 120 * 64
    monkeypatch.setattr(ish, "MAPPED_BUDGET", 0)
    ix.scores(cohort[0][1])
    assert eng.resident_bytes() == 0
    stamp = joined.stat().st_mtime_ns
    again = kf.Index(path)
    assert np.array_equal(again.scores(cohort[5][1]), ix.scores(cohort[5][1]))
    assert joined.stat().st_mtime_ns == stamp  # reused, not written again
    _fill(ix, cohort[7:8])
    assert not joined.exists()
    assert np.array_equal(ix.scores(cohort[7][1]), _fill(mem, cohort[7:8]).scores(cohort[7][1]))
    assert ix.memory_bytes() < 8 * 120 * 64  # the open shard's descriptors are not in RAM
