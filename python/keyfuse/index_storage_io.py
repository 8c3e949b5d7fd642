"""Appending to and opening an on-disk :class:`keyfuse.Index`: a part (Parquet) and the
shards it fills, committed by one manifest; opening maps the sealed shards and streams
the open shard's descriptors only (formats: :mod:`keyfuse.index_storage`,
:mod:`keyfuse.index_shards`)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyfuse.errors import IndexCorruptError, InvalidArgumentError
from keyfuse.index_classify import LabelClassifiers
from keyfuse.index_shards import ShardSet, as_descriptors, seal
from keyfuse.index_storage import (
    Staged,
    _fsync_dir,
    _part_rows,
    _stream_part,
    stored_geometry,
    verified_parts,
    write_part,
)

if TYPE_CHECKING:
    from keyfuse.index import Index


def append_part(
    ix: Index,
    root: Path | None,
    staged: Sequence[Staged],
    parts: list[dict[str, Any]] | None = None,
) -> list[Any]:
    """Write one part and the shards it fills, and commit them by a new manifest (their
    files are removed again when anything fails); ``parts=[]``: into a fresh index.
    Returns the sealed shards for :meth:`ShardSet.append`."""
    fresh = parts is not None
    shards = ShardSet(ix._engine.shard_size, ix.trees) if fresh else ix._engine
    new = [as_descriptors(s[1]) for s in staged]
    seals, open_first = shards.plan([len(d) for d in new])
    if root is None:
        return seal(shards, new, seals, None, [])
    current = ix._parts if parts is None else parts
    seq = 1 + max((int(p["seq"]) for p in current), default=0)
    written: list[Path] = []
    # the open shard's descriptors: one segment file per append (a seal retires them all)
    old = [] if seals else list(shards.segments)
    if sum(int(e["n_subjects"]) for e in old) != len(shards.sizes) - shards.open_first:
        old = []  # a format-v1 index: its open subjects get their first segment now
    try:
        entry = write_part(root, staged, seq, written, ix.geometry)
        sealed = seal(shards, new, seals, root, written)
        entries = [e for e in [s.entry for s in shards.sealed] + [s[3] for s in sealed] if e]
        start = open_first if not old else len(shards.sizes)
        segments = [*old, *_segment(root, shards, new, start, seq, written)]
        ix._write_manifest(root, [*current, entry], entries, segments)  # the commit point
    except BaseException:
        for w in written:
            with contextlib.suppress(OSError):
                w.unlink()
        raise
    for e in shards.segments if seals else []:
        with contextlib.suppress(OSError):
            (root / e["name"]).unlink()  # retired: its subjects are in a sealed shard now
    for f in root.glob("open-*-*.kf[sf]"):  # the open shard's caches (joined, forest): stale
        with contextlib.suppress(OSError):
            f.unlink()
    shards.segments, shards.root = segments, root
    current.append(entry)
    return sealed


def kept_keypoints(ix: Index, staged: Sequence[Staged]) -> list[Any]:
    """What an index keeps of subjects just appended: in memory, their KeypointSets; on
    disk, where their rows lie in the new part, and the open shard's descriptors become
    views of its segment files, so that a long build's memory does not grow with N."""
    import pyarrow.parquet as pq

    if ix.path is None:
        return [s[1] for s in staged]
    shards = ix._engine
    if shards.root is not None and shards.segments:
        shards.remap_open()
    files = ix._parts[-1]["files"]
    sub = pq.read_table(ix.path / files["subjects"]["name"]).to_pydict()
    return [row[1] for row in _part_rows(sub, ix.path / files["keypoints"]["name"])]


def _segment(
    root: Path, shards: ShardSet, new: Sequence[Any], open_first: int, seq: int, written: list[Path]
) -> list[dict[str, Any]]:
    """Write the open shard's subjects from ``open_first`` on (the appended ones, or all
    of them for an index without segments yet) as a segment file."""
    from keyfuse import _core
    from keyfuse.index_storage import _sha256

    lo, hi = open_first, len(shards.sizes) + len(new)
    if lo >= hi:
        return []
    name = f"open-{seq:06d}.kfs"
    written.append(root / name)
    desc = shards.pending(new, lo, hi)
    _core.write_shard(root / name, desc)
    f = root / name
    return [
        {
            "name": name,
            "first_subject": lo,
            "n_subjects": hi - lo,
            "n_keypoints": len(desc),
            "bytes": f.stat().st_size,
            "sha256": _sha256(f),
        }
    ]


def load_into(ix: Index, root: Path) -> None:
    import pyarrow as pa

    manifest, parts, checked = verified_parts(root)
    stored = stored_geometry(manifest)
    if ix._geometry_arg not in (None, stored):
        raise InvalidArgumentError(
            f"{root} stores {stored} geometry, chosen when it was created; open it without "
            f"geometry= (or with geometry={stored!r}), or write a new index with "
            f"save(path) after choosing geometry={ix._geometry_arg!r} for a fresh Index"
        )
    ix.geometry = stored
    entries = manifest.get("shards") or []
    if ix._shard_size_arg is None and manifest.get("shard_size"):
        ix._engine = ShardSet(int(manifest["shard_size"]), ix.trees)
    try:
        sizes = [int(n) for sub, _ in checked for n in sub["n_keypoints"]]
        ix._engine.sizes = sizes
        for e in entries:
            lo = int(e["first_subject"])
            if lo != ix._engine.open_first or e["n_keypoints"] != sum(
                sizes[lo : lo + int(e["n_subjects"])]
            ):
                raise IndexCorruptError(f"{root}: shard {e['name']} disagrees with the parts")
            ix._engine.add_sealed_file(root, e, sizes[lo : lo + int(e["n_subjects"])])
        segments = manifest.get("segments")
        if segments is not None:  # the open shard's segments, mapped (format v2)
            ix._engine.map_segments(root, segments)
        first = 0  # else streamed: the open shard's descriptors only
        for sub, kp_file in checked:
            n = len(sub["subject_id"])
            if segments is not None or first + n <= ix._engine.open_first:
                for row in _part_rows(sub, kp_file):
                    ix._register(*row)
            else:
                for i, streamed in enumerate(_stream_part(sub, kp_file, root)):
                    *meta, desc = streamed
                    ix._register(*meta)
                    if first + i >= ix._engine.open_first:
                        ix._engine.open_subject(desc)
            first += n
    except IndexCorruptError:
        raise
    except (KeyError, TypeError, ValueError, pa.ArrowException, OSError) as e:
        raise IndexCorruptError(f"{root}: corrupt index ({type(e).__name__}: {e})") from e
    ix._parts = list(parts)
    ix._classifiers = LabelClassifiers.read(root)


def write_fresh(ix: Index, target: Path, ids: Sequence[str]) -> None:
    """Write subjects ``ids`` of ``ix`` as a fresh index directory (one part) at
    ``target``, built beside it and renamed into place."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        staged = []
        for sid in ids:
            i = ix._pos[sid]
            staged.append((sid, ix.keypoints(sid), ix._vectors[i], ix._labels[i], ix._sources[i]))
        ix._write_manifest(tmp, [])
        if ix._classifiers.state:
            ix._classifiers.write(tmp)
        if staged:
            ix._append_part(tmp, staged, parts=[])
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
