"""``keyfuse demo``: the main job end to end on a simulated cohort."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from keyfuse.cli.options import (
    CONTEXT,
    dask_option,
    default_rescans,
    device_option,
    path_option,
    quiet_option,
    simulation_options,
    workers_option,
)


@click.command(context_settings=CONTEXT)
@path_option(
    "--out",
    kind="dir",
    default=Path("demo-output"),
    help="Output directory (cohort, keys, index, roc.png, report.json).",
)
@simulation_options()
@device_option()
@dask_option("Extract on this Dask scheduler instead of a local thread pool.")
@workers_option()
@quiet_option()
def demo(out: Path, dask_address: str | None, quiet: bool, **settings: Any) -> None:
    """Run the main job end to end on a simulated cohort.

    Simulates families (identical and fraternal twins, siblings) and rescans from the
    MNI152 template, extracts keypoints, builds an on-disk index, queries every scan
    and prints family-identification AUC, mAP, rescan rank-1, twins vs unrelated and
    the time of each stage; writes OUT/roc.png and OUT/report.json. A second run
    reuses the cohort and keypoints.

    \b
    Examples:
      keyfuse demo
      keyfuse demo --families 6 --resolution 3 --out /tmp/kf-demo
    """
    from keyfuse.demo import DemoConfig, run_demo

    # settings: the simulation options, --device and --workers, named as DemoConfig's fields
    cfg = DemoConfig(
        out=out,
        scheduler=dask_address or "threads",
        progress=not quiet,
        **default_rescans(settings),
    )
    run_demo(cfg, echo=click.echo)
