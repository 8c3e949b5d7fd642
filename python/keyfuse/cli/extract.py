"""``keyfuse extract``: keypoints of many images, one output file each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from keyfuse.cli.options import (
    CONTEXT,
    dask_option,
    device_option,
    path_option,
    quiet_option,
    scheduler_option,
    workers_option,
)


@click.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@path_option(
    "-o",
    "--out",
    kind="dir",
    help="Output directory: one NAME.kfk per NAME.nii(.gz), plus failures.csv "
    "(with --bids: the derivative, default DATASET/derivatives/keyfuse).",
)
@path_option(
    "--bids",
    "bids_dataset",
    kind="dir",
    exists=True,
    help="A BIDS dataset: every sub-*/[ses-*/]anat/*_T1w.nii[.gz], written as a BIDS "
    "derivative (sub-01/ses-1/anat/sub-01_ses-1_keypoints.kfk).",
)
@path_option(
    "--index",
    "index_path",
    help="Then append the keypoints to this index (created if missing; subjects already "
    "in it are skipped); with --bids, labelled from participants.tsv.",
)
@dask_option("Run on this Dask scheduler (e.g. tcp://10.0.0.5:8786); workers must see the paths.")
@scheduler_option(
    "local",
    "local Dask cluster (threads), Dask processes, a plain thread pool, or one at a time.",
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
    out: Path | None,
    bids_dataset: Path | None,
    index_path: Path | None,
    dask_address: str | None,
    scheduler: str,
    n_workers: int | None,
    device: str,
    fmt: str,
    pattern: str | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Extract 3D SIFT-Rank keypoints from IMAGES (files, globs, or directories searched
    recursively for .nii/.nii.gz), or from the T1w scans of a BIDS dataset (--bids).

    Existing outputs are skipped, so re-running a command resumes it. A file that
    fails (missing, corrupt, 4D, ...) is listed in OUT/failures.csv and the batch goes
    on; the exit status is 1 if any file failed. With --index, the keypoints are then
    appended to an index (as 'keyfuse index build' does).

    \b
    Examples:
      keyfuse extract scans/ -o keys/
      keyfuse extract a.nii.gz b.nii.gz -o keys/ --format key
      keyfuse extract bids/ --pattern '*_T1w.nii.gz' -o keys/
      keyfuse extract /data/ukb/*.nii.gz -o keys/ --dask tcp://scheduler:8786
      keyfuse extract --bids ds000001/ --index ds000001.kfi
    """
    from keyfuse.batch import BatchInterrupted, extract_batch

    if bids_dataset is not None and images:
        raise click.UsageError("give either IMAGES or --bids DATASET, not both")
    if bids_dataset is None and not images:
        raise click.UsageError("give IMAGES (files, globs or directories) or --bids DATASET")
    if bids_dataset is None and out is None:
        raise click.UsageError("missing option '-o' / '--out' (the output directory)")
    run: dict[str, Any] = {
        "scheduler": dask_address or scheduler,
        "n_workers": n_workers,
        "device": device,
        "fmt": fmt,
        "overwrite": overwrite,
        "progress": not quiet,
    }
    build = None
    try:
        if bids_dataset is not None:
            from keyfuse.bids import extract_bids

            if pattern is not None:
                raise click.UsageError("--pattern does not apply to --bids (T1w scans only)")
            bids = extract_bids(bids_dataset, out, index=index_path, **run)
            res, out, build = bids.extraction, bids.derivative, bids.build
        else:
            assert out is not None
            res = extract_batch(list(images), out, pattern=pattern, **run)
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
    if index_path is not None:
        if build is None and bids_dataset is None:
            build = _index_outputs(res, index_path, quiet)
        if build is not None:
            more = f", {len(build.skipped)} already there" if build.skipped else ""
            click.echo(f"indexed {len(build.added)} subjects{more} -> {index_path}")
    _report_failures(res, out)


def _index_outputs(res: Any, index_path: Path, quiet: bool) -> Any:
    """Append a batch's keypoint files to an index (:func:`keyfuse.batch.build_index`)."""
    from keyfuse.batch import build_index

    done = [o for o in res.outputs if o.exists()]
    return build_index(done, index_path, progress=not quiet) if done else None


def _report_failures(res: Any, out: Path | None) -> None:
    from keyfuse.batch import FAILURES_FILE

    if res.failures:
        for f in res.failures[:10]:
            click.echo(f"  failed: {f.input}: {f.error}: {f.message}", err=True)
        where = f"; see {out / FAILURES_FILE}" if out is not None else ""
        raise click.ClickException(
            f"{len(res.failures)} of {len(res.outputs)} inputs failed{where}"
        )
