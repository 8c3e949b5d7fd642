"""The persistent cohort index: keypoint sets (and optional CNN vectors) of many subjects,
searchable by soft-Jaccard similarity.

In memory the search engine (every descriptor, a randomized kd-forest and the per-subject
soft-Jaccard accumulation) lives in Rust (:class:`keyfuse._core.SearchEngine`) and runs with the
GIL released. On disk an index is a directory of Apache Parquet files::

    index/
      manifest.json                 format, version, parts and their sha256 checksums
      subjects-000001.parquet       id, keypoint count, affine, shape, labels, vector, source
      keypoints-000001.parquet      subject, geometry and the 64-byte descriptor per row
      subjects-000002.parquet  ...  one pair per append

Appends are atomic: a part is written under a temporary name, flushed and renamed, and
only then does a new ``manifest.json`` (itself written aside and renamed) list it. A file
missing from the manifest is ignored; a listed file that is missing, truncated or fails
its checksum raises :class:`~keyfuse.errors.IndexCorruptError` and nothing is loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from keyfuse import _core
from keyfuse._io import atomic_path
from keyfuse.device import runs_on_gpu
from keyfuse.errors import (
    IndexCorruptError,
    InvalidArgumentError,
    KeyfuseIOError,
)
from keyfuse.index_storage import (
    ROW_GROUP,
    _fsync_dir,
    _keypoints_table,
    _Rows,
    _sha256,
    _stream_part,
    _subjects_table,
)
from keyfuse.keypoints import KeypointSet

__all__ = ["Hit", "Index", "SearchResult"]

FORMAT = "keyfuse-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PathLike = str | os.PathLike[str]
Restrict = Mapping[str, Any] | Callable[[dict[str, Any]], bool] | Iterable[str] | None


class Hit(NamedTuple):
    """One search result: ``subject_id, score = hit``."""

    subject_id: str
    score: float


class SearchResult(list[Hit]):
    """Ranked hits (best first), a list of :class:`Hit` ``(subject_id, score)`` tuples."""

    @property
    def ids(self) -> list[str]:
        return [h.subject_id for h in self]

    @property
    def scores(self) -> npt.NDArray[np.float64]:
        return np.array([h.score for h in self], dtype=np.float64)

    def __repr__(self) -> str:
        body = ", ".join(f"{h.subject_id!r}: {h.score:.4f}" for h in self[:5])
        more = ", …" if len(self) > 5 else ""
        return f"SearchResult([{body}{more}])"


class Index:
    """A cohort of keypoint sets searchable by soft-Jaccard similarity.

    Parameters
    ----------
    path : str or Path, optional
        ``None``: in memory only (``save`` writes it). A directory: opened if it holds an
        index, else created; every :meth:`add` is then appended to disk atomically.
    k : int, optional
        Nearest neighbours per query keypoint (K of the soft Jaccard); default 10 for the
        posterior kernel, 30 for the published one.
    checks : int, default 64
        Distance evaluations per keypoint in the approximate (kd-forest) search.
    trees : int, default 8
        Randomized kd-trees of the forest.
    exact_below : int, default 100_000
        Indices with fewer keypoints than this are searched exactly (brute force) unless
        ``exact=False`` is passed; larger ones use the kd-forest (search and pairwise
        follow the same rule, so a search scores like its row of :meth:`pairwise`).
        Exact search scores better than the forest, but its cost grows as N² for
        :meth:`pairwise` (figures in docs/decisions.md).
    kernel : {"posterior", "published"}, default "posterior"
        Soft-Jaccard kernel (see :func:`keyfuse.soft_jaccard`, and docs/decisions.md for the
        figures): "posterior" normalises each keypoint's kernel values over its K
        neighbours in the cohort; "published" is Chauvin et al.'s unnormalised kernel.
    alpha2_cap_fraction : float, optional
        Cap of the adaptive kernel width (see :func:`keyfuse.soft_jaccard`); default
        ``inf`` (posterior) or 0.1 (published); ``inf`` gives the published formula.

    Scores are cohort-relative: α_i is the distance from a query keypoint to its nearest
    neighbour among all the other subjects.

    Examples
    --------
    >>> index = kf.Index("cohort.kfi")
    >>> index.add("sub-01", kps, family="F1", sex="F")
    >>> index.search(query_kps, k=5)                     # -> [(id, score), ...]
    >>> index.search(query_kps, restrict={"sex": "F"})   # only subjects with sex == "F"
    """

    def __init__(
        self,
        path: PathLike | None = None,
        *,
        k: int | None = None,
        checks: int = 64,
        trees: int = 8,
        exact_below: int = 100_000,
        kernel: str = "posterior",
        alpha2_cap_fraction: float | None = None,
    ) -> None:
        from keyfuse.matching import _kernel_defaults

        post, kk, cap = _kernel_defaults(kernel, k, alpha2_cap_fraction)
        if checks < 1 or trees < 1:
            raise InvalidArgumentError("checks and trees must be ≥ 1")
        self.kernel, self.posterior, self.alpha2_cap_fraction = kernel, post, cap
        self.k, self.checks, self.trees, self.exact_below = (
            kk,
            int(checks),
            int(trees),
            int(exact_below),
        )
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._labels: list[dict[str, Any]] = []
        self._vectors: list[np.ndarray | None] = []
        self._sources: list[str | None] = []
        # a subject's full keypoints: resident (added in this process), or where they lie
        # on disk (opened indexes keep only the descriptors, in the engine)
        self._kps: list[KeypointSet | _Rows] = []
        self._engine = _core.SearchEngine(trees=self.trees)
        self._parts: list[dict[str, Any]] = []
        self.path: Path | None = None
        if path is not None:
            p = Path(path)
            if (p / MANIFEST).exists():
                self._load_into(p)
            else:
                if p.exists() and not p.is_dir():
                    raise KeyfuseIOError(f"{p} exists and is not an index directory")
                if p.is_dir() and any(p.iterdir()):
                    raise KeyfuseIOError(
                        f"{p} is a non-empty directory without {MANIFEST}: not an index"
                    )
                p.mkdir(parents=True, exist_ok=True)
                self._write_manifest(p, [])
            self.path = p

    # -- contents ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, subject_id: object) -> bool:
        return subject_id in self._pos

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Index({len(self)} subjects, {self.n_keypoints} keypoints{where})"

    @property
    def subjects(self) -> list[str]:
        """Subject ids in insertion order."""
        return list(self._ids)

    @property
    def n_keypoints(self) -> int:
        return int(self._engine.n_points)

    @property
    def labels(self) -> dict[str, dict[str, Any]]:
        """``{subject_id: {label: value}}`` for every subject."""
        return {sid: dict(lab) for sid, lab in zip(self._ids, self._labels, strict=True)}

    def labels_table(self) -> Any:
        """The labels as a ``pyarrow.Table`` (column ``subject_id`` + one per label)."""
        import pyarrow as pa

        names = sorted({k for lab in self._labels for k in lab})
        rows = [
            {"subject_id": s, **{n: lab.get(n) for n in names}}
            for s, lab in zip(self._ids, self._labels, strict=True)
        ]
        return (
            pa.Table.from_pylist(rows)
            if rows
            else pa.table({"subject_id": pa.array([], pa.string())})
        )

    def label(self, name: str) -> list[Any]:
        """One label's value per subject (``None`` where missing), in subject order."""
        return [lab.get(name) for lab in self._labels]

    def keypoints(self, subject_id: str) -> KeypointSet:
        """A subject's keypoints (read from the index directory when it was opened from
        disk: an opened index holds only the descriptors in memory)."""
        kp = self._kps[self._index_of(subject_id)]
        return kp if isinstance(kp, KeypointSet) else kp.read()

    def vector(self, subject_id: str) -> np.ndarray | None:
        return self._vectors[self._index_of(subject_id)]

    def source(self, subject_id: str) -> str | None:
        return self._sources[self._index_of(subject_id)]

    def memory_bytes(self) -> int:
        """Bytes held by the search engine (descriptors, owners, kd-forest)."""
        return int(self._engine.memory_bytes())

    def _index_of(self, subject_id: str) -> int:
        try:
            return self._pos[subject_id]
        except KeyError:
            raise InvalidArgumentError(f"no subject {subject_id!r} in the index") from None

    # -- adding ----------------------------------------------------------------------
    def add(
        self,
        subject_id: str,
        kps: KeypointSet | Any,
        vector: npt.ArrayLike | None = None,
        *,
        source: str | None = None,
        device: str = "auto",
        **labels: Any,
    ) -> None:
        """Add one subject (appended to disk atomically when the index has a path).

        Parameters
        ----------
        subject_id : str
            Unique id; adding an existing id raises :class:`InvalidArgumentError`.
        kps : KeypointSet (or an Image / path, extracted with ``device``)
        vector : array, optional
            A CNN feature vector stored with the subject.
        source : str, optional
            Where the keypoints came from (e.g. the image path).
        **labels
            JSON-serialisable labels (``family="F3", sex="F", age=31``).
        """
        self.add_many([(subject_id, kps, vector, labels)], source=[source], device=device)

    def add_many(
        self,
        items: Iterable[tuple[str, Any, npt.ArrayLike | None, Mapping[str, Any]]],
        *,
        source: Sequence[str | None] | None = None,
        device: str = "auto",
    ) -> None:
        """Add several subjects as one atomic append: ``(subject_id, kps, vector, labels)``."""
        from keyfuse.matching import _as_keypoints

        staged: list[tuple[str, KeypointSet, np.ndarray | None, dict[str, Any], str | None]] = []
        seen: set[str] = set()
        items = list(items)
        sources = list(source) if source is not None else [None] * len(items)
        if len(sources) != len(items):
            raise InvalidArgumentError("source must have one entry per item")
        for (sid, kps, vec, labels), src in zip(items, sources, strict=True):
            if not isinstance(sid, str) or not sid:
                raise InvalidArgumentError(f"subject_id must be a non-empty string, got {sid!r}")
            if sid in self._pos or sid in seen:
                raise InvalidArgumentError(f"subject {sid!r} is already in the index")
            seen.add(sid)
            kp = _as_keypoints(kps, device, name=sid)
            v = None if vec is None else np.asarray(vec, dtype=np.float32).ravel()
            labs = dict(labels)
            try:
                json.dumps(labs)
            except TypeError as e:
                raise InvalidArgumentError(
                    f"labels of {sid!r} must be JSON-serialisable: {e}"
                ) from e
            staged.append((sid, kp, v, labs, src))
        if not staged:
            return
        if self.path is not None:
            self._append_part(self.path, staged)
        for sid, kp, v, labs, src in staged:
            self._register(sid, kp, v, labs, src)

    def _register(
        self,
        sid: str,
        kp: KeypointSet | _Rows,
        v: np.ndarray | None,
        labs: dict[str, Any],
        src: str | None,
        descriptors: np.ndarray | None = None,
    ) -> None:
        """Add one subject to memory: its KeypointSet, or (from disk) its rows' place and
        descriptors."""
        desc = kp.descriptors if isinstance(kp, KeypointSet) else descriptors
        self._engine.add(np.ascontiguousarray(desc, dtype=np.uint8))
        self._pos[sid] = len(self._ids)
        self._ids.append(sid)
        self._kps.append(kp)
        self._vectors.append(v)
        self._labels.append(labs)
        self._sources.append(src)

    # -- searching --------------------------------------------------------------------
    def _gpu_cohort(self) -> _core.GpuCohort:
        """Every subject's descriptors uploaded to the GPU once, re-uploaded only after a
        subject is added (subjects are only ever appended)."""
        cached: tuple[int, _core.GpuCohort] | None = getattr(self, "_gpu_cache", None)
        if cached is None or cached[0] != len(self):
            data = self._engine.descriptors()
            sizes = np.asarray(self._engine.sizes(), dtype=np.int64)
            cached = (len(self), _core.GpuCohort(np.ascontiguousarray(data), sizes))
            self._gpu_cache = cached
        return cached[1]

    def _use_exact(self, exact: bool | None) -> bool:
        return self.n_keypoints < self.exact_below if exact is None else bool(exact)

    def _mask(self, restrict: Restrict) -> np.ndarray | None:
        if restrict is None:
            return None
        if callable(restrict):
            return np.array([bool(restrict(dict(lab))) for lab in self._labels], dtype=bool)
        if isinstance(restrict, Mapping):

            def ok(lab: dict[str, Any]) -> bool:
                for key, want in restrict.items():
                    have = lab.get(key)
                    if isinstance(want, (list, tuple, set, frozenset)):
                        if have not in want:
                            return False
                    elif have != want:
                        return False
                return True

            return np.array([ok(lab) for lab in self._labels], dtype=bool)
        if isinstance(restrict, str):
            raise InvalidArgumentError("restrict: pass a dict of labels, ids or a predicate")
        ids = set(restrict)
        unknown = ids - set(self._pos)
        if unknown:
            raise InvalidArgumentError(f"restrict names unknown subjects: {sorted(unknown)[:5]}")
        return np.array([s in ids for s in self._ids], dtype=bool)

    def scores(
        self,
        query: Any,
        *,
        restrict: Restrict = None,
        exclude: str | None = None,
        exact: bool | None = None,
        device: str = "auto",
    ) -> npt.NDArray[np.float64]:
        """Soft-Jaccard score of ``query`` against every subject, in subject order
        (0 for subjects excluded or outside ``restrict``). See :meth:`search`."""
        from keyfuse.matching import _ALPHA2_FLOOR, _as_keypoints

        on_gpu = runs_on_gpu(device, k=self.k, posterior=self.posterior)
        if isinstance(query, str) and query in self._pos and exclude is None:
            exclude = query
            query = self.keypoints(query)
        kps = _as_keypoints(query, device, "query")
        ex = None if exclude is None else self._index_of(exclude)
        mask = self._mask(restrict)
        if len(self) == 0:
            return np.zeros(0)
        # exact search on the GPU (keyfuse-cuda), which has the published kernel only
        if on_gpu:
            return np.asarray(
                self._gpu_cohort().search(
                    np.ascontiguousarray(kps.descriptors, dtype=np.uint8),
                    exclude=ex,
                    allowed=None if mask is None else [bool(x) for x in mask],
                    k=self.k,
                    alpha2_floor=_ALPHA2_FLOOR,
                    alpha2_cap_fraction=self.alpha2_cap_fraction,
                )
            )
        return np.asarray(
            self._engine.search(
                np.ascontiguousarray(kps.descriptors, dtype=np.uint8),
                exclude=ex,
                allowed=mask,
                k=self.k,
                exact=self._use_exact(exact),
                checks=self.checks,
                alpha2_floor=_ALPHA2_FLOOR,
                alpha2_cap_fraction=self.alpha2_cap_fraction,
                posterior=self.posterior,
            )
        )

    def search(
        self,
        query: Any,
        k: int | None = 10,
        restrict: Restrict = None,
        *,
        exclude: str | None = None,
        exact: bool | None = None,
        device: str = "auto",
    ) -> SearchResult:
        """The ``k`` subjects most similar to ``query``, best first.

        Parameters
        ----------
        query : KeypointSet, Image, path, or the id of an indexed subject
            An image or path is extracted first. An indexed subject's id searches with its
            keypoints and excludes it from the results.
        k : int or None, default 10
            Number of hits (``None``: every subject).
        restrict : dict, ids, or predicate, optional
            Search only among matching subjects ("with class prediction"):
            ``{"sex": "F"}`` (a list/tuple/set value means "any of"), an iterable of ids,
            or a function ``labels -> bool``.
        exclude : str, optional
            A subject id left out (e.g. the query's own entry).
        exact : bool, optional
            Brute-force k-NN; default: exact below ``exact_below`` keypoints, else the
            kd-forest.
        device : {"auto", "cpu", "cuda"}
            Backend; on CUDA the search is exact (brute force on the GPU).

        Returns
        -------
        SearchResult
            A list of ``Hit(subject_id, score)``; ties are ordered by insertion.
        """
        s = self.scores(query, restrict=restrict, exclude=exclude, exact=exact, device=device)
        allowed = np.ones(len(s), dtype=bool)
        mask = self._mask(restrict)
        if mask is not None:
            allowed &= mask
        excl = (
            exclude
            if exclude is not None
            else (query if isinstance(query, str) and query in self._pos else None)
        )
        if excl is not None:
            allowed[self._pos[excl]] = False
        cand = np.flatnonzero(allowed)
        order = cand[np.lexsort((cand, -s[cand]))]
        if k is not None:
            if k < 1:
                raise InvalidArgumentError("k must be ≥ 1 (or None)")
            order = order[:k]
        return SearchResult(Hit(self._ids[i], float(s[i])) for i in order)

    def pairwise(
        self, symmetric: bool = False, *, exact: bool | None = None, device: str = "auto"
    ) -> npt.NDArray[np.float64]:
        """N×N soft-Jaccard matrix: row a = subject a's keypoints scored against every
        other subject (its own excluded); diagonal 1. ``symmetric`` averages the two soft
        intersections, giving a symmetric matrix."""
        from keyfuse.matching import _ALPHA2_FLOOR

        on_gpu = runs_on_gpu(device, k=self.k, posterior=self.posterior)
        if len(self) == 0:
            return np.zeros((0, 0))
        # exact, all subjects in one GPU pass (published kernel only)
        if on_gpu:
            return np.asarray(
                self._gpu_cohort().pairwise(
                    k=self.k,
                    alpha2_floor=_ALPHA2_FLOOR,
                    alpha2_cap_fraction=self.alpha2_cap_fraction,
                    symmetric=symmetric,
                )
            )
        return np.asarray(
            self._engine.pairwise(
                k=self.k,
                exact=self._use_exact(exact),
                checks=self.checks,
                alpha2_floor=_ALPHA2_FLOOR,
                alpha2_cap_fraction=self.alpha2_cap_fraction,
                symmetric=symmetric,
                posterior=self.posterior,
            )
        )

    def reference_votes(
        self, k: int = 5, *, exact: bool = False, checks: int = 64
    ) -> npt.NDArray[np.float64]:
        """The reference matcher's (featMatchMultiple) N×N vote matrix over this index: by
        default with the same search as the reference (kd-forest, 64 checks), made
        deterministic; see :func:`keyfuse.matching.reference_votes`."""
        if len(self) == 0:
            return np.zeros((0, 0))
        return np.asarray(
            self._engine.reference_votes(k=int(k), exact=bool(exact), checks=int(checks))
        )

    # -- storage ----------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write the whole index as a fresh directory (one part), atomically: the
        directory is built beside ``path`` and renamed into place."""
        target = Path(path)
        if self.path is not None and target.resolve() == self.path.resolve():
            return  # already on disk, every add was committed
        if target.exists() and not (target / MANIFEST).exists():
            if not target.is_dir() or any(target.iterdir()):
                raise KeyfuseIOError(f"{target} exists and is not an index directory")
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            staged = [
                (sid, self.keypoints(sid), v, labs, src)
                for sid, v, labs, src in zip(
                    self._ids, self._vectors, self._labels, self._sources, strict=True
                )
            ]
            self._write_manifest(tmp, [])
            if staged:
                self._append_part(tmp, staged, parts=[])
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

    @classmethod
    def load(cls, path: PathLike, **kwargs: Any) -> Index:
        """Open an index directory (checksums verified; nothing half-loaded)."""
        p = Path(path)
        if not (p / MANIFEST).exists():
            raise KeyfuseIOError(f"{p} is not a keyfuse index (no {MANIFEST})")
        return cls(p, **kwargs)

    def _write_manifest(self, root: Path, parts: list[dict[str, Any]]) -> None:
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "n_subjects": sum(p["n_subjects"] for p in parts),
            "n_keypoints": sum(p["n_keypoints"] for p in parts),
            "parts": parts,
        }
        with atomic_path(root / MANIFEST) as tmp:
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(root)

    def _append_part(
        self,
        root: Path,
        staged: Sequence[tuple[str, KeypointSet, np.ndarray | None, dict[str, Any], str | None]],
        parts: list[dict[str, Any]] | None = None,
    ) -> None:
        import pyarrow.parquet as pq

        current = self._parts if parts is None else parts
        seq = 1 + max((int(p["seq"]) for p in current), default=0)
        entry: dict[str, Any] = {
            "seq": seq,
            "n_subjects": len(staged),
            "n_keypoints": int(sum(len(s[1]) for s in staged)),
            "files": {},
        }
        written: list[Path] = []
        try:
            for kind, table in (
                ("subjects", _subjects_table(staged)),
                ("keypoints", _keypoints_table(staged)),
            ):
                name = f"{kind}-{seq:06d}.parquet"
                with atomic_path(root / name) as tmp:
                    pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP)
                    with open(tmp, "rb+") as f:
                        os.fsync(f.fileno())
                written.append(root / name)
                entry["files"][kind] = {
                    "name": name,
                    "sha256": _sha256(root / name),
                    "bytes": (root / name).stat().st_size,
                    "rows": table.num_rows,
                }
            new_parts = [*current, entry]
            self._write_manifest(root, new_parts)  # the commit point
        except BaseException:
            for w in written:
                with contextlib.suppress(OSError):
                    w.unlink()
            raise
        current.append(entry)

    def _load_into(self, root: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise IndexCorruptError(f"{root / MANIFEST}: unreadable manifest ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IndexCorruptError(f"{root / MANIFEST}: not a {FORMAT} manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise IndexCorruptError(
                f"{root}: index format version {manifest.get('version')} is not supported "
                f"(this keyfuse reads version {FORMAT_VERSION})"
            )
        parts = manifest.get("parts")
        if not isinstance(parts, list):
            raise IndexCorruptError(f"{root / MANIFEST}: no list of parts")
        try:
            # first every file's checksum and the subject tables (small), so that a
            # damaged index is refused before anything is read into memory
            checked: list[tuple[dict[str, Any], Path]] = []
            for part in parts:
                files = {}
                for kind in ("subjects", "keypoints"):
                    info = part["files"][kind]
                    f = root / info["name"]
                    if not f.is_file():
                        raise IndexCorruptError(f"{f}: listed in the manifest but missing")
                    if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
                        raise IndexCorruptError(f"{f}: size or sha256 checksum mismatch")
                    if pq.ParquetFile(f).metadata.num_rows != info["rows"]:
                        raise IndexCorruptError(f"{f}: row count differs from the manifest")
                    files[kind] = f
                checked.append((pq.read_table(files["subjects"]).to_pydict(), files["keypoints"]))
            ids = [sid for sub, _ in checked for sid in sub["subject_id"]]
            if len(set(ids)) != len(ids):
                raise IndexCorruptError(f"{root}: duplicate subject ids")
            # then the descriptors, streamed: only they stay in memory (in the engine)
            for sub, kp_file in checked:
                for sid, rows, v, labs, src, desc in _stream_part(sub, kp_file, root):
                    self._register(sid, rows, v, labs, src, descriptors=desc)
        except IndexCorruptError:
            raise
        except (KeyError, TypeError, ValueError, pa.ArrowException, OSError) as e:
            raise IndexCorruptError(f"{root}: corrupt index ({type(e).__name__}: {e})") from e
        self._parts = list(parts)

    # -- misc ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)
