"""kf.active: which subject to label next (posterior entropy × density), on a small
index whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from _vector_data import keypoints, rerank

import keyfuse as kf
from keyfuse.errors import InvalidArgumentError

# 2-D "CNN vectors": two labelled classes left and right, a dense ambiguous cluster in
# the middle (centred on c0), confident subjects near each class, and a far outlier
# that is ambiguous too but represents nothing
LABELLED = {
    "a0": ((-4.0, 0.0), "A"),
    "a1": ((-4.0, 1.0), "A"),
    "a2": ((-4.5, -1.0), "A"),
    "b0": ((4.0, 0.0), "B"),
    "b1": ((4.0, 1.0), "B"),
    "b2": ((4.5, -1.0), "B"),
}
UNLABELLED = {
    "near_a": (-3.6, 0.4),
    "c1": (0.4, 0.1),
    "c0": (0.0, 0.0),
    "c2": (-0.4, -0.1),
    "c3": (0.1, 0.45),
    "c4": (-0.1, -0.45),
    "near_b": (3.7, -0.3),
    "outlier": (0.0, 25.0),
}


@pytest.fixture(scope="module")
def index() -> kf.Index:
    rng = np.random.default_rng(0)
    ix = kf.Index()
    for sid, (v, label) in LABELLED.items():
        ix.add(sid, keypoints(rerank(rng.random((20, 64))), rng), vector=np.array(v), kind=label)
    for sid, v in UNLABELLED.items():
        ix.add(sid, keypoints(rerank(rng.random((20, 64))), rng), vector=np.array(v))
    return ix


def test_the_ambiguous_central_subject_comes_first(index: kf.Index) -> None:
    ranking = kf.active.rank(index, "kind")
    ids = [s.subject for s in ranking]
    assert ids[0] == "c0"
    # the central cluster before the confident subjects and the outlier
    assert set(ids[:5]) == {"c0", "c1", "c2", "c3", "c4"}
    assert ids.index("outlier") > ids.index("c4")
    # labelled subjects are never suggested; every unlabelled one is ranked once
    assert sorted(ids) == sorted(UNLABELLED)
    by_id = {s.subject: s for s in ranking}
    assert by_id["c0"].uncertainty > 0.9 and by_id["near_a"].uncertainty < 0.5
    assert by_id["outlier"].density < 0.1 < by_id["c0"].density
    scores = [s.score for s in ranking]
    assert scores == sorted(scores, reverse=True)
    assert kf.active.rank(index, "kind") == ranking  # deterministic
    # a batch: c0 first, then not its near-duplicates from the central cluster
    assert kf.active.suggest(index, "kind", 1) == ["c0"]
    batch = kf.active.suggest(index, "kind", 3)
    assert batch[0] == "c0" and not {"c1", "c2", "c3", "c4"} & set(batch[1:])
    everything = kf.active.suggest(index, "kind", 100)  # capped at the unlabelled subjects
    assert sorted(everything) == sorted(UNLABELLED)
    sim = kf.active.similarity(index)
    assert sim.shape == (14, 14) and np.allclose(np.diag(sim), 1.0)
    dens = kf.active.density(index)
    assert dens.max() == pytest.approx(1.0)
    for sug in ranking:
        assert dens[index.subjects.index(sug.subject)] == pytest.approx(sug.density)


def test_bad_requests_are_keyfuse_errors(index: kf.Index) -> None:
    with pytest.raises(InvalidArgumentError, match="no subject carries the label 'knd'"):
        kf.active.suggest(index, "knd", 1)
    for n in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="n must be an integer"):
            kf.active.suggest(index, "kind", n)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="by must be"):
        kf.active.suggest(index, "kind", 1, by="pixels")  # type: ignore[arg-type]


def test_one_labelled_class_is_not_enough() -> None:
    rng = np.random.default_rng(1)
    ix = kf.Index()
    ix.add("x", keypoints(rerank(rng.random((20, 64))), rng), vector=np.zeros(2), kind="A")
    ix.add("y", keypoints(rerank(rng.random((20, 64))), rng), vector=np.ones(2))
    with pytest.raises(InvalidArgumentError, match="at least 2 classes"):
        kf.active.suggest(ix, "kind", 1)
