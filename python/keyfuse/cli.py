"""The ``keyfuse`` command line.

Every command has ``--help`` with examples. Bad input ends with a one-line
``Error: ...`` message and a non-zero exit status (1; 2 for usage errors), never a
traceback. Heavy modules load only when a command needs them, and the commands that
other modules provide (``segment``, ``evaluate fusion``) are looked up lazily, so a
missing optional part never breaks the rest of the CLI.
"""

from __future__ import annotations

import csv
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from keyfuse.errors import InvalidArgumentError, KeyfuseError, KeyfuseIOError

KEY_SUFFIXES = (".kfk", ".key")
IMAGE_SUFFIXES = (".nii.gz", ".nii")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """A click group whose extra commands live in other modules (``name → (module,
    attribute, short help)``), imported only when used; errors become clean messages."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str, str]] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None or cmd_name not in self.lazy:
            return cmd
        module, attr, short = self.lazy[cmd_name]
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            return _unavailable(cmd_name, short, reason)
        if not isinstance(found, click.Command):
            return _unavailable(cmd_name, short, f"{module}.{attr} is not a click command")
        return found

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyfuseError as exc:
            raise click.ClickException(str(exc)) from exc
        except ImportError as exc:  # an optional part of keyfuse or a dependency is missing
            raise click.ClickException(f"missing module: {exc}") from exc
        except OSError as exc:
            msg = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            raise click.ClickException(msg) from exc


def _unavailable(name: str, short: str, reason: str) -> click.Command:
    def fail() -> None:
        raise click.ClickException(f"'keyfuse {name}' is unavailable here ({reason})")

    return click.Command(
        name,
        callback=fail,
        help=f"{short} [unavailable: {reason}]",
        short_help=f"{short} [unavailable]",
    )


@click.group(
    "keyfuse",
    cls=_Group,
    context_settings=CONTEXT,
    lazy={
        "segment": ("keyfuse.segment", "segment_command", "Segment an image by keypoint transfer.")
    },
)
@click.version_option(package_name="keyfuse", prog_name="keyfuse")
def cli() -> None:
    """keyfuse: 3D keypoint signatures for indexing, retrieving and segmenting cohorts.

    \b
    A typical session:
      keyfuse simulate cohort/ --families 6          # a synthetic cohort with ground truth
      keyfuse extract cohort/images -o keys/         # keypoints, one .kfk per image
      keyfuse index build keys/ -o cohort.kfi --labels cohort/cohort.csv
      keyfuse query cohort.kfi new_scan.nii.gz -k 5  # most similar subjects
      keyfuse evaluate family cohort/ --keys keys/   # family AUC and mAP
      keyfuse demo                                   # all of it, end to end
    """


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``keyfuse`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="keyfuse")


# ------------------------------------------------------------------------ helpers


def _is_key(path: Path) -> bool:
    return path.name.endswith(KEY_SUFFIXES)


def _is_image(path: Path) -> bool:
    return path.name.endswith(IMAGE_SUFFIXES)


def _stem(path: Path) -> str:
    for suf in (*IMAGE_SUFFIXES, *KEY_SUFFIXES):
        if path.name.endswith(suf):
            return path.name[: -len(suf)]
    return path.stem


def _sources(paths: Sequence[Path]) -> list[Path]:
    """Keypoint files and images named directly or found in directories."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and (_is_key(f) or _is_image(f)))
            if not found:
                raise InvalidArgumentError(
                    f"no .kfk/.key keypoint files or .nii/.nii.gz images in {p}"
                )
            out.extend(found)
        elif not p.exists():
            raise KeyfuseIOError(f"no such file or directory: {p}")
        elif _is_key(p) or _is_image(p):
            out.append(p)
        else:
            raise InvalidArgumentError(
                f"{p} is neither a keypoint file (.kfk/.key) nor a NIfTI image"
            )
    return out


def _keypoints(path: Path, device: str) -> Any:
    """Read a keypoint file or extract keypoints from an image."""
    from keyfuse.keypoints import KeypointSet, read_key

    if path.name.endswith(".kfk"):
        return KeypointSet.load(path)
    if path.name.endswith(".key"):
        return read_key(path)
    from keyfuse.extraction import extract

    return extract(path, device=device)


def _read_labels(path: Path, id_column: str | None) -> tuple[str, dict[str, dict[str, str]]]:
    """A CSV table → (id column, {subject id: {column: value}})."""
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise KeyfuseIOError(f"cannot read label table {path}: {exc}") from exc
    if not rows:
        raise InvalidArgumentError(f"label table {path} has no rows")
    cols = list(rows[0])
    col = id_column or ("subject" if "subject" in cols else cols[0])
    if col not in cols:
        raise InvalidArgumentError(f"label table {path} has no column {col!r} (columns: {cols})")
    table: dict[str, dict[str, str]] = {}
    for r in rows:
        sid = str(r[col])
        table[sid] = {k: v for k, v in r.items() if k != col and k is not None}
    return col, table


