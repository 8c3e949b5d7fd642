"""MI binarization (eq. 10), the kernel densities (eqs. 5–9) and the fusion classifier
(eq. 4) on small hand-made data."""

from __future__ import annotations

import numpy as np
import pytest

import keyfuse as kf
from keyfuse.errors import InvalidArgumentError
from keyfuse.fusion import (
    keypoint_log_likelihoods,
    log_posterior,
    mi_thresholds,
    pick_alpha,
    select_alpha,
    vector_log_likelihoods,
)

# ----------------------------------------------------------------------- helpers


def perm_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.stack([rng.permutation(64) for _ in range(n)]).astype(np.uint8)


def jitter(rng: np.random.Generator, desc: np.ndarray, swaps: int) -> np.ndarray:
    """Swap a few ranks in every row: a noisy copy that is still a permutation."""
    out = desc.copy()
    for row in out:
        for _ in range(swaps):
            a, b = rng.integers(0, 64, 2)
            row[a], row[b] = row[b], row[a]
    return out


def kpset(desc: np.ndarray) -> kf.KeypointSet:
    n = len(desc)
    return kf.KeypointSet(
        ijk=np.zeros((n, 3)),
        scale=np.ones(n, np.float32),
        orientation=np.tile(np.eye(3, dtype=np.float32), (n, 1, 1)),
        descriptors=desc,
    )


def cohort(
    seed: int = 0, n_classes: int = 4, per_class: int = 3, n_kp: int = 30, swaps: int = 12
) -> tuple[list[kf.KeypointSet], np.ndarray, np.ndarray]:
    """Samples whose keypoints are noisy copies of a class prototype plus clutter, and
    whose vectors are a weak class signal plus noise."""
    rng = np.random.default_rng(seed)
    sets, vecs, labels = [], [], []
    protos = [perm_rows(rng, n_kp) for _ in range(n_classes)]
    centres = rng.normal(size=(n_classes, 16))
    for c in range(n_classes):
        for _ in range(per_class):
            desc = np.concatenate([jitter(rng, protos[c], swaps), perm_rows(rng, n_kp // 2)])
            sets.append(kpset(desc))
            vecs.append(0.6 * centres[c] + rng.normal(size=16))
            labels.append(c)
    return sets, np.array(vecs), np.array(labels)


def numpy_keypoint_ll(query: np.ndarray, train: list[np.ndarray], cls: np.ndarray, nc: int):
    """Eq. 7 transcribed directly: Σ_i log((1/N_k) Σ_{j∈k} exp(−d²/(1+dNN²)) + 1)."""
    t = np.concatenate(train).astype(np.float64)
    tc = np.repeat(cls, [len(x) for x in train])
    d2 = ((query.astype(np.float64)[:, None, :] - t[None]) ** 2).sum(-1)
    kern = np.exp(-d2 / (1.0 + d2.min(axis=1, keepdims=True)))
    out = np.zeros(nc)
    for k in range(nc):
        n_k = (tc == k).sum()
        out[k] = np.log(kern[:, tc == k].sum(axis=1) / n_k + 1.0).sum()
    return out


def numpy_vector_ll(q: np.ndarray, t: np.ndarray, cls: np.ndarray, nc: int, hamming: bool):
    """Eq. 9 transcribed directly (μ = mean distance to the training vectors)."""
    if hamming:
        d = (q[:, None, :] != t[None]).sum(-1).astype(np.float64)
    else:
        d = np.sqrt(((q[:, None, :] - t[None]) ** 2).sum(-1))
    mu = d.mean(axis=1, keepdims=True)
    kern = np.exp(-(d**2) / mu**2)
    return np.stack([np.log(kern[:, cls == k].mean(axis=1) + 1.0) for k in range(nc)], axis=1)


# ----------------------------------------------------------------- eq. (10)


def test_mi_threshold_known_split() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    col_sep = np.array([1.0, 2.0, 3.0, 7.0, 8.0, 9.0])  # perfect split between 3 and 7
    col_mixed = np.array([5.0, 1.0, 9.0, 2.0, 8.0, 4.0])  # best split: 5 vs 8 -> (4+5)/2?
    x = np.stack([col_sep, col_mixed], axis=1)
    tau, info = mi_thresholds(x, y)
    assert tau[0] == pytest.approx(5.0)
    assert info[0] == pytest.approx(1.0)  # one full bit

    # exhaustive check of the mixed column against a direct formula
    def mi(t: float) -> float:
        b = col_mixed > t

        def h(p: float) -> float:
            return 0.0 if p in (0.0, 1.0) else -(p * np.log2(p) + (1 - p) * np.log2(1 - p))

        return h(b.mean()) - sum((y == c).mean() * h(b[y == c].mean()) for c in (0, 1))

    cands = np.unique(col_mixed)
    mids = (cands[1:] + cands[:-1]) / 2
    best = max(mids, key=mi)  # first maximum, as documented
    assert tau[1] == pytest.approx(best)
    assert info[1] == pytest.approx(mi(best))


def test_mi_one_sample_per_class_maximises_entropy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 5))
    tau_single, _ = mi_thresholds(x, np.arange(10))
    tau_none, info = mi_thresholds(x)
    np.testing.assert_array_equal(tau_single, tau_none)
    b = x > tau_none
    np.testing.assert_array_equal(b.sum(axis=0), 5)  # median split
    np.testing.assert_allclose(info, 1.0)


def test_mibinarizer_estimator_and_constant_column() -> None:
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(kf.MIBinarizer())
    x = np.array([[1.0, 3.0], [1.0, 5.0], [1.0, 9.0]])
    out = kf.MIBinarizer().fit(x, [0, 1, 1]).transform(x)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 0], 0)
    np.testing.assert_array_equal(out[:, 1], [0, 1, 1])


