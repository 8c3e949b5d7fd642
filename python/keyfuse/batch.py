"""Cohort-scale batch processing on Dask (or a plain thread pool).

One output file per input; an existing output is skipped (so re-running a batch
resumes it); every output is written atomically (a killed job never leaves a
half-written file that a resume would trust); a failing input is recorded in the
failure list (``failures.csv`` beside the outputs) and never aborts the batch.

>>> res = kf.batch.extract_batch(["a.nii.gz", "b.nii.gz"], "keys/")
>>> res.failures    # [] when every input worked
>>> kf.batch.extract_batch(paths, "keys/", scheduler="tcp://10.0.0.5:8786")  # a cluster

Schedulers (``scheduler=``):

* ``None`` / ``"local"`` (default): a Dask ``LocalCluster`` in this process (threads;
  the Rust extractor releases the GIL, so threads run truly in parallel). Falls back
  to a thread pool when Dask is not installed (``pip install 'keyfuse[dask]'``).
* ``"processes"``: a Dask ``LocalCluster`` of worker processes.
* ``"threads"``: a ``concurrent.futures`` thread pool, no Dask; ``"sync"``: one by one
  in the calling thread (debugging).
* any Dask scheduler address (``"tcp://host:8786"``) or a ``distributed.Client``:
  the workers need keyfuse installed and must see the input and output paths.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from keyfuse._io import IMAGE_SUFFIXES, subject_id_from_path
from keyfuse.errors import InvalidArgumentError, KeyfuseIOError, MissingDependencyError

if TYPE_CHECKING:  # at run time through __getattr__ (keyfuse.batch_build imports this module)
    from keyfuse.batch_build import BuildInterrupted, BuildResult, build_index

#: what a job's ``skipped`` holds: output paths, subject ids
T = TypeVar("T")

__all__ = [
    "BatchFailure",
    "BatchInterrupted",
    "BatchResult",
    "BuildInterrupted",
    "BuildResult",
    "build_index",
    "collect_inputs",
    "extract_batch",
    "output_path",
    "run_batch",
]

FAILURES_FILE = "failures.csv"

Task = Callable[[str, str], None]


@dataclass(frozen=True)
class BatchFailure:
    """One input that failed: its path, the exception type and the message."""

    input: str
    error: str
    message: str


@dataclass(kw_only=True)
class RunRecord(Generic[T]):
    """What every batch job records (:class:`BatchResult`,
    :class:`~keyfuse.batch_build.BuildResult`).

    Attributes
    ----------
    skipped : what an earlier run already did (resume), not done again.
    failures : the inputs that failed, with their errors.
    seconds : wall time of the whole job.
    interrupted : whether Ctrl-C stopped the job.
    """

    skipped: list[T] = field(default_factory=list)
    failures: list[BatchFailure] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """True when no input failed."""
        return not self.failures

    def _summary(self, counts: str) -> str:
        """``Name(counts, N failed, S s)``, for ``__repr__``."""
        n_failed = len(self.failures)
        return f"{type(self).__name__}({counts}, {n_failed} failed, {self.seconds:.1f} s)"


@dataclass
class BatchResult(RunRecord[Path]):
    """What a batch did (with :class:`RunRecord`'s ``skipped``: outputs that already
    existed, ``failures``, ``seconds``, ``ok`` and ``interrupted``, see
    :class:`BatchInterrupted`).

    Attributes
    ----------
    outputs : the output path of every input, in input order (whether it exists or not).
    written : outputs written by this run.
    """

    outputs: list[Path]
    written: list[Path] = field(default_factory=list)

    def __repr__(self) -> str:
        return self._summary(
            f"{len(self.outputs)} inputs: {len(self.written)} written, {len(self.skipped)} skipped"
        )


def output_path(
    input_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], suffix: str = ".kfk"
) -> Path:
    """The output file of one input: ``out_dir/<name without .nii/.nii.gz><suffix>``."""
    return Path(out_dir) / f"{subject_id_from_path(input_path)}{suffix}"


Inputs = str | os.PathLike[str] | Iterable[str | os.PathLike[str]]

_GLOB_CHARS = frozenset("*?[")


def collect_inputs(
    paths: Inputs,
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
    *,
    pattern: str | None = None,
    recursive: bool = True,
    missing: str = "raise",
) -> list[Path]:
    """The input files named by ``paths``.

    Parameters
    ----------
    paths : a path, a glob pattern, or a list of them (a single string is one path, never
        a sequence of characters). A directory gives the files inside it, and inside its
        sub-directories when ``recursive`` (BIDS layouts such as
        ``sub-01/anat/sub-01_T1w.nii.gz``), whose names end with one of ``suffixes``
        (and match ``pattern``), sorted. A glob (``"scans/*.nii.gz"``,
        ``"bids/**/*_T1w.nii.gz"``) gives the files it matches. A plain file is kept as
        given (so a bad file still reaches the failure list).
    suffixes : file-name endings a directory's files must have.
    pattern : optional glob on the file name inside directories (e.g. ``"*_T1w.nii.gz"``).
    recursive : search directories' sub-directories (default True).
    missing : ``"raise"`` (default): a path that does not exist raises; ``"keep"``: it
        is kept as given (a batch then lists it among its failures), unless no named
        path exists at all.

    Raises
    ------
    KeyfuseIOError
        A path that does not exist (see ``missing``), or a glob that matches nothing.
    """
    import glob

    from keyfuse.formats.dicom import is_dicom_directory

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if missing not in ("raise", "keep"):
        raise InvalidArgumentError(f"missing must be 'raise' or 'keep', not {missing!r}")
    out: list[Path] = []
    gone: list[str] = []
    for p in paths:
        text = os.fspath(p)
        path = Path(text)
        if is_dicom_directory(path):  # one DICOM series is one image
            out.append(path)
        elif path.is_dir():
            files = path.rglob("*") if recursive else path.iterdir()
            out.extend(
                sorted(
                    f
                    for f in files
                    if f.is_file()
                    and f.name.endswith(tuple(suffixes))
                    and not f.name.startswith(".")
                    and (pattern is None or f.match(pattern))
                )
            )
        elif path.exists():
            out.append(path)
        elif _GLOB_CHARS & set(text):
            matched = sorted(Path(m) for m in glob.glob(text, recursive=True))
            if not matched:
                raise KeyfuseIOError(f"no files match {text!r}")
            out.extend(m for m in matched if m.is_file())
        elif missing == "keep":
            out.append(path)
            gone.append(text)
        else:
            raise KeyfuseIOError(f"no such file or directory: {text}")
    if gone and len(gone) == len(out):
        raise KeyfuseIOError(f"no such file or directory: {', '.join(gone[:3])}")
    return out


# ------------------------------------------------------------------------ the tasks


Outcome = tuple[int, str | None, str, float]  # (position, error type or None, message, s)


def _run_one(func: Task, pos: int, inp: str, out: str, resume: bool = False) -> Outcome:
    """Run one task; never raises (the batch must survive any single input).

    With ``resume``, an output that exists when the task starts is kept as done: Dask
    reruns the tasks of a worker that died, and one that had already written its
    (atomic, complete) output is not computed a second time.
    """
    t0 = time.perf_counter()
    if resume and os.path.exists(out):
        return pos, None, "", 0.0
    try:
        func(inp, out)
    except Exception as exc:  # a failure is data for the failure list, whatever it is
        msg = str(exc) or traceback.format_exception_only(type(exc), exc)[-1].strip()
        return pos, type(exc).__name__, msg, time.perf_counter() - t0
    return pos, None, "", time.perf_counter() - t0


@dataclass(frozen=True)
class ExtractTask:
    """Extract keypoints from one image and save them (``.kfk``, or ``.key`` text).

    A picklable callable, so Dask can ship it to worker processes or other machines.
    """

    device: str = "auto"
    params: tuple[tuple[str, Any], ...] = ()

    def __call__(self, inp: str, out: str) -> None:
        from keyfuse.extraction import extract
        from keyfuse.keypoints import write_key

        kps = extract(inp, device=self.device, **dict(self.params))
        if out.endswith(".key"):
            write_key(kps, out)
        else:
            kps.save(out)


# ----------------------------------------------------------------------- executors


@contextlib.contextmanager
def _executor(scheduler: Any, n_workers: int | None) -> Iterator[tuple[str, Any]]:
    """Yield ("dask", client) or ("pool", ThreadPoolExecutor) or ("sync", None)."""
    workers = n_workers or os.cpu_count() or 1
    if scheduler == "sync":
        yield "sync", None
        return
    if scheduler == "threads":
        with _thread_pool(workers) as pool:
            yield "pool", pool
        return
    if hasattr(scheduler, "submit") and hasattr(scheduler, "gather"):  # a Client
        yield "dask", scheduler
        return
    try:
        from distributed import Client
    except ImportError as exc:
        if scheduler in (None, "local"):
            with _thread_pool(workers) as pool:
                yield "pool", pool
            return
        raise MissingDependencyError(
            "a Dask scheduler needs dask[distributed]: pip install 'keyfuse[dask]'"
        ) from exc
    if scheduler in (None, "local", "processes"):
        cluster = _local_cluster(scheduler == "processes", workers)
        client = Client(cluster)
        try:
            yield "dask", client
        finally:
            with _quiet_dask():
                client.close()
                cluster.close()
        return
    if not isinstance(scheduler, str):
        raise InvalidArgumentError(f"unsupported scheduler {scheduler!r}")
    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise KeyfuseIOError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    try:
        yield "dask", client
    finally:
        with _quiet_dask():
            client.close()


def _local_cluster(processes: bool, workers: int) -> Any:
    """A Dask LocalCluster of ``workers`` cores: threads of this process, or one-thread
    worker processes."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers if processes else 1,
        threads_per_worker=1 if processes else workers,
        processes=processes,
        dashboard_address=None,
    )


