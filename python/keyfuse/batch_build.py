"""The streaming index build: the keypoint files of a batch extraction appended to an
on-disk index chunk by chunk (:func:`build_index`, also ``kf.batch.build_index``).

Memory is bounded by the chunk, never by the number of files: at most two chunks of
keypoint sets are in flight (one being read, one being appended). Each chunk is one
atomic append, so an interrupted build keeps every chunk it committed and a rerun skips
the subjects already in the index (resume). Files are read and checked by the
scheduler's workers; the subjects are appended in the sorted order of their files, so
the index is the same whatever the number of workers.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyfuse._io import KEY_SUFFIXES
from keyfuse.batch import BatchFailure, Inputs, RunRecord, _executor, _lost_task, collect_inputs
from keyfuse.errors import (
    InvalidArgumentError,
    UnlabelledSubjectsWarning,
    warn_caller,
)

__all__ = ["BuildInterrupted", "BuildResult", "build_index"]

Read = tuple[Any, str | None, str]  # (keypoint set or None, error type or None, message)


@dataclass
class BuildResult(RunRecord[str]):
    """What a streaming build did (with :class:`~keyfuse.batch.RunRecord`'s ``skipped``:
    subject ids already in the index, not read again; ``failures``: the keypoint files
    that could not be read, not added, a rerun retries them; ``seconds``, ``ok`` and
    ``interrupted``, see :class:`BuildInterrupted`).

    Attributes
    ----------
    index : the index directory.
    added : subject ids appended by this run, in order.
    """

    index: Path
    added: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return self._summary(
            f"{len(self.added)} added, {len(self.skipped)} already in {self.index}"
        )


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a build: the chunks already appended are kept (``result``, a
    :class:`BuildResult`); running the same build again resumes it."""

    def __init__(self, result: BuildResult) -> None:
        super().__init__(f"interrupted: {len(result.added)} subjects added")
        self.result = result


def read_keypoint_file(path: str) -> Read:
    """Read and check one ``.kfk``/``.key`` file; never raises (a bad file is data for
    the failure list). Runs on the scheduler's workers."""
    try:
        from keyfuse.keypoints import DESC_LEN, KeypointSet, read_key

        kps = KeypointSet.load(path) if path.endswith(".kfk") else read_key(path)
        if kps.descriptors.shape[1:] != (DESC_LEN,):
            raise InvalidArgumentError(f"{path}: descriptors are not {DESC_LEN} bytes wide")
        if len(kps.shape) not in (0, 2, 3):
            raise InvalidArgumentError(f"{path}: image shape {kps.shape} is not 2D or 3D")
    except Exception as exc:
        msg = str(exc) or traceback.format_exception_only(type(exc), exc)[-1].strip()
        return None, type(exc).__name__, msg
    return kps, None, ""


def _sources(sources: Inputs | Mapping[str, str | os.PathLike[str]]) -> dict[str, Path]:
    """{subject id: keypoint file}, sorted by file (ids are the file names without
    suffix unless ``sources`` maps ids to files)."""
    from keyfuse._inputs import subject_sources

    if isinstance(sources, Mapping):
        by_id = {str(k): Path(v) for k, v in sources.items()}
    else:
        files = collect_inputs(sources, suffixes=KEY_SUFFIXES)
        not_keys = [str(f) for f in files if not f.name.endswith(KEY_SUFFIXES)]
        if not_keys:
            raise InvalidArgumentError(
                f"{not_keys[0]} is not a keypoint file (.kfk/.key): build_index appends "
                "the outputs of kf.batch.extract_batch"
            )
        by_id = subject_sources(files)
    if not by_id:
        raise InvalidArgumentError("no .kfk/.key keypoint files to index")
    return dict(sorted(by_id.items(), key=lambda kv: (str(kv[1]), kv[0])))


def _labels(
    labels: Mapping[str, Mapping[str, Any]] | str | os.PathLike[str] | None,
    ids: Sequence[str],
    id_column: str | None,
    columns: str | None,
) -> tuple[dict[str, dict[str, Any]], Path | None]:
    """Each subject's labels from a table file or a mapping (BIDS ids such as
    ``sub-01_ses-1`` match the row ``sub-01``), and the table's path; raises when a table
    matches none of the subjects."""
    from keyfuse._inputs import labels_for, match_labels, read_label_table

    if labels is None:
        return {}, None
    if isinstance(labels, Mapping):
        table = {str(k): dict(v) for k, v in labels.items()}
        where = Path("labels")
    else:
        where = Path(labels)
        table = read_label_table(where, id_column, columns)  # type: ignore[assignment]
    match_labels(list(ids), table, where)  # none matched: InvalidArgumentError
    found = {sid: dict(row) for sid in ids if (row := labels_for(sid, table)) is not None}
    return found, where


def _warn_unlabelled(todo: Sequence[str], found: Mapping[str, Any], table: Path) -> None:
    """Warn about the subjects about to be added that have no row in the table."""
    missing = [sid for sid in todo if sid not in found]
    if missing:
        warn_caller(
            f"{len(missing)} of {len(todo)} subjects have no row in {table} (e.g. "
            f"{', '.join(missing[:3])}): they are indexed without labels",
            UnlabelledSubjectsWarning,
        )


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _reader(kind: str, ex: Any) -> Callable[[Sequence[str]], Callable[[], list[Read]]]:
    """submit(paths) → a function returning their reads in order, for one executor."""
    if kind == "sync":

        def submit_sync(paths: Sequence[str]) -> Callable[[], list[Read]]:
            done = [read_keypoint_file(p) for p in paths]
            return lambda: done

        return submit_sync
    if kind == "pool":

        def submit_pool(paths: Sequence[str]) -> Callable[[], list[Read]]:
            futs = [ex.submit(read_keypoint_file, p) for p in paths]
            return lambda: [f.result() for f in futs]

        return submit_pool

    def submit_dask(paths: Sequence[str]) -> Callable[[], list[Read]]:
        futs = [ex.submit(read_keypoint_file, p, pure=False) for p in paths]

        def gather() -> list[Read]:
            out: list[Read] = []
            for f in futs:
                try:
                    out.append(f.result())
                except Exception as exc:  # workers kept dying on this file
                    err, msg, _ = _lost_task(exc)
                    out.append((None, err, msg))
                f.release()
            return out

        return gather

    return submit_dask


