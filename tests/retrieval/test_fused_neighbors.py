"""The fused search's keypoint term ln(J + b) from the keypoint search's own neighbour
lists: the keypoint search's soft Jaccard J, the same whether the index is sharded on disk
or in memory (keyfuse.vector_search.keypoint_terms)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _vector_data import N_KP, family_index, keypoints, rerank

import keyfuse as kf


@pytest.fixture(scope="module")
def fam() -> tuple[kf.Index, dict[str, np.ndarray]]:
    return family_index(n_families=3, size=4)


def in_subject_order(ix: kf.Index, hits: kf.SearchResult) -> np.ndarray:
    out = np.full(len(ix), np.nan)
    for h in hits:
        out[ix.subjects.index(h.subject_id)] = h.score
    return out


def background(ix: kf.Index, n_query: int) -> float:
    return 1.0 / (n_query + np.mean([len(ix.keypoints(s)) for s in ix.subjects]))


def test_fused_keypoint_term_is_the_log_soft_jaccard(fam) -> None:
    ix, vecs = fam
    rng = np.random.default_rng(3)
    for sid in ("f0m0", "f1m3", "f2m1"):
        i = ix.subjects.index(sid)
        jac = in_subject_order(ix, ix.search(sid, k=None, exact=True))
        got = in_subject_order(ix, ix.search(sid, k=None, by="fused", alpha=1.0, exact=True))
        keep = np.arange(len(ix)) != i
        want = np.log(jac[keep] + background(ix, N_KP))
        assert np.isnan(got[i]) and np.array_equal(got[keep], want)
    # a new scan (not indexed, nothing left out)
    proto = np.asarray(ix.keypoints("f1m0").descriptors, np.float64)
    new = keypoints(rerank(proto + 4.0 * rng.standard_normal(proto.shape)), rng)
    jac = in_subject_order(ix, ix.search(new, k=None, exact=True))
    got = in_subject_order(ix, ix.search((new, vecs["f1m0"]), k=None, by="fused", alpha=1.0))
    assert np.array_equal(got, np.log(jac + background(ix, len(new))))
    # pairwise: every row is its subject's keypoint term, off the diagonal
    pw = ix.pairwise(by="fused", alpha=1.0, exact=True)
    jp = ix.pairwise(exact=True)
    for a in range(len(ix)):
        off = np.arange(len(ix)) != a
        np.testing.assert_allclose(pw[a, off], np.log(jp[a, off] + background(ix, N_KP)))


def test_keypoint_term_known_answer() -> None:
    """An exact copy of an indexed set has J = 1 with it, a set no neighbour reaches J = 0:
    their terms are ln(1 + b) and ln b, b = 1 / (|A| + mean |B|)."""
    rng = np.random.default_rng(7)
    sets = [keypoints(rerank(rng.random((30, 64))), rng) for _ in range(3)]
    far = keypoints(rerank(rng.random((5, 64))), rng)
    ix = kf.Index(k=2)
    for i, kps in enumerate([*sets, far]):
        ix.add(f"s{i}", kps, vector=np.zeros(4, np.float32) + i, half="AB"[i % 2])
    b = 1.0 / (30 + (3 * 30 + 5) / 4)
    got = in_subject_order(
        ix, ix.search((sets[1], np.ones(4, np.float32)), k=None, by="fused", alpha=1.0)
    )
    assert got[1] == np.log(1.0 + b)
    # with k = 2 each keypoint's 2 nearest: its copy in s1 and one other; s3 (5 points
    # of 95) is reached by few or none, and a subject reached by none scores ln b
    assert np.all(got[[0, 2, 3]] < got[1]) and np.all(got >= np.log(b))
    # a restriction limits the k-NN pass as in the keypoint search: the same J
    q = (sets[1], np.ones(4, np.float32))
    kp = ix.search(sets[1], k=None, restrict={"half": "A"})
    fused = ix.search(q, k=None, by="fused", alpha=1.0, restrict={"half": "A"})
    assert fused.ids == kp.ids and sorted(kp.ids) == ["s0", "s2"]
    assert np.array_equal(fused.scores, np.log(np.asarray(kp.scores) + b))


def _fill(ix: kf.Index, vecs: dict[str, np.ndarray], src: kf.Index, batch: int) -> kf.Index:
    rows = [(s, src.keypoints(s), vecs[s], src.labels[s]) for s in src.subjects]
    for a in range(0, len(rows), batch):
        ix.add_many(rows[a : a + batch])
    return ix


def test_sharded_fused_search_equals_in_memory(fam, tmp_path: Path) -> None:
    ix, vecs = fam
    path = tmp_path / "sharded.kfi"
    # shards of at most 2 subjects (120 keypoints each), appended 5 at a time
    sharded = _fill(kf.Index(path, mode="x", shard_size=2 * N_KP), vecs, ix, batch=5)
    assert sum(s["sealed"] for s in sharded.shards) >= 4
    reopened = kf.Index(path)
    for sid in ("f0m1", "f2m3"):
        want = ix.search(sid, k=None, by="fused", exact=True)
        for other in (sharded, reopened):
            got = other.search(sid, k=None, by="fused", exact=True)
            assert got.ids == want.ids and np.array_equal(got.scores, want.scores)
            assert got.alpha == want.alpha
    want_pw = ix.pairwise(by="fused", exact=True)
    assert np.array_equal(reopened.pairwise(by="fused", exact=True), want_pw)
    # approximate (each shard's kd-forest): deterministic, in process and on a scheduler
    a = reopened.search("f1m1", k=None, by="fused", alpha=1.0, exact=False)
    b = kf.Index(path).search("f1m1", k=None, by="fused", alpha=1.0, exact=False)
    c = reopened.search("f1m1", k=None, by="fused", alpha=1.0, exact=False, scheduler="sync")
    assert a.ids == b.ids == c.ids and np.array_equal(a.scores, b.scores)
    assert np.array_equal(a.scores, c.scores)
    assert {ix.labels[h]["family"] for h in a.ids[:3]} == {"F1"}
    fa = reopened.pairwise(by="fused", alpha=1.0, exact=False)
    assert np.array_equal(fa, kf.Index(path).pairwise(by="fused", alpha=1.0, exact=False))
    fam_of = [ix.labels[s]["family"] for s in ix.subjects]
    off = ~np.eye(len(ix), dtype=bool)
    best = np.argmax(np.where(off, fa, -np.inf), axis=1)
    assert all(fam_of[j] == fam_of[i] for i, j in enumerate(best))
