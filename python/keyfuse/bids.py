"""BIDS datasets: keypoints of every T1w scan, written as a BIDS derivative.

>>> res = kf.bids.extract_bids("ds000001")               # -> ds000001/derivatives/keyfuse
>>> res = kf.bids.extract_bids("ds000001", index="cohort.kfi")  # and index them

The scans are ``sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_...]_T1w.nii[.gz]``.
Each gives one keypoint file in the derivative, named as BIDS names derivatives: the
source file's entities kept, its suffix ``T1w`` replaced by the derivative's
(``keypoints``) and the keyfuse extension::

    derivatives/keyfuse/
      dataset_description.json      Name, BIDSVersion, DatasetType "derivative", GeneratedBy
      sub-01/ses-1/anat/sub-01_ses-1_keypoints.kfk
      sub-02/anat/sub-02_acq-mprage_run-1_keypoints.kfk

Extraction is :func:`keyfuse.batch.run_batch`'s (schedulers, resume, ``failures.csv``).
Indexed, each scan is the subject named by its entities (``sub-01_ses-1``, or ``sub-02``
for a scan with no other entity), labelled with its participant's row of
``participants.tsv`` (every column; ``n/a`` is a missing value).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyfuse.batch import FAILURES_FILE, BatchResult, extract_task, run_batch
from keyfuse.batch_build import BuildResult, build_index
from keyfuse.errors import InvalidArgumentError, KeyfuseIOError

__all__ = ["BidsResult", "BidsScan", "derivative_path", "extract_bids", "find_t1w"]

BIDS_VERSION = "1.9.0"
SUFFIX = "keypoints"  # the derivative's suffix, replacing the source's "T1w"
_T1W = re.compile(r"^(?P<entities>sub-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*)_T1w\.nii(?:\.gz)?$")


@dataclass(frozen=True)
class BidsScan:
    """One T1w scan: its path and its entities (``sub-01_ses-1_run-1``)."""

    path: Path
    entities: str

    @property
    def subject(self) -> str:
        """The participant (``sub-01``), as in ``participants.tsv``."""
        return self.entities.split("_", 1)[0]

    @property
    def session(self) -> str | None:
        """The session (``ses-1``), or None."""
        return next((e for e in self.entities.split("_") if e.startswith("ses-")), None)


@dataclass
class BidsResult:
    """What :func:`extract_bids` did: the scans, the extraction batch, the derivative's
    folder, and the index build when one was asked for."""

    scans: list[BidsScan]
    extraction: BatchResult
    derivative: Path
    build: BuildResult | None = None

    @property
    def ok(self) -> bool:
        """True when every scan was extracted (and indexed)."""
        return self.extraction.ok and (self.build is None or self.build.ok)


def find_t1w(dataset: str | os.PathLike[str]) -> list[BidsScan]:
    """The T1w scans of a BIDS dataset, sorted by path.

    Raises
    ------
    KeyfuseIOError
        ``dataset`` is not a directory.
    InvalidArgumentError
        It has no ``sub-*`` folders (not a BIDS dataset), or none of them holds a
        ``*_T1w.nii[.gz]`` in an ``anat`` folder.
    """
    root = Path(dataset)
    if not root.is_dir():
        raise KeyfuseIOError(f"no such BIDS dataset directory: {root}")
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if not subjects:
        raise InvalidArgumentError(
            f"{root} is not a BIDS dataset: it has no sub-<label> folders "
            "(expected sub-*/[ses-*/]anat/*_T1w.nii[.gz])"
        )
    scans: list[BidsScan] = []
    for sub in subjects:
        for anat in sorted([sub / "anat", *(s / "anat" for s in sub.glob("ses-*"))]):
            if not anat.is_dir():
                continue
            for f in sorted(anat.iterdir()):
                m = _T1W.match(f.name)
                if m is None or not f.is_file():
                    continue
                entities = m["entities"]
                if entities.split("_", 1)[0] != sub.name:
                    raise InvalidArgumentError(
                        f"{f} is in {sub.name}/ but names {entities.split('_', 1)[0]}: "
                        "a BIDS file's sub- entity must match its folder"
                    )
                scans.append(BidsScan(f, entities))
    if not scans:
        raise InvalidArgumentError(
            f"no T1w scans in {root}: looked for sub-*/[ses-*/]anat/*_T1w.nii[.gz] in "
            f"{len(subjects)} sub-* folders"
        )
    return scans


def derivative_path(scan: BidsScan, out: str | os.PathLike[str], fmt: str = "kfk") -> Path:
    """Where a scan's keypoints go: ``out/sub-01/[ses-1/]anat/<entities>_keypoints.kfk``."""
    folder = Path(out) / scan.subject
    if scan.session:
        folder = folder / scan.session
    return folder / "anat" / f"{scan.entities}_{SUFFIX}.{fmt}"


