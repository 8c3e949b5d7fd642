"""keyfuse.evaluate against scikit-learn and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from keyfuse import evaluate as ev
from keyfuse.errors import InvalidArgumentError


def test_roc_auc_hand_and_sklearn() -> None:
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    s = [0.9, 0.5, 0.4, 0.1]
    y = [1, 0, 1, 0]
    assert ev.roc_auc(s, y) == pytest.approx(0.75)
    rng = np.random.default_rng(1)
    s2 = rng.normal(size=200)
    y2 = rng.random(200) < 0.3
    assert ev.roc_auc(s2, y2) == pytest.approx(roc_auc_score(y2, s2))
    # ties count one half
    assert ev.roc_auc([1.0, 1.0], [True, False]) == pytest.approx(0.5)


def test_roc_curve_endpoints() -> None:
    fpr, tpr, thr = ev.roc_curve([0.9, 0.5, 0.4, 0.1], [1, 0, 1, 0])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert len(fpr) == len(tpr) == len(thr)


def test_average_precision() -> None:
    # ranking: pos, neg, pos, neg -> AP = (1/1 + 2/3) / 2
    assert ev.average_precision([0.9, 0.5, 0.4, 0.1], [1, 0, 1, 0]) == pytest.approx(
        (1 + 2 / 3) / 2
    )
    rng = np.random.default_rng(2)
    s = rng.normal(size=100)
    y = rng.random(100) < 0.5
    assert ev.average_precision(s, y) == pytest.approx(average_precision_score(y, s))


def test_pair_input_errors() -> None:
    with pytest.raises(InvalidArgumentError):
        ev.roc_auc([1, 2, 3], [1, 0])
    with pytest.raises(InvalidArgumentError):
        ev.roc_auc([1, 2], [1, 1])
    with pytest.raises(InvalidArgumentError):
        ev.roc_auc([1, np.nan], [1, 0])
    with pytest.raises(InvalidArgumentError):
        ev.roc_auc([1, 2], [2, 0])


def test_retrieval_metrics_hand() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]])
    rel = np.array([[False, True, False, True], [True, False, False, False]])
    # q0: ranks F T F T -> AP = (1/2 + 2/4)/2 = 0.5; q1: order 3,2,1,0 -> rel at rank 4 -> 0.25
    assert ev.mean_average_precision(scores, rel) == pytest.approx((0.5 + 0.25) / 2)
    assert ev.precision_at_k(scores, rel, 2) == pytest.approx((0.5 + 0.0) / 2)
    assert ev.recall_at_k(scores, rel, 2) == pytest.approx((0.5 + 0.0) / 2)
    assert ev.recall_at_k(scores, rel, 4) == pytest.approx(1.0)
    # excluding column 0 for q0 changes nothing for it; excluding the top item of q1
    ex = np.array([[False, False, False, False], [False, False, False, True]])
    assert ev.precision_at_k(scores, rel, 1, exclude=ex) == pytest.approx(0.0)
    # query with no relevant items is skipped
    rel2 = rel.copy()
    rel2[1] = False
    assert ev.mean_average_precision(scores, rel2) == pytest.approx(0.5)
    with pytest.raises(InvalidArgumentError):
        ev.mean_average_precision(scores, np.zeros_like(rel))
    with pytest.raises(InvalidArgumentError):
        ev.precision_at_k(scores, rel, 0)


def test_map_matches_sklearn_per_query() -> None:
    rng = np.random.default_rng(3)
    s = rng.normal(size=(5, 30))
    r = rng.random((5, 30)) < 0.3
    expect = np.mean([average_precision_score(r[q], s[q]) for q in range(5)])
    assert ev.mean_average_precision(s, r) == pytest.approx(expect)


def test_approx_recall() -> None:
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[1, 3, 9], [5, 4, 7]])
    assert ev.approx_recall_at_k(approx, exact, 1) == pytest.approx(0.5)
    assert ev.approx_recall_at_k(approx, exact, 2) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(InvalidArgumentError):
        ev.approx_recall_at_k(approx, exact, 4)


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 voxels
    b[1:3] = True  # 8 voxels, overlap 4
    assert ev.dice(a, b) == pytest.approx(2 * 4 / 16)
    la = np.array([0, 1, 1, 2, 2, 0])
    lb = np.array([0, 1, 2, 2, 2, 3])
    d = ev.dice(la, lb)
    assert isinstance(d, dict)
    assert d[1] == pytest.approx(2 * 1 / 3)
    assert d[2] == pytest.approx(2 * 2 / 5)
    assert d[3] == pytest.approx(0.0)
    assert ev.dice(la, lb, labels=[7])[7] == 1.0  # type: ignore[index]
    with pytest.raises(InvalidArgumentError):
        ev.dice(a, b[:2])


def test_roc_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(4)
    y = rng.random(50) < 0.5
    out = ev.roc_plot(
        {"a": (rng.normal(size=50) + y, y), "b": (rng.normal(size=50), y)},
        tmp_path / "sub" / "roc.png",
    )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    with pytest.raises(InvalidArgumentError):
        ev.roc_plot({}, tmp_path / "x.png")


def _toy_table() -> list[dict[str, str]]:
    # family A: mz twins a1/a2 + rescan of a1; family B: siblings b1, b2; family C: c1
    return [
        {
            "subject": "a1",
            "individual": "a1",
            "family": "A",
            "relation": "mz_twin",
            "twin_of": "a2",
        },
        {
            "subject": "a2",
            "individual": "a2",
            "family": "A",
            "relation": "mz_twin",
            "twin_of": "a1",
        },
        {
            "subject": "a1r",
            "individual": "a1",
            "family": "A",
            "relation": "mz_twin",
            "twin_of": "a2",
        },
        {"subject": "b1", "individual": "b1", "family": "B", "relation": "sibling", "twin_of": ""},
        {"subject": "b2", "individual": "b2", "family": "B", "relation": "sibling", "twin_of": ""},
        {"subject": "c1", "individual": "c1", "family": "C", "relation": "sibling", "twin_of": ""},
    ]


def test_cohort_helpers() -> None:
    tab = _toy_table()
    n = len(tab)
    s = np.full((n, n), 0.1)
    np.fill_diagonal(s, 1.0)
    s[0, 2] = s[2, 0] = 0.9  # rescan
    s[0, 1] = s[1, 0] = s[1, 2] = s[2, 1] = 0.5  # mz twins
    s[3, 4] = s[4, 3] = 0.3  # siblings
    ps, pl = ev.family_pairs(tab, s)
    assert ps.size == n * (n - 1) // 2 - 1  # the rescan pair is dropped
    assert pl.sum() == 3  # a1-a2, a2-a1r, b1-b2
    assert ev.roc_auc(ps, pl) == pytest.approx(1.0)
    groups = ev.relation_pairs(tab, s)
    assert set(groups) == {"rescan", "mz_twin", "sibling", "unrelated"}
    assert groups["rescan"].tolist() == [0.9]
    assert ev.rescan_rank1(tab, s) == 1.0
    s2 = s.copy()
    s2[2, 1] = 0.95  # the rescan now prefers the twin in its own row
    assert ev.rescan_rank1(tab, s2) == pytest.approx(0.5)
    rep = ev.family_report(tab, s)
    assert rep["family_auc"] == pytest.approx(1.0)
    assert rep["map"] == pytest.approx(1.0)
    assert rep["mz_above_unrelated"] == 1.0
    assert rep["mean_unrelated"] == pytest.approx(0.1)
    with pytest.raises(InvalidArgumentError):
        ev.family_pairs(tab, s[:3, :3])
    with pytest.raises(InvalidArgumentError):
        ev.table_column(tab, "nope")


def test_identification_curves() -> None:
    tab = _toy_table()
    n = len(tab)
    s = np.full((n, n), 0.1)
    s[0, 1] = s[1, 0] = s[1, 2] = s[2, 1] = 0.5  # mz twins
    curves = ev.identification_curves(tab, s)
    assert list(curves) == ["same family vs different family", "identical twins vs unrelated"]
    twins, is_twin = curves["identical twins vs unrelated"]
    assert is_twin.sum() == len(ev.relation_pairs(tab, s)["mz_twin"])
    assert ev.roc_auc(twins, is_twin) == pytest.approx(1.0)
    # one family alone has no different-family pairs, hence no curve
    one = [row for row in tab if row["family"] == "A"]
    assert ev.identification_curves(one, s[:3, :3]) == {}
