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


def is_image_file(path: Path) -> bool:
    return path.name.endswith(IMAGE_SUFFIXES)


def keypoint_sources(paths: Sequence[Path]) -> list[Path]:
    """Keypoint files and images named directly or found in directories."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(
                f for f in p.iterdir() if f.is_file() and (is_keypoint_file(f) or is_image_file(f))
            )
            if not found:
                raise InvalidArgumentError(
                    f"no .kfk/.key keypoint files or .nii/.nii.gz images in {p}"
                )
            out.extend(found)
        elif not p.exists():
            raise KeyfuseIOError(f"no such file or directory: {p}")
        elif is_keypoint_file(p) or is_image_file(p):
            out.append(p)
        else:
            raise InvalidArgumentError(
                f"{p} is neither a keypoint file (.kfk/.key) nor a NIfTI image"
            )
    return out


def load_keypoints(path: Path, device: str) -> Any:
    """Read a keypoint file or extract keypoints from an image."""
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
    """A CSV table → {subject id: {column: value}}; the id column is ``id_column``, else
    ``subject``, else the first; ``columns`` ("A,B") keeps only those columns."""
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
    keep = [c.strip() for c in columns.split(",")] if columns else None
    return {
        str(r[col]): {
            k: v for k, v in r.items() if k != col and k is not None and (not keep or k in keep)
        }
        for r in rows
    }


def add_to_index(
    index: Any,
    sources: Sequence[Path],
    labels: dict[str, dict[str, str]],
    *,
    device: str,
    quiet: bool,
) -> int:
    """Add keypoint files or images to ``index``, each under its subject id
    (:func:`keyfuse._io.subject_id_from_path`) with its row of ``labels``; returns how
    many."""
    from tqdm.auto import tqdm

    from keyfuse._io import subject_id_from_path

    for src in tqdm(sources, desc="index", unit="file", disable=quiet):
        sid = subject_id_from_path(src)
        index.add(sid, load_keypoints(src, device), **labels.get(sid, {}))
    return len(sources)


def open_index(path: Path) -> Any:
    from keyfuse.index import Index

    return Index.load(path)