def write_dataset_description(out: Path, dataset: Path) -> Path:
    """The derivative's ``dataset_description.json`` (BIDS-Derivatives fields), written
    atomically."""
    import keyfuse
    from keyfuse._io import atomic_path

    desc: dict[str, Any] = {
        "Name": f"keyfuse keypoints of {dataset.resolve().name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "keyfuse",
                "Version": keyfuse.__version__,
                "Description": "3D SIFT-Rank keypoints, one file per T1w scan "
                "(<entities>_keypoints.kfk: kf.KeypointSet.load; .key: featExtract text)",
            }
        ],
        "SourceDatasets": [{"URL": dataset.resolve().as_uri()}],
    }
    path = out / "dataset_description.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(desc, indent=2) + "\n")
    except OSError as exc:
        raise KeyfuseIOError(f"cannot write {path}: {exc}") from exc
    return path


def extract_bids(
    dataset: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    index: str | os.PathLike[str] | None = None,
    scheduler: Any = None,
    n_workers: int | None = None,
    device: str = "auto",
    fmt: str = "kfk",
    overwrite: bool = False,
    progress: bool = True,
    **params: Any,
) -> BidsResult:
    """Extract the keypoints of every T1w scan of a BIDS dataset into a BIDS derivative,
    and optionally append them to an index labelled from ``participants.tsv``.

    Parameters
    ----------
    dataset : the BIDS dataset's root folder.
    out : the derivative folder (default ``dataset/derivatives/keyfuse``).
    index : an on-disk index to append the scans to (created when missing; scans
        already in it are skipped), labelled with ``participants.tsv`` when there is one
        (a participant missing from it: :class:`~keyfuse.errors.UnlabelledSubjectsWarning`).
    scheduler, n_workers, device, fmt, overwrite, progress, **params : as for
        :func:`keyfuse.batch.extract_batch` (resume: existing keypoint files are kept).

    Returns
    -------
    BidsResult
        The scans, the extraction's :class:`~keyfuse.batch.BatchResult` (failures also
        in ``out/failures.csv``) and, with ``index``, the build's result.
    """
    root = Path(dataset)
    task = extract_task(device, fmt, params)
    scans = find_t1w(root)
    deriv = Path(out) if out is not None else root / "derivatives" / "keyfuse"
    write_dataset_description(deriv, root)
    outs = [derivative_path(s, deriv, fmt) for s in scans]
    res = run_batch(
        task,
        [s.path for s in scans],
        outs,
        scheduler=scheduler,
        n_workers=n_workers,
        overwrite=overwrite,
        progress=progress,
        desc="extract",
        failures_path=deriv / FAILURES_FILE,
    )
    result = BidsResult(scans=scans, extraction=res, derivative=deriv)
    if index is not None:
        done = {s.entities: o for s, o in zip(scans, outs, strict=True) if o.exists()}
        if done:
            table = root / "participants.tsv"
            result.build = build_index(
                done,
                index,
                labels=table if table.exists() else None,
                scheduler=None if scheduler in (None, "local", "processes") else scheduler,
                n_workers=n_workers,
                progress=progress,
            )
    return result