# ------------------------------------------------------------------- eqs. (5)–(9)


def test_keypoint_kde_matches_numpy() -> None:
    sets, _, labels = cohort(seed=2, n_classes=3, per_class=2, n_kp=12)
    train = [s.descriptors for s in sets[1:]]
    got = keypoint_log_likelihoods([sets[0]], sets[1:], labels[1:], 3)[0]
    want = numpy_keypoint_ll(sets[0].descriptors, train, labels[1:], 3)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert np.argmax(got) == labels[0]
    # leave-one-out exclusion = removing the sample
    loo = keypoint_log_likelihoods([sets[0]], sets, labels, 3, exclude=[0])[0]
    np.testing.assert_array_equal(loo, got)
    # k = every training keypoint gives the exact sum; a small k an approximation
    k_all = keypoint_log_likelihoods([sets[0]], sets[1:], labels[1:], 3, n_neighbors=10_000)
    np.testing.assert_array_equal(k_all[0], got)
    k5 = keypoint_log_likelihoods([sets[0]], sets[1:], labels[1:], 3, n_neighbors=5)[0]
    assert np.all(k5 <= got + 1e-12) and np.argmax(k5) == labels[0]
    # the kd-forest search with enough checks finds the same neighbours
    k5_forest = keypoint_log_likelihoods(
        [sets[0]], sets[1:], labels[1:], 3, n_neighbors=5, checks=10_000
    )[0]
    np.testing.assert_array_equal(k5_forest, k5)


def test_keypoint_kde_terms_are_rounded_like_the_gpu_fixed_point() -> None:
    """Kernel terms are rounded to multiples of 2⁻³², the CUDA kernel's 32.32 fixed
    point, on the CPU too (one formula on both backends): a term of e^-30 (< 2⁻³³) counts
    0 on both, so its class gets exactly ln(0 + b) = 0 (the CPU used to keep it)."""
    base = np.arange(64, dtype=np.uint8)
    near = base.copy()
    near[[0, 1]] = near[[1, 0]]  # d² = 2: the nearest neighbour, width 1 + 2 = 3
    far = base.copy()
    far[[10, 13]] = far[[13, 10]]  # 2·3²
    far[[20, 26]] = far[[26, 20]]  # + 2·6² = 90: exponent 90 / 3 = 30
    train = [kpset(near[None]), kpset(far[None])]
    ll = keypoint_log_likelihoods([kpset(base[None])], train, [0, 1], 2, n_neighbors=None)[0]
    assert ll[1] == 0.0
    assert ll[0] == pytest.approx(np.log(np.exp(-2 / 3) + 1.0), abs=1e-9)


