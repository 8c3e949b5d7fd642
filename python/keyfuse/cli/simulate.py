"""``keyfuse simulate``: a synthetic cohort with ground truth."""

from __future__ import annotations

from pathlib import Path

import click

from keyfuse.cli.options import CONTEXT, default_rescans, quiet_option, simulation_options


@click.command(context_settings=CONTEXT)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@simulation_options()
@quiet_option("No progress bar.")
def simulate(
    out_dir: Path,
    families: int,
    family_size: int,
    rescans: int | None,
    seed: int,
    resolution: float,
    quiet: bool,
) -> None:
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

    c = simulate_cohort(
        out_dir,
        n_families=families,
        family_size=family_size,
        n_rescans=default_rescans(rescans, families, family_size),
        seed=seed,
        resolution_mm=resolution,
        progress=not quiet,
    )
    click.echo(f"simulated {len(c)} scans in {families} families -> {out_dir}")