def _add_sources(
    index: Any,
    sources: Sequence[Path],
    labels: dict[str, dict[str, str]],
    columns: Sequence[str] | None,
    device: str,
    quiet: bool,
) -> int:
    from tqdm.auto import tqdm

    n = 0
    for src in tqdm(sources, desc="index", unit="file", disable=quiet):
        sid = _stem(src)
        extra = labels.get(sid, {})
        if columns:
            extra = {k: v for k, v in extra.items() if k in columns}
        index.add(sid, _keypoints(src, device), **extra)
        n += 1
    return n


def _index_ids(index: Any) -> list[str]:
    for name in ("subject_ids", "subjects", "ids"):
        val = getattr(index, name, None)
        if val is not None:
            val = val() if callable(val) else val
            return [str(v) for v in val]
    raise KeyfuseError("this index does not expose its subject ids")


def _open_index(path: Path) -> Any:
    from keyfuse.index import Index

    return Index.load(path)


def _hits(found: Any) -> list[tuple[str, float]]:
    from keyfuse.demo import hits_to_pairs

    return hits_to_pairs(found)


# ------------------------------------------------------------------------ extract


@cli.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory: one NAME.kfk per NAME.nii(.gz), plus failures.csv.",
)
@click.option(
    "--dask",
    "dask_address",
    default=None,
    metavar="ADDRESS",
    help="Run on this Dask scheduler (e.g. tcp://10.0.0.5:8786); workers must see the paths.",
)
@click.option(
    "--scheduler",
    type=click.Choice(["local", "processes", "threads", "sync"]),
    default="local",
    show_default=True,
    help="Without --dask: local Dask cluster (threads), Dask processes, a plain "
    "thread pool, or one at a time.",
)
@click.option(
    "-j",
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Parallel extractions (default: number of CPUs).",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["kfk", "key"]),
    default="kfk",
    show_default=True,
    help="kfk: compact binary; key: featExtract text format.",
)
@click.option("--overwrite", is_flag=True, help="Recompute outputs that already exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def extract(
    images: tuple[Path, ...],
    out: Path,
    dask_address: str | None,
    scheduler: str,
    workers: int | None,
    device: str,
    fmt: str,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Extract 3D SIFT-Rank keypoints from IMAGES (files or directories of .nii/.nii.gz).

    Existing outputs are skipped, so re-running a command resumes it. A file that
    fails is listed in OUT/failures.csv and the batch goes on; the exit status is 1
    if any file failed.

    \b
    Examples:
      keyfuse extract scans/ -o keys/
      keyfuse extract a.nii.gz b.nii.gz -o keys/ --format key
      keyfuse extract /data/ukb/*.nii.gz -o keys/ --dask tcp://scheduler:8786
    """
    from keyfuse.batch import FAILURES_FILE, extract_batch

    res = extract_batch(
        list(images),
        out,
        scheduler=dask_address or scheduler,
        n_workers=workers,
        device=device,
        fmt=fmt,
        overwrite=overwrite,
        progress=not quiet,
    )
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


# -------------------------------------------------------------------------- index


@cli.group(cls=_Group, context_settings=CONTEXT)
def index() -> None:
    """Build, extend and inspect an on-disk keypoint index (a directory of Parquet files)."""


_labels_opt = click.option(
    "--labels",
    "labels_csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CSV table of per-subject labels (e.g. a cohort.csv); rows are matched "
    "to files by the id column and the file name without suffix.",
)
_idcol_opt = click.option(
    "--id-column", default=None, help="Id column of --labels (default: 'subject', else the first)."
)
_cols_opt = click.option(
    "--columns",
    default=None,
    metavar="A,B",
    help="Only these label columns (default: all but the id).",
)


@index.command("build", context_settings=CONTEXT)
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", required=True, type=click.Path(path_type=Path), help="Index directory."
)
@_labels_opt
@_idcol_opt
@_cols_opt
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="For sources that are images (keypoints are extracted on the fly).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing index.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def index_build(
    sources: tuple[Path, ...],
    out: Path,
    labels_csv: Path | None,
    id_column: str | None,
    columns: str | None,
    device: str,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Build an index from keypoint files (.kfk/.key) or images, or directories of them.

    The subject id of each entry is its file name without suffix.

    \b
    Examples:
      keyfuse index build keys/ -o cohort.kfi --labels cohort/cohort.csv --columns family,group
      keyfuse index build scans/*.nii.gz -o scans.kfi
    """
    import shutil

    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{out} exists: use 'keyfuse index add' or --overwrite")
    srcs = _sources(sources)
    labels = _read_labels(labels_csv, id_column)[1] if labels_csv else {}
    cols = [c.strip() for c in columns.split(",")] if columns else None
    from keyfuse.index import Index

    idx = Index()
    n = _add_sources(idx, srcs, labels, cols, device, quiet)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    idx.save(out)
    click.echo(f"indexed {n} subjects -> {out}")


@index.command("add", context_settings=CONTEXT)
@click.argument("index_path", metavar="INDEX", type=click.Path(exists=True, path_type=Path))
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@_labels_opt
@_idcol_opt
@_cols_opt
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def index_add(
    index_path: Path,
    sources: tuple[Path, ...],
    labels_csv: Path | None,
    id_column: str | None,
    columns: str | None,
    device: str,
    quiet: bool,
) -> None:
    """Add keypoint files or images (or directories of them) to an existing INDEX.

    \b
    Example:
      keyfuse index add cohort.kfi new_keys/ --labels new.csv
    """
    idx = _open_index(index_path)
    srcs = _sources(sources)
    labels = _read_labels(labels_csv, id_column)[1] if labels_csv else {}
    cols = [c.strip() for c in columns.split(",")] if columns else None
    n = _add_sources(idx, srcs, labels, cols, device, quiet)
    idx.save(index_path)
    click.echo(f"added {n} subjects -> {index_path} ({len(idx)} in all)")


@index.command("info", context_settings=CONTEXT)
@click.argument("index_path", metavar="INDEX", type=click.Path(exists=True, path_type=Path))
def index_info(index_path: Path) -> None:
    """Summarise INDEX: subjects, keypoints, labels, size on disk.

    \b
    Example:
      keyfuse index info cohort.kfi
    """
    idx = _open_index(index_path)
    size = (
        sum(p.stat().st_size for p in index_path.rglob("*") if p.is_file())
        if index_path.is_dir()
        else index_path.stat().st_size
    )
    click.echo(f"index:      {index_path}")
    click.echo(f"subjects:   {len(idx)}")
    n_kp = getattr(idx, "n_keypoints", None)
    if n_kp is not None:
        n_kp = n_kp() if callable(n_kp) else n_kp
        click.echo(f"keypoints:  {int(n_kp)} ({int(n_kp) / max(len(idx), 1):.0f} per subject)")
    click.echo(f"disk:       {size / 1e6:.2f} MB")
    labels = getattr(idx, "labels", None)
    if isinstance(labels, dict):
        names = sorted({str(k) for lab in labels.values() for k in lab})
        click.echo(f"labels:     {', '.join(names) or '(none)'}")
    ids = _index_ids(idx)
    preview = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
    click.echo(f"first ids:  {preview}")


# -------------------------------------------------------------------- query/pairwise


def _search_option(f: Any) -> Any:
    """--search auto|exact|forest, for commands that search an index."""
    return click.option(
        "--search",
        type=click.Choice(["auto", "exact", "forest"]),
        default="auto",
        show_default=True,
        help="Nearest-neighbour search: exact brute force, the kd-forest, or auto (exact "
        "below the index's exact_below keypoints, 100,000 by default).",
    )(f)


_SEARCH_EXACT = {"auto": None, "exact": True, "forest": False}


@cli.command(context_settings=CONTEXT)
@click.argument("index_path", metavar="INDEX", type=click.Path(exists=True, path_type=Path))
@click.argument(
    "query_path",
    metavar="IMAGE_OR_KEY",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Results to show."
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (rank,subject,score).")
@_search_option
def query(
    index_path: Path, query_path: Path, k: int, device: str, as_csv: bool, search: str
) -> None:
    """Rank the subjects of INDEX by similarity to one image or keypoint file.

    \b
    Examples:
      keyfuse query cohort.kfi new_scan.nii.gz -k 5
      keyfuse query cohort.kfi keys/sub-003.kfk --csv > hits.csv
    """
    if not (_is_key(query_path) or _is_image(query_path)):
        raise InvalidArgumentError(f"{query_path} is neither a keypoint file nor a NIfTI image")
    idx = _open_index(index_path)
    kps = _keypoints(query_path, device)
    hits = _hits(idx.search(kps, k=k, exact=_SEARCH_EXACT[search]))
    if as_csv:
        click.echo("rank,subject,score")
        for r, (sid, score) in enumerate(hits, 1):
            click.echo(f"{r},{sid},{score:.6g}")
        return
    click.echo(f"{'rank':>4}  {'score':>8}  subject")
    for r, (sid, score) in enumerate(hits, 1):
        click.echo(f"{r:>4}  {score:8.4f}  {sid}")


@cli.command(context_settings=CONTEXT)
@click.argument("index_path", metavar="INDEX", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV file: a header of subject ids, then one row per subject.",
)
@_search_option
def pairwise(index_path: Path, out: Path, search: str) -> None:
    """Write the N×N soft-Jaccard similarity matrix of every pair in INDEX.

    Row i, column j is the similarity of subject i (query) to subject j.

    \b
    Example:
      keyfuse pairwise cohort.kfi -o similarity.csv
    """
    import numpy as np

    from keyfuse._io import atomic_path

    idx = _open_index(index_path)
    mat = np.asarray(idx.pairwise(exact=_SEARCH_EXACT[search]), dtype=np.float64)
    ids = _index_ids(idx)
    with atomic_path(out) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", *ids])
        for sid, row in zip(ids, mat, strict=True):
            w.writerow([sid, *(f"{v:.6g}" for v in row)])
    click.echo(f"wrote {mat.shape[0]}×{mat.shape[1]} matrix -> {out}")


# ----------------------------------------------------------------------- simulate


@cli.command(context_settings=CONTEXT)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--families", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--family-size", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--rescans",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="Individuals scanned twice.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resolution", type=float, default=1.5, show_default=True, help="Voxel size, mm.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def simulate(
    out_dir: Path,
    families: int,
    family_size: int,
    rescans: int,
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
        n_rescans=rescans,
        seed=seed,
        resolution_mm=resolution,
        progress=not quiet,
    )
    click.echo(f"simulated {len(c)} scans in {families} families -> {out_dir}")


# ----------------------------------------------------------------------- evaluate


@cli.group(
    cls=_Group,
    context_settings=CONTEXT,
    lazy={
        "fusion": (
            "keyfuse.fusion",
            "fusion_command",
            "Fusion of keypoints and CNN features (AUC table).",
        )
    },
)
def evaluate() -> None:
    """Evaluate retrieval and classification on a (simulated) cohort."""


def _cohort_scores(
    cohort: Any, keys_dir: Path | None, index_path: Path | None, device: str, quiet: bool
) -> Any:
    """The cohort's N×N score matrix from an index, or from keypoint files (extracted
    into COHORT/keys when absent)."""
    import numpy as np

    if index_path is not None:
        idx = _open_index(index_path)
        ids = _index_ids(idx)
        mat = np.asarray(idx.pairwise(), dtype=np.float64)
    else:
        from keyfuse.batch import extract_batch
        from keyfuse.index import Index
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
        ids = list(cohort.subjects)
        mat = np.asarray(idx.pairwise(), dtype=np.float64)
    pos = {s: i for i, s in enumerate(ids)}
    missing = [s for s in cohort.subjects if s not in pos]
    if missing:
        raise InvalidArgumentError(
            f"{len(missing)} cohort subjects are not in the index, e.g. {missing[0]}"
        )
    order = [pos[s] for s in cohort.subjects]
    return mat[np.ix_(order, order)]


@evaluate.command("family", context_settings=CONTEXT)
@click.argument("cohort_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keypoint files NAME.kfk per scan (default: COHORT_DIR/keys, extracted if missing).",
)
@click.option(
    "--index",
    "index_path",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Score with this index's pairwise matrix instead.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the ROC curve to this PNG.",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
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

    cohort = Cohort.load(cohort_dir)
    scores = _cohort_scores(cohort, keys_dir, index_path, device, quiet)
    report = ev.family_report(cohort, scores)
    for name, val in report.items():
        click.echo(f"{name:<22} {val:.4f}")
    if plot is not None:
        ps, pl = ev.family_pairs(cohort, scores)
        ev.roc_plot({"same vs different family": (ps, pl)}, plot)
        click.echo(f"ROC plot -> {plot}")


# --------------------------------------------------------------------------- demo


@cli.command(context_settings=CONTEXT)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-output"),
    show_default=True,
    help="Output directory (cohort, keys, index, roc.png, report.json).",
)
@click.option("--families", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--family-size", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--rescans", type=click.IntRange(min=0), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resolution", type=float, default=1.5, show_default=True, help="Voxel size, mm.")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--dask",
    "dask_address",
    default=None,
    metavar="ADDRESS",
    help="Extract on this Dask scheduler instead of a local thread pool.",
)
@click.option("-j", "--workers", type=click.IntRange(min=1), default=None)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo(
    out: Path,
    families: int,
    family_size: int,
    rescans: int,
    seed: int,
    resolution: float,
    device: str,
    dask_address: str | None,
    workers: int | None,
    quiet: bool,
) -> None:
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

    cfg = DemoConfig(
        out=out,
        n_families=families,
        family_size=family_size,
        n_rescans=rescans,
        seed=seed,
        resolution_mm=resolution,
        device=device,
        scheduler=dask_address or "threads",
        n_workers=workers,
        progress=not quiet,
    )
    run_demo(cfg, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
