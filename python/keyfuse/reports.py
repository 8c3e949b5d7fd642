"""Self-contained HTML reports: one page per subject, segmentation or cohort evaluation.

A :class:`Report` is a title and a list of :class:`Section` s; a section holds blocks
(figures, tables, key figures, text). :meth:`Report.write` renders one HTML file with
every image embedded as a ``data:`` URI, inline CSS and no script, so the page opens
offline, can be mailed or archived, and needs no JavaScript.

New kinds of content slot in as *section builders*: functions ``(report, ...) ->
Section`` that add one section (see :func:`keypoints_section`,
:func:`alignment_section`, :func:`neighbours_section`, :func:`segmentation_section`,
:func:`evaluation_section`, :func:`worst_cases_section`). The three ready-made reports
(:func:`subject_report`, :func:`segmentation_report`, :func:`cohort_report`) are
sequences of builders, and :func:`report` (``kf.report``) puts whichever apply on one
page.

>>> kf.report("sub-01.html", image="sub-01.nii.gz", index=kf.Index.load("cohort.kfi"))
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError, KeyfuseError, KeyfuseIOError

__all__ = [
    "Report",
    "Section",
    "alignment_section",
    "cohort_report",
    "evaluation_section",
    "keypoints_section",
    "load_cohort_scores",
    "load_segmentation",
    "neighbours_section",
    "report",
    "segmentation_report",
    "segmentation_section",
    "subject_report",
    "worst_cases_section",
    "write_demo_report",
]

# ------------------------------------------------------------------------ the document


@dataclass
class _Figure:
    png: bytes
    caption: str
    alt: str
    width: int
    height: int


@dataclass
class _Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str | None


@dataclass
class _Metrics:
    items: list[tuple[str, str]]
    caption: str | None


@dataclass
class _Text:
    text: str
    kind: str  # "p" or "note"


Block = _Figure | _Table | _Metrics | _Text


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}-{n}", n + 1
    taken.add(slug)
    return slug


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not np.isfinite(v):
            return "–"
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(value)


@dataclass
class Section:
    """One section of a report: a title, an optional introduction and blocks."""

    title: str
    intro: str = ""
    blocks: list[Block] = field(default_factory=list)

    def figure(self, fig: Any, caption: str = "", alt: str | None = None) -> Section:
        """Add a matplotlib figure (embedded as PNG); closes nothing, keeps no reference."""
        from keyfuse.plotting import figure_to_bytes

        png = figure_to_bytes(fig)
        w, h = struct.unpack(">II", png[16:24])  # the IHDR chunk's width and height
        self.blocks.append(_Figure(png, caption, alt or caption or self.title, w, h))
        return self

    def table(
        self, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None
    ) -> Section:
        """Add a table (values formatted: floats to 3 decimals)."""
        cols = [str(c) for c in columns]
        body = [list(r) for r in rows]
        if any(len(r) != len(cols) for r in body):
            raise InvalidArgumentError("every table row needs one value per column")
        self.blocks.append(_Table(cols, body, caption))
        return self

    def metrics(self, values: Mapping[str, Any], caption: str | None = None) -> Section:
        """Add key figures (``name → value``) shown as a compact grid."""
        self.blocks.append(_Metrics([(str(k), _fmt(v)) for k, v in values.items()], caption))
        return self

    def text(self, text: str) -> Section:
        """Add a paragraph (plain text, escaped)."""
        self.blocks.append(_Text(text, "p"))
        return self

    def note(self, text: str) -> Section:
        """Add a highlighted note (e.g. why a part could not be drawn)."""
        self.blocks.append(_Text(text, "note"))
        return self


_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: #1d2330; background: #f4f5f7; }
header { background: #1d2330; color: #fff; padding: 20px 32px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; color: #c9cfdb; font-size: 14px; }
nav { padding: 10px 32px; background: #fff; border-bottom: 1px solid #dde1e8;
  font-size: 15px; }
nav a { margin-right: 18px; color: #2557c7; text-decoration: none; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 24px 40px; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px;
  margin: 20px 0; padding: 16px 24px; }
h2 { font-size: 21px; margin: 4px 0 8px; }
.intro { color: #4a5263; margin-top: 0; }
figure { margin: 14px 0; }
figure img { display: block; max-width: 100%; height: auto; border-radius: 3px; }
figcaption { font-size: 14px; color: #4a5263; margin-top: 6px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 15px; }
caption { text-align: left; font-size: 14px; color: #4a5263; padding-bottom: 4px; }
th, td { padding: 4px 12px; border-bottom: 1px solid #e6e9ee; text-align: left; }
th { background: #f0f2f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.metrics { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr));
  gap: 8px 18px; margin: 10px 0; }
.metric { border-left: 3px solid #2557c7; padding: 2px 10px; }
.metric .k { font-size: 14px; color: #4a5263; }
.metric .v { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
.note { background: #fff7e0; border-left: 3px solid #e0a800; padding: 8px 12px; }
footer { max-width: 1180px; margin: 0 auto; padding: 0 24px 30px; font-size: 13px;
  color: #6b7385; }
"""


