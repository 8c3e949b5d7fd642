"""Searching and scoring a :class:`keyfuse.Index` in process or on Dask.

One path for both: every shard's k nearest neighbours of the query keypoints (global
point ids), merged by (distance, id) and scored with the cohort's statistics
(:mod:`keyfuse.index_shards`). With a ``scheduler`` (the choices of
:mod:`keyfuse.batch`: "local", "threads", "sync", a scheduler address or a
``distributed.Client``), the sealed on-disk shards are searched by tasks that carry the
query descriptors and the shard's file name and checksum; each worker opens a shard once
and keeps it in a worker-local cache (:func:`_worker_shard`). The open shard (opened in
the client) and in-memory shards are searched in the client. Neighbour lists of a shard
do not depend on who computes them, so the scores are bit-identical whatever the
scheduler and worker count. A scheduler address, "local" or "processes" gets one Client
(and local cluster) per process, reused by later calls while it runs.

``pairwise(out=DIR)`` runs in row blocks, each written atomically as
``rows-START-STOP.parquet`` (columns ``row``, and ``scores`` — the full row — or
``top`` / ``scores`` — the ``top_k`` best other subjects) once it is finished; blocks
already in ``DIR`` are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from keyfuse import _core, index_shards
from keyfuse.errors import InvalidArgumentError, KeyfuseIOError
from keyfuse.index_shards import (
    SearchParams,
    jaccard_from,
    jaccard_rows,
    merge_scores,
    shard_knn,
)

if TYPE_CHECKING:
    from keyfuse.index import Index

# rows of the N×N matrix per block (a task per block and shard)
BLOCK_ROWS = 64
# above this many subjects, pairwise(out=...) keeps the top_k of each row only
FULL_MATRIX_MAX = 20_000

_cache: dict[tuple[str, str], _core.Shard] = {}
_cache_lock = threading.Lock()
# one Client per scheduler address in this process, reused by every later call
_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()
_NAMED = (None, "sync", "threads", "local", "processes")  # keyfuse.batch's own choices


def _shared_client(scheduler: Any) -> Any:
    """A scheduler address, "local" or "processes" becomes this process's Client for it
    (connected or started once, then reused while it runs, so a worker's opened shards
    stay resident from one search to the next); any other choice is returned as given."""
    local = scheduler in ("local", "processes")
    if not isinstance(scheduler, str) or (scheduler in _NAMED and not local):
        return scheduler
    with _clients_lock:
        client = _clients.get(scheduler)
        if client is not None and client.status == "running":
            return client
        try:
            from distributed import Client
        except ImportError:
            return scheduler  # keyfuse.batch._executor names the missing dependency
        if local:
            client = _local_client(scheduler == "processes")
        else:
            try:
                client = Client(scheduler, timeout="20s", set_as_default=False)
            except (OSError, TimeoutError) as exc:
                msg = f"cannot reach the Dask scheduler at {scheduler}: {exc}"
                raise KeyfuseIOError(msg) from exc
        _clients[scheduler] = client
        return client


def _local_client(processes: bool) -> Any:
    """A LocalCluster of this machine's cores (threads of this process, or one-thread
    worker processes) and its Client, both closed when the interpreter exits."""
    import atexit
    import os

    from distributed import Client

    from keyfuse.batch import _local_cluster, _quiet_dask

    cluster = _local_cluster(processes, os.cpu_count() or 1)
    client = Client(cluster, set_as_default=False)

    def close() -> None:
        with _quiet_dask():
            client.close()
            cluster.close()

    atexit.register(close)
    return client


def _params(index: Index, exact: bool) -> SearchParams:
    from keyfuse.matching import _ALPHA2_FLOOR

    return SearchParams(
        index.k, exact, index.checks, _ALPHA2_FLOOR, index.alpha2_cap_fraction, index.posterior
    )


def _worker_shard(spec: dict[str, Any], exact: bool) -> _core.Shard:
    """The shard ``spec`` names, opened once per process and kept (keyed by path and
    checksum, so a rewritten shard is opened afresh)."""
    key = (spec["path"], spec["sha256"])
    with _cache_lock:
        eng = _cache.get(key)
        if eng is None:
            eng = _core.Shard.open(
                Path(spec["path"]),
                spec["sizes"],
                first_subject=spec["first"],
                base=spec["base"],
                trees=spec["trees"],
            )
            _cache[key] = eng
        if not exact and not eng.has_forest:
            if spec["forest"] is not None:
                eng.load_forest(Path(spec["forest"]))
            else:
                eng.build_forest()
    return eng


def _knn_task(
    spec: dict[str, Any],
    queries: Sequence[tuple[np.ndarray, int | None]],
    allowed: np.ndarray | None,
    p: SearchParams,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """On a worker: one shard's neighbour lists of each (descriptors, excluded subject)."""
    eng = _worker_shard(spec, p.exact)
    budget = worker_mapped_budget()
    return [shard_knn([("", eng)], q, ex, allowed, p, budget)[0] for q, ex in queries]


