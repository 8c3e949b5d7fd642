"""``keyfuse segment``: keypoint-transfer segmentation from annotated atlases."""

from __future__ import annotations

from pathlib import Path

import click

from keyfuse.cli.options import CONTEXT, device_option, path_option, quiet_option

#: the segmenter's default ν (keyfuse.segment.DEFAULT_NU), repeated here so that
#: ``keyfuse --help`` does not import the segmenter
DEFAULT_NU = 300.0


def _extract_params(items: tuple[str, ...]) -> dict[str, float]:
    """``NAME=NUMBER`` items → {name: number}."""
    params: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            params[name.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(
                f"expected NAME=NUMBER, got {item!r}", param_hint="--extract-param"
            ) from None
    return params


@click.command(
    "segment", context_settings=CONTEXT, short_help="Segment an image by keypoint transfer."
)
@path_option(
    "--atlases",
    "atlas_dir",
    kind="dir",
    exists=True,
    required=True,
    help="Folder of annotated training images (.nii/.nii.gz).",
)
@path_option(
    "--labels",
    "label_dir",
    kind="dir",
    exists=True,
    required=True,
    help="Folder of their label maps (same file names, or names starting with the "
    "image's name, e.g. sub01_labels.nii.gz).",
)
@path_option(
    "--label-names",
    kind="file",
    exists=True,
    help="BIDS look-up table (TSV with index and name columns) naming the labels "
    "[default: LABELS/dseg.tsv when present].",
)
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@path_option(
    "-o",
    "--output",
    required=True,
    help="Output label map (.nii.gz or .nii); its label names go beside it as a BIDS "
    "look-up table (NAME.tsv).",
)
@path_option(
    "--probabilities",
    help="Also write the per-label probability maps (4D NIfTI).",
)
@click.option("--ratio", default=0.9, show_default=True, help="Match distance-ratio test.")
@click.option("--scale-factor", default=2.0, show_default=True, help="Match scale gate.")
@click.option(
    "--nu",
    default=DEFAULT_NU,
    show_default=True,
    help="Intensity likelihood σ (normalised units: local tissue mean = 1000); 0 = off.",
)
@click.option(
    "--background-fraction",
    default=0.15,
    show_default=True,
    help="Background where the best label's probability is below this.",
)
@click.option(
    "--min-weight",
    default=0.2,
    show_default=True,
    help="Skip transfers weaker than this fraction of the label's strongest (0: keep all).",
)
@click.option(
    "--across-weight",
    default=0.1,
    show_default=True,
    help="Weight factor when an organ is carried by a touching organ's keypoints "
    "(transfer_from='auto'); 0: each organ by its own keypoints only.",
)
@click.option(
    "--extract-param",
    "extract_param",
    multiple=True,
    metavar="NAME=VALUE",
    help="Keypoint extraction parameter (repeatable), e.g. --extract-param sigma0=0.8.",
)
@device_option()
@quiet_option()
def segment(
    atlas_dir: Path,
    label_dir: Path,
    label_names: Path | None,
    image: Path,
    output: Path,
    probabilities: Path | None,
    ratio: float,
    scale_factor: float,
    nu: float,
    background_fraction: float,
    min_weight: float,
    across_weight: float,
    extract_param: tuple[str, ...],
    device: str,
    quiet: bool,
) -> None:
    """Segment IMAGE by keypoint transfer from annotated atlases (no registration).

    Every test keypoint is matched to the atlases' keypoints; matches that agree
    with the keypoint's voted label transfer that atlas' whole organ map, shifted
    by the match. Works on a limited field of view (a crop) unchanged.

    The label map is written with its label names beside it (OUTPUT without .nii.gz,
    plus .tsv: a BIDS look-up table).

    Example: keyfuse segment --atlases train/ --labels train_labels/ new.nii.gz
    -o new_labels.nii.gz
    """
    from keyfuse.segment import KeypointTransferSegmenter
    from keyfuse.segment_files import check_output_path, pair_atlas_files, read_label_names

    # every output path is checked before the (long) work, not after it
    check_output_path(output, "-o/--output")
    if probabilities is not None:
        check_output_path(probabilities, "--probabilities")
    params = _extract_params(extract_param)
    pairs = pair_atlas_files(atlas_dir, label_dir)
    seg = KeypointTransferSegmenter(
        ratio=ratio,
        scale_factor=scale_factor,
        nu=None if nu <= 0 else nu,
        background_fraction=background_fraction,
        min_weight=min_weight,
        across_weight=across_weight,
        device=device,
        extract_params=params,
        progress=not quiet,
    )
    if label_names is None and (label_dir / "dseg.tsv").is_file():
        label_names = label_dir / "dseg.tsv"
    names = read_label_names(label_names) if label_names is not None else None
    seg.fit([p[0] for p in pairs], [p[1] for p in pairs], label_names=names)
    out = seg.predict(image)
    out.save(output, probabilities)
    from keyfuse.plotting import save_segmentation_overlay

    overlay = save_segmentation_overlay(image, out, output, label_names=names)
    if not quiet:
        counts = {lab: int((out.labels == lab).sum()) for lab in out.probabilities}
        click.echo(
            f"wrote {output} and its overlay {overlay}: {len(pairs)} atlases, "
            f"{out.n_transfers} transfers, voxels per label {counts}, "
            f"{sum(out.timings.values()):.2f} s"
        )