def build_index(
    sources: Inputs | Mapping[str, str | os.PathLike[str]],
    index: str | os.PathLike[str],
    *,
    labels: Mapping[str, Mapping[str, Any]] | str | os.PathLike[str] | None = None,
    id_column: str | None = None,
    columns: str | None = None,
    scheduler: Any = None,
    n_workers: int | None = None,
    chunk: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    **index_params: Any,
) -> BuildResult:
    """Append keypoint files (the outputs of :func:`keyfuse.batch.extract_batch`) to an
    on-disk index, in bounded memory, resumably.

    Parameters
    ----------
    sources : a ``.kfk``/``.key`` file, a directory (searched recursively), a glob, or a
        list of them; each file is the subject named by its file name without suffix.
        Or a mapping ``{subject id: file}``.
    index : the index directory: created when missing; an existing index is appended to,
        and subjects already in it are skipped (so a rerun after Ctrl-C continues).
    labels : a CSV/TSV table (``participants.tsv``; ``n/a`` is a missing value) or a
        mapping ``{subject id: {label: value}}``; subjects without a row are indexed
        without labels (:class:`~keyfuse.errors.UnlabelledSubjectsWarning`).
    id_column, columns : the table's id column (default ``subject``, else
        ``participant_id``, else the first) and the label columns to keep ("A,B").
    scheduler : where files are read and checked: None (default: a thread pool in this
        process), ``"sync"``, ``"threads"``, ``"local"``/``"processes"`` (a local Dask
        cluster), a Dask scheduler address or a ``distributed.Client``.
    n_workers : parallel reads (default: the number of CPUs).
    chunk : files per atomic append (memory holds at most two chunks of keypoint sets).
    overwrite : replace an existing index instead of resuming it.
    progress : show a progress bar.
    **index_params : :class:`keyfuse.Index` parameters for a new index (``k``,
        ``trees``, ...).

    Returns
    -------
    BuildResult
        Subjects added and skipped, and the files that could not be read.

    Raises
    ------
    BuildInterrupted
        Ctrl-C: the chunks appended so far are kept; rerun to resume.
    """
    from tqdm.auto import tqdm

    from keyfuse.index import Index

    if chunk < 1:
        raise InvalidArgumentError(f"chunk must be >= 1, got {chunk}")
    if n_workers is not None and n_workers < 1:
        raise InvalidArgumentError(f"n_workers must be >= 1, got {n_workers}")
    t0 = time.perf_counter()
    by_id = _sources(sources)
    subject_labels, table = _labels(labels, list(by_id), id_column, columns)
    idx = Index(index, mode="w" if overwrite else "a", **index_params)
    result = BuildResult(index=Path(index))
    result.skipped = [sid for sid in by_id if sid in idx]
    todo = [(sid, str(src)) for sid, src in by_id.items() if sid not in idx]
    if table is not None:
        _warn_unlabelled([sid for sid, _ in todo], subject_labels, table)
    ndim = len(idx.keypoints(idx.subjects[0]).shape) if len(idx) else None
    bar = tqdm(total=len(todo), desc="index", unit="file", disable=not progress)

    def append(batch: Sequence[tuple[str, str]], reads: list[Read]) -> None:
        nonlocal ndim
        items, srcs = [], []
        for (sid, src), (kps, err, msg) in zip(batch, reads, strict=True):
            if kps is not None and ndim is not None and len(kps.shape) not in (0, ndim):
                err, msg = (
                    "InvalidArgumentError",
                    (f"keypoints of a {len(kps.shape)}D image, but the index holds {ndim}D images"),
                )
            if err is not None:
                result.failures.append(BatchFailure(src, err, msg))
                continue
            if ndim is None and len(kps.shape) in (2, 3):
                ndim = len(kps.shape)
            items.append((sid, kps, None, subject_labels.get(sid, {})))
            srcs.append(src)
        idx.add_many(items, source=srcs)  # one atomic append: the commit of this chunk
        result.added.extend(sid for sid, *_ in items)
        bar.update(len(batch))
        if result.failures:
            bar.set_postfix(failed=len(result.failures))

    try:
        if todo:
            kind_ex = _executor("threads" if scheduler is None else scheduler, n_workers)
            with kind_ex as (kind, ex):
                submit = _reader(kind, ex)
                chunks = list(_chunks(todo, chunk))
                pending = submit([src for _, src in chunks[0]])
                for n, current in enumerate(chunks):
                    # read the next chunk while this one is appended
                    ahead = (
                        submit([src for _, src in chunks[n + 1]]) if n + 1 < len(chunks) else None
                    )
                    append(current, pending())
                    if ahead is not None:
                        pending = ahead
    except KeyboardInterrupt:
        result.interrupted = True
        result.seconds = time.perf_counter() - t0
        raise BuildInterrupted(result) from None
    finally:
        bar.close()
    result.seconds = time.perf_counter() - t0
    return result
