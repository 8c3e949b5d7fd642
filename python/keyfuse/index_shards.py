"""The search side of :class:`keyfuse.Index`: its subjects' descriptors in shards.

A shard is a run of consecutive subjects holding at most ``shard_size`` keypoints (a
subject with more has a shard of its own). The last shard is *open*: it takes the
appended subjects; when the next subject would overflow it, or when it is full, it is
*sealed*. On disk the open shard's descriptors are its segment files (one per append). A
single segment is memory-mapped and searched in place like a sealed shard; several are
read into RAM when first searched, since a search reads one contiguous array, unless
:data:`JOIN_OPEN_SEGMENTS` is set: then they are joined into one cache file beside them
(``open-NNNNNN-<points>.kfs``, the shard format, named by the last segment; not in the
manifest: reused when its size, header and statistics match the segments', removed by the
next append) and mapped, which trades a second copy of the open shard on disk (up to
``shard_size`` × 64 bytes) for its RAM (where it cannot be written they are read). A
sealed shard on
disk is two files beside the parts::

    shard-000001.kfs   2048-byte header (magic, version, n, descriptor statistics,
                       header checksum) + n × 64 uint8 descriptors, memory-mapped
    shard-000001.kff   its kd-forest (magic, version, trees, nodes in build order: 3
                       bytes an internal node, 1 a leaf; permutations in ⌈log2 n⌉
                       bits a point; checksum; keyfuse_core::knn::forest_io), built
                       when sealed; once loaded, its nodes are in RAM and its
                       permutations are searched in the mapped file
    open-000007.kfs    the open shard's subjects appended by part 7 (shard file
                       format), memory-mapped; retired when the open shard is sealed

Both are written aside, flushed and renamed before the manifest that lists them (with
their sizes and sha256) is committed, so an interrupted append leaves the previous
index. Opening checks each shard or segment file's size and header only (no
descriptor is read: seconds for any size);
:func:`keyfuse.index_verify.verify_index` reads every byte. A forest is loaded (and
validated) on the first approximate search, never rebuilt on open.

Memory: the pages of mapped files a search touches count in the process's resident set
(clean, reclaimable, but in RSS, its peak and a Dask worker's memory limit). When the
process's file-backed resident memory exceeds :data:`MAPPED_BUDGET` after a shard's
search, that shard's mapped pages (descriptors, the forest's permutations) are released
from the process (``madvise(MADV_DONTNEED)``: they stay in the OS page cache; its next
search maps them again with minor faults, ≈ 0.4 µs a page), so the resident set stays
within the anonymous memory (forests' nodes, subject ends, the interpreter) + the budget
+ one shard.

Scoring is the same whatever the layout: every shard's k nearest neighbours of each
query keypoint (global point ids), merged by (distance, id), then scored with the
cohort's merged descriptor statistics (``_core.merge_score``), so a sharded index scores
bit-identically to one shard holding the same subjects.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse import _core
from keyfuse.errors import CorruptDataError, IndexCorruptError, KeyfuseIOError

DEFAULT_SHARD_SIZE = 20_000_000
#: file-backed resident bytes above which a searched shard's mapped pages are released:
#: 50% of the machine's memory (a process may set it; 0 releases after every search;
#: a Dask worker keeps less, index_dask.worker_mapped_budget)
MAPPED_FRACTION = 0.5
#: of a Dask worker's memory limit: the rest holds its forests' nodes, the interpreter and
#: the shard being searched below the 80% at which Dask pauses the worker
WORKER_MAPPED_FRACTION = 0.3
MAPPED_BUDGET = int(MAPPED_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
#: map a multi-segment open shard through a joined cache file instead of reading it into
#: RAM (off by default: the cache doubles the open shard on disk; docs/decisions.md)
JOIN_OPEN_SEGMENTS = False
HEADER_BYTES = 2048  # of a shard file (keyfuse_core::shard::HEADER_BYTES)


def as_descriptors(kps: Any) -> npt.NDArray[np.uint8]:
    """A keypoint set's descriptors as a contiguous (n, 64) uint8 array."""
    return np.ascontiguousarray(kps.descriptors, dtype=np.uint8).reshape(-1, 64)