def worker_mapped_budget() -> int:
    """The mapped-pages budget of a search task: :data:`~keyfuse.index_shards.MAPPED_BUDGET`,
    and on a Dask worker with a memory limit at most ``WORKER_MAPPED_FRACTION`` (30%) of
    that limit.

    Clean mapped pages count in a worker's resident memory, which its nanny compares with
    the limit (pausing at 80%, restarting at 95%); several workers on one host would
    otherwise each keep up to the machine-wide budget.
    """
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):  # not on a worker
        limit = None
    if not limit:
        return index_shards.MAPPED_BUDGET
    return min(index_shards.MAPPED_BUDGET, int(index_shards.WORKER_MAPPED_FRACTION * limit))


def _specs(index: Index) -> list[dict[str, Any]]:
    """The sealed on-disk shards as task specs."""
    specs = []
    shards = index._engine
    offsets = shards.offsets()
    for s in shards.sealed:
        if s.entry is None or s.root is None:
            continue
        f = s.entry.get("forest")
        specs.append(
            {
                "path": str(s.root / s.entry["name"]),
                "sha256": s.entry["sha256"],
                "sizes": list(s.sizes),
                "first": s.first,
                "base": int(offsets[s.first]),
                "trees": shards.trees,
                "forest": None if not f else str(s.root / f["name"]),
            }
        )
    return specs


