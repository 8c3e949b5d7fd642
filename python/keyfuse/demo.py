"""The end-to-end demo job (``keyfuse demo`` / ``make demo``).

Stages, each a separate function so later work (fusion, segmentation) can add its own:

1. :func:`stage_simulate` — a cohort of families, twins and rescans from the MNI152
   template (reused when an identical one is already in the output directory);
2. :func:`stage_extract` — batch keypoint extraction (one ``.kfk`` per scan, resumable);
3. :func:`stage_index` — an on-disk :class:`keyfuse.Index` with family/group labels;
4. :func:`stage_query` — every scan queries the index (itself excluded);
5. :func:`stage_evaluate` — family AUC, mAP, rescan rank-1, twins vs unrelated, and the
   ROC plot.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from keyfuse.errors import KeyfuseError

__all__ = [
    "DemoConfig",
    "DemoResult",
    "hits_to_pairs",
    "run_demo",
    "stage_evaluate",
    "stage_extract",
    "stage_index",
    "stage_query",
    "stage_simulate",
]

T = TypeVar("T")


@dataclass
class DemoConfig:
    """Settings of the demo (the ``keyfuse demo`` options).

    out : output directory (default ``demo-output``): ``cohort/``, ``keys/``,
        ``index/``, ``roc.png``, ``report.json``.
    n_families, family_size, n_rescans, seed, resolution_mm : the simulated cohort
        (defaults 12 × 3 + 4 rescans = 40 scans at 1.5 mm).
    device : extraction backend (``"auto"``).
    scheduler : batch scheduler (default ``"threads"``: no cluster start-up cost; any
        value of :func:`keyfuse.batch.run_batch` works, e.g. ``"local"`` or an address).
    n_workers : parallel extractions (default: CPUs).
    progress : progress bars.
    """

    out: Path = Path("demo-output")
    n_families: int = 12
    family_size: int = 3
    n_rescans: int = 4
    seed: int = 0
    resolution_mm: float = 1.5
    device: str = "auto"
    scheduler: Any = "threads"
    n_workers: int | None = None
    progress: bool = True

    def cohort_params(self) -> dict[str, Any]:
        return {
            "n_families": self.n_families,
            "family_size": self.family_size,
            "n_rescans": self.n_rescans,
            "seed": self.seed,
            "resolution_mm": float(self.resolution_mm),
        }


@dataclass
class DemoResult:
    """Figures and timings of a demo run."""

    report: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)
    n_scans: int = 0
    n_keypoints: int = 0
    index_bytes: int = 0
    image_bytes: int = 0
    roc_path: Path | None = None
    report_path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["roc_path"] = str(self.roc_path) if self.roc_path else None
        d["report_path"] = str(self.report_path) if self.report_path else None
        return d


def _timed(timings: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    t0 = time.perf_counter()
    out = fn()
    timings[name] = time.perf_counter() - t0
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# ------------------------------------------------------------------------- stages


def stage_simulate(cfg: DemoConfig) -> Any:
    """Simulate the cohort into ``out/cohort`` (reused if the same parameters made it)."""
    from keyfuse.datasets.cohort import Cohort, simulate_cohort

    root = cfg.out / "cohort"
    stamp = root / "params.json"
    params = cfg.cohort_params()
    if stamp.exists() and (root / "cohort.csv").exists():
        try:
            if json.loads(stamp.read_text()) == params:
                cohort = Cohort.load(root)
                if all(cohort.image_path(i).exists() for i in range(len(cohort))):
                    return cohort
        except (ValueError, KeyfuseError, OSError):
            pass  # anything odd: simulate afresh
    # a new cohort invalidates keypoints and index made from an old one
    for stale in (root, cfg.out / "keys", cfg.out / "index"):
        if stale.exists():
            shutil.rmtree(stale)
    cohort = simulate_cohort(root, progress=cfg.progress, **params)
    stamp.write_text(json.dumps(params))
    return cohort


def stage_extract(cfg: DemoConfig, cohort: Any) -> list[Path]:
    """Batch-extract keypoints of every scan into ``out/keys`` (resumes); returns paths."""
    from keyfuse.batch import extract_batch

    paths = [cohort.image_path(i) for i in range(len(cohort))]
    res = extract_batch(
        paths,
        cfg.out / "keys",
        scheduler=cfg.scheduler,
        n_workers=cfg.n_workers,
        device=cfg.device,
        progress=cfg.progress,
    )
    if res.failures:
        f = res.failures[0]
        raise KeyfuseError(
            f"{len(res.failures)} extraction(s) failed, e.g. {f.input}: {f.error}: {f.message}"
        )
    return res.outputs


def stage_index(cfg: DemoConfig, cohort: Any, keys: Sequence[Path]) -> Any:
    """Build the on-disk index ``out/index`` with family/group/individual labels."""
    from tqdm.auto import tqdm

    from keyfuse.index import Index
    from keyfuse.keypoints import KeypointSet

    path = cfg.out / "index"
    if path.exists():
        shutil.rmtree(path)
    index = Index()
    for i, (row, key) in enumerate(
        tqdm(
            list(zip(cohort.table, keys, strict=True)),
            desc="index",
            unit="scan",
            disable=not cfg.progress,
        )
    ):
        index.add(
            row["subject"],
            KeypointSet.load(key),
            source=str(cohort.image_path(i)),
            family=row["family"],
            group=row["group"],
            individual=row["individual"],
        )
    index.save(path)
    return Index.load(path)


def hits_to_pairs(hits: Any) -> list[tuple[str, float]]:
    """Normalise ``Index.search`` results to ``[(subject_id, score), ...]``."""
    out = []
    for h in hits:
        if isinstance(h, (tuple, list)):
            out.append((str(h[0]), float(h[1])))
        else:
            sid = getattr(h, "subject_id", getattr(h, "subject", None))
            out.append((str(sid), float(h.score)))
    return out


def stage_query(
    cfg: DemoConfig, index: Any, cohort: Any, keys: Sequence[Path]
) -> npt.NDArray[np.float64]:
    """Every scan queries the index; returns the N×N score matrix (row = query,
    diagonal = -inf: a scan never counts as its own hit)."""
    from tqdm.auto import tqdm

    from keyfuse.keypoints import KeypointSet

    ids = cohort.subjects
    pos = {s: i for i, s in enumerate(ids)}
    n = len(ids)
    scores = np.full((n, n), -np.inf)
    for i, key in enumerate(tqdm(keys, desc="query", unit="scan", disable=not cfg.progress)):
        found = index.search(KeypointSet.load(key), k=None, exclude=ids[i])
        for sid, score in hits_to_pairs(found):
            if sid in pos and pos[sid] != i:
                scores[i, pos[sid]] = score
    # scans outside a query's top-n (none here, k = n) rank last
    finite = scores[np.isfinite(scores)]
    floor = float(finite.min()) - 1.0 if finite.size else 0.0
    scores[~np.isfinite(scores)] = floor
    np.fill_diagonal(scores, floor)
    return scores


def stage_evaluate(
    cfg: DemoConfig, cohort: Any, scores: npt.NDArray[np.float64]
) -> tuple[dict[str, float], Path | None]:
    """Family-identification figures and the ROC plot (``out/roc.png``; None when no
    curve can be drawn, e.g. a single family has no different-family pairs)."""
    from keyfuse import evaluate as ev

    report = ev.family_report(cohort, scores)
    curves = ev.identification_curves(cohort, scores)
    if not curves:
        return report, None
    roc = ev.roc_plot(curves, cfg.out / "roc.png", title="keyfuse demo: family identification")
    return report, roc


def run_demo(cfg: DemoConfig | None = None, echo: Callable[[str], None] = print) -> DemoResult:
    """Run every stage, print the figures and timings, write ``report.json``."""
    cfg = cfg or DemoConfig()
    cfg.out = Path(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    n_scans = cfg.n_families * cfg.family_size + cfg.n_rescans
    echo(f"[1/5] simulating {n_scans} scans from the MNI152 template ({cfg.resolution_mm:g} mm)")
    cohort = _timed(timings, "simulate", lambda: stage_simulate(cfg))
    echo(f"[2/5] extracting 3D SIFT-Rank keypoints ({cfg.device})")
    keys = _timed(timings, "extract", lambda: stage_extract(cfg, cohort))
    echo("[3/5] building the on-disk index")
    index = _timed(timings, "index", lambda: stage_index(cfg, cohort, keys))
    echo("[4/5] querying every scan against the index")
    scores = _timed(timings, "query", lambda: stage_query(cfg, index, cohort, keys))
    echo("[5/5] evaluating")
    report, roc = _timed(timings, "evaluate", lambda: stage_evaluate(cfg, cohort, scores))
    from keyfuse.reports import write_demo_report

    html = _timed(timings, "report", lambda: write_demo_report(cfg.out, cohort, scores, keys))

    from keyfuse.keypoints import KeypointSet

    n_kp = sum(len(KeypointSet.load(k)) for k in keys)
    res = DemoResult(
        report=report,
        timings=timings,
        n_scans=len(cohort),
        n_keypoints=n_kp,
        index_bytes=_dir_bytes(cfg.out / "index"),
        image_bytes=len(cohort) * int(np.prod(cohort.image(0).shape)) * 4,
        roc_path=roc,
        report_path=html,
    )
    report_json = {**res.to_json(), "provenance": provenance(cfg, index)}
    (cfg.out / "report.json").write_text(json.dumps(report_json, indent=2))
    for line in format_result(res):
        echo(line)
    return res


def provenance(cfg: DemoConfig, index: Any) -> dict[str, Any]:
    """What made a demo's figures: the keyfuse version, the cohort's parameters and seed,
    the extraction parameters and the index's parameters and seed."""
    from keyfuse import __version__
    from keyfuse.extraction import default_params

    return {
        "keyfuse_version": __version__,
        "cohort": cfg.cohort_params(),
        "seed": cfg.seed,
        "device": cfg.device,
        "extraction": {k: float(v) for k, v in default_params().items()},
        "index": index.provenance(),
    }