@dataclass
class SearchParams:
    """What a shard search needs (the index's k, kernel and clamp)."""

    k: int
    exact: bool
    checks: int
    alpha2_floor: float
    alpha2_cap_fraction: float
    posterior: bool


@dataclass
class _Sealed:
    """A sealed shard: its manifest entry (``None`` in memory) and the engine."""

    shard: _core.Shard
    first: int
    sizes: list[int]
    entry: dict[str, Any] | None = None
    root: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    starts: npt.NDArray[np.int64] | None = None  # each subject's first row, when needed

    @property
    def name(self) -> str:
        return "memory" if self.entry is None else str(self.entry["name"])


def shard_entry_files(entry: dict[str, Any]) -> list[str]:
    """The file names of a sealed shard's manifest entry."""
    return [entry["name"], *([entry["forest"]["name"]] if entry.get("forest") else [])]


class ShardSet:
    """Every subject's descriptors as sealed shards plus the open one."""

    def __init__(self, shard_size: int, trees: int) -> None:
        self.shard_size, self.trees = int(shard_size), int(trees)
        self.sealed: list[_Sealed] = []
        self.sizes: list[int] = []  # keypoints of every subject
        self.open_first = 0  # the open shard's first subject
        self._open: list[np.ndarray] = []
        self._open_engine: _core.Shard | None = None
        self._lock = threading.Lock()
        self.segments: list[dict[str, Any]] = []  # on disk: the open shard's files
        self.root: Path | None = None  # on disk: the index directory

    # -- contents -----------------------------------------------------------------------
    @property
    def n_points(self) -> int:
        return int(sum(self.sizes))

    def __len__(self) -> int:
        return len(self.sizes)

    def offsets(self) -> npt.NDArray[np.int64]:
        return np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).astype(np.int64)

    def memory_bytes(self) -> int:
        """Bytes in RAM: open descriptors, owners and forests (mapped files not counted)."""
        sealed = sum(int(s.shard.memory_bytes()) for s in self.sealed)
        if self.root is not None and self.segments:  # the open shard's views are mapped
            eng = self._open_engine
            return sealed + (0 if eng is None else int(eng.memory_bytes()))
        return sealed + sum(d.nbytes for d in self._open)

    def listing(self) -> list[dict[str, Any]]:
        """One row per shard: name, subjects, keypoints, sealed."""
        rows = [
            {
                "name": s.name,
                "first_subject": s.first,
                "subjects": len(s.sizes),
                "keypoints": int(sum(s.sizes)),
                "sealed": True,
            }
            for s in self.sealed
        ]
        if self._open or not rows:
            rows.append(
                {
                    "name": "open",
                    "first_subject": self.open_first,
                    "subjects": len(self._open),
                    "keypoints": int(sum(len(d) for d in self._open)),
                    "sealed": False,
                }
            )
        return rows

    def subject_descriptors(self, i: int) -> npt.NDArray[np.uint8]:
        """Subject ``i``'s descriptors (a copy for a sealed shard)."""
        if i >= self.open_first:
            return self._open[i - self.open_first]
        firsts = [s.first for s in self.sealed]
        j = int(np.searchsorted(firsts, i, side="right")) - 1
        if j < 0:
            raise IndexError(i)
        s = self.sealed[j]
        if s.starts is None:
            s.starts = np.concatenate([[0], np.cumsum(s.sizes)]).astype(np.int64)
        a, b = int(s.starts[i - s.first]), int(s.starts[i - s.first + 1])
        return np.asarray(s.shard.descriptors(a, b))

    def iter_subjects(self) -> Iterator[npt.NDArray[np.uint8]]:
        for s in self.sealed:
            d = np.asarray(s.shard.descriptors(0, None))
            for a, b in zip(np.cumsum([0, *s.sizes[:-1]]), np.cumsum(s.sizes), strict=True):
                yield d[a:b]
        yield from self._open

    def descriptors(self) -> npt.NDArray[np.uint8]:
        """Every descriptor, (n_points, 64), subjects in order (a copy)."""
        parts = [np.asarray(s.shard.descriptors(0, None)) for s in self.sealed] + self._open
        return np.concatenate(parts) if parts else np.zeros((0, 64), np.uint8)

    def stats(self) -> npt.NDArray[np.uint64]:
        """The cohort's descriptor statistics (exact sums merged over the shards)."""
        words = np.zeros(129, np.uint64)
        for s in self.sealed:
            words += np.asarray(s.shard.stats(), np.uint64)
        if self._open:
            words += np.asarray(self._open_shard().stats(), np.uint64)
        return words

    # -- growing ------------------------------------------------------------------------
    def plan(self, sizes: Sequence[int]) -> tuple[list[tuple[int, int]], int]:
        """Where appending subjects with ``sizes`` keypoints seals shards: the subject
        ranges ``[first, stop)`` (global) to seal, and the new open shard's first subject."""
        seals: list[tuple[int, int]] = []
        first, pts = self.open_first, int(sum(len(d) for d in self._open))
        i = len(self.sizes)
        for n in sizes:
            if i > first and pts + n > self.shard_size:
                seals.append((first, i))
                first, pts = i, 0
            pts += int(n)
            i += 1
            if pts >= self.shard_size:
                seals.append((first, i))
                first, pts = i, 0
        return seals, first

    def pending(self, new: Sequence[npt.NDArray[np.uint8]], lo: int, hi: int) -> np.ndarray:
        """The descriptors of subjects ``[lo, hi)``, from the open shard and ``new``."""
        base = len(self.sizes)
        rows = [
            self._open[i - self.open_first] if i < base else new[i - base] for i in range(lo, hi)
        ]
        return np.ascontiguousarray(
            np.concatenate(rows) if rows else np.zeros((0, 64), np.uint8), dtype=np.uint8
        )

    def append(
        self,
        new: Sequence[npt.NDArray[np.uint8]],
        sealed: Sequence[tuple[int, int, _core.Shard, dict[str, Any] | None, Path | None]],
    ) -> None:
        """Take subjects ``new`` (committed to disk already) and the shards sealed for
        them (engines from :meth:`seal_in_memory` or opened files)."""
        all_open = [*self._open, *new]
        sizes = [*self.sizes, *(len(d) for d in new)]
        first = self.open_first
        for lo, hi, shard, entry, root in sealed:
            self.sealed.append(_Sealed(shard, lo, sizes[lo:hi], entry, root))
            first = hi
        self._open = all_open[first - self.open_first :]
        self.open_first, self.sizes = first, sizes
        self._open_engine = None

    def seal_in_memory(self, desc: np.ndarray, lo: int, hi: int, sizes: Sequence[int]) -> Any:
        base = int(sum(sizes[:lo]))
        return _core.Shard(desc, list(sizes[lo:hi]), first_subject=lo, base=base, trees=self.trees)

    def add_sealed_file(self, root: Path, entry: dict[str, Any], sizes: list[int]) -> None:
        """Map a sealed shard of an opened index (size and header checked)."""
        first = int(entry["first_subject"])
        base = int(sum(self.sizes[:first]))
        try:
            shard = _core.Shard.open(
                root / entry["name"], sizes, first_subject=first, base=base, trees=self.trees
            )
        except (CorruptDataError, KeyfuseIOError, OSError) as e:
            raise IndexCorruptError(f"{root}: shard {entry['name']} is damaged: {e}") from e
        self.sealed.append(_Sealed(shard, first, sizes, entry, root))
        self.open_first = first + len(sizes)

    def map_segments(self, root: Path, segments: list[dict[str, Any]]) -> None:
        """Map the open shard's segment files (size and header checked): each subject's
        descriptors a view of its file, copied only when the open shard is searched."""
        first = self.open_first
        for e in segments:
            lo, n = int(e["first_subject"]), int(e["n_subjects"])
            sizes = self.sizes[lo : lo + n]
            f = root / e["name"]
            try:
                if lo != first or len(sizes) != n:
                    raise CorruptDataError("does not follow the shards")
                _core.Shard.open(f, sizes, first_subject=lo, base=0, trees=self.trees)
            except (CorruptDataError, KeyfuseIOError, OSError) as exc:
                raise IndexCorruptError(f"{root}: open-shard segment {e['name']}: {exc}") from exc
            rows = np.memmap(f, np.uint8, "r", offset=HEADER_BYTES, shape=(sum(sizes), 64))
            for a, b in zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes), strict=True):
                self.open_subject(rows[a:b])
            first = lo + n
        if first != len(self.sizes):
            raise IndexCorruptError(f"{root}: the open shard's segments miss subjects")
        self.segments, self.root = list(segments), root

    def remap_open(self) -> None:
        """The open shard's subjects as views of its segment files (after an append)."""
        assert self.root is not None
        self._open = []
        self.map_segments(self.root, self.segments)

    def open_subject(self, desc: npt.NDArray[np.uint8]) -> None:
        """A subject of the open shard, streamed in when an index is opened."""
        self._open.append(np.ascontiguousarray(desc, dtype=np.uint8))
        self._open_engine = None

    # -- searching ----------------------------------------------------------------------
    def _open_shard(self) -> _core.Shard:
        with self._lock:
            if self._open_engine is None:
                base = int(sum(self.sizes[: self.open_first]))
                kw = {"first_subject": self.open_first, "base": base, "trees": self.trees}
                sizes = self.sizes[self.open_first :]
                if self.root is not None and self.segments:
                    # one segment mapped in place; several read, or joined into a cache
                    # file beside them (like the open shard's forest) and mapped
                    files = [(self.root / e["name"], int(e["n_keypoints"])) for e in self.segments]
                    n = sum(f[1] for f in files)
                    stem = Path(self.segments[-1]["name"]).stem
                    joined = self.root / f"{stem}-{n}.kfs" if JOIN_OPEN_SEGMENTS else None
                    try:
                        self._open_engine = _core.Shard.open_files(files, joined, sizes, **kw)
                    except (CorruptDataError, KeyfuseIOError, OSError) as e:
                        raise IndexCorruptError(f"{self.root}: open-shard segments: {e}") from e
                else:
                    desc = self.pending([], self.open_first, len(self.sizes))
                    self._open_engine = _core.Shard(desc, sizes, **kw)
            return self._open_engine

    def engines(self, exact: bool, on_disk: bool = True) -> list[tuple[str, _core.Shard]]:
        """Every shard's engine (name, engine), forests loaded or built when ``exact`` is
        false; ``on_disk=False``: only those not in a shard file (the open shard, the
        sealed shards of an in-memory index)."""
        out = [(s.name, self._ready(s, exact)) for s in self.sealed if on_disk or s.entry is None]
        if self._open:
            eng = self._open_shard()
            if not exact and not eng.has_forest:
                with self._lock:
                    if not eng.has_forest:
                        self._open_forest(eng)
            out.append(("open", eng))
        return out

    def _open_forest(self, eng: _core.Shard) -> None:
        """The open shard's forest: loaded from the cache file of its current segments
        (``open-NNNNNN-<points>.kff``, not in the manifest: checked on load, removed when
        the shard is sealed), else built and, where the directory is writable, saved."""
        if self.root is None or not self.segments:
            eng.build_forest()
            return
        f = self.root / f"{Path(self.segments[-1]['name']).stem}-{eng.n_points}.kff"
        try:
            eng.load_forest(f)
            return
        except (CorruptDataError, KeyfuseIOError, OSError):
            pass
        eng.build_forest()
        with contextlib.suppress(KeyfuseIOError, OSError):
            eng.save_forest(f)

    def _ready(self, s: _Sealed, exact: bool) -> _core.Shard:
        if exact or s.shard.has_forest:
            return s.shard
        with s.lock:
            if s.shard.has_forest:
                return s.shard
            forest = s.entry.get("forest") if s.entry else None
            if forest and s.root is not None:
                f = s.root / forest["name"]
                try:
                    if f.stat().st_size != forest["bytes"]:
                        raise CorruptDataError("size differs from the manifest")
                    s.shard.load_forest(f)
                except (CorruptDataError, OSError) as e:
                    raise IndexCorruptError(
                        f"{s.root}: the kd-forest of shard {s.name} ({forest['name']}) is "
                        f"damaged: {e}; run 'keyfuse index verify --repair {s.root}'"
                    ) from e
            else:
                s.shard.build_forest()
        return s.shard


