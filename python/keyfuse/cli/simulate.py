"""``keyfuse simulate``: a synthetic cohort with ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from keyfuse.cli.options import CONTEXT, default_rescans, quiet_option, simulation_options


@click.command(context_settings=CONTEXT)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@simulation_options()
@quiet_option("No progress bar.")
def simulate(out_dir: Path, quiet: bool, **cohort: Any) -> None:
    """Simulate a cohort of families, twins and rescans from the MNI152 template.

    Writes OUT_DIR/images/*.nii.gz, OUT_DIR/labels/*.nii.gz (left/right GM and WM,
    ventricles) and OUT_DIR/cohort.csv (subject, family, relation, group, rescan_of,
    pose, ...).

    \b
    Examples:
      keyfuse simulate cohort/
      keyfuse simulate small/ --families 3 --resolution 4 --seed 7
    """
    from keyfuse.datasets.cohort import simulate_cohort

    # cohort: the simulation_options, named as simulate_cohort's parameters
    c = simulate_cohort(out_dir, progress=not quiet, **default_rescans(cohort))
    click.echo(f"simulated {len(c)} scans in {cohort['n_families']} families -> {out_dir}")
