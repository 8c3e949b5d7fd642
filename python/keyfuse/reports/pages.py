"""Ready-made reports (subject, segmentation, cohort), ``kf.report`` and the loaders the
``keyfuse report`` command uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError, KeyfuseError, KeyfuseIOError
from keyfuse.reports import sections
from keyfuse.reports.document import Report

# -------------------------------------------------------------------- ready-made reports


def subject_report(
    image: Any,
    *,
    keypoints: Any = None,
    atlas: Any = "mni152",
    index: Any = None,
    images: Mapping[str, Any] | Callable[[str], Any] | None = None,
    k: int = 5,
    name: str | None = None,
    radiological: bool = False,
) -> Report:
    """A subject's page: its keypoints, its alignment to ``atlas`` (None: skipped) and,
    given an ``index``, its nearest subjects."""
    from keyfuse.plotting._slices import _as_image

    label = name or (
        Path(image).name.split(".")[0] if isinstance(image, (str, Path)) else "subject"
    )
    img = _as_image(image)
    kps = sections._keypoints_of(img, keypoints)
    rep = Report(f"keyfuse subject report: {label}", f"{len(kps)} keypoints")
    sections.keypoints_section(rep, img, kps, name=label, radiological=radiological)
    if atlas is not None:
        sections.alignment_section(
            rep, img, kps, atlas=atlas, name=label, radiological=radiological
        )
    if index is not None:
        excl = label if label in index else None
        sections.neighbours_section(
            rep, kps, index, query_image=img, images=images, k=k, exclude=excl, name=label
        )
    return rep


def segmentation_report(
    image: Any,
    segmentation: Any,
    *,
    label_names: Mapping[int, str] | None = None,
    name: str | None = None,
    radiological: bool = False,
) -> Report:
    """A segmentation's page: overlay with legend, probability maps, label volumes."""
    label = name or (Path(image).name.split(".")[0] if isinstance(image, (str, Path)) else "")
    rep = Report(f"keyfuse segmentation report{': ' if label else ''}{label}")
    sections.segmentation_section(
        rep, image, segmentation, label_names=label_names, name=label, radiological=radiological
    )
    return rep


def cohort_report(
    cohort: Any,
    scores: npt.ArrayLike,
    *,
    keys: Sequence[Any] | None = None,
    n_subjects: int = 2,
    n_worst: int = 3,
    k: int = 5,
    atlas: Any = "mni152",
    title: str = "keyfuse cohort evaluation",
) -> Report:
    """A cohort evaluation's page: identification figures and curves, the worst queries
    as montages, and for ``n_subjects`` scans (rescanned individuals first) their
    keypoints, their alignment to their nearest scan and to ``atlas`` (None: skipped).
    ``keys``: the scans' KeypointSets or ``.kfk`` paths, one per scan (extracted if None).

    ``cohort`` is a :class:`keyfuse.datasets.Cohort` (its images and table); ``scores``
    the N×N similarity matrix (row = query), e.g. ``Index.pairwise()``."""
    s = np.asarray(scores, dtype=np.float64)
    n = len(cohort)
    if s.shape != (n, n):
        raise InvalidArgumentError(f"scores must be {n}×{n} for this cohort, got {s.shape}")
    if keys is not None and len(keys) != n:
        raise InvalidArgumentError(f"keys has {len(keys)} entries for {n} scans")
    rep = Report(title, f"{n} scans · {len({r['family'] for r in cohort.table})} families")
    sections.evaluation_section(rep, cohort, s)
    sections.worst_cases_section(rep, cohort, s, n_worst=n_worst, k=k)
    ids = cohort.subjects
    atlas_img = atlas_kps = None
    for i in _showcase(cohort, int(n_subjects)):
        img = cohort.image(i)
        kps = sections._keypoints_of(img, None if keys is None else keys[i])
        sections.keypoints_section(rep, img, kps, name=ids[i])
        # its nearest scan (a rescan or relative when retrieval works): the same anatomy
        j = int(np.argmax(np.where(np.arange(n) == i, -np.inf, s[i])))
        sections.alignment_section(
            rep,
            img,
            kps,
            atlas=cohort.image(j),
            atlas_keypoints=None if keys is None else keys[j],
            name=ids[i],
            target=f"{ids[j]}, its nearest scan",
        )
        if atlas is None:
            continue
        if atlas_img is None:
            try:
                atlas_img = sections._default_atlas(img) if atlas == "mni152" else atlas
                atlas_kps = sections._keypoints_of(atlas_img, None)
            except KeyfuseError as exc:
                rep.section("Alignment to the atlas").note(f"no atlas: {exc}")
                atlas = None
                continue
        sections.alignment_section(
            rep, img, kps, atlas=atlas_img, atlas_keypoints=atlas_kps, name=ids[i]
        )
    return rep


def _showcase(cohort: Any, n: int) -> list[int]:
    """Up to ``n`` scans to show in detail: scans with a rescan first (their nearest scan
    is the same anatomy), then table order."""
    from keyfuse import evaluate as ev

    ind = ev._individuals(cohort)
    rescanned = [i for i in range(len(ind)) if ind.count(ind[i]) > 1]
    seen: set[str] = set()
    first = []
    for i in rescanned:  # one scan per rescanned individual
        if ind[i] not in seen:
            seen.add(ind[i])
            first.append(i)
    rest = [i for i in range(len(ind)) if i not in first]
    return (first + rest)[: max(0, n)]