def shard_knn(
    engines: Sequence[tuple[str, _core.Shard]],
    queries: np.ndarray,
    exclude: int | None,
    allowed: np.ndarray | None,
    p: SearchParams,
    budget: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each shard's neighbour lists of ``queries`` (global point ids); a shard's mapped
    pages are released after its search when the process holds more than ``budget``
    (default :data:`MAPPED_BUDGET`) of file-backed pages."""
    budget = MAPPED_BUDGET if budget is None else budget
    out = []
    for _, eng in engines:
        out.append(
            eng.knn(
                queries, exclude=exclude, allowed=allowed, k=p.k, exact=p.exact, checks=p.checks
            )
        )
        if file_resident_bytes() > budget:
            eng.release_pages()
    return out


def file_resident_bytes() -> int:
    """This process's file-backed (and shared) resident bytes (``/proc/self/statm``; 0
    where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            shared = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 0
    return shared * os.sysconf("SC_PAGE_SIZE")


def merge_scores(
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
    offsets: np.ndarray,
    stats: np.ndarray,
    p: SearchParams,
) -> npt.NDArray[np.float64]:
    """Soft intersections with every subject from the shards' neighbour lists."""
    return np.asarray(
        _core.merge_score(
            list(parts),
            subject_offsets=offsets,
            stats=stats,
            k=p.k,
            alpha2_floor=p.alpha2_floor,
            alpha2_cap_fraction=p.alpha2_cap_fraction,
            posterior=p.posterior,
        )
    )


def jaccard_from(inter: npt.NDArray[np.float64], na: Any, nb: Any) -> npt.NDArray[np.float64]:
    """J = |A∩B| / (|A| + |B| − |A∩B|) in [0, 1] (0 for an empty union), elementwise, with
    the core's operations in the core's order (``keyfuse_core::jaccard::jaccard_from``)."""
    union = (np.asarray(na, np.float64) + np.asarray(nb, np.float64)) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        j = np.clip(inter / union, 0.0, 1.0)
    return np.where(union <= 0.0, 0.0, j)


def jaccard_rows(
    inter: npt.NDArray[np.float64],
    rows: Sequence[int],
    sizes: npt.NDArray[np.int64],
    symmetric: bool,
    inter_t: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]:
    """Rows ``rows`` of the soft-Jaccard matrix from their soft intersections ``inter``
    (one row per query subject); ``symmetric`` averages with ``inter_t`` (the columns
    ``rows`` of the intersection matrix, transposed). The diagonal is 1."""
    i = 0.5 * (inter + inter_t) if symmetric and inter_t is not None else inter
    r = np.asarray(rows, np.int64)
    out = jaccard_from(i, sizes[r][:, None], sizes[None, :])
    out[np.arange(len(r)), r] = 1.0
    return out


def seal(
    shards: ShardSet,
    new: Sequence[npt.NDArray[np.uint8]],
    seals: Sequence[tuple[int, int]],
    root: Path | None,
    written: list[Path],
) -> list[tuple[int, int, _core.Shard, dict[str, Any] | None, Path | None]]:
    """Seal shards ``seals`` (subject ranges of the open shard and ``new``): in memory, or
    on disk as a shard file and its kd-forest (each written aside and renamed; every file
    is appended to ``written`` for a clean-up). The caller commits the manifest."""
    from keyfuse.index_storage import _sha256

    sizes = [*shards.sizes, *(len(d) for d in new)]
    out: list[tuple[int, int, _core.Shard, dict[str, Any] | None, Path | None]] = []
    for lo, hi in seals:
        desc = shards.pending(new, lo, hi)
        if root is None:
            out.append((lo, hi, shards.seal_in_memory(desc, lo, hi, sizes), None, None))
            continue
        seq = len(shards.sealed) + len(out) + 1
        name, fname = f"shard-{seq:06d}.kfs", f"shard-{seq:06d}.kff"
        written.append(root / name)
        _core.write_shard(root / name, desc)
        del desc
        base = int(sum(sizes[:lo]))
        eng = _core.Shard.open(
            root / name, sizes[lo:hi], first_subject=lo, base=base, trees=shards.trees
        )
        eng.build_forest()
        written.append(root / fname)
        eng.save_forest(root / fname)
        entry = {
            "name": name,
            "first_subject": lo,
            "n_subjects": hi - lo,
            "n_keypoints": int(sum(sizes[lo:hi])),
            "bytes": (root / name).stat().st_size,
            "sha256": _sha256(root / name),
            "forest": {
                "name": fname,
                "trees": shards.trees,
                "bytes": (root / fname).stat().st_size,
                "sha256": _sha256(root / fname),
            },
        }
        out.append((lo, hi, eng, entry, root))
    return out
