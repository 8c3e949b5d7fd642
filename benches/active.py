"""Active learning benchmark: which scan to label next (``kf.active.suggest``) against
random selection, on the simulated cohort's group ("sex") label.

    .venv/bin/python benches/active.py [--families 20] [--size 4] [--start 4] [--step 2]
    .venv/bin/python benches/active.py --quick

The lecture's loop: the scans are split once into a pool and a test set (stratified by
group); ``--start`` pool scans are labelled (both groups), then ``--step`` more at a time,
chosen by ``kf.active.suggest`` (posterior entropy × density) or at random, until
``--budget`` labels. After every step the index's classifier for the label (what
``restrict={"group": "predicted"}`` uses) is refitted on the labelled scans and its AUC on
the test set recorded. Both strategies start from the same labels; random selection is
averaged over ``--repeats`` draws, and everything over ``--starts`` starting sets.

Prints the AUC per number of labels for both strategies and the fraction of random's
labels active selection needs to reach random's final AUC (target ≤ 60%, issue 14), and
writes ``active_learning.png`` (AUC against labels).

Features: 3-D keypoints and the CNN vector of the mid-axial slice after the simulator's
known pose (``transform_source="truth"``, so the figure does not depend on the keypoint
alignment); ``--by`` picks what the classifier uses (default: one loop on the vectors,
one on the keypoints).
"""

from __future__ import annotations

import argparse
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import keyfuse as kf
from keyfuse.experiments.fusion_table1 import cohort_features

QUICK = {"families": 4, "size": 3, "start": 4, "step": 2, "budget": 8, "repeats": 2, "starts": 1}


def make_index(feats: Any, rows: list[int], labels: dict[int, str], by: str) -> kf.Index:
    """An index of the pool scans ``rows``, those in ``labels`` carrying their group."""
    ix = kf.Index()
    for i in rows:
        kps = feats.kps3d[i]
        extra = {"group": labels[i]} if i in labels else {}
        ix.add(str(i), kps, vector=feats.vectors[i], **extra)
    return ix


def test_auc(ix: kf.Index, feats: Any, test: list[int], groups: list[str], by: str) -> float:
    """AUC on the test scans of the index's classifier for "group"."""
    from sklearn.metrics import roc_auc_score

    parts = "vector" if by == "auto" else by
    clf = ix._classifiers.classifier(ix, "group", parts)
    vecs = np.asarray(feats.vectors[test], dtype=np.float64)
    kps = [feats.kps3d[i] for i in test]
    X: Any = {"vector": vecs, "keypoints": kps, "fused": list(zip(kps, vecs, strict=True))}[parts]
    proba = clf.predict_proba(X)
    pos = list(clf.classes_).index("M")
    y = np.asarray([groups[i] == "M" for i in test])
    return float(roc_auc_score(y, proba[:, pos]))


def run_loop(
    feats: Any,
    pool: list[int],
    test: list[int],
    groups: list[str],
    start: list[int],
    strategy: str,
    args: argparse.Namespace,
    rng: np.random.Generator | None,
) -> list[float]:
    labels = {i: groups[i] for i in start}
    aucs = []
    while True:
        ix = make_index(feats, pool, labels, args.by)
        aucs.append(test_auc(ix, feats, test, groups, args.by))
        if len(labels) >= args.budget:
            return aucs
        n = min(args.step, args.budget - len(labels))
        if strategy == "active":
            pick = [int(s) for s in kf.active.suggest(ix, "group", n, by=args.by)]
        else:
            assert rng is not None
            free = [i for i in pool if i not in labels]
            pick = [free[j] for j in rng.choice(len(free), n, replace=False)]
        for i in pick:
            labels[i] = groups[i]


