"""What the commands read from the paths a user names: keypoint files or images (or
folders of them), label tables and on-disk indexes. The library is imported inside each
function, so ``keyfuse --help`` stays fast."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keyfuse._io import IMAGE_SUFFIXES, KEY_SUFFIXES
from keyfuse.errors import InvalidArgumentError, KeyfuseIOError


def is_keypoint_file(path: Path) -> bool:
    return path.name.endswith(KEY_SUFFIXES)


def image_suffixes() -> tuple[str, ...]:
    """What counts as an image: volumes, 2D images (PNG/JPEG/TIFF/BMP) and DICOM files."""
    from keyfuse.formats import DICOM_SUFFIXES, RASTER_SUFFIXES

    return (*IMAGE_SUFFIXES, *RASTER_SUFFIXES, *DICOM_SUFFIXES)


def is_image_file(path: Path) -> bool:
    return path.name.lower().endswith(image_suffixes())


def keypoint_sources(paths: Sequence[Path]) -> list[Path]:
    """Keypoint files and images named directly or found in directories."""
    from keyfuse.formats.dicom import is_dicom_directory

    out: list[Path] = []
    for p in paths:
        if is_dicom_directory(p):  # one DICOM series is one image
            out.append(p)
        elif p.is_dir():
            found = sorted(
                f for f in p.iterdir() if f.is_file() and (is_keypoint_file(f) or is_image_file(f))
            )
            if not found:
                raise InvalidArgumentError(
                    f"no .kfk/.key keypoint files or images ({', '.join(image_suffixes())}) in {p}"
                )
            out.extend(found)
        elif not p.exists():
            raise KeyfuseIOError(f"no such file or directory: {p}")
        elif is_keypoint_file(p) or is_image_file(p):
            out.append(p)
        else:
            raise InvalidArgumentError(
                f"{p} is neither a keypoint file (.kfk/.key) nor an image "
                f"({', '.join(image_suffixes())})"
            )
    return out


def load_keypoints(path: Path, device: str) -> Any:
    """Read a keypoint file or extract keypoints from an image (any format the image
    reader supports)."""
    from keyfuse.keypoints import KeypointSet, read_key

    if path.name.endswith(".kfk"):
        return KeypointSet.load(path)
    if path.name.endswith(".key"):
        return read_key(path)
    from keyfuse.extraction import extract

    return extract(path, device=device)


def read_label_table(
    path: Path, id_column: str | None, columns: str | None = None
) -> dict[str, dict[str, str]]:
    """A CSV or TSV table → {subject id: {column: value}}.

    The delimiter is a tab for ``.tsv`` files (BIDS ``participants.tsv``), else sniffed
    (comma, tab or semicolon). The id column is ``id_column``, else ``subject``, else
    BIDS's ``participant_id``, else the first; ``columns`` ("A,B") keeps only those
    columns, each of which must exist. BIDS's ``n/a`` marks a missing value (left out).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyfuseIOError(f"cannot read label table {path}: {exc}") from exc
    if path.name.endswith(".tsv"):
        delimiter = "\t"
    else:
        try:
            delimiter = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",\t;").delimiter
        except csv.Error:
            delimiter = ","
    try:
        rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    except csv.Error as exc:
        raise KeyfuseIOError(f"cannot read label table {path}: {exc}") from exc
    if not rows:
        raise InvalidArgumentError(f"label table {path} has no rows")
    cols = [c for c in rows[0] if c is not None]
    if id_column:
        col = id_column
    else:
        col = next((c for c in ("subject", "participant_id") if c in cols), cols[0])
    if col not in cols:
        raise InvalidArgumentError(
            f"label table {path} has no column {col!r} (columns: {', '.join(cols)}); "
            "name the id column with --id-column"
        )
    keep = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    if keep:
        missing = [c for c in keep if c not in cols]
        if missing:
            raise InvalidArgumentError(
                f"--columns names {', '.join(missing)}, not in label table {path} "
                f"(columns: {', '.join(cols)})"
            )
    return {
        str(r[col]).strip(): {
            k: v
            for k, v in r.items()
            if k != col and k is not None and v not in (None, "n/a") and (not keep or k in keep)
        }
        for r in rows
    }


def labels_for(sid: str, labels: dict[str, dict[str, str]]) -> dict[str, str] | None:
    """The row of ``labels`` for subject ``sid``: by its id, else by its BIDS subject
    entity (``sub-01_ses-1_T1w`` → ``sub-01``, as in ``participants.tsv``)."""
    if sid in labels:
        return labels[sid]
    entity = sid.split("_", 1)[0]
    if entity.startswith("sub-") and entity in labels:
        return labels[entity]
    return None


