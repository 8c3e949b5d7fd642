"""``keyfuse index verify [--repair]``: read every byte of an on-disk index.

Opening an index checks sizes and headers only (so a large one opens in seconds); this
checks every file's sha256 against the manifest, every sealed shard's descriptors against
its header statistics and every kd-forest's structure. ``repair=True`` rebuilds a damaged
forest from its shard, and a damaged shard file (and its forest) from the subjects'
keypoints in the Parquet parts when those verify; each repair is committed by a new
manifest. The open shard's segment files are checked and rebuilt the same way. What
cannot be repaired (damaged parts) is reported, nothing is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keyfuse import _core
from keyfuse.errors import CorruptDataError, KeyfuseError
from keyfuse.index_storage import _sha256, _stream_part, read_manifest, write_manifest


@dataclass
class VerifyReport:
    """What :func:`verify_index` found (``problems``) and repaired (``repaired``)."""

    path: Path
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
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


def verify_index(path: Any, *, repair: bool = False) -> VerifyReport:
    """Verify (and with ``repair``, repair) the index at ``path``; see the module notes."""
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
    for e in manifest.get("segments") or []:
        report.checked += 1
        why = _file_problem(root, e)
        if why:
            report.problems.append(f"open-shard segment {e['name']}: {why}")
            if repair and not bad_parts:
                _rebuild_shard(root, e, parts, subjects)
                report.repaired.append(f"segment {e['name']}: rebuilt from the Parquet parts")
                report.problems.pop()
    changed = False
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
    if changed:
        write_manifest(
            root,
            parts,
            manifest["provenance"],
            shards,
            manifest.get("shard_size"),
            manifest.get("segments"),
        )
        report.problems = [p for p in report.problems if "cannot repair" in p]
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