def test_keypoint_kde_no_underflow_with_many_keypoints() -> None:
    rng = np.random.default_rng(3)
    train = [kpset(perm_rows(rng, 50)) for _ in range(2)]
    query = kpset(perm_rows(rng, 3000))  # unrelated: every kernel tiny
    ll = keypoint_log_likelihoods([query], train, [0, 1], 2)[0]
    assert np.all(np.isfinite(ll)) and np.all(ll > 0)


@pytest.mark.parametrize("hamming", [False, True])
def test_vector_kde_matches_numpy(hamming: bool) -> None:
    rng = np.random.default_rng(4)
    t = rng.normal(size=(9, 20))
    q = rng.normal(size=(4, 20))
    if hamming:
        t, q = (t > 0).astype(np.uint8), (q > 0).astype(np.uint8)
    cls = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    got = vector_log_likelihoods(q, t, cls, 3)
    np.testing.assert_allclose(got, numpy_vector_ll(q, t, cls, 3, hamming), rtol=1e-12)
    # leave-one-out: row i excludes training vector i
    loo = vector_log_likelihoods(t[:3], t, cls, 3, exclude=[0, 1, 2])
    for i in range(3):
        keep = np.arange(9) != i
        want = numpy_vector_ll(t[i : i + 1], t[keep], cls[keep], 3, hamming)
        np.testing.assert_allclose(loo[i : i + 1], want, rtol=1e-12)


def test_kde_bad_inputs() -> None:
    sets, vecs, labels = cohort(seed=5, n_classes=2, per_class=2, n_kp=6)
    with pytest.raises(InvalidArgumentError, match="outside"):
        vector_log_likelihoods(vecs, vecs, np.full(len(vecs), 7), 2)
    with pytest.raises(InvalidArgumentError, match=r"columns|elements"):
        vector_log_likelihoods(vecs[:, :3], vecs, labels, 2)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        vector_log_likelihoods(np.full((1, 16), np.nan), vecs, labels, 2)
    with pytest.raises(InvalidArgumentError, match="only 0 and 1"):
        vector_log_likelihoods(vecs, vecs, labels, 2, metric="hamming")
    with pytest.raises(InvalidArgumentError, match="background"):
        keypoint_log_likelihoods(sets[:1], sets, labels, 2, background=0.0)
    with pytest.raises(InvalidArgumentError, match="KeypointSet"):
        keypoint_log_likelihoods([np.zeros(3)], sets, labels, 2)


# ------------------------------------------------------------------------- eq. (4)


def test_alpha_extremes_reduce_to_single_sources() -> None:
    sets, vecs, labels = cohort(seed=6)
    pairs = list(zip(sets, vecs, strict=True))
    kp_only = kf.FusionClassifier().fit(sets, labels)
    vec_only = kf.FusionClassifier().fit(vecs, labels)
    assert kp_only.alpha_ == 1.0 and vec_only.alpha_ == 0.0
    fused1 = kf.FusionClassifier(alpha=1.0).fit(pairs, labels)
    fused0 = kf.FusionClassifier(alpha=0.0).fit(pairs, labels)
    np.testing.assert_allclose(fused1.predict_proba(pairs), kp_only.predict_proba(sets))
    np.testing.assert_allclose(fused0.predict_proba(pairs), vec_only.predict_proba(vecs))
    # the fused log-likelihood is the α-weighted sum of the two
    half = kf.FusionClassifier(alpha=0.25).fit(pairs, labels)
    want = 0.25 * keypoint_log_likelihoods(sets, sets, labels, 4, n_neighbors=5) + 0.75 * (
        vector_log_likelihoods(vecs, vecs, labels, 4)
    )
    np.testing.assert_allclose(half.joint_log_likelihood(pairs), want)
    np.testing.assert_allclose(half.predict_log_proba(pairs), log_posterior(want))


