"""On-disk storage of :class:`keyfuse.Index`: the Parquet tables of one append (a "part"),
their checksums, and reading a subject's keypoints back.

A part is a pair of Parquet files: ``subjects-NNNNNN.parquet`` (id, keypoint count,
affine, shape, labels as JSON, CNN vector, source) and ``keypoints-NNNNNN.parquet``
(subject and geometry per row, grouped by subject; formats 4 and 5: one flat column per
component, repeats stored as nulls, format 5 also the orientation's first two rows
coded, see :func:`_keypoints_table`). Each descriptor is stored once, in the checksummed
shard or segment files (formats 3 to 5); parts written
by format 1 and 2 also hold a 64-byte descriptor column, which an index without segment
files streams into memory. An opened index remembers, per subject, where its rows lie
(:class:`_Rows`), so the full keypoints are read back on demand, their descriptors from
the shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keyfuse.errors import IndexCorruptError
from keyfuse.index_geometry import (
    ROUNDED,
    SCALE_MANTISSA,
    decode_positions,
    encode_frames,
    encode_positions,
    round_mantissa,
    subject_grids,
    unpack_frames,
)
from keyfuse.keypoints import KeypointSet

# one subject as staged for an append: (id, keypoints, vector, labels, source)
Staged = tuple[str, KeypointSet, np.ndarray | None, dict[str, Any], str | None]

FORMAT = "keyfuse-index"
# 6: format 5, or compact geometry (keyfuse.index_geometry; the manifest's "geometry");
# 5: the orientation's first two rows as two components and a predicted third (see
# _orientation_code); 4: flat geometry columns, repeats and the orientation's cross
# product as nulls (see _keypoints_table); 3: descriptors only in the shard/segment files;
# 2: sealed shards, descriptors also in the parts (keyfuse.index_shards); 1 is read as
# unsharded
FORMAT_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
MANIFEST = "manifest.json"


def _not_an_index(p: Path) -> str:
    """The message for a path that holds no index."""
    if not p.exists():
        why = "does not exist"
    elif p.is_dir():
        why = f"is a directory without {MANIFEST}"
    else:
        why = "is a file, not an index directory"
    return (
        f"{p} is not a keyfuse index: it {why}. Check the path, or create a new index "
        f"with kf.Index.create({str(p)!r}) ('keyfuse index build' on the command line)"
    )


def _remove_index_files(p: Path) -> None:
    """Remove an index's manifest and parts (nothing else in its directory)."""
    (p / MANIFEST).unlink()
    (p / "classifiers.json").unlink(missing_ok=True)  # the class predictors' cache
    for f in p.glob("*.parquet"):
        if f.name.startswith(("subjects-", "keypoints-")):
            f.unlink()
    for f in [*p.glob("shard-*.kf[sf]"), *p.glob("open-*.kf[sf]")]:
        f.unlink()


def stored_geometry(manifest: dict[str, Any]) -> str:
    """How an index's parts store geometry: its manifest's choice, "exact" for indexes
    written before compact geometry existed."""
    return str(manifest.get("geometry", "exact"))


def write_manifest(
    root: Path,
    parts: list[dict[str, Any]],
    provenance: dict[str, Any],
    shards: list[dict[str, Any]] | None = None,
    shard_size: int | None = None,
    segments: list[dict[str, Any]] | None = None,
    geometry: str = "exact",
) -> None:
    """Write ``root/manifest.json`` atomically (written aside, flushed and renamed): the
    format, the parts and sealed shards with their checksums, how new parts store the
    geometry (``"compact"`` or ``"exact"``, see :mod:`keyfuse.index_geometry`), and what
    made the index (``provenance``). An exact index is written as format 5, which older
    keyfuse versions read."""
    from keyfuse._io import atomic_path

    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION if geometry == "compact" else 5,
        "geometry": geometry,
        "n_subjects": sum(p["n_subjects"] for p in parts),
        "n_keypoints": sum(p["n_keypoints"] for p in parts),
        "parts": parts,
        "shards": shards or [],
        "segments": segments or [],
        "shard_size": shard_size,
        "provenance": provenance,
    }
    with atomic_path(root / MANIFEST) as tmp:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(root)