def labels_to_reach(counts: list[int], curve: np.ndarray, target: float) -> int | None:
    """Fewest labels from which ``curve`` stays at or above ``target`` (None: it ends
    below): a noisy curve that touches the target once and drops again does not count."""
    above = np.asarray(curve) >= target - 1e-9
    if not above[-1]:
        return None
    first = len(above) - int(np.argmin(above[::-1])) if not above.all() else 0
    return counts[first]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", type=int, default=20)
    ap.add_argument("--size", type=int, default=4, help="individuals per family")
    ap.add_argument("--resolution", type=float, default=4.0, help="scan voxel size (mm)")
    ap.add_argument("--start", type=int, default=4, help="labels to start with")
    ap.add_argument("--step", type=int, default=2, help="labels added per round")
    ap.add_argument("--budget", type=int, default=30, help="labels at the end")
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=10, help="random draws per start set")
    ap.add_argument("--starts", type=int, default=3, help="starting label sets")
    ap.add_argument(
        "--by",
        nargs="+",
        default=["vector", "keypoints"],
        choices=["auto", "keypoints", "vector", "fused"],
        help="what the classifier uses (one loop each)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="active_learning.png")
    ap.add_argument(
        "--cache", default=None, help="pickle of the cohort's features: reused when it exists"
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    args = ap.parse_args()
    args.by_all = list(args.by)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)

    t0 = time.perf_counter()
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        with cache.open("rb") as f:
            feats, groups = pickle.load(f)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cohort = kf.datasets.simulate_cohort(
                None,
                n_families=args.families,
                family_size=args.size,
                n_rescans=0,
                seed=args.seed,
                resolution_mm=args.resolution,
                progress=False,
            )
            feats = cohort_features(cohort, transform_source="truth", device="cpu", progress=False)
        groups = [str(g) for g in cohort.column("group")]
        if cache is not None:
            with cache.open("wb") as f:
                pickle.dump((feats, groups), f)
    n = len(groups)
    print(
        f"cohort: {n} scans ({groups.count('F')} F, {groups.count('M')} M) at "
        f"{args.resolution:g} mm, features in {time.perf_counter() - t0:.1f} s"
    )
    rng = np.random.default_rng(args.seed)
    test: list[int] = []
    for g in ("F", "M"):
        members = [i for i in range(n) if groups[i] == g]
        k = max(1, round(args.test_fraction * len(members)))
        test += sorted(int(i) for i in rng.choice(members, k, replace=False))
    pool = [i for i in range(n) if i not in set(test)]
    args.budget = min(args.budget, len(pool))
    for by in args.by:
        simulate(feats, pool, test, groups, argparse.Namespace(**{**vars(args), "by": by}))


def simulate(
    feats: Any, pool: list[int], test: list[int], groups: list[str], args: argparse.Namespace
) -> None:
    """The loop for one feature choice (``args.by``): the table, the figure and the
    fraction of random's labels active selection needs."""
    counts = [*range(args.start, args.budget, args.step), args.budget]
    active_curves, random_curves = [], []
    t0 = time.perf_counter()
    for s in range(args.starts):
        srng = np.random.default_rng([args.seed, s])
        per = [i for i in pool if groups[i] == "F"], [i for i in pool if groups[i] == "M"]
        start = [int(srng.choice(per[0])), int(srng.choice(per[1]))]
        rest = [i for i in pool if i not in start]
        start += [int(i) for i in srng.choice(rest, args.start - 2, replace=False)]
        active_curves.append(run_loop(feats, pool, test, groups, start, "active", args, None))
        for r in range(args.repeats):
            rrng = np.random.default_rng([args.seed, s, r])
            random_curves.append(run_loop(feats, pool, test, groups, start, "random", args, rrng))
    active = np.mean(active_curves, axis=0)
    random = np.mean(random_curves, axis=0)
    print(
        f"{len(pool)} pool / {len(test)} test scans, {args.starts} start set(s), random × "
        f"{args.repeats}, classifier on {args.by} ({time.perf_counter() - t0:.1f} s)"
    )
    print("  labels   AUC active   AUC random")
    for c, a, r in zip(counts, active, random, strict=True):
        print(f"  {c:6d}   {a:10.3f}   {r:10.3f}")
    final = float(random[-1])
    need = labels_to_reach(counts, active, final)
    if need is None:
        print(f"active ends below random's final AUC {final:.3f} at {args.budget} labels")
    else:
        print(
            f"active reaches (and keeps) random's final AUC {final:.3f} from {need} of "
            f"{args.budget} labels: "
            f"{100 * need / args.budget:.1f}% of random's (target ≤ 60%)"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(counts, active, "o-", label="active (entropy × density)")
    ax.plot(counts, random, "s--", label=f"random (mean of {len(random_curves)})")
    ax.axhline(final, color="grey", lw=0.8)
    ax.set_xlabel("labelled scans")
    ax.set_ylabel(f"test AUC (group, {args.by})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = args.out if len(args.by_all) == 1 else args.out.replace(".png", f"_{args.by}.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