def format_result(res: DemoResult) -> list[str]:
    """The demo's printed summary."""
    r = res.report
    lines = [
        "",
        f"cohort: {res.n_scans} scans, {res.n_keypoints} keypoints "
        f"({res.n_keypoints / max(res.n_scans, 1):.0f} per scan)",
        f"index: {res.index_bytes / 1e6:.2f} MB on disk, "
        f"{res.image_bytes / max(res.index_bytes, 1):.0f}× smaller than the float32 images",
        "",
        "family identification (soft-Jaccard keypoint signatures)",
        f"  same-family vs different-family AUC  {r.get('family_auc', float('nan')):.3f}",
        f"  mean average precision (mAP)         {r.get('map', float('nan')):.3f}",
        f"  precision@1 (a relative ranks first) {r.get('p_at_1', float('nan')):.3f}",
        f"  rescans found at rank 1              {100 * r.get('rescan_rank1', float('nan')):.0f}%",
        f"  identical twins above all unrelated  "
        f"{100 * r.get('mz_above_unrelated', float('nan')):.0f}%",
        f"  fraternal twins above all unrelated  "
        f"{100 * r.get('dz_above_unrelated', float('nan')):.0f}%",
        f"  identical twins vs unrelated AUC     {r.get('mz_vs_unrelated_auc', float('nan')):.3f}",
        "  mean score by relation: "
        + ", ".join(
            f"{k[5:]} {v:.3f}"
            for k, v in sorted(r.items(), key=lambda kv: -kv[1])
            if k.startswith("mean_")
        ),
        "",
        "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in res.timings.items()),
        f"ROC plot: {res.roc_path}"
        if res.roc_path
        else "ROC plot: none (needs pairs of the same and of different families)",
        f"HTML report: {res.report_path}",
    ]
    return lines
