"""``keyfuse evaluate family|fusion``: retrieval and classification on a cohort."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from keyfuse._inputs import open_index
from keyfuse.cli.options import (
    CONTEXT,
    device_option,
    index_option,
    path_option,
    quiet_option,
    simulation_options,
)
from keyfuse.errors import KeyfuseError


@click.group(context_settings=CONTEXT)
def evaluate() -> None:
    """Evaluate retrieval and classification on a (simulated) cohort."""


def _cohort_scores(
    cohort: Any, keys_dir: Path | None, index_path: Path | None, device: str, quiet: bool
) -> Any:
    """The cohort's N×N score matrix from an index, or from keypoint files (extracted
    into COHORT/keys when absent)."""
    from keyfuse.index import Index

    if index_path is not None:
        idx = open_index(index_path)
    else:
        from keyfuse.batch import extract_batch
        from keyfuse.keypoints import KeypointSet

        keys_dir = keys_dir or (cohort.root / "keys")
        paths = [cohort.image_path(i) for i in range(len(cohort))]
        res = extract_batch(paths, keys_dir, scheduler="threads", device=device, progress=not quiet)
        if res.failures:
            f = res.failures[0]
            raise KeyfuseError(f"extraction failed for {f.input}: {f.message}")
        idx = Index()
        for sid, p in zip(cohort.subjects, res.outputs, strict=True):
            idx.add(sid, KeypointSet.load(p))
    from keyfuse.evaluate import cohort_matrix

    # matched to the cohort by subject id (an index may be built in any order)
    return cohort_matrix(cohort, idx.pairwise(device=device, as_frame=True))


@evaluate.command("family", context_settings=CONTEXT)
@click.argument("cohort_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@path_option(
    "--keys",
    "keys_dir",
    kind="dir",
    help="Keypoint files NAME.kfk per scan (default: COHORT_DIR/keys, extracted if missing).",
)
@index_option("Score with this index's pairwise matrix instead.")
@path_option(
    "--plot",
    kind="file",
    help="Write the ROC curve to this file (.png, .svg or .pdf, by its suffix).",
)
@device_option()
@quiet_option()
def evaluate_family(
    cohort_dir: Path,
    keys_dir: Path | None,
    index_path: Path | None,
    plot: Path | None,
    device: str,
    quiet: bool,
) -> None:
    """Family identification on COHORT_DIR (made by 'keyfuse simulate').

    Prints same-family vs different-family AUC and AP, mAP, precision@1, recall@5,
    rescans found at rank 1, and how often twins outrank every unrelated scan.

    \b
    Examples:
      keyfuse evaluate family cohort/
      keyfuse evaluate family cohort/ --index cohort.kfi --plot roc.png
    """
    from keyfuse import evaluate as ev
    from keyfuse.datasets.cohort import Cohort

    if plot is not None:
        ev.plot_format(plot)  # an unknown format fails now, not after the scoring
    cohort = Cohort.load(cohort_dir)
    scores = _cohort_scores(cohort, keys_dir, index_path, device, quiet)
    report = ev.family_report(cohort, scores)
    for name, val in report.items():
        click.echo(f"{name:<22} {val:.4f}")
    if plot is not None:
        ps, pl = ev.family_pairs(cohort, scores)
        ev.roc_plot({"same vs different family": (ps, pl)}, plot)
        click.echo(f"ROC plot -> {plot}")


@evaluate.command(
    "fusion",
    context_settings=CONTEXT,
    short_help="Fusion of keypoints and CNN features (AUC table).",
)
@path_option(
    "--cohort",
    "cohort_dir",
    kind="dir",
    exists=True,
    help="An existing cohort directory (else one is simulated).",
)
@path_option(
    "--out",
    "out_dir",
    kind="dir",
    default=Path("fusion-output"),
    help="Directory for the ROC and scatter PNGs.",
)
@simulation_options(families=10, family_size=4, rescans=False)
@click.option(
    "--transform",
    "transform_source",
    type=click.Choice(["align", "truth", "none"]),
    default="align",
    show_default=True,
    help="Spatial normalisation: keypoint alignment, the simulator's known pose (oracle), or none.",
)
@click.option(
    "--neighbors",
    "n_neighbors",
    type=int,
    default=5,
    show_default=True,
    help="Keypoint kernel over the k nearest training keypoints (0: all, exact eq. 7).",
)
@click.option(
    "--checks",
    type=int,
    default=0,
    show_default=True,
    help="Approximate keypoint neighbours with a kd-forest (e.g. 64); 0 = exact.",
)
@device_option()
@quiet_option()
def evaluate_fusion(
    cohort_dir: Path | None, n_neighbors: int, checks: int, quiet: bool, **settings: Any
) -> None:
    """Fuse 3D/2D keypoints with (binarized) CNN vectors: leave-one-out family
    identification and group classification, printed as the fusion paper's
    Table 1, with ROC curves and the shallow-vs-deep scatter saved as PNGs.

    \b
    Examples:
      keyfuse evaluate fusion                       # 10 families x 4, 1.5 mm
      keyfuse evaluate fusion --cohort small/ --out fig/
    """
    from keyfuse.experiments.fusion_table1 import report, run_experiment

    # settings: --out, the simulation options, --transform and --device, named as
    # run_experiment's parameters; 0 neighbours / checks mean "all" / "exact" (None)
    res = run_experiment(
        cohort_dir,
        n_neighbors=n_neighbors or None,
        checks=checks or None,
        progress=not quiet,
        **settings,
    )
    click.echo(report(res))


@evaluate.command(
    "retrieval",
    context_settings=CONTEXT,
    short_help="mAP, P@k, R@k of an index, with and without class prediction.",
)
@click.argument("index_path", metavar="INDEX", type=click.Path(exists=True, path_type=Path))
@click.option("--label", required=True, help="The label that defines relevance (same value).")
@click.option(
    "--by",
    "bys",
    type=click.Choice(["keypoints", "vector", "fused"]),
    multiple=True,
    help="Ranking(s) to evaluate (repeatable; default: keypoints, plus vector and fused "
    "when every labelled subject has a vector).",
)
@click.option(
    "-k",
    "ks",
    type=click.IntRange(min=1),
    multiple=True,
    help="k of P@k and R@k (repeatable; default 1, 5, 10).",
)
@click.option(
    "--alpha",
    default=None,
    metavar="A|auto",
    help="Keypoint weight of the fused ranking in [0, 1], or 'auto': chosen per query on "
    "the other queries (nested leave-one-out). Default: both terms with the same spread.",
)
@path_option(
    "--out",
    default=Path("retrieval-output"),
    help="Directory (or .png file) for the precision-recall curves.",
)
@path_option("--csv", "csv_path", kind="file", help="Also write the table as CSV.")
def evaluate_retrieval(
    index_path: Path,
    label: str,
    bys: tuple[str, ...],
    ks: tuple[int, ...],
    alpha: str | None,
    out: Path,
    csv_path: Path | None,
) -> None:
    """Content-based retrieval on INDEX: every subject with LABEL queries the others
    (leave-one-out); prints mAP, P@k and R@k overall and per class, unrestricted and
    restricted to the predicted class ("|pred") side by side, and saves the
    precision-recall curves as PNG.

    \b
    Examples:
      keyfuse evaluate retrieval cohort.kfi --label group
      keyfuse evaluate retrieval cohort.kfi --label family --by vector --by fused
      keyfuse evaluate retrieval cohort.kfi --label family --alpha auto
    """
    from keyfuse.evaluate import retrieval

    idx = open_index(index_path)
    if not bys:
        has_vec = all(
            idx.vector(s) is not None
            for s, v in zip(idx.subjects, idx.label(label), strict=True)
            if v is not None
        )
        bys = ("keypoints", "vector", "fused") if has_vec and len(idx) else ("keypoints",)
    weight: Any = alpha
    if alpha is not None and alpha != "auto":
        try:
            weight = float(alpha)
        except ValueError:
            raise click.BadParameter(f"{alpha!r}: a number in [0, 1] or 'auto'") from None
    report = retrieval(idx, label, by=bys, ks=ks or (1, 5, 10), alpha=weight, plot=out)
    click.echo(str(report))
    for p in report.plots:
        click.echo(f"precision-recall curves -> {p}")
    if csv_path is not None:
        report.table.to_csv(csv_path)
        click.echo(f"table -> {csv_path}")