def write_part(
    root: Path, staged: Sequence[Staged], seq: int, written: list[Path], geometry: str = "exact"
) -> dict[str, Any]:
    """Write the Parquet files of part ``seq`` (each atomically, flushed) and return its
    manifest entry; every file written is appended to ``written`` (for a clean-up).
    ``geometry="compact"``: positions, scales and frames as :mod:`keyfuse.index_geometry`
    codes them."""
    grids = subject_grids(staged) if geometry == "compact" else None
    return write_part_tables(
        root, _subjects_table(staged, grids), _keypoints_table(staged, grids=grids), seq, written
    )


def write_part_tables(
    root: Path, subjects: Any, keypoints: Any, seq: int, written: list[Path]
) -> dict[str, Any]:
    """Write a part's two tables as part ``seq`` (see :func:`write_part`)."""
    import pyarrow.parquet as pq

    from keyfuse._io import atomic_path

    entry: dict[str, Any] = {
        "seq": seq,
        "n_subjects": subjects.num_rows,
        "n_keypoints": keypoints.num_rows,
        "files": {},
    }
    for kind, table in (("subjects", subjects), ("keypoints", keypoints)):
        name = f"{kind}-{seq:06d}.parquet"
        with atomic_path(root / name) as tmp:
            pq.write_table(table, tmp, row_group_size=ROW_GROUP, **_encodings(table))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        written.append(root / name)
        entry["files"][kind] = {
            "name": name,
            "sha256": _sha256(root / name),
            "bytes": (root / name).stat().st_size,
            "rows": table.num_rows,
        }
    return entry


def _encodings(table: Any) -> dict[str, Any]:
    """Parquet writer options: zstd, and the flat float columns byte-stream-split (their
    sign and exponent bytes compress, unlike whole values) instead of dictionary-coded;
    compact geometry codes plain (frames) or delta-coded (positions)."""
    import pyarrow as pa

    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    codes = [f.name for f in table.schema if f.name.startswith(("ijk_q", "orientation_q"))]
    return {
        "compression": "zstd",
        "compression_level": ZSTD_LEVEL,
        "use_dictionary": [f.name for f in table.schema if f.name not in floats + codes],
        "use_byte_stream_split": floats,
        # compact positions: differences between rows (keypoints come sorted on one axis)
        "column_encoding": {c: "DELTA_BINARY_PACKED" for c in codes if c.startswith("ijk")},
    }


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the index at ``root``, its format and version checked."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise IndexCorruptError(f"{root / MANIFEST}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"{root / MANIFEST}: not a {FORMAT} manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise IndexCorruptError(
            f"{root}: index format version {manifest.get('version')} is not supported "
            f"(this keyfuse reads versions {READABLE_VERSIONS}); a newer keyfuse wrote it"
        )
    return manifest


