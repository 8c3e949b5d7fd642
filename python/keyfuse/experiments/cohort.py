"""Cohort-level figures: keyfuse soft-Jaccard vs the reference matcher's voting.

On a simulated cohort (families with identical/fraternal twins and siblings, plus
rescans; ``kf.datasets.simulate_cohort``), the SAME keypoint sets are scored two ways:

* keyfuse: the soft Jaccard index of ALGORITHMS.md §3 (``Index.pairwise()``, the
  default posterior kernel: K = 10 neighbours, width half the nearest distance);
* the reference large-scale matcher's voting (``featMatchMultiple``, re-implemented
  deterministically in ``keyfuse.matching.reference_votes``: one kd-forest over all
  images, k = 5, vote = log2(1 + w/Σw)), both as the raw vote matrix V and read as a
  soft intersection J = V / (n_i + n_j − V).

Both are scored with the same neighbour search, exact (the Index default below 100k
keypoints) and the kd-forest (8 trees, 64 checks, the reference matcher's search).

:func:`report` sets side by side: family AUC (same vs different family, rescans
excluded), mAP, precision@1, rescans at rank 1, identical twins above every unrelated
scan, and the scoring time. ``benches/cohort.py`` runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from keyfuse import evaluate as ev
from keyfuse.demo import DemoConfig, stage_extract, stage_simulate
from keyfuse.index import Index
from keyfuse.keypoints import KeypointSet
from keyfuse.matching import reference_votes, votes_to_jaccard

__all__ = ["REPORT_ROWS", "report", "run_experiment"]

#: (printed name, key of keyfuse.evaluate.family_report)
REPORT_ROWS = [
    ("family AUC", "family_auc"),
    ("family AP", "family_ap"),
    ("mAP (family retrieval)", "map"),
    ("precision@1", "p_at_1"),
    ("rescans at rank 1", "rescan_rank1"),
    ("MZ twin above all unrelated", "mz_above_unrelated"),
    ("DZ twin above all unrelated", "dz_above_unrelated"),
    ("MZ vs unrelated AUC", "mz_vs_unrelated_auc"),
]


def _timed(fn: Callable[[], Any]) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = np.asarray(fn(), dtype=np.float64)
    return out, time.perf_counter() - t0


def _index_of(cohort: Any, sets: list[KeypointSet], **params: Any) -> Index:
    index = Index(**params)
    for sid, s in zip(cohort.subjects, sets, strict=True):
        index.add(sid, s)
    return index


def run_experiment(
    out: str | Path = "demo-output",
    *,
    variants: bool = False,
    echo: Callable[[str], None] = print,
    **settings: Any,
) -> dict[str, Any]:
    """Simulate (or reuse) a cohort under ``out``, extract its keypoints and score it
    both ways.

    Parameters
    ----------
    out : str or Path, default="demo-output"
        The demo's output folder: a cohort and keypoints already there are reused.
    variants : bool, default=False
        Also score the symmetric soft Jaccard and the published (uncapped) kernel width.
    echo : callable, default=print
        Receives a line on the cohort once its keypoints are ready.
    **settings
        Fields of :class:`keyfuse.demo.DemoConfig`, with its defaults: the simulated
        cohort (``n_families``, ``family_size``, ``n_rescans``, ``seed``,
        ``resolution_mm``; 12 × 3 + 4 rescans at 1.5 mm) and where the keypoints are
        extracted (``device``, ``scheduler``, ``n_workers``).

    Returns
    -------
    dict
        ``reports`` (method → keyfuse.evaluate.family_report), ``times`` (method →
        scoring seconds), ``soft_jaccard_repeatable`` and ``votes_repeatable`` (a second
        run gives identical matrices).
    """
    cfg = DemoConfig(out=Path(out), **settings)
    t0 = time.perf_counter()
    cohort = stage_simulate(cfg)
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    keys = stage_extract(cfg, cohort)
    t_ext = time.perf_counter() - t0
    sets = [KeypointSet.load(k) for k in keys]
    sizes = np.array([len(s) for s in sets], dtype=np.float64)
    echo(
        f"cohort: {len(cohort)} scans ({cfg.resolution_mm:g} mm), {int(sizes.sum())} keypoints "
        f"({sizes.mean():.0f} per scan); simulate {t_sim:.1f} s, extract {t_ext:.1f} s "
        "(cached runs reuse both)"
    )

    index = _index_of(cohort, sets)
    sj, t_sj = _timed(lambda: index.pairwise(exact=True))
    sjf, t_sjf = _timed(lambda: index.pairwise(exact=False))
    votes, t_ref = _timed(lambda: reference_votes(sets, exact=True))
    votesf, t_reff = _timed(lambda: reference_votes(sets))
    again = reference_votes(sets)
    methods = {
        "soft Jaccard exact": (sj, t_sj),
        "ref. votes as J exact": (votes_to_jaccard(votes, sizes), t_ref),
        "soft Jaccard forest": (sjf, t_sjf),
        "ref. votes as J forest": (votes_to_jaccard(votesf, sizes), t_reff),
        "ref. votes V forest": (votesf, t_reff),
    }
    if variants:
        methods["soft Jaccard symmetric"] = _timed(lambda: index.pairwise(symmetric=True))
        raw = _index_of(cohort, sets, kernel="published", alpha2_cap_fraction=float("inf"))
        methods["published kernel uncapped"] = _timed(raw.pairwise)
    return {
        "reports": {name: ev.family_report(cohort, m) for name, (m, _) in methods.items()},
        "times": {name: t for name, (_, t) in methods.items()},
        "soft_jaccard_repeatable": np.array_equal(sj, np.asarray(index.pairwise(exact=True))),
        "votes_repeatable": np.array_equal(votesf, again),
    }


def report(results: dict[str, Any]) -> str:
    """The side-by-side table of :func:`run_experiment`'s results and its verdicts."""
    reports, times = results["reports"], results["times"]
    width = max(len(r[0]) for r in REPORT_ROWS) + 2
    lines = ["", " " * width + "".join(f"{n:>26}" for n in reports)]
    for label, key in REPORT_ROWS:
        lines.append(
            f"{label:<{width}}"
            + "".join(f"{reports[n].get(key, float('nan')):>26.4f}" for n in reports)
        )
    lines.append(f"{'scoring time (s)':<{width}}" + "".join(f"{t:>26.3f}" for t in times.values()))
    lines.append("")
    lines.append(
        f"soft Jaccard bit-identical on a second run: {results['soft_jaccard_repeatable']}"
    )
    lines.append(f"reference votes bit-identical on a second run: {results['votes_repeatable']}")
    for search in ("exact", "forest"):
        sjr, ref = reports[f"soft Jaccard {search}"], reports[f"ref. votes as J {search}"]
        wins = [k for k in ("family_auc", "map") if sjr[k] > ref[k]]
        lines.append(
            f"target ({search} k-NN for both): soft Jaccard beats the reference voting on "
            f"{' and '.join(wins) if wins else 'NEITHER family AUC nor mAP'}"
        )
    return "\n".join(lines)
