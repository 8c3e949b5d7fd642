"""Search by CNN vector and by the fused model (eq. 4), class-restricted retrieval, and the
retrieval evaluation (keyfuse.Index.search(by=...), keyfuse.evaluate.retrieval)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _vector_data import family_index, keypoints, rerank

import keyfuse as kf
from keyfuse.errors import InvalidArgumentError, KeyfuseError


@pytest.fixture(scope="module")
def fam() -> tuple[kf.Index, dict[str, np.ndarray]]:
    return family_index()


def brute_force(mat: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    m = mat.astype(np.float64)
    q = q.astype(np.float64)
    if metric == "cosine":
        with np.errstate(invalid="ignore", divide="ignore"):  # a zero vector: NaN, ranked last
            s = m @ q / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))
    else:
        s = -np.linalg.norm(m - q, axis=1)
    return np.lexsort((np.arange(len(s)), -s))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_vector_search_equals_brute_force(metric: str) -> None:
    rng = np.random.default_rng(1)
    base = keypoints(rerank(rng.random((20, 64))), rng)
    ix = kf.Index()
    mat = rng.standard_normal((300, 32)).astype(np.float32)
    for i, v in enumerate(mat):
        ix.add(f"s{i:03d}", base, vector=v)
    for _ in range(5):
        q = rng.standard_normal(32).astype(np.float32)
        hits = ix.search(q, k=15, by="vector", metric=metric)
        want = brute_force(mat, q, metric)[:15]
        assert hits.ids == [f"s{i:03d}" for i in want]
        assert np.all(np.diff(hits.scores) <= 0)
        if metric == "euclidean":
            assert hits.scores[0] == pytest.approx(
                -np.linalg.norm(mat[want[0]].astype(float) - q.astype(float)), rel=1e-12
            )
    # k=None ranks every subject; restrict limits the candidates
    assert len(ix.search(q, k=None, by="vector")) == 300
    some = [f"s{i:03d}" for i in range(0, 300, 7)]
    got = ix.search(q, k=5, by="vector", restrict=some)
    allowed = [int(s[1:]) for s in some]
    want = [allowed[i] for i in brute_force(mat[allowed], q, "euclidean")[:5]]
    assert got.ids == [f"s{i:03d}" for i in want]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_int8_scan_of_a_large_matrix_is_exact(metric: str) -> None:
    """Above 2**20 values the scan reads int8 codes; the error bounds keep every row that
    may be among the best, so the result is still the float64 brute force's, ties and
    near-ties (rows closer than the quantisation step) included."""
    from keyfuse.vector_search import VectorMatrix

    rng = np.random.default_rng(4)
    mat = rng.standard_normal((2100, 512)).astype(np.float32)
    q = rng.standard_normal(512).astype(np.float32)
    mat[1000] = mat[10]  # an exact tie, the later subject after the earlier
    mat[1500] = q + 1e-3 * rng.standard_normal(512).astype(np.float32)  # two near-ties
    mat[1501] = q + 1e-3 * rng.standard_normal(512).astype(np.float32)
    mat[2000] = 0.0  # a zero vector (cosine 0)
    vm = VectorMatrix(list(mat))
    assert vm.quantised is not None and vm.quantised.codes.dtype == np.int8
    for query in (q, mat[10] + 0.01, rng.standard_normal(512).astype(np.float32)):
        rows, scores = vm.top(query, 12, metric, None)
        want = brute_force(mat, query, metric)[:12]
        assert rows.tolist() == want.tolist()
        np.testing.assert_allclose(scores, vm.exact(query, want, metric), rtol=0, atol=0)
    allowed = np.zeros(len(mat), dtype=bool)
    allowed[::3] = True
    rows, _ = vm.top(q, 7, metric, allowed)
    keep = np.flatnonzero(allowed)
    assert rows.tolist() == keep[brute_force(mat[keep], q, metric)[:7]].tolist()


def test_vector_ties_follow_subject_order() -> None:
    rng = np.random.default_rng(2)
    base = keypoints(rerank(rng.random((20, 64))), rng)
    ix = kf.Index()
    same = rng.standard_normal(64).astype(np.float32)
    order = ["z", "a", "m", "b", "y"]
    for sid in order:  # identical vectors: every score ties
        ix.add(sid, base, vector=same)
    ix.add("far", base, vector=same + 10)
    for metric in ("euclidean", "cosine"):
        hits = ix.search(same + 0.5, k=3, by="vector", metric=metric)
        assert hits.ids == order[:3]
        assert len(set(hits.scores.tolist())) == 1


def test_subject_id_query_leaves_itself_out(fam) -> None:
    ix, vecs = fam
    hits = ix.search("f0m0", k=3, by="vector")
    assert "f0m0" not in hits.ids
    assert hits.ids == ix.search(vecs["f0m0"], k=4, by="vector").ids[1:]
    assert {ix.labels[h]["family"] for h in hits.ids} == {"F0"}


def test_fused_alpha_one_and_zero_are_the_single_sources(fam) -> None:
    ix, vecs = fam
    kps = ix.keypoints("f1m2")
    pair = (kps, vecs["f1m2"])
    by_vec = ix.search(pair, k=None, by="vector", exclude="f1m2")
    fused0 = ix.search(pair, k=None, by="fused", alpha=0.0, exclude="f1m2")
    assert fused0.ids == by_vec.ids and fused0.alpha == 0.0
    # α = 1: the keypoint term alone, ln(J + b): the keypoint search's ranking
    by_kp = ix.search(pair, k=None, exclude="f1m2")
    fused1 = ix.search(pair, k=None, by="fused", alpha=1.0, exclude="f1m2")
    assert fused1.ids == by_kp.ids
    sizes = [len(ix.keypoints(s)) for s in ix.subjects]
    b = 1.0 / (len(kps) + np.mean(sizes))
    np.testing.assert_allclose(fused1.scores, np.log(np.asarray(by_kp.scores) + b), rtol=1e-12)
    # the default α balances the two terms and still finds the family first
    fused = ix.search("f1m2", k=3, by="fused")
    assert 0 < fused.alpha < 1
    assert {ix.labels[h]["family"] for h in fused.ids} == {"F1"}
    # α from a fitted FusionClassifier
    clf = kf.FusionClassifier(alpha=0.25).fit(
        [(ix.keypoints(s), vecs[s]) for s in ix.subjects], ix.label("half")
    )
    assert ix.search(pair, k=2, by="fused", alpha=clf).alpha == 0.25


def test_pairwise_by(fam) -> None:
    ix, vecs = fam
    mat = np.stack([vecs[s] for s in ix.subjects]).astype(np.float64)
    v = ix.pairwise(by="vector")
    d = -np.linalg.norm(mat[:, None] - mat[None], axis=2)
    np.testing.assert_allclose(v, d, atol=1e-9)
    c = ix.pairwise(by="vector", metric="cosine")
    u = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    np.testing.assert_allclose(c, u @ u.T, atol=1e-12)
    f = ix.pairwise(by="fused", alpha=0.3)
    for a, sid in enumerate(ix.subjects[:3]):  # each row is that subject's fused search
        hits = ix.search(sid, k=None, by="fused", alpha=0.3)
        np.testing.assert_allclose(
            [f[a, ix.subjects.index(h)] for h in hits.ids], hits.scores, rtol=1e-12
        )
    assert np.all(np.diag(f) == f[~np.eye(len(f), dtype=bool)].max())


def test_predicted_restriction(fam, tmp_path: Path) -> None:
    ix, vecs = fam
    for by, q in (("vector", vecs["f2m1"]), ("keypoints", ix.keypoints("f2m1"))):
        hits = ix.search(q, k=None, by=by, restrict={"family": "predicted"}, exclude="f2m1")
        assert hits.predicted == {"family": "F2"}
        assert hits.ids and {ix.labels[h]["family"] for h in hits.ids} == {"F2"}
    # the prediction follows the query, and combines with explicit values
    odd = ix.search(
        vecs["f3m0"], k=None, by="vector", restrict={"family": "predicted", "half": "B"}
    )
    assert odd.predicted == {"family": "F3"} and set(odd.ids) == {f"f3m{m}" for m in range(4)}
    # cached with the index and saved with it; refitted after an add
    fused = ix.search("f0m1", k=2, by="fused", restrict={"half": "predicted"})
    assert fused.predicted == {"half": "A"}
    state = dict(ix._classifiers.state)
    assert {"family/vector", "family/keypoints", "half/fused"} <= set(state)
    ix.save(tmp_path / "ix")
    back = kf.Index(tmp_path / "ix")
    assert back._classifiers.state == state
    for s in ix.subjects:
        np.testing.assert_array_equal(back.vector(s), ix.vector(s))
    assert (
        back.search(vecs["f1m1"], k=5, by="vector").ids
        == ix.search(vecs["f1m1"], k=5, by="vector").ids
    )
    more = kf.Index(tmp_path / "ix", mode="r+")
    rng = np.random.default_rng(9)
    more.add("new", keypoints(rerank(rng.random((30, 64))), rng), vector=vecs["f1m1"],
             family="F1", half="A")  # fmt: skip
    old_fp = state["family/vector"]["fingerprint"]
    more.search(vecs["f1m1"], k=2, by="vector", restrict={"family": "predicted"})
    assert more._classifiers.state["family/vector"]["fingerprint"] != old_fp
    assert kf.Index(tmp_path / "ix")._classifiers.state["family/vector"]["n_train"] == 17


def test_bad_input_is_a_keyfuse_error(fam) -> None:
    ix, vecs = fam
    v = vecs["f0m0"]
    with pytest.raises(InvalidArgumentError, match="16"):
        ix.search(np.zeros(5), by="vector")
    bad = v.copy()
    bad[3] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN"):
        ix.search(bad, by="vector")
    with pytest.raises(InvalidArgumentError, match="by must be"):
        ix.search(v, by="pixels")
    with pytest.raises(InvalidArgumentError, match="metric"):
        ix.search(v, by="vector", metric="manhattan")
    with pytest.raises(InvalidArgumentError, match="keypoints"):
        ix.search(v, by="fused")
    with pytest.raises(InvalidArgumentError, match="vector"):
        ix.search(ix.keypoints("f0m0"), by="vector")
    with pytest.raises(InvalidArgumentError, match="alpha"):
        ix.search((ix.keypoints("f0m0"), v), by="fused", alpha=1.5)
    with pytest.raises(InvalidArgumentError, match="label"):
        ix.search(v, by="vector", restrict={"colour": "predicted"})
    with pytest.raises(KeyfuseError, match="by must"):
        ix.pairwise(by="nope")
    no_vec = kf.Index()
    no_vec.add("a", ix.keypoints("f0m0"))
    with pytest.raises(InvalidArgumentError, match="no subject of the index has one"):
        no_vec.search(v, by="vector")


def test_evaluate_retrieval(fam, tmp_path: Path) -> None:
    ix, _ = fam
    rep = kf.evaluate.retrieval(ix, "family", by=["vector", "fused"], plot=tmp_path)
    t = rep.table
    assert list(t.index.get_level_values("class")[:5]) == ["all", "F0", "F1", "F2", "F3"]
    assert {"mAP", "mAP|pred", "P@1", "P@1|pred", "R@10", "R@10|pred"} <= set(t.columns)
    assert t.loc[("vector", "all"), "queries"] == 16
    # well-separated families: perfect retrieval, and a perfect classifier
    assert t.loc[("vector", "all"), "mAP"] == pytest.approx(1.0)
    assert rep.accuracy["vector"] == 1.0
    assert t.loc[("vector", "all"), "R@5"] == pytest.approx(1.0)
    assert t.loc[("vector", "all"), "P@5"] == pytest.approx(3 / 5)
    png = rep.plots[0]
    assert png.suffix == ".png" and png.read_bytes()[:4] == b"\x89PNG"
    assert "mAP|pred" in str(rep)


def test_retrieval_metrics_restriction_hides_relevant() -> None:
    from keyfuse.evaluate import retrieval_metrics

    cls = ["a", "a", "b", "b"]
    s = np.array([[0, 0.9, 0.5, 0.1], [0.9, 0, 0.2, 0.3], [0.4, 0.3, 0, 0.8], [0.1, 0.2, 0.7, 0]])
    plain = retrieval_metrics(s, cls, ks=(1,))
    assert plain["ap"].tolist() == [1.0, 1.0, 1.0, 1.0]
    wrong = retrieval_metrics(s, cls, predicted=["b", "a", "b", "b"], ks=(1,))
    assert wrong["ap"].tolist() == [0.0, 1.0, 1.0, 1.0]  # query 0 mispredicted: nothing found
    assert wrong["p"][0, 0] == 0.0 and wrong["r"][0, 0] == 0.0


def test_fusion_alpha_falls_back_to_the_source_with_signal() -> None:
    """Vectors without family signal: α chosen on the index is 1 (keypoints alone), and
    the nested-α fused retrieval is not worse than either source, query by query."""
    ix, _ = family_index(n_families=3, size=3, vec_noise=50.0, seed=4)
    assert kf.evaluate.choose_fusion_alpha(ix, "family") == 1.0
    rep = kf.evaluate.retrieval(ix, "family", by=["keypoints", "vector", "fused"], alpha="auto")
    t = rep.table
    assert rep.alpha == 1.0
    assert t.loc[("vector", "all"), "mAP"] < t.loc[("keypoints", "all"), "mAP"]
    assert t.loc[("fused", "all"), "mAP"] >= t.loc[("keypoints", "all"), "mAP"]
    assert np.all(rep.ap["fused"] >= rep.ap["keypoints"])
    # keypoints without family signal (every subject its own random set): α falls to 0
    rng = np.random.default_rng(5)
    protos = {f: 10.0 * rng.standard_normal(8) for f in ("F0", "F1", "F2")}
    noisy = kf.Index()
    for s in ix.subjects:
        f = ix.labels[s]["family"]
        v = (protos[f] + 0.1 * rng.standard_normal(8)).astype(np.float32)
        noisy.add(s, keypoints(rerank(rng.random((40, 64))), rng), vector=v, family=f)
    rep = kf.evaluate.retrieval(noisy, "family", by=["keypoints", "vector", "fused"], alpha="auto")
    t = rep.table
    assert t.loc[("keypoints", "all"), "mAP"] < t.loc[("vector", "all"), "mAP"] == 1.0
    assert rep.alpha == 0.0 and t.loc[("fused", "all"), "mAP"] == 1.0
    with pytest.raises(InvalidArgumentError, match="colour"):
        kf.evaluate.choose_fusion_alpha(ix, "colour")
