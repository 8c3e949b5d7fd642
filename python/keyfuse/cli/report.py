"""``keyfuse report``: self-contained HTML reports of a subject, a segmentation or a
cohort evaluation."""

from __future__ import annotations

from pathlib import Path

import click

from keyfuse.cli.options import CONTEXT, count_option, index_option, path_option

_OUT = path_option("-o", "--output", kind="file", required=True, help="The HTML file to write.")
_RADIO = click.option(
    "--radiological", is_flag=True, help="Mirror axial/coronal views (default neurological)."
)


def _atlas(value: str) -> object:
    return None if value == "none" else ("mni152" if value == "mni152" else Path(value))


@click.group("report", context_settings=CONTEXT, short_help="Write an HTML report.")
def report() -> None:
    """Write one self-contained HTML page (images embedded, no network, no JavaScript)
    that shows what keyfuse found.

    \b
    Examples:
      keyfuse report subject scan.nii.gz -o scan.html --index cohort.kfi
      keyfuse report segmentation scan.nii.gz scan_labels.nii.gz -o seg.html
      keyfuse report cohort demo-output/ -o cohort.html
    """


@report.command("subject", context_settings=CONTEXT)
@click.argument("image", type=click.Path(exists=True, path_type=Path))
@_OUT
@path_option(
    "--keys",
    kind="file",
    exists=True,
    help="The image's keypoints (.kfk); extracted when not given.",
)
@click.option(
    "--atlas",
    default="mni152",
    show_default=True,
    help="Image to align to: 'mni152' (the template at the scan's resolution), a path, or 'none'.",
)
@index_option("An index to search for the nearest subjects (montage from its source paths).")
@count_option("-k", default=5, help="Hits shown.")
@_RADIO
def subject(
    image: Path,
    output: Path,
    keys: Path | None,
    atlas: str,
    index_path: Path | None,
    k: int,
    radiological: bool,
) -> None:
    """A subject's keypoints, its alignment to the atlas and its nearest subjects."""
    from keyfuse.reports import subject_report

    index = None
    if index_path is not None:
        from keyfuse.index import Index

        index = Index.load(index_path)
    rep = subject_report(
        image, keypoints=keys, atlas=_atlas(atlas), index=index, k=k, radiological=radiological
    )
    click.echo(rep.write(output))


def _label_names(items: tuple[str, ...]) -> dict[int, str]:
    out: dict[int, str] = {}
    for item in items:
        value, sep, name = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[int(value)] = name.strip()
        except ValueError:
            raise click.BadParameter(
                f"expected VALUE=NAME, got {item!r}", param_hint="--name"
            ) from None
    return out


@report.command("segmentation", context_settings=CONTEXT)
@click.argument("image", type=click.Path(exists=True, path_type=Path))
@click.argument("labels", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_OUT
@path_option(
    "--probabilities",
    kind="file",
    exists=True,
    help="The per-label probability maps (4D NIfTI, as `keyfuse segment --probabilities`).",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    metavar="VALUE=NAME",
    help="A label's name (repeatable), e.g. --name 5=ventricles.",
)
@_RADIO
def segmentation(
    image: Path,
    labels: Path,
    output: Path,
    probabilities: Path | None,
    names: tuple[str, ...],
    radiological: bool,
) -> None:
    """A label map over its IMAGE: overlay with legend, probability maps, volumes."""
    from keyfuse.reports import load_segmentation, segmentation_report

    seg = load_segmentation(labels, probabilities)
    rep = segmentation_report(
        image, seg, label_names=_label_names(names) or None, radiological=radiological
    )
    click.echo(rep.write(output))


@report.command("cohort", context_settings=CONTEXT)
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_OUT
@path_option(
    "--keys",
    "keys_dir",
    kind="dir",
    exists=True,
    help="Keypoint folder (one <subject>.kfk per scan); default DIRECTORY/keys.",
)
@click.option("--worst", default=3, show_default=True, help="Worst queries shown as montages.")
@click.option("--subjects", default=2, show_default=True, help="Subjects shown in detail.")
@click.option("--atlas", default="mni152", show_default=True, help="'mni152', a path, or 'none'.")
def cohort(
    directory: Path, output: Path, keys_dir: Path | None, worst: int, subjects: int, atlas: str
) -> None:
    """A cohort evaluation: identification figures, ROC/PR, worst cases, subjects.

    DIRECTORY is a `keyfuse demo` output (cohort/ and keys/ inside) or a cohort
    folder written by `keyfuse simulate` (then give --keys)."""
    from keyfuse.reports import cohort_report, load_cohort_scores

    coh, keys, scores = load_cohort_scores(directory, keys_dir)
    rep = cohort_report(
        coh, scores, keys=keys, n_subjects=subjects, n_worst=worst, atlas=_atlas(atlas)
    )
    click.echo(rep.write(output))
