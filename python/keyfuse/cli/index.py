"""``keyfuse index build|add|remove|info``: an on-disk keypoint index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from keyfuse._inputs import (
    add_to_index,
    is_keypoint_file,
    keypoint_sources,
    open_index,
    source_labels,
)
from keyfuse.cli.options import (
    CONTEXT,
    count_option,
    dask_option,
    device_option,
    index_argument,
    label_table_options,
    path_option,
    quiet_option,
    scheduler_option,
    vectors_option,
    workers_option,
)
from keyfuse.errors import InvalidArgumentError

IMAGE_DEVICE_HELP = "For sources that are images (keypoints are extracted on the fly)."


@click.group(context_settings=CONTEXT)
def index() -> None:
    """Build, extend and inspect an on-disk keypoint index (a directory of Parquet files)."""


@index.command("build", context_settings=CONTEXT)
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@path_option("-o", "--out", required=True, help="Index directory.")
@label_table_options
@device_option(IMAGE_DEVICE_HELP)
@vectors_option()
@click.option("--overwrite", is_flag=True, help="Replace an existing index.")
@click.option(
    "--geometry",
    type=click.Choice(["compact", "exact"]),
    default=None,
    help="How a new index stores keypoint geometry: compact (default; positions within "
    "extent/131070, frames within 0.23 degrees, scores unaffected) or exact (bit for bit). "
    "An existing index keeps the choice it was created with.",
)
@dask_option("Read the keypoint files on this Dask scheduler (e.g. tcp://10.0.0.5:8786).")
@scheduler_option(
    "threads",
    "where keypoint files are read (a thread pool, a local Dask cluster of threads or "
    "processes, or one at a time).",
)
@workers_option("Parallel reads (default: number of CPUs).")
@count_option(
    "--chunk",
    default=64,
    help="Keypoint files per atomic append (memory holds at most two chunks).",
)
@quiet_option("No progress bar.")
def index_build(
    sources: tuple[Path, ...],
    out: Path,
    device: str,
    vectors: bool,
    dask_address: str | None,
    scheduler: str,
    quiet: bool,
    **options: Any,
) -> None:
    """Build an index from keypoint files (.kfk/.key) or images, or directories of them.

    The subject id of each entry is its file name without suffix.

    Keypoint files (the output of 'keyfuse extract') are streamed: read in chunks
    (at most two in memory), each chunk appended atomically. If OUT already exists,
    the build resumes: subjects already in it are skipped (rerun the same command
    after Ctrl-C). A file that cannot be read is reported and left out (exit status
    1). Images are read and extracted first and the index is written at the end, as
    one part.

    \b
    Examples:
      keyfuse index build keys/ -o cohort.kfi --labels cohort/cohort.csv --columns family,group
      keyfuse index build keys/ -o ukb.kfi --labels participants.tsv --dask tcp://sched:8786
      keyfuse index build scans/*.nii.gz -o scans.kfi
      keyfuse index build xrays/*.png -o xrays.kfi --vectors   # 2D images, with CNN vectors
    """
    paths = keypoint_sources(sources)
    if not vectors and all(is_keypoint_file(p) for p in paths):
        # options: the label table, --overwrite, --geometry, --workers and --chunk, named
        # as build_index's parameters
        _stream_build(
            paths, out, scheduler=dask_address or scheduler, progress=not quiet, **options
        )
        return
    import shutil

    from keyfuse.index import Index

    if out.exists() and not options["overwrite"]:
        raise InvalidArgumentError(f"{out} exists: use 'keyfuse index add' or --overwrite")
    idx = Index(geometry=options["geometry"])
    table, warning = source_labels(
        paths, options["labels"], options["id_column"], options["columns"]
    )
    if warning:
        click.echo(warning, err=True)
    n, _ = add_to_index(idx, paths, table, device=device, quiet=quiet, vectors=vectors)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    idx.save(out)
    click.echo(f"indexed {n} subjects -> {out}")


def _stream_build(paths: list[Path], out: Path, **options: Any) -> None:
    """``index build`` of keypoint files: :func:`keyfuse.batch.build_index`."""
    from keyfuse.batch import BuildInterrupted, build_index

    try:
        res = build_index(paths, out, **options)
    except BuildInterrupted as stop:
        click.echo(
            f"\ninterrupted: {len(stop.result.added)} subjects added are kept in {out}. "
            "Run the same command again to resume.",
            err=True,
        )
        raise SystemExit(130) from None
    more = f", {len(res.skipped)} already there" if res.skipped else ""
    click.echo(f"indexed {len(res.added)} subjects{more} -> {out} ({res.seconds:.1f} s)")
    if res.failures:
        for f in res.failures[:10]:
            click.echo(f"  failed: {f.input}: {f.error}: {f.message}", err=True)
        raise click.ClickException(
            f"{len(res.failures)} keypoint files could not be read and were left out; "
            "fix or remove them and run the same command again"
        )


@index.command("add", context_settings=CONTEXT)
@index_argument()
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@label_table_options
@device_option(IMAGE_DEVICE_HELP)
@vectors_option()
@click.option(
    "--skip-existing",
    is_flag=True,
    help="Leave out subjects already in INDEX (default: refuse, adding nothing).",
)
@quiet_option("No progress bar.")
def index_add(
    index_path: Path,
    sources: tuple[Path, ...],
    labels: Path | None,
    id_column: str | None,
    columns: str | None,
    device: str,
    vectors: bool,
    skip_existing: bool,
    quiet: bool,
) -> None:
    """Add keypoint files or images (or directories of them) to an existing INDEX.

    All or nothing: every source is read first and the subjects are committed in one
    atomic append, so a bad file adds none of them and the command can be re-run.

    \b
    Examples:
      keyfuse index add cohort.kfi new_keys/ --labels new.csv
      keyfuse index add cohort.kfi keys/ --skip-existing   # only the subjects not yet in it
    """
    idx = open_index(index_path, mode="r+")
    paths = keypoint_sources(sources)
    table, warning = source_labels(paths, labels, id_column, columns)
    if warning:
        click.echo(warning, err=True)
    n, skipped = add_to_index(
        idx,
        paths,
        table,
        device=device,
        quiet=quiet,
        skip_existing=skip_existing,
        vectors=vectors,
    )
    more = f", {skipped} already there" if skipped else ""
    click.echo(f"added {n} subjects{more} -> {index_path} ({len(idx)} in all)")


@index.command("remove", context_settings=CONTEXT)
@index_argument()
@click.argument("subject_ids", nargs=-1, required=True, metavar="SUBJECT_ID...")
@quiet_option("Accepted for symmetry with the other commands (remove shows no progress).")
def index_remove(index_path: Path, subject_ids: tuple[str, ...], quiet: bool) -> None:
    """Remove subjects from INDEX by id (the index is rewritten atomically).

    \b
    Example:
      keyfuse index remove cohort.kfi sub-003 sub-017
    """
    idx = open_index(index_path, mode="r+")
    idx.remove(list(dict.fromkeys(subject_ids)))
    click.echo(f"removed {len(set(subject_ids))} subjects -> {index_path} ({len(idx)} left)")


@index.command("info", context_settings=CONTEXT)
@index_argument()
@quiet_option("Accepted for symmetry with the other commands (info prints no progress).")
def index_info(index_path: Path, quiet: bool) -> None:
    """Summarise INDEX: subjects, keypoints, labels, size on disk.

    \b
    Example:
      keyfuse index info cohort.kfi
    """
    idx = open_index(index_path)
    size = (
        sum(p.stat().st_size for p in index_path.rglob("*") if p.is_file())
        if index_path.is_dir()
        else index_path.stat().st_size
    )
    n_kp = int(idx.n_keypoints)
    names = sorted({str(k) for lab in idx.labels.values() for k in lab})
    ids = [str(s) for s in idx.subjects]
    preview = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
    click.echo(f"index:      {index_path}")
    click.echo(f"subjects:   {len(idx)}")
    click.echo(f"keypoints:  {n_kp} ({n_kp / max(len(idx), 1):.0f} per subject)")
    click.echo(f"disk:       {size / 1e6:.2f} MB")
    click.echo(f"labels:     {', '.join(names) or '(none)'}")
    click.echo(f"geometry:   {idx.geometry}")
    click.echo(f"first ids:  {preview}")
    sealed = sum(s["sealed"] for s in idx.shards)
    click.echo(
        f"shards:     {len(idx.shards)} ({sealed} sealed, at most {idx.shard_size} keypoints each)"
    )


@index.command("verify", context_settings=CONTEXT)
@index_argument()
@click.option(
    "--repair",
    is_flag=True,
    help="Rebuild damaged kd-forests, and damaged shard files from the Parquet parts "
    "where these hold descriptors (indexes written before format 3).",
)
@click.option(
    "--drop-damaged",
    is_flag=True,
    help="With --repair: drop a damaged shard or segment that cannot be rebuilt, and "
    "its subjects (listed by id), from the index.",
)
@quiet_option("Accepted for symmetry with the other commands (verify prints no progress).")
def index_verify(index_path: Path, repair: bool, drop_damaged: bool, quiet: bool) -> None:
    """Read every byte of INDEX: checksums, shard headers and kd-forests (opening an
    index checks sizes and headers only). Exits with status 1 when damage remains.

    \b
    Example:
      keyfuse index verify cohort.kfi --repair
    """
    from keyfuse.index_verify import verify_index

    if drop_damaged and not repair:
        raise click.UsageError("--drop-damaged needs --repair")
    report = verify_index(index_path, repair=repair, drop_damaged=drop_damaged)
    for line in report.repaired:
        click.echo(f"repaired: {line}")
    for sid in report.dropped:
        click.echo(f"dropped subject: {sid}")
    for line in report.problems:
        click.echo(f"damaged:  {line}", err=True)
    state = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    click.echo(f"verified {report.checked} files of {index_path}: {state}")
    if not report.ok:
        raise SystemExit(1)