class Report:
    """An HTML report: ``title``, a subtitle line and sections, rendered by :meth:`html`.

    >>> rep = Report("sub-01")
    >>> rep.section("Keypoints").figure(fig, "keypoints over orthogonal slices")
    >>> rep.write("sub-01.html")
    """

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self.sections: list[Section] = []

    def section(self, title: str, intro: str = "") -> Section:
        """Append a new section and return it."""
        sec = Section(title, intro)
        self.sections.append(sec)
        return sec

    def extend(self, other: Report) -> Report:
        """Append the sections of another report (e.g. to combine reports on one page)."""
        self.sections.extend(other.sections)
        return self

    def html(self) -> str:
        """The page as one HTML string (images as base64 ``data:`` URIs, inline CSS)."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("keyfuse")
        except PackageNotFoundError:
            ver = "dev"
        e = html.escape
        taken: set[str] = set()
        ids = [_slug(s.title, taken) for s in self.sections]
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{e(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<header><h1>{e(self.title)}</h1><p>{e(self.subtitle)}</p></header>",
        ]
        if len(self.sections) > 1:
            links = "".join(
                f'<a href="#{i}">{e(s.title)}</a>' for i, s in zip(ids, self.sections, strict=True)
            )
            out.append(f"<nav>{links}</nav>")
        out.append("<main>")
        for sid, sec in zip(ids, self.sections, strict=True):
            out.append(f'<section id="{sid}"><h2>{e(sec.title)}</h2>')
            if sec.intro:
                out.append(f'<p class="intro">{e(sec.intro)}</p>')
            out.extend(_render(b) for b in sec.blocks)
            out.append("</section>")
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        out.append(
            f"</main><footer>keyfuse {e(ver)} · {stamp} · a self-contained page: every image "
            "is embedded, nothing is loaded from the network.</footer></body></html>"
        )
        return "\n".join(out)

    def write(self, path: str | PathLike[str]) -> Path:
        """Write the page to ``path`` (atomically); returns the path."""
        from keyfuse._io import atomic_path

        out = Path(path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out) as tmp:
                Path(tmp).write_text(self.html(), encoding="utf-8")
        except OSError as exc:
            raise KeyfuseIOError(f"cannot write report to {out}: {exc}") from exc
        return out


def _render(block: Block) -> str:
    e = html.escape
    if isinstance(block, _Figure):
        uri = "data:image/png;base64," + base64.b64encode(block.png).decode("ascii")
        cap = f"<figcaption>{e(block.caption)}</figcaption>" if block.caption else ""
        return (
            f'<figure><img src="{uri}" alt="{e(block.alt)}" width="{block.width}" '
            f'height="{block.height}">{cap}</figure>'
        )
    if isinstance(block, _Table):
        head = "".join(f"<th>{e(c)}</th>" for c in block.columns)
        rows = "".join(
            "<tr>"
            + "".join(
                f'<td class="num">{e(_fmt(v))}</td>'
                if isinstance(v, (int, float, np.number))
                else f"<td>{e(_fmt(v))}</td>"
                for v in r
            )
            + "</tr>"
            for r in block.rows
        )
        cap = f"<caption>{e(block.caption)}</caption>" if block.caption else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if isinstance(block, _Metrics):
        cells = "".join(
            f'<div class="metric"><div class="k">{e(k)}</div><div class="v">{e(v)}</div></div>'
            for k, v in block.items
        )
        cap = f'<p class="intro">{e(block.caption)}</p>' if block.caption else ""
        return f'{cap}<div class="metrics">{cells}</div>'
    cls = ' class="note"' if block.kind == "note" else ""
    return f"<p{cls}>{e(block.text)}</p>"


# ------------------------------------------------------------------ section builders


def _keypoints_of(image: Any, keypoints: Any) -> Any:
    from keyfuse.extraction import extract
    from keyfuse.keypoints import KeypointSet

    if keypoints is None:
        return extract(image)
    if isinstance(keypoints, KeypointSet):
        return keypoints
    return KeypointSet.load(keypoints)


def keypoints_section(
    rep: Report, image: Any, keypoints: Any = None, *, name: str = "", radiological: bool = False
) -> Section:
    """Keypoints over orthogonal slices, with counts by polarity and scale range."""
    from keyfuse.plotting import _as_image, plot_keypoints

    img = _as_image(image)
    kps = _keypoints_of(img, keypoints)
    sec = rep.section(
        f"Keypoints {name}".strip(),
        "3D SIFT-Rank keypoints: position (dot), scale (circle where the slice cuts the "
        "keypoint's sphere) and polarity (colour).",
    )
    pol = np.asarray(kps.polarity)
    scale = np.asarray(kps.scale, dtype=np.float64)
    sec.metrics(
        {
            "keypoints": len(kps),
            "DoG maxima / minima": f"{int((pol > 0).sum())} / {int((pol < 0).sum())}",
            "scale σ (mm), median [min, max]": (
                f"{np.median(scale):.1f} [{scale.min():.1f}, {scale.max():.1f}]"
                if scale.size
                else "–"
            ),
            "image": f"{'×'.join(map(str, img.shape))} at "
            f"{'×'.join(f'{s:g}' for s in np.round(img.spacing, 2))} mm",
        }
    )
    sec.figure(plot_keypoints(img, kps, radiological=radiological), "keypoints over slices")
    return sec


def _default_atlas(image: Any) -> Any:
    from keyfuse.datasets.mni import mni152

    return mni152("t1", max(1.0, float(np.round(np.mean(image.spacing), 2))))


def alignment_section(
    rep: Report,
    image: Any,
    keypoints: Any = None,
    *,
    atlas: Any = "mni152",
    atlas_keypoints: Any = None,
    name: str = "",
    radiological: bool = False,
) -> Section:
    """The subject aligned to an atlas with ``kf.align``: edges before and after, and the
    transform's figures. ``atlas="mni152"`` uses the template at the image's resolution."""
    from keyfuse.matching import align
    from keyfuse.plotting import _as_image, plot_alignment, plot_matches

    img = _as_image(image)
    kps = _keypoints_of(img, keypoints)
    sec = rep.section(
        f"Alignment to the atlas {name}".strip(),
        "kf.align: keypoint matches → RANSAC similarity. The subject's edges (orange) on "
        "the atlas, before and after the transform.",
    )
    try:
        atlas_img = (
            _default_atlas(img)
            if isinstance(atlas, str) and atlas == "mni152"
            else (_as_image(atlas, "atlas"))
        )
        atlas_kps = _keypoints_of(atlas_img, atlas_keypoints)
        al = align(kps, atlas_kps)
    except KeyfuseError as exc:
        sec.note(f"no alignment: {exc}")
        return sec
    rot = float(np.degrees(np.arccos(np.clip((np.trace(al.rotation) - 1) / 2, -1, 1))))
    sec.metrics(
        {
            "inliers / matches": f"{al.n_inliers} / {len(al.inliers)}",
            "inlier rmse (mm)": al.rmse,
            "scale": f"{al.scale:.3f}",
            "rotation (°)": f"{rot:.1f}",
            "translation (mm)": ", ".join(f"{t:.1f}" for t in al.translation),
        }
    )
    sec.figure(plot_alignment(img, atlas_img, al, radiological=radiological), "alignment check")
    sec.figure(
        plot_matches(
            img,
            kps,
            atlas_img,
            atlas_kps,
            al.matches,
            inliers=al.inliers,
            radiological=radiological,
        ),
        "keypoint matches subject → atlas (green: RANSAC inliers)",
    )
    return sec


def neighbours_section(
    rep: Report,
    query: Any,
    index: Any,
    *,
    query_image: Any = None,
    images: Mapping[str, Any] | Callable[[str], Any] | None = None,
    k: int = 5,
    exclude: str | None = None,
    name: str = "query",
    label: str | None = None,
    relevant: Callable[[str], bool] | None = None,
) -> Section:
    """The query's nearest subjects in ``index`` (``Index.search``): a table and, given
    the ``query_image``, a montage. Hit images come from ``images`` (a mapping or
    function id → image/path), else the index's recorded source paths; hits without an
    image are only listed."""
    sec = rep.section(f"Nearest subjects of {name}", f"Index.search, top {k} by soft Jaccard.")
    hits = list(index.search(query, k=k, exclude=exclude))
    labels = index.labels
    rows = []
    for rank, h in enumerate(hits, 1):
        lab = labels.get(h.subject_id, {})
        rows.append(
            [rank, h.subject_id, float(h.score), ", ".join(f"{a}={b}" for a, b in lab.items())]
        )
    sec.table(["rank", "subject", "score", "labels"], rows)
    panels = []
    for h in hits:
        src = (
            (images(h.subject_id) if callable(images) else images.get(h.subject_id))
            if images is not None
            else index.source(h.subject_id)
        )
        if src is None or (isinstance(src, (str, Path)) and not Path(src).exists()):
            continue
        lab = labels.get(h.subject_id, {})
        text = label and lab.get(label)
        rel = relevant(h.subject_id) if relevant else None
        panels.append((src, h.subject_id, float(h.score), str(text) if text else None, rel))
    if panels and query_image is not None:
        from keyfuse.plotting import plot_retrieval

        sec.figure(plot_retrieval(query_image, panels, query_id=name), "retrieval montage")
    elif not panels:
        sec.note("no images of the hits are known (index without source paths)")
    return sec


def segmentation_section(
    rep: Report,
    image: Any,
    segmentation: Any,
    *,
    label_names: Mapping[int, str] | None = None,
    name: str = "",
    radiological: bool = False,
) -> Section:
    """The segmentation over its image, per-label probability maps and label volumes."""
    from keyfuse.plotting import _as_image, _label_image, plot_segmentation

    img = _as_image(image)
    lab, probs = _label_image(segmentation, img)
    names = dict(label_names or {})
    sec = rep.section(f"Segmentation {name}".strip())
    data = np.asarray(lab.data)
    voxel_ml = float(abs(np.linalg.det(lab.affine[:3, :3]))) / 1000.0
    rows = []
    for v in sorted(set(int(u) for u in np.unique(data) if u != 0) | set(probs)):
        n = int((data == v).sum())
        row: list[Any] = [v, names.get(v, f"label {v}"), n, n * voxel_ml]
        if probs:
            p = np.asarray(probs[v].data) if v in probs else None
            row.append(float(p[data == v].mean()) if p is not None and n else float("nan"))
        rows.append(row)
    cols = ["label", "name", "voxels", "volume (ml)"] + (["mean p inside"] if probs else [])
    sec.table(cols, rows, "per-label volumes")
    extra: dict[str, Any] = {}
    for attr in ("n_matches", "n_transfers"):
        if hasattr(segmentation, attr):
            extra[attr.replace("n_", "").replace("_", " ")] = int(getattr(segmentation, attr))
    if extra:
        sec.metrics(extra)
    sec.figure(
        plot_segmentation(img, segmentation, label_names=names, radiological=radiological),
        "labels over orthogonal slices; below, each label's probability map",
    )
    return sec


def _cohort_curves(cohort: Any, scores: npt.NDArray[Any]) -> dict[str, tuple[Any, Any]]:
    from keyfuse import evaluate as ev

    ps, pl = ev.family_pairs(cohort, scores)
    curves: dict[str, tuple[Any, Any]] = {}
    if 0 < pl.sum() < pl.size:
        curves["same family vs different family"] = (ps, pl)
    groups = ev.relation_pairs(cohort, scores)
    if "mz_twin" in groups and "unrelated" in groups:
        a, b = groups["mz_twin"], groups["unrelated"]
        curves["identical twins vs unrelated"] = (
            np.concatenate([a, b]),
            np.concatenate([np.ones(a.size, bool), np.zeros(b.size, bool)]),
        )
    return curves


_METRIC_NAMES = {
    "family_auc": "same-family vs different-family AUC",
    "family_ap": "same-family average precision",
    "map": "mean average precision (mAP)",
    "p_at_1": "precision@1",
    "r_at_5": "recall@5",
    "rescan_rank1": "rescans found at rank 1",
    "mz_above_unrelated": "identical twins above all unrelated",
    "dz_above_unrelated": "fraternal twins above all unrelated",
    "mz_vs_unrelated_auc": "identical twins vs unrelated AUC",
}


def evaluation_section(rep: Report, cohort: Any, scores: npt.ArrayLike) -> Section:
    """Family-identification figures (as ``keyfuse evaluate family`` prints them), mean
    score by relation and the ROC and precision–recall curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from keyfuse import evaluate as ev
    from keyfuse.plotting import plot_precision_recall, plot_roc

    s = np.asarray(scores, dtype=np.float64)
    figures = ev.family_report(cohort, s)
    sec = rep.section(
        "Cohort identification",
        f"{len(cohort)} scans; every scan queries all others (scans of the same "
        "individual excluded from the family figures).",
    )
    sec.metrics({_METRIC_NAMES[k]: v for k, v in figures.items() if k in _METRIC_NAMES})
    means = sorted(
        ((k[5:], v) for k, v in figures.items() if k.startswith("mean_")), key=lambda x: -x[1]
    )
    groups = ev.relation_pairs(cohort, s)
    sec.table(
        ["relation", "pairs", "mean score"],
        [[k, int(groups[k].size) if k in groups else 0, v] for k, v in means],
        "mean pair score by relation",
    )
    curves = _cohort_curves(cohort, s)
    if curves:
        fig = Figure(figsize=(10.0, 4.6), dpi=100)
        FigureCanvasAgg(fig)
        plot_roc(curves, ax=fig.add_subplot(1, 2, 1), title="ROC")
        plot_precision_recall(curves, ax=fig.add_subplot(1, 2, 2), title="precision–recall")
        fig.subplots_adjust(left=0.07, right=0.98, top=0.92, bottom=0.11, wspace=0.25)
        sec.figure(fig, "ROC and precision–recall curves of pair scores")
    else:
        sec.note("no positive and negative pairs: no curves")
    return sec