def verified_parts(
    root: Path, full: bool = False
) -> tuple[dict[str, Any], list[Any], list[tuple[dict[str, list[Any]], Path]]]:
    """The manifest, its parts and, per part, its subjects table and keypoints file, after
    every file's size and row count was verified, and the checksum of every subjects
    table and of the keypoints files whose descriptors are read into memory (the open
    shard's; ``full``: all), so a damaged index is refused before anything is loaded.
    Keypoints files of sealed shards are checksummed by ``keyfuse index verify``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = read_manifest(root)
    parts = manifest.get("parts")
    if not isinstance(parts, list):
        raise IndexCorruptError(f"{root / MANIFEST}: no list of parts")
    try:
        sealed = sum(int(e["n_subjects"]) for e in manifest.get("shards") or [])
        checked: list[tuple[dict[str, list[Any]], Path]] = []
        first = 0  # the part's first subject
        for part in parts:
            files = {}
            first += int(part["n_subjects"])
            for kind in ("subjects", "keypoints"):
                info = part["files"][kind]
                f = root / info["name"]
                if not f.is_file():
                    raise IndexCorruptError(f"{f}: listed in the manifest but missing")
                # the open shard's descriptors come from its segment files if listed
                streamed = first > sealed and "segments" not in manifest
                digest = full or kind == "subjects" or streamed
                if f.stat().st_size != info["bytes"] or (digest and _sha256(f) != info["sha256"]):
                    raise IndexCorruptError(f"{f}: size or sha256 checksum mismatch")
                if pq.ParquetFile(f).metadata.num_rows != info["rows"]:
                    raise IndexCorruptError(f"{f}: row count differs from the manifest")
                files[kind] = f
            checked.append((pq.read_table(files["subjects"]).to_pydict(), files["keypoints"]))
    except IndexCorruptError:
        raise
    except (KeyError, TypeError, ValueError, pa.ArrowException, OSError) as e:
        raise IndexCorruptError(f"{root}: corrupt index ({type(e).__name__}: {e})") from e
    ids = [sid for sub, _ in checked for sid in sub["subject_id"]]
    if len(set(ids)) != len(ids):
        raise IndexCorruptError(f"{root}: duplicate subject ids")
    return manifest, parts, checked


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename is durable only then); best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _subjects_table(staged: Sequence[Staged], grids: dict[str, list[Any]] | None = None) -> Any:
    """The subjects table of one part: one row per subject (``grids``: a compact part's
    position grids and frame signs, see :func:`keyfuse.index_geometry.subject_grids`)."""
    import pyarrow as pa

    extra: dict[str, Any] = {}
    if grids is not None:
        extra["ijk_origin"] = pa.array(grids["ijk_origin"], pa.list_(pa.float64(), 3))
        extra["ijk_step"] = pa.array(grids["ijk_step"], pa.list_(pa.float64(), 3))
        extra["frame_sign"] = pa.array(grids["frame_sign"], pa.int8())
    return pa.table(
        {
            "subject_id": pa.array([s[0] for s in staged], pa.string()),
            "n_keypoints": pa.array([len(s[1]) for s in staged], pa.int64()),
            "affine": pa.array(
                [s[1].affine.ravel().tolist() for s in staged], pa.list_(pa.float64(), 16)
            ),
            "shape": pa.array([list(s[1].shape) for s in staged], pa.list_(pa.int64())),
            "labels": pa.array([json.dumps(s[3], sort_keys=True) for s in staged], pa.string()),
            "vector": pa.array(
                [None if s[2] is None else s[2].tolist() for s in staged], pa.list_(pa.float32())
            ),
            "source": pa.array([s[4] for s in staged], pa.string()),
            **extra,
        }
    )


# zstd level of the Parquet parts
ZSTD_LEVEL = 9

# keypoint rows per Parquet row group: one subject's keypoints are read back from disk
# without decoding more than a group or two around them
ROW_GROUP = 65_536

_KP_COLUMNS: tuple[tuple[str, Any, int], ...] = (
    ("ijk", np.float64, 3),
    ("scale", np.float32, 1),
    ("orientation", np.float32, 9),
    ("descriptors", np.uint8, 64),
    ("polarity", np.int8, 1),
    ("response", np.float32, 1),
    ("eigenvalues", np.float32, 3),
    ("flags", np.uint8, 1),
)


# Format 4 stores each geometry component in a flat column (``ijk_0``, ``ijk_1``, …), the
# floats byte-stream-split, and a value is null where it is reproduced bit for bit by the
# same component of the subject's previous row (the orientations of one detection share
# its position, scale, response and eigenvalues) or, for the orientation's third row, by
# the float32 cross product of its first two (as the extractor computes it). Format 5
# stores each of the orientation's first two rows (unit vectors) as its two smaller
# components and a small integer from which its largest one is rebuilt bit for bit
# (``orientation_r0_a``, ``_b``, ``_code``; see _orientation_code), null where the
# subject's previous row repeats the whole row. Formats 1-3 wrote one fixed-size-list
# column per component, still read.
_REPEATED = ("ijk", "scale", "orientation", "response", "eigenvalues")

# the two components kept beside the largest one (0, 1 or 2) of a row
_OTHERS = np.array([[1, 2], [0, 2], [0, 1]])


def _predicted_magnitude(kept: np.ndarray) -> np.ndarray:
    """The float32 bits (sign cleared, int64) of sqrt(1 - a² - b²) from a unit row's two
    kept components ``kept`` ((n, 2) float32), in float64 (IEEE operations in a fixed
    order, so the same bits on every platform; 0 where the components are not finite)."""
    a = kept.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.sqrt(np.maximum(0.0, 1.0 - a[:, 0] * a[:, 0] - a[:, 1] * a[:, 1]))
    p = np.where(np.isfinite(p), p, 0.0).astype(np.float32)
    return _bits(p).astype(np.int64) & 0x7FFFFFFF


def _orientation_code(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One orientation row per keypoint (``v``: (n, 3) float32) as its two components
    beside the largest (by magnitude bits) and a code: the zigzag-coded difference
    between the largest's magnitude bits and :func:`_predicted_magnitude`'s, its sign and
    its position, ``zz << 3 | sign << 2 | position``. For a unit row the difference is a
    few units in the last place, so the code compresses to about a byte where the
    component took 3-4; any value (NaN, signed zeros, a row that is no unit vector) is
    rebuilt bit for bit by :func:`_orientation_rows`."""
    bits = _bits(np.ascontiguousarray(v)).astype(np.int64)
    mag = bits & 0x7FFFFFFF
    j = np.argmax(mag, axis=1)
    kept = np.take_along_axis(v, _OTHERS[j], 1)
    r = np.take_along_axis(mag, j[:, None], 1)[:, 0] - _predicted_magnitude(kept)
    sign = np.take_along_axis(bits, j[:, None], 1)[:, 0] >> 31
    code = (np.where(r >= 0, 2 * r, -2 * r - 1) << 3) | (sign << 2) | j
    return np.ascontiguousarray(kept[:, 0]), np.ascontiguousarray(kept[:, 1]), code