def match_labels(
    ids: Sequence[str], labels: dict[str, dict[str, str]], table: Path | None
) -> tuple[dict[str, dict[str, str]], str | None]:
    """Each subject's labels, and a warning (or None) when some subjects have no row.

    Raises :class:`InvalidArgumentError` when a table was given but no subject is in it
    (an index without its labels is almost never what was meant).
    """
    if table is None:
        return {}, None
    found = {sid: row for sid in ids if (row := labels_for(sid, labels)) is not None}
    unmatched = [sid for sid in ids if sid not in found]
    if ids and not found:
        raise InvalidArgumentError(
            f"none of the {len(ids)} subjects is in label table {table} "
            f"(subjects: {', '.join(ids[:3])}, ...; table ids: "
            f"{', '.join(list(labels)[:3])}, ...): check --id-column"
        )
    warning = None
    if unmatched:
        warning = (
            f"warning: {len(unmatched)} of {len(ids)} subjects have no row in {table} "
            f"(e.g. {', '.join(unmatched[:3])}): they are indexed without labels"
        )
    return found, warning


def subject_sources(sources: Sequence[Path]) -> dict[str, Path]:
    """{subject id: source}, refusing two files that would be the same subject (a
    ``.kfk`` and a ``.key`` of one scan, or one name in two folders)."""
    from keyfuse._io import subject_id_from_path

    out: dict[str, Path] = {}
    for src in sources:
        sid = subject_id_from_path(src)
        if sid in out:
            raise InvalidArgumentError(
                f"{out[sid]} and {src} would both be subject {sid!r} (the subject id is the "
                "file name without its suffix): pass only one of them, e.g. only the .kfk "
                "files (keys/*.kfk)"
            )
        out[sid] = src
    return out


def add_to_index(
    index: Any,
    sources: Sequence[Path],
    labels: dict[str, dict[str, str]],
    *,
    device: str,
    quiet: bool,
    skip_existing: bool = False,
    vectors: bool = False,
) -> tuple[int, int]:
    """Add keypoint files or images to ``index`` as one atomic append (all or nothing),
    each under its subject id (:func:`keyfuse._io.subject_id_from_path`) with its row of
    ``labels``, and with ``vectors`` each image's CNN vector (:class:`keyfuse.CNNFeatures`,
    the default network); returns (added, skipped as already in the index)."""
    from tqdm.auto import tqdm

    by_id = subject_sources(sources)
    present = [sid for sid in by_id if sid in index]
    if present and not skip_existing:
        raise InvalidArgumentError(
            f"{len(present)} subject(s) already in the index (e.g. {', '.join(present[:3])}); "
            "nothing was added. Pass --skip-existing to add only the new ones, or remove "
            "them first with 'keyfuse index remove'"
        )
    todo = [(sid, src) for sid, src in by_id.items() if sid not in index]
    cnn = None
    if vectors:
        not_images = [str(src) for _, src in todo if is_keypoint_file(src)]
        if not_images:
            raise InvalidArgumentError(
                f"--vectors needs images, but {len(not_images)} source(s) are keypoint files "
                f"(e.g. {not_images[0]}); nothing was added"
            )
        from keyfuse.cnn import CNNFeatures

        cnn = CNNFeatures(device=device)
    items: list[tuple[str, Any, Any, dict[str, str]]] = []
    for sid, src in tqdm(todo, desc="read", unit="file", disable=quiet):
        if cnn is None:
            items.append((sid, load_keypoints(src, device), None, labels.get(sid, {})))
            continue
        from keyfuse.extraction import extract
        from keyfuse.image import load_image

        img = load_image(src)  # read once: keypoints and vector from the same image
        items.append((sid, extract(img, device=device), cnn(img), labels.get(sid, {})))
    index.add_many(items, source=[str(src) for _, src in todo], device=device)
    return len(items), len(present)


def open_index(path: Path, mode: str = "r") -> Any:
    from keyfuse.index import Index

    return Index(path, mode=mode)


def source_labels(
    paths: Sequence[Path], labels_csv: Path | None, id_column: str | None, columns: str | None
) -> tuple[dict[str, dict[str, str]], str | None]:
    """The labels of the subjects of ``paths`` from a ``--labels`` table (see
    :func:`match_labels`)."""
    if labels_csv is None:
        return {}, None
    table = read_label_table(labels_csv, id_column, columns)
    return match_labels(list(subject_sources(paths)), table, labels_csv)