def _knn_all(
    index: Index,
    queries: Sequence[tuple[np.ndarray, int | None]],
    allowed: np.ndarray | None,
    p: SearchParams,
    scheduler: Any,
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per query, every shard's neighbour lists (in shard order)."""
    shards = index._engine
    if scheduler is None:
        engines = shards.engines(p.exact)
        return [shard_knn(engines, q, ex, allowed, p) for q, ex in queries]
    from keyfuse.batch import _executor

    specs = _specs(index)
    engines = shards.engines(p.exact, on_disk=False)
    with _executor(_shared_client(scheduler), None) as (kind, ex):
        if kind == "dask":
            futures = [
                ex.submit(_knn_task, spec, queries, allowed, p, pure=False) for spec in specs
            ]
            remote = ex.gather(futures)
        elif kind == "pool":
            remote = list(ex.map(lambda s: _knn_task(s, queries, allowed, p), specs))
        else:
            remote = [_knn_task(s, queries, allowed, p) for s in specs]
    near = [shard_knn(engines, q, e, allowed, p) for q, e in queries]
    # order does not change the merge, but keep shard order for clarity
    return [[*(r[i] for r in remote), *near[i]] for i in range(len(queries))]


def search_scores(
    index: Index,
    desc: np.ndarray,
    exclude: int | None,
    mask: np.ndarray | None,
    exact: bool,
    scheduler: Any = None,
) -> npt.NDArray[np.float64]:
    """Soft-Jaccard of one query set against every subject."""
    shards = index._engine
    p = _params(index, exact)
    parts = _knn_all(index, [(desc, exclude)], mask, p, scheduler)[0]
    inter = merge_scores(parts, shards.offsets(), shards.stats(), p)
    return jaccard_from(inter, len(desc), np.asarray(shards.sizes, np.int64))


def _inter_rows(
    index: Index, rows: Sequence[int], p: SearchParams, scheduler: Any
) -> npt.NDArray[np.float64]:
    shards = index._engine
    offsets, stats = shards.offsets(), shards.stats()
    if scheduler is None:
        from concurrent.futures import ThreadPoolExecutor

        engines = shards.engines(p.exact)
        one_call = int(offsets[-1]) * p.k * ALL_PAIRS_BYTES_PER_NEIGHBOR <= ALL_PAIRS_MAX_BYTES
        if p.exact and len(engines) == 1 and one_call and list(rows) == list(range(len(shards))):
            return _all_pairs_one_shard(engines[0][1], offsets, stats, p)
        queries = [(shards.subject_descriptors(i), i) for i in rows]
        # a subject's scoring (one thread, the GIL released) runs while the next subject
        # is searched: it was a tenth of an exact all-pairs' wall time, done in turn
        with ThreadPoolExecutor(1) as pool:
            scored = [
                pool.submit(merge_scores, shard_knn(engines, q, ex, None, p), offsets, stats, p)
                for q, ex in queries
            ]
            inter = [f.result() for f in scored]
    else:
        queries = [(shards.subject_descriptors(i), i) for i in rows]
        per = _knn_all(index, queries, None, p, scheduler)
        inter = [merge_scores(parts, offsets, stats, p) for parts in per]
    return np.stack(inter).reshape(len(rows), len(shards))


#: Exact all-pairs of a cohort in one shard run as one search when its neighbour lists
#: (8 bytes a neighbour) and the symmetric pass's column lists (≈ 17 bytes a neighbour at
#: k = 10) fit in this; larger cohorts are searched subject by subject.
ALL_PAIRS_MAX_BYTES = 1 << 30
ALL_PAIRS_BYTES_PER_NEIGHBOR = 25


def _all_pairs_one_shard(
    engine: _core.Shard, offsets: np.ndarray, stats: np.ndarray, p: SearchParams
) -> npt.NDArray[np.float64]:
    """Every subject's soft intersections when one shard holds the whole cohort: one
    exact all-pairs search (each pair computed once where the kernel allows it), then
    each subject's rows scored, two at a time (the GIL released)."""
    from concurrent.futures import ThreadPoolExecutor

    idx, dist = engine.knn_all_pairs(p.k)

    def score(s: int) -> npt.NDArray[np.float64]:
        a, b = int(offsets[s]), int(offsets[s + 1])
        return merge_scores([(idx[a:b], dist[a:b])], offsets, stats, p)

    with ThreadPoolExecutor(2) as pool:
        return np.stack(list(pool.map(score, range(len(offsets) - 1))))


def pairwise_scores(
    index: Index,
    symmetric: bool,
    exact: bool,
    scheduler: Any = None,
    out: Any = None,
    top_k: int | None = None,
    progress: bool = False,
) -> Any:
    """The N×N soft-Jaccard matrix; with ``out``, written in row blocks (see the module
    notes) and ``out``'s path returned."""
    n = len(index)
    p = _params(index, exact)
    sizes = np.asarray(index._engine.sizes, np.int64)
    if out is None:
        if top_k is not None:
            raise InvalidArgumentError("top_k needs out= (rows written to disk)")
        inter = _inter_rows(index, range(n), p, scheduler)
        return jaccard_rows(inter, range(n), sizes, symmetric, inter.T)
    if symmetric:
        raise InvalidArgumentError("pairwise(out=...) writes the asymmetric rows only")
    if top_k is None and n > FULL_MATRIX_MAX:
        raise InvalidArgumentError(
            f"{n} subjects: a full N×N matrix is written up to {FULL_MATRIX_MAX}; pass top_k"
        )
    return _blocks(index, Path(out), p, sizes, scheduler, top_k, progress)


def _blocks(
    index: Index,
    out: Path,
    p: SearchParams,
    sizes: np.ndarray,
    scheduler: Any,
    top_k: int | None,
    progress: bool,
) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from keyfuse._io import atomic_path

    n = len(index)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"subjects": index.subjects, "top_k": top_k, "exact": p.exact}
    info = out / "pairwise.json"
    if info.exists() and json.loads(info.read_text()) != meta:
        raise InvalidArgumentError(
            f"{out} holds blocks of another pairwise run (other subjects or parameters)"
        )
    with atomic_path(info) as tmp:
        tmp.write_text(json.dumps(meta))
    todo = [
        (a, min(a + BLOCK_ROWS, n))
        for a in range(0, n, BLOCK_ROWS)
        if not (out / f"rows-{a:07d}-{min(a + BLOCK_ROWS, n):07d}.parquet").exists()
    ]
    bar = tqdm(total=len(todo), desc="pairwise", unit="block", disable=not progress)
    for a, b in todo:
        rows = list(range(a, b))
        j = jaccard_rows(_inter_rows(index, rows, p, scheduler), rows, sizes, False)
        cols: dict[str, Any] = {"row": pa.array(rows, pa.int64())}
        if top_k is None:
            cols["scores"] = pa.FixedSizeListArray.from_arrays(pa.array(j.ravel()), n)
        else:
            j[np.arange(len(rows)), rows] = -np.inf  # not its own hit
            kk = min(top_k, n)
            top = np.argsort(-j, axis=1, kind="stable")[:, :kk]
            cols["top"] = pa.FixedSizeListArray.from_arrays(pa.array(top.ravel()), kk)
            cols["scores"] = pa.FixedSizeListArray.from_arrays(
                pa.array(np.take_along_axis(j, top, 1).ravel()), kk
            )
        with atomic_path(out / f"rows-{a:07d}-{b:07d}.parquet") as tmp:
            pq.write_table(pa.table(cols), tmp)
        bar.update(1)
    bar.close()
    return out


def read_pairwise(out: Any) -> npt.NDArray[np.float64]:
    """The full matrix from the blocks ``pairwise(out=...)`` wrote (without ``top_k``)."""
    import pyarrow.parquet as pq

    out = Path(out)
    meta = json.loads((out / "pairwise.json").read_text())
    if meta["top_k"] is not None:
        raise InvalidArgumentError(f"{out} holds top-{meta['top_k']} rows, not a full matrix")
    n = len(meta["subjects"])
    mat = np.full((n, n), np.nan)
    for f in sorted(out.glob("rows-*.parquet")):
        t = pq.read_table(f)
        rows = np.asarray(t.column("row").to_numpy())
        mat[rows] = np.asarray(t.column("scores").combine_chunks().flatten()).reshape(-1, n)
    if np.isnan(mat).any():
        raise InvalidArgumentError(f"{out}: some row blocks are missing (rerun to finish)")
    return mat