def _orientation_rows(a: np.ndarray, b: np.ndarray, code: np.ndarray) -> np.ndarray:
    """The rows (n, 3) float32 that :func:`_orientation_code` coded as ``a, b, code``."""
    j, sign, zz = code & 3, (code >> 2) & 1, code >> 3
    if len(code) and (j.max() > 2 or zz.min() < 0):
        raise ValueError("bad orientation code")
    kept = np.stack([a, b], axis=1).astype(np.float32)
    mag = _predicted_magnitude(kept) + np.where(zz & 1, -(zz >> 1) - 1, zz >> 1)
    if len(code) and (mag.min() < 0 or mag.max() > 0x7FFFFFFF):
        raise ValueError("bad orientation code")
    out = np.empty((len(code), 3), np.float32)
    np.put_along_axis(out, _OTHERS[j], kept, 1)
    big = (mag | (sign << 31)).astype(np.uint32).view(np.float32)
    np.put_along_axis(out, j[:, None], big[:, None], 1)
    return out


def _flat_names(name: str, width: int) -> list[str]:
    """The format-4 column names of a keypoint component."""
    return [name] if width == 1 else [f"{name}_{c}" for c in range(width)]


def _cross(o: np.ndarray) -> np.ndarray:
    """The float32 cross products of the orientations' first two rows (``o``: (n, 9)),
    in the extractor's arithmetic (each product and difference rounded to float32)."""
    a, b = o[:, 0:3], o[:, 3:6]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or infinite components
        return np.stack(
            [
                a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1],
                a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2],
                a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0],
            ],
            axis=1,
        ).astype(np.float32)


def _bits(a: np.ndarray) -> np.ndarray:
    """An array's values as unsigned integers of the same width (bitwise equality)."""
    return a.view(f"u{a.dtype.itemsize}")