def report(
    path: str | PathLike[str],
    *,
    image: Any = None,
    keypoints: Any = None,
    atlas: Any = "mni152",
    index: Any = None,
    images: Mapping[str, Any] | Callable[[str], Any] | None = None,
    segmentation: Any = None,
    label_names: Mapping[int, str] | None = None,
    cohort: Any = None,
    scores: npt.ArrayLike | None = None,
    keys: Sequence[Any] | None = None,
    title: str | None = None,
    name: str | None = None,
    radiological: bool = False,
) -> Path:
    """Write one self-contained HTML report (``kf.report``) and return its path.

    What the page holds follows from the arguments: ``image`` → the subject's keypoints,
    its alignment to ``atlas`` ("mni152", an image, or None) and, with ``index``, its
    nearest subjects; ``image`` + ``segmentation`` → the overlay, probability maps and
    label volumes (instead of the subject sections); ``cohort`` + ``scores`` → the
    identification figures, ROC/PR curves, worst cases and a few subjects. ``name``
    titles the subject (default: the image's file name).
    """
    if image is None and cohort is None:
        raise InvalidArgumentError("report needs an image (subject/segmentation) or a cohort")
    if cohort is not None and scores is None:
        raise InvalidArgumentError("a cohort report needs the scores matrix (scores=...)")
    parts: list[Report] = []
    if image is not None and segmentation is not None:
        parts.append(
            segmentation_report(
                image, segmentation, label_names=label_names, radiological=radiological
            )
        )
    elif image is not None:
        parts.append(
            subject_report(
                image,
                keypoints=keypoints,
                atlas=atlas,
                index=index,
                images=images,
                name=name,
                radiological=radiological,
            )
        )
    if cohort is not None:
        parts.append(cohort_report(cohort, np.asarray(scores), keys=keys, atlas=atlas))
    page = Report(title or parts[0].title, parts[0].subtitle if len(parts) == 1 else "")
    for part in parts:
        page.extend(part)
    return page.write(path)


def write_demo_report(
    out_dir: str | PathLike[str], cohort: Any, scores: npt.ArrayLike, keys: Sequence[Any]
) -> Path:
    """The ``keyfuse demo`` report: ``out_dir/report.html`` (beside ``roc.png``)."""
    rep = cohort_report(cohort, scores, keys=keys, title="keyfuse demo: family identification")
    return rep.write(Path(out_dir) / "report.html")


# ---------------------------------------------------------------------- loading inputs


@dataclass
class LoadedSegmentation:
    """A label map (and optional probability maps) read from files: what
    :func:`segmentation_section` needs of a :class:`keyfuse.Segmentation`."""

    labels: npt.NDArray[Any]
    affine: npt.NDArray[np.float64]
    probabilities: dict[int, npt.NDArray[np.float32]] = field(default_factory=dict)


def load_segmentation(
    labels: str | PathLike[str], probabilities: str | PathLike[str] | None = None
) -> LoadedSegmentation:
    """Read a label map and, optionally, the 4D probability maps written by
    ``Segmentation.save`` (label values from the header's ``labels …`` description,
    else 1, 2, … in order)."""
    from keyfuse.image import load_image

    lab = load_image(labels)
    data = np.asarray(lab.data)
    if data.dtype.kind == "f":
        if not np.allclose(data, np.round(data)):
            raise InvalidArgumentError(f"{labels} is not a label map (non-integer values)")
        data = np.round(data).astype(np.int32)
    probs: dict[int, npt.NDArray[np.float32]] = {}
    if probabilities is not None:
        import nibabel as nib

        try:
            pimg: Any = nib.load(str(probabilities))
            stack = np.asarray(pimg.dataobj, dtype=np.float32)
            descrip = pimg.header.get("descrip", b"")
        except Exception as exc:  # nibabel raises many kinds
            raise KeyfuseIOError(f"cannot read probability maps {probabilities}: {exc}") from exc
        if stack.ndim == 3:
            stack = stack[..., None]
        if stack.ndim != 4 or stack.shape[:3] != data.shape:
            raise InvalidArgumentError(
                f"probability maps {probabilities} have shape {stack.shape}; expected "
                f"{data.shape} + (labels,)"
            )
        text = bytes(np.asarray(descrip).tobytes()).decode("ascii", "ignore").strip("\x00 ")
        values = [int(v) for v in text.split()[1:]] if text.startswith("labels ") else []
        if len(values) != stack.shape[3]:
            values = list(range(1, stack.shape[3] + 1))
        probs = {v: stack[..., n] for n, v in enumerate(values)}
    return LoadedSegmentation(data, np.asarray(lab.affine, dtype=np.float64), probs)


def load_cohort_scores(
    directory: str | PathLike[str], keys_dir: str | PathLike[str] | None = None
) -> tuple[Any, list[Path], npt.NDArray[np.float64]]:
    """``(cohort, key paths, N×N scores)`` of a ``keyfuse demo`` output (``cohort/`` and
    ``keys/`` inside) or a cohort folder with a separate keypoint folder. Scores are the
    soft-Jaccard matrix of an in-memory index of the keys (``Index.pairwise``)."""
    from keyfuse.datasets.cohort import Cohort
    from keyfuse.index import Index
    from keyfuse.keypoints import KeypointSet

    root = Path(directory)
    cohort_dir = root / "cohort" if (root / "cohort" / "cohort.csv").exists() else root
    coh = Cohort.load(cohort_dir)
    kdir = Path(keys_dir) if keys_dir is not None else root / "keys"
    keys = [kdir / f"{sid}.kfk" for sid in coh.subjects]
    missing = [p for p in keys if not p.exists()]
    if missing:
        raise KeyfuseIOError(
            f"{len(missing)} keypoint files missing, e.g. {missing[0]}: run `keyfuse extract "
            f"{cohort_dir / 'images'} -o {kdir}` (or give --keys)"
        )
    index = Index()
    for sid, key in zip(coh.subjects, keys, strict=True):
        index.add(sid, KeypointSet.load(key))
    return coh, keys, np.asarray(index.pairwise(), dtype=np.float64)
