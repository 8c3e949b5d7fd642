"""The files around a keypoint-transfer segmentation: pairing atlas images with their
label maps, checking output paths before any work, and the BIDS look-up table
(``dseg.tsv``) written beside a label map."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from keyfuse._io import IMAGE_SUFFIXES, subject_id_from_path
from keyfuse.errors import InvalidArgumentError, KeyfuseIOError

__all__ = [
    "check_output_path",
    "dseg_tsv_path",
    "pair_atlas_files",
    "read_label_names",
    "write_image",
]

PathLike = str | os.PathLike[str]


#: the formats a label or probability map is written in: NIfTI, and FreeSurfer's MGH
OUTPUT_SUFFIXES = (*IMAGE_SUFFIXES, ".mgz", ".mgh")


def check_output_path(path: PathLike, what: str = "output") -> Path:
    """Check, before any work, that a label or probability map can be written to
    ``path``: a ``.nii.gz``/``.nii``/``.mgz``/``.mgh`` name in an existing (or creatable)
    folder."""
    p = Path(path)
    if p.is_dir():
        raise KeyfuseIOError(f"{what} {p} is a directory: give a file name ending .nii.gz")
    if not p.name.endswith(OUTPUT_SUFFIXES):
        raise InvalidArgumentError(
            f"{what} {p}: name it .nii.gz, .nii, .mgz or .mgh, e.g. {p.name}.nii.gz"
        )
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise KeyfuseIOError(f"{what} {p}: cannot write in {parent}")
    return p


def write_image(nifti: Any, path: Path) -> None:
    """Write a ``Nifti1Image`` to ``path`` atomically, as MGH when the name ends
    ``.mgz``/``.mgh`` (same voxels and affine), else as NIfTI."""
    import nibabel as nib
    import numpy as np

    from keyfuse._io import atomic_path

    image = nifti
    if path.name.endswith((".mgz", ".mgh")):
        data = np.asarray(nifti.dataobj)
        if data.dtype not in (np.uint8, np.int16, np.int32, np.float32):
            data = data.astype(np.float32 if data.dtype.kind == "f" else np.int32)
        image = nib.MGHImage(data, nifti.affine)
    with atomic_path(path) as tmp:
        image.to_filename(str(tmp))


def dseg_tsv_path(path: PathLike) -> Path:
    """The BIDS look-up table beside a label map: ``x_dseg.nii.gz`` → ``x_dseg.tsv``."""
    p = Path(path)
    for suffix in OUTPUT_SUFFIXES:
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)] + ".tsv")
    return p.with_suffix(".tsv")


# ------------------------------------------------------------------- atlas folders


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InvalidArgumentError(f"not a directory: {folder}")
    return sorted(p for p in folder.iterdir() if p.name.endswith(IMAGE_SUFFIXES))


def pair_atlas_files(atlases: Path, labels: Path) -> list[tuple[Path, Path]]:
    """Pair the images of ``atlases`` with the label maps of ``labels``: by identical file
    name (``.nii``/``.nii.gz`` ignored), else by a label name that starts with the image's
    name (``sub01.nii.gz`` ↔ ``sub01_labels.nii.gz``)."""
    images = _image_files(atlases)
    maps = _image_files(labels)
    if not images:
        raise InvalidArgumentError(f"no .nii/.nii.gz images in {atlases}")
    by_stem = {subject_id_from_path(p): p for p in maps}
    pairs = []
    for img in images:
        stem = subject_id_from_path(img)
        match = by_stem.get(stem)
        if match is None:
            cands = [p for s, p in by_stem.items() if s.startswith(stem)]
            if len(cands) != 1:
                raise InvalidArgumentError(
                    f"no unique label map in {labels} for atlas image {img.name}"
                )
            match = cands[0]
        pairs.append((img, match))
    return pairs


def read_label_names(path: PathLike) -> dict[int, str]:
    """{label value: name} from a BIDS look-up table (``dseg.tsv``: tab-separated, with
    columns ``index`` and ``name``); background (0) is left out."""
    import csv

    p = Path(path)
    try:
        with p.open(newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise KeyfuseIOError(f"cannot read label names {p}: {exc}") from exc
    if not rows or not {"index", "name"} <= set(rows[0]):
        raise InvalidArgumentError(f"{p}: a look-up table needs the columns 'index' and 'name'")
    try:
        names = {int(r["index"]): str(r["name"]) for r in rows}
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{p}: 'index' must hold integers ({exc})") from exc
    names.pop(0, None)
    return names
