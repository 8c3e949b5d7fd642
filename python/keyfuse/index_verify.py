"""``keyfuse index verify [--repair]``: read every byte of an on-disk index.

Opening an index checks sizes and headers only (so a large one opens in seconds); this
checks every file's sha256 against the manifest, every sealed shard's descriptors against
its header statistics and every kd-forest's structure. ``repair=True`` rebuilds a damaged
forest from its shard, and a damaged shard file (and its forest) from the subjects'
descriptors in the Parquet parts where those hold them (formats 1 and 2) and verify;
each repair is committed by a new manifest. The open shard's segment files are checked
and rebuilt the same way. In format 3 a shard or segment file is the only copy of its
descriptors: a damaged one is dropped, with its subjects, only when asked
(``drop_damaged=True``): the parts holding them are rewritten without them and one new
manifest commits that (the report names every dropped subject). What is not repaired
is reported; nothing is deleted unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keyfuse import _core
from keyfuse.errors import CorruptDataError, KeyfuseError
from keyfuse.index_storage import (
    _sha256,
    _stream_part,
    read_manifest,
    stored_geometry,
    write_manifest,
)


@dataclass
class VerifyReport:
    """What :func:`verify_index` found (``problems``) and repaired (``repaired``)."""

    path: Path
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # ids of the subjects dropped
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _file_problem(root: Path, info: dict[str, Any]) -> str | None:
    f = root / info["name"]
    if not f.is_file():
        return "missing"
    if f.stat().st_size != info["bytes"]:
        return f"{f.stat().st_size} bytes, the manifest says {info['bytes']} (truncated?)"
    if _sha256(f) != info["sha256"]:
        return "sha256 checksum mismatch (damaged)"
    return None


def _open(root: Path, e: dict[str, Any], sizes: list[int], trees: int) -> _core.Shard:
    lo = int(e["first_subject"])
    return _core.Shard.open(
        root / e["name"],
        sizes[lo : lo + int(e["n_subjects"])],
        first_subject=lo,
        base=int(sum(sizes[:lo])),
        trees=trees,
    )


def _rebuildable(root: Path, e: dict[str, Any], parts: list[dict[str, Any]]) -> bool:
    """Whether every part holding subjects of ``e`` keeps their descriptors (format ≤ 2)."""
    import pyarrow.parquet as pq

    lo, hi = int(e["first_subject"]), int(e["first_subject"]) + int(e["n_subjects"])
    first = 0
    for part in parts:
        n = int(part["n_subjects"])
        if first < hi and first + n > lo:
            f = root / part["files"]["keypoints"]["name"]
            if "descriptors" not in pq.ParquetFile(f).schema_arrow.names:
                return False
        first += n
    return True


def _cannot(e: dict[str, Any], what: str) -> str:
    return (
        f"{what} {e['name']}: cannot rebuild, it holds the only copy of the descriptors "
        f"of its {int(e['n_subjects'])} subject(s); 'keyfuse index verify --repair "
        "--drop-damaged' drops them from the index"
    )


def verify_index(path: Any, *, repair: bool = False, drop_damaged: bool = False) -> VerifyReport:
    """Verify (and with ``repair``, repair) the index at ``path``; ``drop_damaged``
    (with ``repair``): drop shards and segments that cannot be rebuilt, with their
    subjects. See the module notes."""
    import pyarrow.parquet as pq

    root = Path(path)
    report = VerifyReport(root)
    manifest = read_manifest(root)
    parts, shards = manifest.get("parts") or [], manifest.get("shards") or []
    bad_parts = False
    subjects: list[dict[str, Any]] = []
    for part in parts:
        for kind in ("subjects", "keypoints"):
            info = part["files"][kind]
            report.checked += 1
            why = _file_problem(root, info)
            if why:
                bad_parts = True
                report.problems.append(f"part file {info['name']}: {why}")
        if not bad_parts:
            subjects.append(pq.read_table(root / part["files"]["subjects"]["name"]).to_pydict())
    sizes = [int(n) for sub in subjects for n in sub["n_keypoints"]]
    trees = int(manifest.get("provenance", {}).get("params", {}).get("trees", 8))
    drop: list[dict[str, Any]] = []  # shard and segment entries to drop
    changed = False
    for e in manifest.get("segments") or []:
        report.checked += 1
        why = _file_problem(root, e)
        if why:
            report.problems.append(f"open-shard segment {e['name']}: {why}")
            if repair and not bad_parts and _rebuildable(root, e, parts):
                _rebuild_shard(root, e, parts, subjects)
                report.repaired.append(f"segment {e['name']}: rebuilt from the Parquet parts")
                report.problems.pop()
                changed = True
            elif repair and not bad_parts:
                if drop_damaged:
                    drop.append(e)
                else:
                    report.problems.append(_cannot(e, "segment"))
    for e in shards:
        report.checked += 1
        why = _file_problem(root, e)
        if why is None and not bad_parts:
            try:
                _open(root, e, sizes, trees).verify()
            except (KeyfuseError, OSError) as exc:
                why = str(exc)
        fe = e.get("forest")
        fwhy = None
        if fe:
            report.checked += 1
            fwhy = _file_problem(root, fe)
            if fwhy is None and why is None and not bad_parts:
                try:
                    _open(root, e, sizes, trees).load_forest(root / fe["name"])
                except (CorruptDataError, OSError) as exc:
                    fwhy = str(exc)
        if why:
            report.problems.append(f"shard {e['name']}: {why}")
        if fwhy:
            report.problems.append(f"shard {e['name']}: its kd-forest {fe['name']}: {fwhy}")
        if not repair or not (why or fwhy):
            continue
        if bad_parts:
            report.problems.append(
                f"shard {e['name']}: cannot repair while Parquet parts are damaged"
            )
            continue
        if why and not _rebuildable(root, e, parts):
            if drop_damaged:
                drop.append(e)
            else:
                report.problems.append(_cannot(e, "shard"))
            continue
        if why:
            _rebuild_shard(root, e, parts, subjects)
            report.repaired.append(f"shard {e['name']}: rebuilt from the Parquet parts")
        shard = _open(root, e, sizes, trees)
        shard.build_forest()
        fname = f"{Path(e['name']).stem}.kff"
        shard.save_forest(root / fname)
        e["forest"] = {
            "name": fname,
            "trees": trees,
            "bytes": (root / fname).stat().st_size,
            "sha256": _sha256(root / fname),
        }
        report.repaired.append(f"shard {e['name']}: kd-forest rebuilt")
        changed = True
    if drop:
        _drop(root, manifest, subjects, drop, report)
    elif changed:
        write_manifest(
            root,
            parts,
            manifest["provenance"],
            shards,
            manifest.get("shard_size"),
            manifest.get("segments"),
            stored_geometry(manifest),
        )
    if changed or drop:
        report.problems = [p for p in report.problems if "cannot" in p]
    return report


def _rebuild_shard(
    root: Path, e: dict[str, Any], parts: list[dict[str, Any]], subjects: list[dict[str, Any]]
) -> None:
    """Write shard ``e``'s file again from its subjects' descriptors in the parts."""
    lo, hi = int(e["first_subject"]), int(e["first_subject"]) + int(e["n_subjects"])
    rows: list[np.ndarray] = []
    first = 0
    for part, sub in zip(parts, subjects, strict=True):
        n = len(sub["subject_id"])
        if first < hi and first + n > lo:
            kp = root / part["files"]["keypoints"]["name"]
            for i, (*_, desc) in enumerate(_stream_part(sub, kp, root)):
                if lo <= first + i < hi:
                    rows.append(desc)
        first += n
    desc = np.concatenate(rows) if rows else np.zeros((0, 64), np.uint8)
    _core.write_shard(root / e["name"], np.ascontiguousarray(desc, dtype=np.uint8))
    e["bytes"] = (root / e["name"]).stat().st_size
    e["sha256"] = _sha256(root / e["name"])


def _drop(
    root: Path,
    manifest: dict[str, Any],
    subjects: list[dict[str, Any]],
    drop: list[dict[str, Any]],
    report: VerifyReport,
) -> None:
    """Drop the shards and segments ``drop`` with their subjects: the parts holding
    those are rewritten without them (new files), later shards and segments renumbered,
    one new manifest commits it all; then the dropped and replaced files are removed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from keyfuse.index_storage import write_part_tables

    gone = {
        i
        for e in drop
        for i in range(int(e["first_subject"]), int(e["first_subject"]) + int(e["n_subjects"]))
    }
    parts = manifest["parts"]
    seq = 1 + max((int(p["seq"]) for p in parts), default=0)
    new_parts: list[dict[str, Any]] = []
    written: list[Path] = []
    stale: list[Path] = [root / e["name"] for e in drop]
    stale += [root / e["forest"]["name"] for e in drop if e.get("forest")]
    first = 0
    try:
        for part, sub in zip(parts, subjects, strict=True):
            n = len(sub["subject_id"])
            keep = [i for i in range(n) if first + i not in gone]
            first += n
            names = [root / part["files"][k]["name"] for k in ("subjects", "keypoints")]
            if len(keep) == n:
                new_parts.append(part)
                continue
            report.dropped += [sub["subject_id"][i] for i in range(n) if i not in set(keep)]
            stale += names
            if not keep:
                continue
            starts = np.concatenate([[0], np.cumsum(sub["n_keypoints"])]).astype(np.int64)
            rows = np.concatenate(
                [np.arange(starts[i], starts[i + 1]) for i in keep] or [np.zeros(0, np.int64)]
            )
            st = pq.read_table(names[0]).take(pa.array(keep))
            kt = pq.read_table(names[1]).take(pa.array(rows))
            new_parts.append(write_part_tables(root, st, kt, seq, written))
            seq += 1

        def renumber(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
            out = []
            for e in entries:
                if any(e is d for d in drop):
                    continue
                lo = int(e["first_subject"])
                out.append({**e, "first_subject": lo - sum(1 for g in gone if g < lo)})
            return out

        write_manifest(
            root,
            new_parts,
            manifest["provenance"],
            renumber(manifest.get("shards") or []),
            manifest.get("shard_size"),
            renumber(manifest.get("segments") or []),
            stored_geometry(manifest),
        )  # the commit point
    except BaseException:
        for w in written:
            w.unlink(missing_ok=True)
        raise
    for f in [*stale, *root.glob("open-*-*.kf[sf]")]:  # the open shard's caches: stale
        f.unlink(missing_ok=True)
    for e in drop:
        report.repaired.append(
            f"dropped {e['name']} and its {int(e['n_subjects'])} subject(s) from the index"
        )