def complementary_cohort(
    seed: int, per_class: int
) -> tuple[list[kf.KeypointSet], np.ndarray, np.ndarray]:
    """Four classes; the keypoints tell {0, 1} from {2, 3} only (one prototype per
    pair), the vectors tell {0, 2} from {1, 3} only: each source alone is at chance
    within its pair, the two together name the class."""
    rng = np.random.default_rng(seed)
    protos = [perm_rows(rng, 30) for _ in range(2)]
    centres = 3.0 * rng.normal(size=(2, 16))
    sets, vecs, labels = [], [], []
    for c in range(4):
        for _ in range(per_class):
            desc = np.concatenate([jitter(rng, protos[c // 2], 12), perm_rows(rng, 15)])
            sets.append(kpset(desc))
            vecs.append(centres[c % 2] + rng.normal(size=16))
            labels.append(c)
    return sets, np.array(vecs), np.array(labels)


def test_auto_alpha_and_fusion_helps() -> None:
    """Fused predictions on held-out samples beat either source alone where the sources
    carry complementary information, and the α search prefers an interior α."""
    all_sets, all_vecs, all_labels = complementary_cohort(seed=7, per_class=7)
    train = np.arange(len(all_labels)) % 7 < 4  # 4 training, 3 test samples per class
    sets = [s for s, t in zip(all_sets, train, strict=True) if t]
    test_sets = [s for s, t in zip(all_sets, train, strict=True) if not t]
    vecs, test_vecs = all_vecs[train], all_vecs[~train]
    labels, test_labels = all_labels[train], all_labels[~train]
    pairs = list(zip(sets, vecs, strict=True))
    test_pairs = list(zip(test_sets, test_vecs, strict=True))
    clf = kf.FusionClassifier(alpha="auto").fit(pairs, labels)
    assert 0.0 < clf.alpha_ < 1.0
    assert len(clf.cv_alphas_) == len(clf.cv_scores_) > 2
    assert np.nanmax(clf.cv_scores_) > np.nanmax(clf.cv_scores_[[0, -1]]) + 0.05
    fused = (clf.predict(test_pairs) == test_labels).mean()
    kp_only = (kf.FusionClassifier().fit(sets, labels).predict(test_sets) == test_labels).mean()
    vec_only = (kf.FusionClassifier().fit(vecs, labels).predict(test_vecs) == test_labels).mean()
    assert fused >= 0.9 > max(kp_only, vec_only) + 0.2
    # selection helper on matrices where only the keypoint term is informative
    codes = np.repeat(np.arange(3), 2)
    l_kp = np.where(np.eye(3)[codes] > 0, 5.0, 0.0)
    l_v = np.random.default_rng(0).normal(size=(6, 3))
    a, cand, aucs = select_alpha(l_kp, l_v, codes)
    assert aucs[-1] == 1.0 and aucs[cand == a][0] == 1.0 and a > 0.0


def test_auto_alpha_binarizer_does_not_see_the_held_out_sample() -> None:
    """Vectors of pure noise carry no class information: their leave-one-out AUC (the
    α = 0 candidate) must stay near chance. A binariser fitted on every row, the
    held-out one included, picks thresholds that separate each pair of classmates and
    makes noise look informative (AUC ≈ 0.9 before the fix)."""
    rng = np.random.default_rng(3)
    sets, _, labels = cohort(seed=3, n_classes=8, per_class=2)
    noise = rng.normal(size=(len(labels), 400))
    pairs = list(zip(sets, noise, strict=True))
    clf = kf.FusionClassifier(alpha="auto", binarize=True).fit(pairs, labels)
    assert clf.cv_alphas_[0] == 0.0
    assert clf.cv_scores_[0] < 0.7
    # the keypoints are informative, so the search still leans on them
    assert clf.cv_scores_[-1] > 0.9 and clf.alpha_ > 0.5


def test_pick_alpha_takes_the_middle_of_ties() -> None:
    grid = [0.0, 0.1, 0.2, 0.3, 0.4, 1.0]
    assert pick_alpha(grid, [0.5, 0.9, 0.9, 0.9, 0.7, np.nan]) == 0.2
    assert pick_alpha(grid, [0.5, 0.9, 0.9, 0.9, 0.9, 0.1]) == 0.3  # middle of 4: upper
    assert pick_alpha(grid, [1.0, 0.2, 0.2, 0.2, 0.2, 0.2]) == 0.0
    assert pick_alpha(grid, [np.nan] * 6) == 0.5
    assert pick_alpha(grid, [np.nan] * 6, undecided=0.0) == 0.0


def test_classifier_api_and_errors() -> None:
    sets, vecs, labels = cohort(seed=8, n_classes=2, per_class=4)
    names = np.array(["F", "M"])[labels]
    pairs = list(zip(sets, vecs, strict=True))
    clf = kf.FusionClassifier(alpha=0.5, binarize=True).fit(pairs, names)
    assert set(clf.predict(pairs)) <= {"F", "M"}
    assert clf.decision_function(pairs).shape == (len(pairs),)
    np.testing.assert_allclose(clf.predict_proba(pairs).sum(axis=1), 1.0)
    assert clf.binarizer_ is not None
    assert (clf.predict(pairs) == names).mean() >= 0.75
    with pytest.raises(InvalidArgumentError, match="alpha"):
        kf.FusionClassifier(alpha=2.0).fit(pairs, names)
    with pytest.raises(InvalidArgumentError, match="labels"):
        kf.FusionClassifier().fit(pairs, names[:-1])
    with pytest.raises(InvalidArgumentError, match="same parts"):
        clf.predict(sets)
    with pytest.raises(ValueError, match="features"):
        kf.FusionClassifier().fit(vecs, names).predict(vecs[:, :5])


def test_check_estimator_on_vectors() -> None:
    """The vectors-only mode is a plain scikit-learn classifier. No check is skipped:
    keypoint inputs cannot be expressed as the arrays check_estimator generates, so the
    keypoint path is covered by the tests above instead."""
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(kf.FusionClassifier())


# ------------------------------------------------------------------- experiment


def test_experiment_on_synthetic_features(tmp_path) -> None:
    from click.testing import CliRunner

    from keyfuse.cli import cli
    from keyfuse.experiments.fusion_table1 import (
        CohortFeatures,
        _slice_image,
        evaluate_fusion,
        format_table,
        save_figures,
    )

    sets, vecs, labels = cohort(seed=9, n_classes=4, per_class=3)
    rng = np.random.default_rng(9)
    table = [
        {"subject": f"s{i}", "individual": f"s{i}", "family": f"f{c}", "group": "FM"[c % 2]}
        for i, c in enumerate(labels)
    ]
    table[1]["individual"] = "s0"  # a rescan: never trains or ranks against its twin scan
    flat = [kpset(perm_rows(rng, 8)) for _ in sets]
    feats = CohortFeatures(table, sets, flat, vecs.astype(np.float32), [], [], {})
    res = evaluate_fusion(feats, progress=False)
    rows = res["rows"]
    assert rows["3D keypoints"]["family"] > 0.9  # the keypoints carry the family signal
    assert 0.3 < rows["2D keypoints"]["family"] < 0.8  # random keypoints: chance
    assert np.isnan(rows["linear SVM on CNN (raw)"]["family"])
    assert all(0.0 <= r["group"] <= 1.0 for r in rows.values())
    assert -1.0 <= res["correlation"] <= 1.0
    text = format_table(res)
    assert text.splitlines()[1].startswith("3D keypoints")  # best family AUC first
    paths = save_figures(res, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)
    out = CliRunner().invoke(cli, ["evaluate", "fusion", "--help"])
    assert out.exit_code == 0 and "--transform" in out.output
    img = kf.Image(np.arange(60.0).reshape(3, 4, 5), np.diag([2.0, 3.0, 4.0, 1.0]))
    sl = _slice_image(img, 2)
    assert sl.shape == (3, 4) and np.allclose(sl.spacing[:2], [2.0, 3.0])
    np.testing.assert_array_equal(sl.data, img.data[:, :, 2])