def worst_cases_section(
    rep: Report, cohort: Any, scores: npt.ArrayLike, *, n_worst: int = 3, k: int = 5
) -> Section:
    """The queries with the lowest average precision (relevant: other individuals of the
    family), each as a montage of its top-``k`` hits (green: same family)."""
    from keyfuse import evaluate as ev
    from keyfuse.plotting import plot_retrieval

    s = np.asarray(scores, dtype=np.float64)
    fam = np.asarray([str(v) for v in ev.table_column(cohort, "family")])
    ind = np.asarray(ev._individuals(cohort))
    ids = [str(v) for v in ev.table_column(cohort, "subject")]
    relevant = (fam[:, None] == fam[None, :]) & (ind[:, None] != ind[None, :])
    exclude = ind[:, None] == ind[None, :]
    sec = rep.section(
        "Worst cases",
        f"The {n_worst} queries with the lowest average precision, with their top {k} hits "
        "(green frame: same family; scans of the query's own individual left out).",
    )
    aps = []
    for q in range(len(ids)):
        if relevant[q].any():
            aps.append((ev.mean_average_precision(s[q], relevant[q], exclude=exclude[q]), q))
    if not aps:
        sec.note("no query has a relative in the cohort")
        return sec
    worst = sorted(aps)[: max(0, int(n_worst))]
    for ap, q in worst:
        cand = [j for j in np.argsort(-s[q], kind="stable") if not exclude[q, j]][:k]
        hits = [
            (cohort.image(int(j)), ids[j], float(s[q, j]), f"family {fam[j]}", bool(relevant[q, j]))
            for j in cand
        ]
        fig = plot_retrieval(
            cohort.image(q),
            hits,
            query_id=ids[q],
            query_label=f"family {fam[q]}",
            title=f"{ids[q]}: average precision {ap:.3f}",
        )
        sec.figure(fig, f"{ids[q]} (family {fam[q]}): AP {ap:.3f}")
    return sec


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
    from keyfuse.plotting import _as_image

    label = name or (
        Path(image).name.split(".")[0] if isinstance(image, (str, Path)) else "subject"
    )
    img = _as_image(image)
    kps = _keypoints_of(img, keypoints)
    rep = Report(f"keyfuse subject report: {label}", f"{len(kps)} keypoints")
    keypoints_section(rep, img, kps, name=label, radiological=radiological)
    if atlas is not None:
        alignment_section(rep, img, kps, atlas=atlas, name=label, radiological=radiological)
    if index is not None:
        excl = label if label in index else None
        neighbours_section(
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
    label = name or (Path(image).name.split(".")[0] if isinstance(image, (str, Path)) else "image")
    rep = Report(f"keyfuse segmentation report: {label}")
    segmentation_section(
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
    as montages, and the keypoints and atlas alignment of the first ``n_subjects`` scans
    (``keys``: their KeypointSets or ``.kfk`` paths, one per scan; extracted if None).

    ``cohort`` is a :class:`keyfuse.datasets.Cohort` (its images and table); ``scores``
    the N×N similarity matrix (row = query), e.g. ``Index.pairwise()``."""
    s = np.asarray(scores, dtype=np.float64)
    n = len(cohort)
    if s.shape != (n, n):
        raise InvalidArgumentError(f"scores must be {n}×{n} for this cohort, got {s.shape}")
    if keys is not None and len(keys) != n:
        raise InvalidArgumentError(f"keys has {len(keys)} entries for {n} scans")
    rep = Report(title, f"{n} scans · {len({r['family'] for r in cohort.table})} families")
    evaluation_section(rep, cohort, s)
    worst_cases_section(rep, cohort, s, n_worst=n_worst, k=k)
    ids = cohort.subjects
    atlas_img = atlas_kps = None
    for i in range(min(int(n_subjects), n)):
        img = cohort.image(i)
        kps = _keypoints_of(img, None if keys is None else keys[i])
        keypoints_section(rep, img, kps, name=ids[i])
        if atlas is None:
            continue
        if atlas_img is None:
            try:
                atlas_img = _default_atlas(img) if atlas == "mni152" else atlas
                atlas_kps = _keypoints_of(atlas_img, None)
            except KeyfuseError as exc:
                rep.section("Alignment to the atlas").note(f"no atlas: {exc}")
                atlas = None
                continue
        alignment_section(rep, img, kps, atlas=atlas_img, atlas_keypoints=atlas_kps, name=ids[i])
    return rep


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
    radiological: bool = False,
) -> Path:
    """Write one self-contained HTML report (``kf.report``) and return its path.

    What the page holds follows from the arguments: ``image`` → the subject's keypoints,
    its alignment to ``atlas`` ("mni152", an image, or None) and, with ``index``, its
    nearest subjects; ``image`` + ``segmentation`` → the overlay, probability maps and
    label volumes (instead of the subject sections); ``cohort`` + ``scores`` → the
    identification figures, ROC/PR curves, worst cases and a few subjects.
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
            pimg = nib.load(str(probabilities))
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