@contextlib.contextmanager
def _thread_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A thread pool that, when left by an exception (Ctrl-C), drops its queued tasks
    and returns at once instead of waiting for every one of them; the tasks already
    running finish their file (each writes atomically) in the background."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


@contextlib.contextmanager
def _quiet_dask() -> Iterator[None]:
    """Silence distributed's log while a cluster shuts down after an interrupt (the
    cancelled tasks' ``CancelledError`` reports say nothing a user needs)."""
    import logging

    loggers = [logging.getLogger(n) for n in ("distributed", "tornado", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a batch: queued inputs were cancelled, finished outputs kept.

    A :class:`KeyboardInterrupt` (so it ends a program as Ctrl-C does) that carries
    what was done (``result``, a :class:`BatchResult` with ``interrupted=True``); running
    the same batch again resumes it.
    """

    def __init__(self, result: BatchResult) -> None:
        super().__init__(
            f"interrupted: {len(result.written)} written, {len(result.skipped)} already done"
        )
        self.result = result


def run_batch(
    func: Task,
    inputs: Sequence[str | os.PathLike[str]],
    outputs: Sequence[str | os.PathLike[str]],
    *,
    scheduler: Any = None,
    n_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "batch",
    failures_path: str | os.PathLike[str] | None = None,
) -> BatchResult:
    """Run ``func(input, output)`` for every input whose output does not exist yet.

    Parameters
    ----------
    func : picklable callable ``(input_path, output_path) -> None`` that writes the
        output (atomically, as keyfuse's writers do).
    inputs, outputs : one output path per input; duplicate outputs are refused.
    scheduler : see the module docstring (default None: a local Dask cluster).
    n_workers : parallel tasks (default: the number of CPUs).
    overwrite : recompute outputs that exist (default False: skip them = resume).
    progress : show a tqdm progress bar (default True).
    desc : progress-bar label.
    failures_path : where to write the failure list (CSV: input, error, message);
        default None writes none. A run without failures removes a stale list.
    """
    from tqdm.auto import tqdm

    ins = [str(p) for p in inputs]
    outs = [Path(p) for p in outputs]
    if len(ins) != len(outs):
        raise InvalidArgumentError(f"{len(ins)} inputs but {len(outs)} outputs")
    seen: dict[Path, str] = {}
    for i, o in zip(ins, outs, strict=True):
        key = o.resolve()
        if key in seen:
            raise InvalidArgumentError(
                f"inputs {seen[key]} and {i} would both write {o}: rename one of them"
            )
        seen[key] = i
    if n_workers is not None and n_workers < 1:
        raise InvalidArgumentError(f"n_workers must be >= 1, got {n_workers}")
    for d in {o.parent for o in outs}:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyfuseIOError(f"cannot create output directory {d}: {exc}") from exc

    t0 = time.perf_counter()
    result = BatchResult(outputs=outs)
    todo: list[int] = []
    for n, o in enumerate(outs):
        if o.exists() and not overwrite:
            result.skipped.append(o)
        else:
            todo.append(n)
    bar = tqdm(total=len(todo), desc=desc, unit="file", disable=not progress)
    written: list[int] = []
    failed: list[tuple[int, BatchFailure]] = []

    def record(res: Outcome) -> None:
        pos, err, msg, _ = res
        if err is None:
            written.append(pos)
        else:
            failed.append((pos, BatchFailure(ins[pos], err, msg)))
            bar.set_postfix(failed=len(failed))
        bar.update(1)

    interrupted = False
    try:
        if todo:
            with _executor(scheduler, n_workers) as (kind, ex):
                if kind == "sync":
                    for n in todo:
                        record(_run_one(func, n, ins[n], str(outs[n])))
                elif kind == "pool":
                    futs = [ex.submit(_run_one, func, n, ins[n], str(outs[n])) for n in todo]
                    try:
                        for fut in as_completed(futs):
                            record(fut.result())
                    except KeyboardInterrupt:
                        for fut in futs:
                            fut.cancel()
                        # the pool's threads never see the signal: stop the keyfuse calls
                        # they are running (the executor waits for them on leaving)
                        from keyfuse import _core

                        _core.request_stop()
                        raise
                else:
                    from distributed import as_completed as dask_completed

                    # a worker that dies is replaced and its tasks rerun elsewhere
                    # (distributed's allowed-failures); `resume` makes a rerun keep an
                    # output its first run had already written
                    dfuts = {
                        ex.submit(
                            _run_one, func, n, ins[n], str(outs[n]), not overwrite, pure=False
                        ): n
                        for n in todo
                    }
                    try:
                        for fut in dask_completed(list(dfuts)):
                            try:
                                record(fut.result())
                            except Exception as exc:  # workers kept dying on this input
                                record((dfuts[fut], *_lost_task(exc)))
                    except KeyboardInterrupt:
                        with _quiet_dask(), contextlib.suppress(Exception):
                            ex.cancel(list(dfuts), force=True)
                        raise
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        if interrupted:
            from keyfuse import _core

            _core.clear_stop()
    # input order in the lists (completion order is arbitrary)
    result.written = [outs[n] for n in sorted(written)]
    result.failures = [f for _, f in sorted(failed, key=lambda t: t[0])]
    result.seconds = time.perf_counter() - t0
    result.interrupted = interrupted
    if interrupted:
        # outputs that exist are complete (atomic writes): the next run skips them
        result.written = [outs[n] for n in todo if outs[n].exists()]
        raise BatchInterrupted(result)
    if failures_path is not None:
        _write_failures(Path(failures_path), result.failures)
    return result


def _lost_task(exc: BaseException) -> tuple[str, str, float]:
    """The failure-list entry of a task Dask gave up on (``KilledWorker``: every worker
    that ran it died, e.g. killed for memory or crashed)."""
    name = type(exc).__name__
    if name == "KilledWorker":
        return (
            name,
            "the Dask workers running this input died each time (out of memory, or a "
            "crash): give workers more memory or check this file",
            0.0,
        )
    return name, str(exc) or name, 0.0


def _write_failures(path: Path, failures: list[BatchFailure]) -> None:
    from keyfuse._io import atomic_path

    try:
        if not failures:
            path.unlink(missing_ok=True)
            return
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["input", "error", "message"])
            for f in failures:
                w.writerow([f.input, f.error, f.message])
    except OSError as exc:
        raise KeyfuseIOError(f"cannot write the failure list {path}: {exc}") from exc


def extract_task(device: str, fmt: str, params: dict[str, Any]) -> ExtractTask:
    """The extraction task of a batch, its arguments checked once before any work."""
    if fmt not in ("kfk", "key"):
        raise InvalidArgumentError(f"fmt must be 'kfk' or 'key', not {fmt!r}")
    # checked here rather than once per file; resolved on the workers, which may differ
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidArgumentError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    if device == "cuda":
        from keyfuse.extraction import check_extract_device

        check_extract_device(device)  # no GPU path: one error before the work
    return ExtractTask(device=device, params=tuple(sorted(params.items())))


def extract_batch(
    inputs: Inputs,
    out_dir: str | os.PathLike[str],
    *,
    pattern: str | None = None,
    scheduler: Any = None,
    n_workers: int | None = None,
    device: str = "auto",
    fmt: str = "kfk",
    overwrite: bool = False,
    progress: bool = True,
    **params: Any,
) -> BatchResult:
    """Extract keypoints from many images, one ``.kfk`` (or ``.key``) file per image.

    Parameters
    ----------
    inputs : an image path, a directory, a glob, or a list of them (see
        :func:`collect_inputs`): directories are searched recursively for
        ``.nii``/``.nii.gz`` files. A named file that does not exist is listed among the
        failures (the batch goes on), unless none of the named paths exists.
    out_dir : output directory; each image ``name.nii.gz`` gives ``out_dir/name.kfk``,
        and failures go to ``out_dir/failures.csv``.
    pattern : only files of the input directories whose names match this glob (e.g.
        ``"*_T1w.nii.gz"``).
    scheduler : None (default: a local Dask cluster), ``"processes"``, ``"threads"``,
        ``"sync"``, a Dask scheduler address or a ``distributed.Client``.
    n_workers : parallel extractions (default: the number of CPUs).
    device : ``"auto"`` (default), ``"cpu"`` or ``"cuda"``, passed to :func:`keyfuse.extract`.
    fmt : ``"kfk"`` (default, compact binary) or ``"key"`` (featExtract text).
    overwrite : recompute existing outputs (default False: resume).
    progress : show a progress bar (default True).
    **params : extraction parameters for :func:`keyfuse.extract`.
    """
    task = extract_task(device, fmt, params)
    files = collect_inputs(inputs, pattern=pattern, missing="keep")
    if not files:
        where = f" matching {pattern!r}" if pattern else ""
        raise InvalidArgumentError(
            f"no input images{where} (directories are searched for .nii/.nii.gz files)"
        )
    outs = [output_path(f, out_dir, f".{fmt}") for f in files]
    return run_batch(
        task,
        files,
        outs,
        scheduler=scheduler,
        n_workers=n_workers,
        overwrite=overwrite,
        progress=progress,
        desc="extract",
        failures_path=Path(out_dir) / FAILURES_FILE,
    )


_BUILD_NAMES = ("BuildInterrupted", "BuildResult", "build_index")


def __getattr__(name: str) -> Any:
    """The streaming index build (:mod:`keyfuse.batch_build`, which imports this
    module), as ``kf.batch.build_index``."""
    if name in _BUILD_NAMES:
        from keyfuse import batch_build

        return getattr(batch_build, name)
    raise AttributeError(f"module 'keyfuse.batch' has no attribute {name!r}")
