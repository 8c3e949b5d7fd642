"""``keyfuse query`` and ``keyfuse pairwise``: similarity search in an index."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import click

from keyfuse._inputs import load_keypoints, open_index
from keyfuse.cli.options import (
    CONTEXT,
    SEARCH_EXACT,
    count_option,
    dask_option,
    device_option,
    index_argument,
    path_option,
    quiet_option,
    search_option,
)
from keyfuse.errors import InvalidArgumentError, KeyfuseIOError

BY = click.Choice(["keypoints", "vector", "fused"])


def by_options(f: Any) -> Any:
    """--by, --alpha and --metric: what the ranking uses."""
    f = click.option(
        "--metric",
        type=click.Choice(["euclidean", "cosine"]),
        default="euclidean",
        show_default=True,
        help="Vector distance of --by vector (scores: minus the distance, or the cosine).",
    )(f)
    f = click.option(
        "--alpha",
        type=click.FloatRange(0.0, 1.0),
        default=None,
        help="Keypoint weight of --by fused (default: both terms with the same spread).",
    )(f)
    return click.option(
        "--by",
        type=BY,
        default="keypoints",
        show_default=True,
        help="Rank by soft-Jaccard of the keypoints, by the stored CNN vectors, or by the "
        "fused model (the fusion paper's eq. 4).",
    )(f)


def format_score(score: float) -> str:
    """Four significant digits, so that small scores stay apart (0.00012, 3.4e-06)."""
    return f"{score:.4g}"


@click.command(context_settings=CONTEXT)
@index_argument()
@click.argument("query_arg", metavar="QUERY")
@count_option("-k", "k", default=10, help="Results to show.")
@click.option(
    "--exclude",
    multiple=True,
    metavar="SUBJECT_ID",
    help="Leave this subject out of the results (repeatable).",
)
@click.option(
    "--keep-self",
    is_flag=True,
    help="Keep the query's own entry when QUERY's subject is in INDEX (default: left out).",
)
@click.option(
    "--labels/--no-labels",
    "show_labels",
    default=True,
    show_default=True,
    help="Show each hit's labels.",
)
@device_option("Extraction of an image query and the search: a CUDA GPU or the CPU.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (rank,subject,score,labels...).")
@click.option(
    "--predicted",
    "predicted_label",
    metavar="LABEL",
    default=None,
    help="Search only the query's predicted class of LABEL (a classifier fitted on the "
    "indexed subjects' labels).",
)
@by_options
@search_option()
@dask_option("Search the index's sealed shards on this Dask scheduler (same results).")
@quiet_option("No notes on stderr.")
def query(
    index_path: Path,
    query_arg: str,
    k: int,
    exclude: tuple[str, ...],
    keep_self: bool,
    show_labels: bool,
    device: str,
    as_csv: bool,
    search: str,
    quiet: bool,
    predicted_label: str | None,
    by: str,
    alpha: float | None,
    metric: str,
    dask_address: str | None,
) -> None:
    """Rank the subjects of INDEX by similarity to QUERY: an image, a keypoint file or
    the id of a subject in INDEX (--by vector/fused: an image or a subject id).

    A query whose subject is in INDEX (by id, or by file name) leaves its own entry out
    of the results, since it would rank first with score 1.

    \b
    Examples:
      keyfuse query cohort.kfi new_scan.nii.gz -k 5
      keyfuse query cohort.kfi sub-003 --exclude sub-004     # by subject id
      keyfuse query cohort.kfi keys/sub-003.kfk --csv > hits.csv
      keyfuse query cohort.kfi sub-003 --by fused --predicted group
    """
    from keyfuse._io import subject_id_from_path
    from keyfuse.device import resolve_device

    resolve_device(device)  # --device cuda without a GPU: one clear error, before the work
    idx = open_index(index_path)
    path = Path(query_arg)
    if path.is_file():
        sid = subject_id_from_path(path)
        if by == "keypoints":
            query_obj: Any = load_keypoints(path, device)
        elif path.suffix in (".kfk", ".key"):
            raise InvalidArgumentError(
                f"--by {by} needs the query's CNN vector: pass an image or a subject id, "
                f"not the keypoint file {path}"
            )
        else:
            query_obj = str(path)
    elif query_arg in idx:
        sid = query_arg
        query_obj = idx.keypoints(query_arg) if by == "keypoints" else query_arg
    elif path.is_dir():
        raise InvalidArgumentError(f"{path} is a directory: QUERY is one image or keypoint file")
    else:
        raise KeyfuseIOError(
            f"{query_arg}: no such file, and no subject of that id in {index_path} "
            f"(e.g. {', '.join(idx.subjects[:3])})"
        )
    excluded = [e for e in exclude if e in idx]
    unknown = [e for e in exclude if e not in idx]
    if unknown:
        raise InvalidArgumentError(f"--exclude: {', '.join(unknown)} not in {index_path}")
    if sid in idx and not keep_self:
        excluded.append(sid)
        if not quiet and not as_csv:
            click.echo(f"({sid} left out: the query's own entry; --keep-self keeps it)", err=True)
    if len(set(excluded)) >= len(idx):
        raise InvalidArgumentError("every subject of the index is excluded")
    if isinstance(query_obj, str) and query_obj in idx and keep_self:
        # an id query leaves itself out: pass its parts instead
        vec = idx.vector(query_obj)
        query_obj = (None if by == "vector" else idx.keypoints(query_obj), vec)
    gone = set(excluded)
    restrict: Any = [s for s in idx.subjects if s not in gone] if excluded else None
    if predicted_label:
        restrict = {predicted_label: "predicted"}  # the excluded are filtered below
    hits = idx.search(
        query_obj,
        k=None if predicted_label else k,
        restrict=restrict,
        by=by,
        alpha=alpha,
        metric=metric,
        exact=SEARCH_EXACT[search],
        device=device,
        scheduler=dask_address,
    )
    if hits.predicted and not quiet and not as_csv:
        said = ", ".join(f"{n} = {v}" for n, v in hits.predicted.items())
        click.echo(f"(searching the predicted class: {said})", err=True)
    if predicted_label:
        hits = type(hits)([h for h in hits if h.subject_id not in gone][:k], labels=hits.labels)
    names = sorted({n for lab in hits.labels.values() for n in lab}) if show_labels else []
    if as_csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["rank", "subject", "score", *names])
        for r, (hit_id, score) in enumerate(hits, 1):
            w.writerow(
                [r, hit_id, f"{score:.6g}", *(hits.labels[hit_id].get(n, "") for n in names)]
            )
        return
    width = max([7, *(len(h.subject_id) for h in hits)])
    click.echo(f"{'rank':>4}  {'score':>9}  {'subject':<{width}}  {'  '.join(names)}".rstrip())
    for r, (hit_id, score) in enumerate(hits, 1):
        labs = "  ".join(str(hits.labels[hit_id].get(n, "")) for n in names)
        click.echo(f"{r:>4}  {format_score(score):>9}  {hit_id:<{width}}  {labs}".rstrip())


@click.command(context_settings=CONTEXT)
@index_argument()
@path_option(
    "-o",
    "--out",
    required=True,
    help="CSV file: a header of subject ids, then one row per subject; with --blocks "
    "or --top-k, a directory of Parquet row blocks.",
)
@click.option(
    "--blocks",
    is_flag=True,
    help="Write OUT as Parquet row blocks as they finish (resumable: rerun to finish).",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=None,
    help="Keep each row's best K other subjects only (row blocks; for > 20,000 subjects).",
)
@by_options
@search_option()
@device_option("The all-pairs scoring: a CUDA GPU (exact search) or the CPU.")
@dask_option("Score the rows on this Dask scheduler (same results).")
@quiet_option("No progress bar.")
def pairwise(
    index_path: Path,
    out: Path,
    blocks: bool,
    top_k: int | None,
    dask_address: str | None,
    search: str,
    device: str,
    quiet: bool,
    by: str,
    alpha: float | None,
    metric: str,
) -> None:
    """Write the N×N similarity matrix of every pair in INDEX (soft-Jaccard, or --by
    vector / fused).

    Row i, column j is the similarity of subject i (query) to subject j.

    \b
    Example:
      keyfuse pairwise cohort.kfi -o similarity.csv
    """
    import numpy as np

    from keyfuse._io import atomic_path
    from keyfuse.device import resolve_device

    resolve_device(device)
    idx = open_index(index_path)
    if blocks or top_k is not None:
        if by != "keypoints":
            raise InvalidArgumentError("--blocks/--top-k score keypoints (--by keypoints)")
        idx.pairwise(
            exact=SEARCH_EXACT[search], scheduler=dask_address, out=out, top_k=top_k,
            progress=not quiet,
        )  # fmt: skip
        click.echo(f"wrote the row blocks of {len(idx)} subjects -> {out}")
        return
    mat = np.asarray(
        idx.pairwise(
            by=by, alpha=alpha, metric=metric, exact=SEARCH_EXACT[search], device=device,
            scheduler=dask_address,
        ),
        dtype=np.float64,
    )  # fmt: skip
    ids = [str(s) for s in idx.subjects]
    with atomic_path(out) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", *ids])
        for sid, row in zip(ids, mat, strict=True):
            w.writerow([sid, *(f"{v:.6g}" for v in row)])
    click.echo(f"wrote {mat.shape[0]}×{mat.shape[1]} matrix -> {out}")
