"""``keyfuse extract``: keypoints of many images, one output file each."""

from __future__ import annotations

from pathlib import Path

import click

from keyfuse.cli.options import CONTEXT, dask_option, device_option, quiet_option, workers_option


@click.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory: one NAME.kfk per NAME.nii(.gz), plus failures.csv.",
)
@dask_option("Run on this Dask scheduler (e.g. tcp://10.0.0.5:8786); workers must see the paths.")
@click.option(
    "--scheduler",
    type=click.Choice(["local", "processes", "threads", "sync"]),
    default="local",
    show_default=True,
    help="Without --dask: local Dask cluster (threads), Dask processes, a plain "
    "thread pool, or one at a time.",
)
@workers_option("Parallel extractions (default: number of CPUs).")
@device_option()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["kfk", "key"]),
    default="kfk",
    show_default=True,
    help="kfk: compact binary; key: featExtract text format.",
)
@click.option(
    "--pattern",
    default=None,
    metavar="GLOB",
    help="Only files of IMAGES' directories whose names match, e.g. '*_T1w.nii.gz' "
    "(directories are searched recursively).",
)
@click.option("--overwrite", is_flag=True, help="Recompute outputs that already exist.")
@quiet_option("No progress bar.")
def extract(
    images: tuple[Path, ...],
    out: Path,
    dask_address: str | None,
    scheduler: str,
    workers: int | None,
    device: str,
    fmt: str,
    pattern: str | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Extract 3D SIFT-Rank keypoints from IMAGES (files, globs, or directories searched
    recursively for .nii/.nii.gz).

    Existing outputs are skipped, so re-running a command resumes it. A file that
    fails is listed in OUT/failures.csv and the batch goes on; the exit status is 1
    if any file failed.

    \b
    Examples:
      keyfuse extract scans/ -o keys/
      keyfuse extract a.nii.gz b.nii.gz -o keys/ --format key
      keyfuse extract bids/ --pattern '*_T1w.nii.gz' -o keys/
      keyfuse extract /data/ukb/*.nii.gz -o keys/ --dask tcp://scheduler:8786
    """
    from keyfuse.batch import FAILURES_FILE, BatchInterrupted, extract_batch

    try:
        res = extract_batch(
            list(images),
            out,
            scheduler=dask_address or scheduler,
            n_workers=workers,
            device=device,
            fmt=fmt,
            pattern=pattern,
            overwrite=overwrite,
            progress=not quiet,
        )
    except BatchInterrupted as stop:
        done = stop.result
        click.echo(
            f"\ninterrupted: queued files cancelled; {len(done.written)} extracted, "
            f"{len(done.skipped)} already done are kept -> {out}. Run the same command "
            "again to resume.",
            err=True,
        )
        raise SystemExit(130) from None
    click.echo(
        f"{len(res.written)} extracted, {len(res.skipped)} already done, "
        f"{len(res.failures)} failed ({res.seconds:.1f} s) -> {out}"
    )
    if res.failures:
        for f in res.failures[:10]:
            click.echo(f"  failed: {f.input}: {f.error}: {f.message}", err=True)
        raise click.ClickException(
            f"{len(res.failures)} of {len(res.outputs)} inputs failed; see {out / FAILURES_FILE}"
        )