def _repeats(codes: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Rows whose value (bits; a row of a 2-D array) equals the previous row's, each
    subject's first row excepted: stored as nulls."""
    b = _bits(np.ascontiguousarray(codes))
    same = np.zeros(len(b), bool)
    eq = b[1:] == b[:-1]
    same[1:] = eq.all(axis=1) if eq.ndim > 1 else eq
    return same & ~first


def _compact_columns(
    staged: Sequence[Staged], grids: dict[str, list[Any]], first: np.ndarray
) -> dict[str, Any]:
    """A compact part's position and frame columns (see :mod:`keyfuse.index_geometry`):
    codes, nulls where they repeat, exact values on exception rows only."""
    import pyarrow as pa

    pos, frames, pos_x, frame_x = [], [], [], []
    for s, origin, step, sign in zip(
        staged, grids["ijk_origin"], grids["ijk_step"], grids["frame_sign"], strict=True
    ):
        code, exc = encode_positions(s[1].ijk, np.asarray(origin), np.asarray(step))
        pos.append(code)
        pos_x.append(exc)
        code, exc = encode_frames(s[1].orientation, sign)
        frames.append(code)
        frame_x.append(exc)
    n = len(first)
    ijk = np.concatenate(pos) if pos else np.zeros((0, 3), np.uint16)
    ijk_exc = np.concatenate(pos_x) if pos else np.zeros(0, bool)
    fc = np.concatenate(frames) if frames else np.zeros(0, np.uint32)
    f_exc = np.concatenate(frame_x) if frames else np.zeros(0, bool)
    cols: dict[str, Any] = {}
    for c in range(3):
        cols[f"ijk_q{c}"] = pa.array(ijk[:, c], mask=_repeats(ijk[:, c], first))
    cols["orientation_q"] = pa.array(fc, mask=_repeats(fc, first))
    exact_ijk = np.concatenate([s[1].ijk for s in staged]) if n else np.zeros((0, 3))
    for c in range(3):
        cols[f"ijk_x{c}"] = pa.array(np.ascontiguousarray(exact_ijk[:, c]), mask=~ijk_exc)
    o = (
        np.concatenate([s[1].orientation.reshape(-1, 9) for s in staged])
        if n
        else np.zeros((0, 9), np.float32)
    )
    for c in range(9):
        cols[f"orientation_x{c}"] = pa.array(np.ascontiguousarray(o[:, c]), mask=~f_exc)
    return cols


def _keypoints_table(
    staged: Sequence[Staged], coded: bool = True, grids: dict[str, list[Any]] | None = None
) -> Any:
    """The keypoints table of one part: every subject's keypoints, in subject order
    (``coded=False``: the orientation as format 4 stored it; ``grids``: compact geometry,
    see :func:`_compact_columns`)."""
    import pyarrow as pa

    counts = [len(s[1]) for s in staged]
    n = sum(counts)
    first = np.zeros(n, bool)  # each subject's first row: always stored
    first[np.cumsum([0, *counts[:-1]])[np.asarray(counts) > 0]] = True
    cols: dict[str, Any] = {
        "subject": pa.DictionaryArray.from_arrays(
            pa.array(np.repeat(np.arange(len(staged), dtype=np.int32), counts)),
            pa.array([s[0] for s in staged], pa.string()),
        )
    }
    if grids is not None:
        cols.update(_compact_columns(staged, grids, first))
    for name, dtype, width in _KP_COLUMNS:
        if name == "descriptors":
            continue  # stored once, in the shard or segment files (format 3)
        if grids is not None and name in ("ijk", "orientation"):
            continue
        flat = (
            np.concatenate(
                [
                    np.asarray(getattr(s[1], name), dtype=dtype).reshape(len(s[1]), width)
                    for s in staged
                ]
            )
            if staged
            else np.zeros((0, width), dtype)
        )
        if grids is not None and name in ROUNDED:
            flat = round_mantissa(flat, SCALE_MANTISSA)
        for c, col in enumerate(_flat_names(name, width)):
            if name == "orientation" and coded and c < 6:
                if c % 3 == 0:  # a whole row: two components and a code
                    row = flat[:, c : c + 3]
                    same = np.zeros(n, bool)
                    same[1:] = (_bits(row[1:]) == _bits(row[:-1])).all(axis=1)
                    same &= ~first
                    for suffix, arr in zip(("a", "b", "code"), _orientation_code(row), strict=True):
                        cols[f"orientation_r{c // 3}_{suffix}"] = pa.array(arr, mask=same)
                continue
            v = np.ascontiguousarray(flat[:, c])
            if name not in _REPEATED:
                cols[col] = pa.array(v)
                continue
            if name == "orientation" and c >= 6:
                same = _bits(_cross(flat)[:, c - 6]) == _bits(v)
            else:
                same = np.zeros(n, bool)
                same[1:] = _bits(v[1:]) == _bits(v[:-1])
                same &= ~first
            cols[col] = pa.array(v, mask=same)
    return pa.table(cols)


def _compact_arrays(keypoints: Any, name: str, grid: Any) -> np.ndarray:
    """One subject's positions (n, 3) float64 or frames (n, 9) float32 from a compact
    part's codes (``grid``: the subject's position origin, step and frame sign), the
    exception rows' exact values put back."""
    if grid is None:
        raise ValueError("compact geometry without its subject's grid")
    origin, step, sign = grid
    if name == "ijk":
        codes = np.stack([_filled(keypoints, f"ijk_q{c}") for c in range(3)], axis=1)
        out = decode_positions(codes, np.asarray(origin), np.asarray(step))
    else:
        out = unpack_frames(_filled(keypoints, "orientation_q")).reshape(-1, 9)
        if sign < 0:
            out = -out
    for c in range(out.shape[1]):
        col = _combined(keypoints.column(f"{name}_x{c}"))
        if col.null_count < len(col):
            known = np.asarray(col.is_valid().to_numpy(zero_copy_only=False))
            out[known, c] = np.asarray(col.drop_null().to_numpy(), out.dtype)
    return out


def _column_arrays(
    keypoints: Any, names: Sequence[str] | None = None, grid: Any = None
) -> dict[str, np.ndarray]:
    """Numpy arrays (one row per keypoint) of some keypoint components (default: all the
    table holds) of a table or a record batch whose rows start at a subject's first row
    (any layout; a compact one holds one subject, whose ``grid`` decodes it)."""
    arrays: dict[str, np.ndarray] = {}
    present = set(keypoints.column_names)
    for name, dtype, width in _KP_COLUMNS:
        stored = {name, f"{name}_0", f"{name}_r0_code", f"{name}_q", f"{name}_q0"} & present
        if (names is None and not stored) or (names is not None and name not in names):
            continue
        if {f"{name}_q", f"{name}_q0"} & present:  # compact geometry
            arrays[name] = _compact_arrays(keypoints, name, grid)
        elif name == "descriptors":
            col = _combined(keypoints.column(name))
            buf = col.buffers()[1]
            flat = np.frombuffer(buf, dtype=np.uint8, count=col.offset * 64 + len(col) * 64)
            arrays[name] = flat[col.offset * 64 :].reshape(-1, 64)
        elif width > 1 and name in present:  # formats 1-3: a fixed-size list
            col = _combined(keypoints.column(name))
            arrays[name] = np.asarray(
                col.flatten().to_numpy(zero_copy_only=False), dtype=dtype
            ).reshape(-1, width)
        else:
            out = np.empty((keypoints.num_rows, width), dtype)
            coded = name == "orientation" and "orientation_r0_code" in present
            for r in range(2 if coded else 0):  # format 5: rows 0 and 1 coded
                a, b, code = (
                    _filled(keypoints, f"orientation_r{r}_{x}") for x in ("a", "b", "code")
                )
                out[:, 3 * r : 3 * r + 3] = _orientation_rows(a, b, code.astype(np.int64))
            for c, cname in enumerate(_flat_names(name, width)):
                if coded and c < 6:
                    continue
                col = _combined(keypoints.column(cname))
                if name == "orientation" and c >= 6 and col.null_count:
                    known = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False))
                    out[:, c] = _cross(out)[:, c - 6]
                    out[known, c] = np.asarray(col.drop_null().to_numpy(), dtype)
                    continue
                out[:, c] = np.asarray(_filled(keypoints, cname), dtype)
            arrays[name] = np.ascontiguousarray(out[:, 0]) if width == 1 else out
    return arrays


