"""The persistent cohort index: keypoint sets (and optional CNN vectors) of many subjects,
searchable by soft-Jaccard similarity.

The descriptors are searched in shards (:mod:`keyfuse.index_shards`; Rust
:class:`keyfuse._core.Shard`, GIL released): sealed shards are memory-mapped files with
their kd-forest saved beside them, the open one too when it holds one append (several
are read into RAM; :mod:`keyfuse.index_shards`); in process or on Dask
(:mod:`keyfuse.index_dask`), with the same scores. On disk an index is a directory::

    index/
      manifest.json                 format, version, parts, shards and their sha256
      subjects-000001.parquet       id, keypoint count, affine, shape, labels, vector, source
      keypoints-000001.parquet      subject and geometry per row (descriptors: the shards)
      shard-000001.kfs / .kff       a sealed shard's descriptors and its kd-forest
      open-000001.kfs               the open shard's descriptors, one segment an append
      open-000003-<n>.kff / .kfs    caches: its forest, its segments joined (only with
                                    index_shards.JOIN_OPEN_SEGMENTS; not listed)

Appends are atomic: a part is written under a temporary name, flushed and renamed, and
only then does a new ``manifest.json`` (itself written aside and renamed) list it. A file
missing from the manifest is ignored; a listed file that is missing, truncated or fails
its checksum raises :class:`~keyfuse.errors.IndexCorruptError` and nothing is loaded.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse import _core
from keyfuse.device import runs_on_gpu
from keyfuse.errors import InvalidArgumentError, KeyfuseIOError, warn_caller
from keyfuse.index_classify import LabelClassifiers
from keyfuse.index_restrict import Restrict, check_restrict_labels, restriction_mask
from keyfuse.index_results import (
    CPUFallbackWarning,
    EmptyKeypointsWarning,
    EmptyRestrictionWarning,
    Hit,
    SearchResult,
)
from keyfuse.index_shards import DEFAULT_SHARD_SIZE, ShardSet, as_descriptors
from keyfuse.index_storage import (
    MANIFEST,
    Staged,
    _not_an_index,
    _remove_index_files,
    _Rows,
    write_manifest,
)
from keyfuse.index_storage_io import kept_keypoints
from keyfuse.keypoints import KeypointSet
from keyfuse.vector_search import VectorMatrix

__all__ = [
    "CPUFallbackWarning",
    "EmptyKeypointsWarning",
    "EmptyRestrictionWarning",
    "Hit",
    "Index",
    "SearchResult",
]


MODES = ("r", "r+", "a", "w", "x")

PathLike = str | os.PathLike[str]


class Index:
    """A cohort of keypoint sets searchable by soft-Jaccard similarity.

    Parameters
    ----------
    path : str or Path, optional
        ``None``: in memory only (``save`` writes it). A directory: an on-disk index,
        opened or created as ``mode`` says; every :meth:`add` is then appended to disk
        atomically.
    mode : {"r", "r+", "a", "w", "x"}, default "r"
        As in h5py and zarr: ``"r"`` opens an existing index for searching (adding
        raises), ``"r+"`` opens an existing index for searching and adding, ``"a"`` opens
        one or creates it when missing, ``"w"`` creates a new empty index (replacing an
        existing one), ``"x"`` creates one and fails if the path exists. ``"r"`` and
        ``"r+"`` raise :class:`~keyfuse.errors.KeyfuseIOError` for a path that holds no
        index, so a mistyped name is never silently a new, empty index.
        :meth:`create` is ``mode="x"``.
    k : int, optional
        Nearest neighbours per query keypoint (K of the soft Jaccard); default 10 for the
        posterior kernel, 30 for the published one.
    checks : int, default 96
        Distance evaluations per keypoint in the approximate (kd-forest) search (96 with
        the forest's leaves of 16 gives the per-keypoint recall that 64 gave with leaves of
        8, at about the same time; docs/decisions.md).
    trees : int, default 4
        Randomized kd-trees of the forest (4: recall@1 against exact search 1.00 as
        with 8, at half the forest's memory and disk; docs/decisions.md).
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
    shard_size : int, optional
        Most keypoints per shard (default: the opened index's, else 20,000,000). Sealed
        shards are memory-mapped files with their kd-forest saved beside them
        (:mod:`keyfuse.index_shards`); scores do not depend on the layout.
    geometry : {"compact", "exact"}, optional
        How keypoint geometry is stored, chosen at creation and kept in the manifest
        (default: the opened index's, else "compact"). "compact": positions within
        1/131070 of the keypoints' extent per axis, scales, responses and eigenvalues
        within 0.05%, frames within 0.23° (special values exact; 13 bytes a keypoint
        instead of 28, :mod:`keyfuse.index_geometry`); "exact": bit for bit. Scores
        never read the geometry; only :meth:`keypoints` returns it.

    Scores are cohort-relative: α_i is the distance from a query keypoint to its nearest
    neighbour among all the other subjects.

    Examples
    --------
    >>> index = kf.Index.create("cohort.kfi")            # a new index; kf.Index(path) opens
    >>> index.add("sub-01", kps, family="F1", sex="F")
    >>> index.search(query_kps, k=5)                     # -> [(id, score), ...]
    >>> index.search(query_kps, restrict={"sex": "F"})   # only subjects with sex == "F"
    """

    def __init__(
        self,
        path: PathLike | None = None,
        *,
        mode: str = "r",
        k: int | None = None,
        checks: int = 96,
        trees: int = 4,
        exact_below: int = 100_000,
        kernel: str = "posterior",
        alpha2_cap_fraction: float | None = None,
        shard_size: int | None = None,
        geometry: str | None = None,
    ) -> None:
        from keyfuse.index_geometry import GEOMETRIES
        from keyfuse.matching import _kernel_defaults

        if geometry not in (None, *GEOMETRIES):
            raise InvalidArgumentError(f"geometry must be 'compact' or 'exact'; got {geometry!r}")
        self._geometry_arg, self.geometry = geometry, geometry or "compact"

        post, kk, cap = _kernel_defaults(kernel, k, alpha2_cap_fraction)
        if checks < 1 or trees < 1 or (shard_size is not None and shard_size < 1):
            raise InvalidArgumentError("checks, trees and shard_size must be ≥ 1")
        self._shard_size_arg = shard_size
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
        self._engine = ShardSet(shard_size or DEFAULT_SHARD_SIZE, self.trees)
        self._ndim: int | None = None  # 2 or 3: the dimension of the indexed images
        self._gpu_cache: tuple[int, _core.GpuCohort] | None = None
        # derived from the subjects, rebuilt when their number changes (see _derived)
        self._cache: dict[str, tuple[int, Any]] = {}
        self._classifiers = LabelClassifiers()
        self._parts: list[dict[str, Any]] = []
        self.path: Path | None = None
        self.mode = mode
        self.seed = 0  # the kd-forest's fixed seed (recorded in the manifest)
        if mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if path is not None:
            p = Path(path)
            exists = (p / MANIFEST).exists()
            if mode in ("r", "r+") and not exists:
                raise KeyfuseIOError(_not_an_index(p))
            if mode == "x" and p.exists() and (exists or not p.is_dir() or any(p.iterdir())):
                raise KeyfuseIOError(
                    f"{p} already exists: open it with kf.Index({str(p)!r}) (mode='r+' to "
                    "add to it) or replace it with mode='w'"
                )
            if exists and mode in ("r", "r+", "a"):
                self._load_into(p)
            else:
                if p.exists() and not p.is_dir():
                    raise KeyfuseIOError(f"{p} exists and is not an index directory")
                if p.is_dir() and not exists and any(p.iterdir()):
                    raise KeyfuseIOError(
                        f"{p} is a non-empty directory without {MANIFEST}: not an index"
                    )
                if exists:  # mode "w": replace the old index by an empty one
                    _remove_index_files(p)
                p.mkdir(parents=True, exist_ok=True)
                self._write_manifest(p, [])
            self.path = p

    @classmethod
    def create(cls, path: PathLike, **kwargs: Any) -> Index:
        """Create a new, empty on-disk index at ``path`` (``mode="x"``: an existing path
        raises :class:`~keyfuse.errors.KeyfuseIOError`); keyword arguments as for
        :class:`Index`."""
        return cls(path, mode="x", **kwargs)

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
        return self._engine.n_points

    @property
    def shards(self) -> list[dict[str, Any]]:
        """The shards: name, first_subject, subjects, keypoints, sealed."""
        return self._engine.listing()

    @property
    def shard_size(self) -> int:
        return self._engine.shard_size

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
        i = self._index_of(subject_id)
        kp = self._kps[i]
        return kp if isinstance(kp, KeypointSet) else kp.read(self._engine, i)

    def vector(self, subject_id: str) -> np.ndarray | None:
        return self._vectors[self._index_of(subject_id)]

    def source(self, subject_id: str) -> str | None:
        return self._sources[self._index_of(subject_id)]

    def memory_bytes(self) -> int:
        """Bytes held in RAM by the search engine (descriptors of an in-memory index's open
        shard, owners, kd-forests' nodes; memory-mapped files not counted)."""
        return self._engine.memory_bytes()

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

        if self.path is not None and self.mode == "r":
            raise InvalidArgumentError(
                f"{self.path} was opened read-only (mode='r'): open it with "
                f"kf.Index({str(self.path)!r}, mode='r+') to add subjects"
            )
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
            self._check_dims(kp, f"subject {sid!r}")
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
        empty = [s[0] for s in staged if len(s[1]) == 0]
        if empty:
            warnings.warn(
                f"{len(empty)} of {len(staged)} subjects added have no keypoints "
                f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}): they score 0 "
                "against everything; check those images (blank, cropped or mostly background?)",
                EmptyKeypointsWarning,
                stacklevel=3,
            )
        sealed = self._append_part(self.path, staged)
        self._engine.append([as_descriptors(s[1]) for s in staged], sealed)
        for (sid, _, v, labs, src), kp in zip(staged, kept_keypoints(self, staged), strict=True):
            self._register(sid, kp, v, labs, src)

    def _register(
        self,
        sid: str,
        kp: KeypointSet | _Rows,
        v: np.ndarray | None,
        labs: dict[str, Any],
        src: str | None,
    ) -> None:
        """Add one subject's metadata to memory: its KeypointSet, or (from disk) its rows'
        place (the descriptors go to the shards)."""
        if self._ndim is None and len(kp.shape) in (2, 3):
            self._ndim = len(kp.shape)
        self._pos[sid] = len(self._ids)
        self._ids.append(sid)
        self._kps.append(kp)
        self._vectors.append(v)
        self._labels.append(labs)
        self._sources.append(src)

    def _check_dims(self, kp: KeypointSet, what: str) -> None:
        """Refuse keypoints of 2D images in an index of 3D ones, and the reverse."""
        nd = len(kp.shape)
        if self._ndim is not None and nd in (2, 3) and nd != self._ndim:
            raise InvalidArgumentError(
                f"{what} has keypoints of a {nd}D image (shape {kp.shape}) but the index "
                f"holds {self._ndim}D images: 2D and 3D SIFT-Rank descriptors are not "
                "comparable (use keyfuse.extraction.extract_slice for 2D slices, and an "
                "index of slices)"
            )

    # -- searching --------------------------------------------------------------------
    def _gpu_cohort(self) -> _core.GpuCohort:
        """Every subject's descriptors uploaded to the GPU once, re-uploaded only after a
        subject is added (subjects are only ever appended)."""
        cached = self._gpu_cache
        if cached is None or cached[0] != len(self):
            data = self._engine.descriptors()
            sizes = np.asarray(self._engine.sizes, dtype=np.int64)
            cached = (len(self), _core.GpuCohort(np.ascontiguousarray(data), sizes))
            self._gpu_cache = cached
        return cached[1]

    def _on_gpu(self, device: str, operation: str) -> bool:
        """Whether the scoring runs on the GPU; ``device="cuda"`` that cannot be honoured
        (the posterior kernel has no GPU version) raises DeviceUnavailableError."""
        return runs_on_gpu(device, k=self.k, posterior=self.posterior, operation=operation)

    def _use_exact(self, exact: bool | None) -> bool:
        return self.n_keypoints < self.exact_below if exact is None else bool(exact)

    def _mask(self, restrict: Restrict) -> np.ndarray | None:
        return restriction_mask(self, restrict)

    def _check_restrict_labels(self, restrict: Mapping[str, Any]) -> None:
        check_restrict_labels(self, restrict)

    def scores(
        self,
        query: Any,
        *,
        restrict: Restrict = None,
        exclude: str | None = None,
        exact: bool | None = None,
        device: str = "auto",
        scheduler: Any = None,
    ) -> npt.NDArray[np.float64]:
        """Soft-Jaccard score of ``query`` against every subject, in subject order
        (0 for subjects excluded or outside ``restrict``). See :meth:`search`."""
        mask = self._mask(restrict)
        return self._scores(
            query, mask, exclude=exclude, exact=exact, device=device, scheduler=scheduler
        )

    def _scores(
        self,
        query: Any,
        mask: np.ndarray | None,
        *,
        exclude: str | None,
        exact: bool | None,
        device: str,
        scheduler: Any = None,
    ) -> npt.NDArray[np.float64]:
        from keyfuse.matching import _ALPHA2_FLOOR, _as_keypoints

        on_gpu = self._on_gpu(device, "index.search")
        if isinstance(query, str) and query in self._pos and exclude is None:
            exclude = query
            query = self.keypoints(query)
        kps = _as_keypoints(query, device, "query")
        self._check_dims(kps, "the query")
        if len(kps) == 0:
            warn_caller("the query has no keypoints: every score is 0", EmptyKeypointsWarning)
        ex = None if exclude is None else self._index_of(exclude)
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
        from keyfuse.index_dask import search_scores

        return search_scores(self, as_descriptors(kps), ex, mask, self._use_exact(exact), scheduler)

    def _derived(self, name: str, build: Any) -> Any:
        """A structure derived from the subjects (the vector matrix), rebuilt after
        subjects are added or removed."""
        hit = self._cache.get(name)
        if hit is None or hit[0] != len(self):
            hit = (len(self), build(self))
            self._cache[name] = hit
        return hit[1]

    def _vector_matrix(self) -> VectorMatrix:
        return self._derived("vectors", lambda ix: VectorMatrix(ix._vectors))  # type: ignore[no-any-return]

    def search(
        self,
        query: Any,
        k: int | None = 10,
        restrict: Restrict = None,
        *,
        by: str = "keypoints",
        alpha: Any = None,
        metric: str = "euclidean",
        exclude: str | None = None,
        exact: bool | None = None,
        device: str = "auto",
        cnn: Any = None,
        scheduler: Any = None,
    ) -> SearchResult:
        """The ``k`` subjects most similar to ``query``, best first.

        Parameters
        ----------
        query : KeypointSet, vector, (KeypointSet, vector), Image, path, or a subject id
            An image or path is extracted first (and, for ``by="vector"``/``"fused"``,
            passed through ``cnn``). An indexed subject's id searches with its keypoints
            and/or vector and excludes it from the results.
        k : int or None, default 10
            Number of hits (``None``: every subject).
        restrict : dict, ids, or predicate, optional
            Search only among matching subjects: ``{"sex": "F"}`` (a list/tuple/set value
            means "any of"), an iterable of ids, or a function ``labels -> bool``. The
            value ``"predicted"`` (``{"diagnosis": "predicted"}``) restricts to the
            query's predicted class: a :class:`~keyfuse.FusionClassifier` fitted on the
            indexed subjects' labels (cached with the index, refitted after subjects are
            added); the prediction is in ``result.predicted``.
        by : {"keypoints", "vector", "fused"}, default "keypoints"
            ``"keypoints"``: soft-Jaccard score of the keypoint sets. ``"vector"``: exact
            nearest neighbours of the stored CNN vectors (``metric``); scores are the
            cosine similarity or minus the Euclidean distance. ``"fused"``: the fusion
            paper's eq. 4 per subject, ``α log p({f_i}|j) + (1 − α) log p(v|j)``
            (keypoint term ``ln(J + b)``, the keypoint search's own soft Jaccard: see
            :func:`keyfuse.vector_search.keypoint_terms`; vector term by eqs. 8–9).
        alpha : float, FusionClassifier or None
            ``by="fused"`` only: the keypoint weight in [0, 1], or a fitted
            :class:`~keyfuse.FusionClassifier` whose ``alpha_`` is used (fitted on the
            classifier's own KDE keypoint term, whose scale differs from this one's:
            prefer ``kf.evaluate.choose_fusion_alpha`` for retrieval). ``None``
            (default): the α giving both terms the same spread over the candidates.
        metric : {"euclidean", "cosine"}, default "euclidean"
            ``by="vector"`` only.
        exclude : str, optional
            A subject id left out (e.g. the query's own entry).
        exact : bool, optional
            Brute-force k-NN; default: exact below ``exact_below`` keypoints, else the
            kd-forest.
        device : {"auto", "cpu", "cuda"}
            Backend of the keypoint search; on CUDA it is exact (brute force on the GPU),
            for ``kernel="published"`` only ("cuda" on the posterior kernel raises
            DeviceUnavailableError; "auto" then uses the CPU).
        cnn : CNNFeatures, optional
            Computes an image query's vector as ``cnn(image)`` (default
            ``kf.CNNFeatures()``; unaligned: pass the vector when the indexed ones were aligned).
        scheduler : optional
            ``None`` (default): in process. Else as in :mod:`keyfuse.batch` ("local", a
            scheduler address, a ``distributed.Client``): the sealed shards are searched
            on the workers, with the same results (:mod:`keyfuse.index_dask`). An
            address, "local" or "processes" is connected or started once per process
            and reused, so workers keep the shards they opened.

        Returns
        -------
        SearchResult
            A list of ``Hit(subject_id, score)``; ties are ordered by insertion.
        """
        from keyfuse.index_query import run_search

        return run_search(
            self, query, k, restrict, by=by, alpha=alpha, metric=metric, exclude=exclude,
            exact=exact, device=device, cnn=cnn, scheduler=scheduler,
        )  # fmt: skip

    def pairwise(
        self,
        symmetric: bool = False,
        *,
        by: str = "keypoints",
        alpha: Any = None,
        metric: str = "euclidean",
        exact: bool | None = None,
        device: str = "auto",
        as_frame: bool = False,
        scheduler: Any = None,
        out: PathLike | None = None,
        top_k: int | None = None,
        progress: bool = False,
    ) -> Any:
        """N×N score matrix, rows and columns in :attr:`subjects` order.

        ``by="keypoints"`` (default): soft-Jaccard, row a = subject a's keypoints scored
        against every other subject (its own excluded), diagonal 1; ``symmetric``
        averages the two soft intersections. ``by="vector"``: cosine similarity or minus
        the Euclidean distance (``metric``) of the stored vectors. ``by="fused"``: row a
        = eq. 4 of subject a against every other subject (see :meth:`search`; ``alpha``
        as there), diagonal the matrix's largest value. ``as_frame=True`` returns a pandas
        ``DataFrame`` with the subject ids as its index and columns (what
        :func:`keyfuse.evaluate.family_report` matches by id).

        ``scheduler`` as in :meth:`search`. ``out=DIR`` (keypoints, asymmetric): rows are
        computed in blocks written to ``DIR`` as Parquet as they finish (resumable: done
        blocks are skipped), the full matrix up to 20,000 subjects or each row's ``top_k``
        best; returns ``DIR`` (read a full one with
        :func:`keyfuse.index_dask.read_pairwise`)."""
        from keyfuse.index_query import pairwise_by

        if by == "keypoints":
            if out is not None or top_k is not None:
                from keyfuse.index_dask import pairwise_scores

                use = self._use_exact(exact)
                return pairwise_scores(self, symmetric, use, scheduler, out, top_k, progress)
            mat = self._pairwise(symmetric, exact=exact, device=device, scheduler=scheduler)
        else:
            mat = pairwise_by(self, by, alpha, metric, exact, scheduler)
        if not as_frame:
            return mat
        import pandas as pd

        ids = pd.Index(self._ids, name="subject_id")
        return pd.DataFrame(mat, index=ids, columns=ids.rename(None))

    def _pairwise(
        self,
        symmetric: bool,
        *,
        exact: bool | None,
        device: str,
        scheduler: Any = None,
    ) -> Any:
        from keyfuse.matching import _ALPHA2_FLOOR

        on_gpu = self._on_gpu(device, "index.pairwise")
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
        from keyfuse.index_dask import pairwise_scores

        return pairwise_scores(self, symmetric, self._use_exact(exact), scheduler)

    def reference_votes(
        self, k: int = 5, *, exact: bool = False, checks: int = 64
    ) -> npt.NDArray[np.float64]:
        """The reference matcher's (featMatchMultiple) N×N vote matrix over this index: by
        default with the same search as the reference (kd-forest, 64 checks), made
        deterministic; see :func:`keyfuse.matching.reference_votes`."""
        if len(self) == 0:
            return np.zeros((0, 0))
        engine = _core.SearchEngine(trees=self.trees)
        for desc in self._engine.iter_subjects():
            engine.add(desc)
        return np.asarray(engine.reference_votes(k=int(k), exact=bool(exact), checks=int(checks)))

    # -- provenance -------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        """The search parameters (the keyword arguments of :class:`Index`)."""
        return {
            "kernel": self.kernel,
            "k": self.k,
            "checks": self.checks,
            "trees": self.trees,
            "exact_below": self.exact_below,
            "alpha2_cap_fraction": self.alpha2_cap_fraction,
        }

    def provenance(self) -> dict[str, Any]:
        """What made this index: the keyfuse version, the parameters and the kd-forest's
        seed (written into every manifest)."""
        from keyfuse import __version__

        cap = self.alpha2_cap_fraction
        return {
            "keyfuse_version": __version__,
            "params": {**self.params, "alpha2_cap_fraction": None if cap == np.inf else cap},
            "seed": self.seed,
        }

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
        self._write_fresh(target, self._ids)

    def _write_fresh(self, target: Path, ids: Sequence[str]) -> None:
        from keyfuse.index_storage_io import write_fresh

        write_fresh(self, target, ids)

    def remove(self, subject_ids: str | Iterable[str]) -> None:
        """Remove subjects (by id) from the index; on disk, the index is rewritten as
        one fresh part and swapped in atomically (every remaining subject's keypoints
        are read once). Unknown ids raise :class:`InvalidArgumentError` and nothing
        changes."""
        ids = [subject_ids] if isinstance(subject_ids, str) else list(subject_ids)
        unknown = [s for s in ids if s not in self._pos]
        if unknown:
            raise InvalidArgumentError(
                f"cannot remove {unknown[:5]}: not in the index ({len(self)} subjects)"
            )
        if self.path is not None and self.mode == "r":
            raise InvalidArgumentError(
                f"{self.path} was opened read-only (mode='r'): open it with mode='r+' to "
                "remove subjects"
            )
        gone = set(ids)
        keep = [s for s in self._ids if s not in gone]
        old = [
            (sid, self._kps[i], self._vectors[i], self._labels[i], self._sources[i])
            for sid, i in ((s, self._pos[s]) for s in keep)
        ]
        if self.path is not None:
            self._write_fresh(self.path, keep)
        self._reset()
        if self.path is not None:
            self._load_into(self.path)
        else:
            for sid, kp, v, labs, src in old:
                assert isinstance(kp, KeypointSet)  # in memory: always resident
                self._register(sid, kp, v, labs, src)
            descs = [as_descriptors(o[1]) for o in old]
            self._engine.append(descs, self._append_part(None, old))  # type: ignore[arg-type]

    def _reset(self) -> None:
        """Forget every subject (memory only)."""
        self._ids, self._pos, self._labels = [], {}, []
        self._vectors, self._sources, self._kps, self._parts = [], [], [], []
        self._engine = ShardSet(self._engine.shard_size, self.trees)
        self._ndim = None
        self._gpu_cache = None
        self._cache = {}

    @classmethod
    def load(cls, path: PathLike, **kwargs: Any) -> Index:
        """Open an index directory (checksums verified; nothing half-loaded)."""
        p = Path(path)
        if not (p / MANIFEST).exists():
            raise KeyfuseIOError(_not_an_index(p))
        return cls(p, **kwargs)

    def _write_manifest(
        self, root: Path, parts: list[Any], shards: Any = None, segments: Any = None
    ) -> None:
        """The sealed shards' and the open shard's segments' entries with the parts."""
        write_manifest(
            root, parts, self.provenance(), shards, self._engine.shard_size, segments, self.geometry
        )

    def _append_part(
        self,
        root: Path | None,
        staged: Sequence[Staged],
        parts: list[dict[str, Any]] | None = None,
    ) -> list[Any]:
        """Write one part and the shards it fills, committed by a new manifest (see
        :func:`keyfuse.index_storage_io.append_part`)."""
        from keyfuse.index_storage_io import append_part

        return append_part(self, root, staged, parts)

    def _load_into(self, root: Path) -> None:
        from keyfuse.index_storage_io import load_into

        load_into(self, root)

    # -- misc ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)
