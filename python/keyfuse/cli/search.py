"""``keyfuse query`` and ``keyfuse pairwise``: similarity search in an index."""

from __future__ import annotations

import csv
from pathlib import Path

import click

from keyfuse.cli._inputs import is_image_file, is_keypoint_file, load_keypoints, open_index
from keyfuse.cli.options import (
    CONTEXT,
    SEARCH_EXACT,
    device_option,
    index_argument,
    search_option,
)
from keyfuse.errors import InvalidArgumentError


@click.command(context_settings=CONTEXT)
@index_argument()
@click.argument(
    "query_path",
    metavar="IMAGE_OR_KEY",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Results to show."
)
@device_option()
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (rank,subject,score).")
@search_option()
def query(
    index_path: Path, query_path: Path, k: int, device: str, as_csv: bool, search: str
) -> None:
    """Rank the subjects of INDEX by similarity to one image or keypoint file.

    \b
    Examples:
      keyfuse query cohort.kfi new_scan.nii.gz -k 5
      keyfuse query cohort.kfi keys/sub-003.kfk --csv > hits.csv
    """
    from keyfuse.demo import hits_to_pairs

    if not (is_keypoint_file(query_path) or is_image_file(query_path)):
        raise InvalidArgumentError(f"{query_path} is neither a keypoint file nor a NIfTI image")
    idx = open_index(index_path)
    kps = load_keypoints(query_path, device)
    hits = hits_to_pairs(idx.search(kps, k=k, exact=SEARCH_EXACT[search]))
    if as_csv:
        click.echo("rank,subject,score")
        for r, (sid, score) in enumerate(hits, 1):
            click.echo(f"{r},{sid},{score:.6g}")
        return
    click.echo(f"{'rank':>4}  {'score':>8}  subject")
    for r, (sid, score) in enumerate(hits, 1):
        click.echo(f"{r:>4}  {score:8.4f}  {sid}")


@click.command(context_settings=CONTEXT)
@index_argument()
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV file: a header of subject ids, then one row per subject.",
)
@search_option()
def pairwise(index_path: Path, out: Path, search: str) -> None:
    """Write the N×N soft-Jaccard similarity matrix of every pair in INDEX.

    Row i, column j is the similarity of subject i (query) to subject j.

    \b
    Example:
      keyfuse pairwise cohort.kfi -o similarity.csv
    """
    import numpy as np

    from keyfuse._io import atomic_path

    idx = open_index(index_path)
    mat = np.asarray(idx.pairwise(exact=SEARCH_EXACT[search]), dtype=np.float64)
    ids = [str(s) for s in idx.subjects]
    with atomic_path(out) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", *ids])
        for sid, row in zip(ids, mat, strict=True):
            w.writerow([sid, *(f"{v:.6g}" for v in row)])
    click.echo(f"wrote {mat.shape[0]}×{mat.shape[1]} matrix -> {out}")