def _filled(keypoints: Any, cname: str) -> np.ndarray:
    """A flat column's values, each null (a repeat) filled with the value above it."""
    import pyarrow.compute as pc

    col = _combined(keypoints.column(cname))
    if col.null_count:
        if not col.is_valid()[0].as_py():
            raise ValueError(f"column {cname} starts with a repeat")
        col = pc.fill_null_forward(col)
    return np.asarray(col.to_numpy(zero_copy_only=False))


def _combined(col: Any) -> Any:
    """One array of a table's (chunked) column or a record batch's column."""
    return col.combine_chunks() if hasattr(col, "combine_chunks") else col


def _keypoint_set(arrays: dict[str, np.ndarray], affine: Any, shape: Any) -> KeypointSet:
    return KeypointSet(
        arrays["ijk"],
        arrays["scale"],
        arrays["orientation"].reshape(-1, 3, 3),
        arrays["descriptors"],
        arrays["polarity"],
        arrays["response"],
        arrays["eigenvalues"],
        arrays["flags"],
        affine=np.asarray(affine, dtype=np.float64).reshape(4, 4),
        shape=shape,
    )


@dataclass(frozen=True)
class _Rows:
    """Where one subject's keypoints lie in an index part: rows [start, stop) of a
    keypoints Parquet file, verified when the index was opened. ``stamp`` (size,
    modification time) and the subject column guard against a file changed since."""

    subject: str
    path: Path
    start: int
    stop: int
    stamp: tuple[int, int]
    affine: tuple[float, ...]
    shape: tuple[int, ...]
    # a compact part's position origin and step per axis and frame sign
    grid: tuple[tuple[float, ...], tuple[float, ...], int] | None = None

    def read(self, shards: Any = None, i: int = -1) -> KeypointSet:
        """The subject's keypoints; ``shards`` (the index's ``ShardSet``) and ``i`` (its
        subject number) give its descriptors when the part has none (format 3)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        hint = "was the index directory changed or removed after it was opened?"
        try:
            st = self.path.stat()
            if (st.st_size, st.st_mtime_ns) != self.stamp:
                raise IndexCorruptError(f"{self.path}: changed since the index was opened; {hint}")
            pf = pq.ParquetFile(self.path)
            ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            if self.stop > self.start:
                first = int(np.searchsorted(ends, self.start, side="right"))
                last = int(np.searchsorted(ends, self.stop - 1, side="right"))
                table = pf.read_row_groups(list(range(first, last + 1)))
                offset = int(ends[first - 1]) if first else 0
                table = table.slice(self.start - offset, self.stop - self.start)
            else:
                table = pf.schema_arrow.empty_table()
            owners = table.column("subject").combine_chunks()
            if table.num_rows != self.stop - self.start or any(
                v != self.subject for v in owners.dictionary.take(owners.indices).to_pylist()
            ):
                raise IndexCorruptError(f"{self.path}: rows of {self.subject!r} moved; {hint}")
            arrays = _column_arrays(table, grid=self.grid)
            if "descriptors" not in arrays:
                if shards is None:
                    raise IndexCorruptError(f"{self.path}: no descriptors for {self.subject!r}")
                desc = shards.subject_descriptors(i)
                arrays["descriptors"] = np.asarray(desc, np.uint8).reshape(-1, 64)
        except IndexCorruptError:
            raise
        except (OSError, ValueError, IndexError, pa.ArrowException) as e:
            raise IndexCorruptError(
                f"{self.path}: cannot read keypoints back ({type(e).__name__}: {e}); {hint}"
            ) from e
        return _keypoint_set(arrays, self.affine, self.shape)


def _stream_part(
    sub: dict[str, list[Any]], keypoints_file: Path, root: Path
) -> Iterator[tuple[Any, ...]]:
    """(id, rows on disk, vector, labels, source, descriptors) of one part's subjects in
    order, reading only the descriptor column, a row group at a time."""
    import pyarrow.parquet as pq

    counts = np.asarray(sub["n_keypoints"], dtype=np.int64)
    st = keypoints_file.stat()
    stamp = (st.st_size, st.st_mtime_ns)
    pf = pq.ParquetFile(keypoints_file)
    if pf.metadata.num_rows != int(counts.sum()):
        raise IndexCorruptError(f"{root}: keypoint rows do not add up to the subjects' counts")
    ends = np.cumsum(counts)
    position = {sid: i for i, sid in enumerate(sub["subject_id"])}
    buf = np.zeros((0, 64), np.uint8)  # descriptor rows read but not yet handed out
    done, subject = 0, 0  # rows handed out, next subject
    for batch in pf.iter_batches(columns=["subject", "descriptors"], batch_size=ROW_GROUP):
        # each row's subject, through the batch's own dictionary of subject ids
        col = batch.column(0)
        lookup = np.array([position.get(v, -1) for v in col.dictionary.to_pylist()], np.int64)
        owners = lookup[np.asarray(col.indices.to_numpy(zero_copy_only=False), np.int64)]
        first = done + len(buf)
        expect = np.searchsorted(ends, np.arange(first, first + len(owners)), side="right")
        if not np.array_equal(owners, expect):
            raise IndexCorruptError(f"{root}: keypoint rows are not grouped by subject")
        buf = np.concatenate([buf, _column_arrays(batch, ["descriptors"])["descriptors"]])
        while subject < len(counts) and ends[subject] <= done + len(buf):
            n = int(counts[subject])
            yield (*_subject_row(sub, subject, keypoints_file, done, stamp), buf[:n])
            buf = buf[n:]
            done += n
            subject += 1
    while subject < len(counts):  # subjects without keypoints at the end
        if counts[subject] != 0:
            raise IndexCorruptError(f"{root}: keypoint rows end early")
        yield (
            *_subject_row(sub, subject, keypoints_file, done, stamp),
            np.zeros((0, 64), np.uint8),
        )
        subject += 1


def _part_rows(sub: dict[str, list[Any]], keypoints_file: Path) -> Iterator[tuple[Any, ...]]:
    """(id, rows on disk, vector, labels, source) of one part's subjects, descriptors not
    read (subjects of sealed shards: their descriptors are memory-mapped)."""
    st = keypoints_file.stat()
    start = 0
    for i, n in enumerate(sub["n_keypoints"]):
        yield _subject_row(sub, i, keypoints_file, start, (st.st_size, st.st_mtime_ns))
        start += int(n)


def _subject_row(
    sub: dict[str, list[Any]], i: int, keypoints_file: Path, start: int, stamp: tuple[int, int]
) -> tuple[Any, ...]:
    """(id, rows on disk, vector, labels, source) of subject ``i`` of a part."""
    vec = sub["vector"][i]
    n = int(sub["n_keypoints"][i])
    return (
        sub["subject_id"][i],
        _Rows(
            sub["subject_id"][i],
            keypoints_file,
            start,
            start + n,
            stamp,
            tuple(sub["affine"][i]),
            tuple(sub["shape"][i]),
            _grid(sub, i),
        ),
        None if vec is None else np.asarray(vec, dtype=np.float32),
        json.loads(sub["labels"][i]),
        sub["source"][i],
    )


def _grid(
    sub: dict[str, list[Any]], i: int
) -> tuple[tuple[float, ...], tuple[float, ...], int] | None:
    """Subject ``i``'s compact grid (origin, step, frame sign), None in an exact part."""
    if sub.get("ijk_origin") is None or sub["ijk_origin"][i] is None:
        return None
    return tuple(sub["ijk_origin"][i]), tuple(sub["ijk_step"][i]), int(sub["frame_sign"][i])
