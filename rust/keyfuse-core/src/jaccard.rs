//! Soft-Jaccard keypoint-set similarity (Chauvin et al. 2020/2021) and a deterministic
//! re-implementation of the reference matcher's voting (`featMatchMultiple`).
//!
//! Soft intersection of A with B:
//! `|A∩B| = Σ_{f_i∈A} max_{f_j ∈ NN_K(f_i) ∩ B} exp(−d²(f_i,f_j) / 2α_i²)`, with α_i² the
//! squared distance from f_i to its nearest neighbour in the collection it is compared
//! against, clamped to `[alpha2_floor, γ·E]`, and `J = |A∩B| / (|A| + |B| − |A∩B|)`.
//! The floor keeps exact duplicates at 1. The cap (our addition; γ =
//! [`SoftJaccardParams::alpha2_cap_fraction`], E = the mean squared distance between two
//! independent descriptors of the pooled data, `2 Σ_d Var_d`) matters because distances
//! concentrate in 64-d: without it every unrelated pair scores ≈ exp(−½) per keypoint,
//! since a keypoint with no true match still has a nearest neighbour at about the typical
//! distance. γ = ∞ gives the published formula.
//!
//! * In a [`Cohort`] (an index), the collection is every other subject: a subject's scores
//!   are relative to the cohort, as in the paper's large-scale retrieval.
//! * For two sets alone ([`soft_jaccard_pair`]), it is `A∖{f_i} ∪ B`: with B alone the
//!   nearest neighbour would always score exp(−½) and J would not depend on the data.
//!
//! Posterior kernel ([`SoftJaccardParams::posterior`], keyfuse's default): f_i's kernel
//! values over its K = 10 neighbours, with α_i = half its nearest-neighbour distance, are
//! normalised to sum to 1, subject B receives the share of its best neighbour, and each
//! keypoint of B keeps its best share from one query set (|A∩B| ≤ min(|A|,|B|), so J
//! stays a soft Jaccard: 1 for identical sets, ≈ 0 for disjoint ones). The competition
//! among candidates is what the reference voting gets right; with the narrower width it
//! beats the votes read as J on the same exact neighbours (see docs/decisions.md).
//!
//! Summation order never depends on the thread count (per-subject rows, fixed order),
//! so every score is bit-identical from run to run.
// Index loops mirror the formulas; `!(x > 0.0)` is deliberate: it also rejects NaN.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

use crate::knn::{
    check_rows, knn_all_pairs, knn_exact, knn_exact_prepared, ExactPrepared, ForestParams,
    KdForest, Neighbors,
};
use crate::{KfError, Result, DESC_LEN};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::OnceLock;

mod shares;
use shares::add_best_shares;

/// Parameters of soft-Jaccard scoring.
#[derive(Clone, Debug)]
pub struct SoftJaccardParams {
    /// Nearest neighbours per keypoint (K).
    pub k: usize,
    /// Exact brute-force k-NN instead of the kd-forest.
    pub exact: bool,
    /// Distance evaluations per query in the kd-forest.
    pub checks: usize,
    /// Lower bound of α² (squared rank-descriptor distance; the smallest non-zero distance
    /// between two permutations is 2).
    pub alpha2_floor: f64,
    /// γ: α² is capped at γ·E (E: mean squared distance of unrelated descriptors);
    /// `f64::INFINITY` disables the cap.
    pub alpha2_cap_fraction: f64,
    /// Posterior kernel (the default): each query keypoint's kernel values over its K
    /// neighbours are normalised to sum to 1, a subject receives the share of its best
    /// neighbour, and each indexed keypoint keeps only its best share from one query set.
    /// `false`: the published kernel `exp(−d²/2α²)` unnormalised.
    pub posterior: bool,
    /// α = `alpha_scale` × the nearest-neighbour distance (before the floor and cap):
    /// 1 in the published kernel, 0.5 in the posterior one (see the module notes).
    pub alpha_scale: f64,
}

impl Default for SoftJaccardParams {
    fn default() -> Self {
        SoftJaccardParams {
            k: 30,
            exact: false,
            checks: 128,
            alpha2_floor: 1.0,
            alpha2_cap_fraction: 0.1,
            posterior: false,
            alpha_scale: 1.0,
        }
    }
}

impl SoftJaccardParams {
    /// The posterior kernel with K = 10 and α = half the nearest-neighbour distance,
    /// uncapped: `keyfuse.soft_jaccard`'s default (see the module notes).
    pub fn posterior() -> Self {
        SoftJaccardParams {
            k: 10,
            alpha2_cap_fraction: f64::INFINITY,
            posterior: true,
            alpha_scale: 0.5,
            ..Default::default()
        }
    }
}

fn check_params(p: &SoftJaccardParams) -> Result<()> {
    if p.k == 0
        || p.checks == 0
        || !(p.alpha2_floor > 0.0 && p.alpha2_floor.is_finite())
        || !(p.alpha2_cap_fraction > 0.0)
        || !(p.alpha_scale > 0.0 && p.alpha_scale.is_finite())
    {
        return Err(KfError::InvalidArgument(
            "soft Jaccard needs k ≥ 1, checks ≥ 1, alpha2_floor > 0, alpha2_cap_fraction > 0 \
             and a finite alpha_scale > 0"
                .into(),
        ));
    }
    Ok(())
}

/// Per-dimension running sums of descriptor rows, for E = 2 Σ_d Var_d (the mean squared
/// distance between two independent descriptors of the data). The sums are exact integers,
/// so E does not depend on the order rows were added in.
#[derive(Clone, Debug)]
pub struct DimStats {
    n: u64,
    sum: [u64; DESC_LEN],
    sq: [u64; DESC_LEN],
}

impl Default for DimStats {
    fn default() -> Self {
        DimStats {
            n: 0,
            sum: [0; DESC_LEN],
            sq: [0; DESC_LEN],
        }
    }
}

impl DimStats {
    /// Add descriptor rows (`n × 64` bytes, row-major).
    pub fn add(&mut self, desc: &[u8]) {
        for row in desc.chunks_exact(DESC_LEN) {
            for d in 0..DESC_LEN {
                let v = row[d] as u64;
                self.sum[d] += v;
                self.sq[d] += v * v;
            }
        }
        self.n += (desc.len() / DESC_LEN) as u64;
    }
    /// Add the rows counted by `other` (the sums are exact, so merging shards' statistics
    /// gives the statistics of their union, whatever the order).
    pub fn merge(&mut self, other: &DimStats) {
        self.n += other.n;
        for d in 0..DESC_LEN {
            self.sum[d] += other.sum[d];
            self.sq[d] += other.sq[d];
        }
    }
    /// The sums as `1 + 2·64` words: row count, per-dimension sums, sums of squares.
    pub fn to_words(&self) -> Vec<u64> {
        let mut w = Vec::with_capacity(1 + 2 * DESC_LEN);
        w.push(self.n);
        w.extend_from_slice(&self.sum);
        w.extend_from_slice(&self.sq);
        w
    }
    /// Statistics from [`DimStats::to_words`]' words.
    pub fn from_words(w: &[u64]) -> Result<DimStats> {
        if w.len() != 1 + 2 * DESC_LEN {
            return Err(KfError::InvalidArgument(format!(
                "descriptor statistics need {} words, got {}",
                1 + 2 * DESC_LEN,
                w.len()
            )));
        }
        let mut s = DimStats {
            n: w[0],
            ..Default::default()
        };
        s.sum.copy_from_slice(&w[1..1 + DESC_LEN]);
        s.sq.copy_from_slice(&w[1 + DESC_LEN..]);
        Ok(s)
    }
    /// E = 2 Σ_d Var_d of the rows added so far (∞ for fewer than two rows).
    pub fn mean_sq_dist(&self) -> f64 {
        if self.n < 2 {
            return f64::INFINITY;
        }
        let n = self.n as f64;
        (0..DESC_LEN)
            .map(|d| {
                let m = self.sum[d] as f64 / n;
                2.0 * (self.sq[d] as f64 / n - m * m).max(0.0)
            })
            .sum()
    }
}

/// The α² clamp `(floor, max(γ·E, floor))` for `floor` = [`SoftJaccardParams::alpha2_floor`],
/// γ = `cap_fraction` and E = `mean_sq_dist` ([`DimStats::mean_sq_dist`]); a NaN cap
/// (γ = ∞ with E = 0) means no cap. The CUDA cohort engine clamps with the same bounds.
pub fn alpha2_clamp(floor: f64, cap_fraction: f64, mean_sq_dist: f64) -> (f64, f64) {
    let cap = cap_fraction * mean_sq_dist;
    let cap = if cap.is_nan() { f64::INFINITY } else { cap };
    (floor, cap.max(floor))
}

/// The kernel width of `p` for data with statistics `stats`.
fn alpha2_bounds(p: &SoftJaccardParams, stats: &DimStats) -> KernelWidth {
    let (floor, cap) = alpha2_clamp(p.alpha2_floor, p.alpha2_cap_fraction, stats.mean_sq_dist());
    KernelWidth {
        scale2: p.alpha_scale * p.alpha_scale,
        floor,
        cap,
    }
}

/// The adaptive kernel width: α² = clamp(alpha_scale² · d²(nearest neighbour), floor, cap).
#[derive(Clone, Copy, Debug)]
struct KernelWidth {
    scale2: f64,
    floor: f64,
    cap: f64,
}

impl KernelWidth {
    #[inline]
    fn alpha2(&self, d1: f64) -> f64 {
        (self.scale2 * d1).clamp(self.floor, self.cap)
    }
}

/// Jaccard index from a soft intersection and the two set sizes.
#[inline]
pub fn jaccard_from(inter: f64, na: usize, nb: usize) -> f64 {
    let union = na as f64 + nb as f64 - inter;
    if union <= 0.0 {
        0.0
    } else {
        (inter / union).clamp(0.0, 1.0)
    }
}

/// Jaccard indices of a query set of `n_query` keypoints against subjects with keypoint
/// counts `sizes`, from its soft intersections with them (CPU and CUDA cohorts alike).
pub fn jaccard_scores(inter: &[f64], n_query: usize, sizes: &[usize]) -> Vec<f64> {
    inter
        .iter()
        .zip(sizes)
        .map(|(&i, &n)| jaccard_from(i, n_query, n))
        .collect()
}

/// The N×N soft-Jaccard matrix, row-major, of subjects with keypoint counts `sizes`, from
/// their soft intersections `inter(a, b)` (a's keypoints into subject b): diagonal 1;
/// `symmetric` averages `inter(a, b)` and `inter(b, a)` before forming J. CPU and CUDA
/// cohorts both assemble their matrices here.
pub fn jaccard_matrix(
    sizes: &[usize],
    symmetric: bool,
    inter: impl Fn(usize, usize) -> f64,
) -> Vec<f64> {
    let n = sizes.len();
    let mut out = vec![0.0f64; n * n];
    for a in 0..n {
        for b in 0..n {
            out[a * n + b] = if a == b {
                1.0
            } else {
                let i = if symmetric {
                    0.5 * (inter(a, b) + inter(b, a))
                } else {
                    inter(a, b)
                };
                jaccard_from(i, sizes[a], sizes[b])
            };
        }
    }
    out
}

/// A cohort of keypoint sets (descriptors only) with a lazily built kd-forest: the search
/// engine of `keyfuse.Index`.
#[derive(Clone, Debug)]
pub struct Cohort {
    data: Vec<u8>,
    owner: Vec<u32>,
    offsets: Vec<usize>,
    forest: Option<KdForest>,
    forest_params: ForestParams,
    stats: DimStats,
    // what exact search precomputes from the rows, made on the first exact search after
    // the last `add`
    exact: OnceLock<ExactPrepared>,
}

impl Cohort {
    pub fn new(forest_params: ForestParams) -> Self {
        Cohort {
            data: Vec::new(),
            owner: Vec::new(),
            offsets: vec![0],
            forest: None,
            forest_params,
            stats: DimStats::default(),
            exact: OnceLock::new(),
        }
    }

    /// Append one subject's descriptors (`n × 64` bytes); returns its subject number.
    pub fn add(&mut self, desc: &[u8]) -> Result<usize> {
        let n = check_rows("descriptors", desc)?;
        let s = self.n_subjects();
        if self.owner.len() + n >= u32::MAX as usize {
            return Err(KfError::InvalidArgument(
                "index is full (2³² keypoints)".into(),
            ));
        }
        self.data.extend_from_slice(desc);
        self.owner.extend(std::iter::repeat_n(s as u32, n));
        self.offsets.push(self.owner.len());
        self.stats.add(desc);
        self.forest = None;
        self.exact = OnceLock::new();
        Ok(s)
    }

    pub fn n_subjects(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn n_points(&self) -> usize {
        self.owner.len()
    }

    /// Keypoints per subject.
    pub fn sizes(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    pub fn descriptors(&self) -> &[u8] {
        &self.data
    }

    /// Bytes held: descriptors, owners and the forest.
    pub fn memory_bytes(&self) -> usize {
        self.data.len()
            + self.owner.len() * 4
            + self.forest.as_ref().map_or(0, |f| f.memory_bytes())
    }

    /// Build the kd-forest now (otherwise built on the first approximate search).
    pub fn build_forest(&mut self) -> Result<()> {
        if self.forest.is_none() {
            self.forest = Some(KdForest::build(&self.data, &self.forest_params)?);
        }
        Ok(())
    }

    pub fn has_forest(&self) -> bool {
        self.forest.is_some()
    }

    /// k-NN of `queries` among the cohort's points; `skip` as in [`knn_exact_prepared`]
    /// (only the exact search uses it).
    fn knn<F, S>(
        &self,
        queries: &[u8],
        p: &SoftJaccardParams,
        skip: S,
        filter: F,
    ) -> Result<Neighbors>
    where
        F: Fn(usize, u32) -> bool + Sync,
        S: Fn(Range<usize>) -> Range<usize> + Sync,
    {
        if p.exact {
            let prepared = ExactPrepared::cached(&self.exact, &self.data)?;
            return knn_exact_prepared(&self.data, prepared, queries, p.k, skip, filter);
        }
        match &self.forest {
            Some(f) => f.search(&self.data, queries, p.k, p.checks, filter),
            None => Err(KfError::InvalidArgument(
                "approximate search needs build_forest() first".into(),
            )),
        }
    }

    /// Soft intersection of a query set with every subject (`exclude`: the query's own
    /// subject, skipped; `allowed`: per-subject mask restricting the search).
    pub fn intersections(
        &self,
        queries: &[u8],
        exclude: Option<usize>,
        allowed: Option<&[bool]>,
        p: &SoftJaccardParams,
    ) -> Result<Vec<f64>> {
        check_params(p)?;
        check_rows("query descriptors", queries)?;
        if let Some(a) = allowed {
            if a.len() != self.n_subjects() {
                return Err(KfError::InvalidArgument(
                    "restriction mask length differs from the number of subjects".into(),
                ));
            }
        }
        let ex = exclude.map_or(u32::MAX, |e| e as u32);
        let owner = &self.owner;
        // the excluded subject's rows (none if it is not in the cohort)
        let own = exclude
            .and_then(|e| Some(*self.offsets.get(e)?..*self.offsets.get(e + 1)?))
            .unwrap_or(0..0);
        let nb = self.knn(
            queries,
            p,
            |_| own.clone(),
            |_, c| {
                let s = owner[c as usize];
                s != ex && allowed.is_none_or(|a| a[s as usize])
            },
        )?;
        // the one path of sharded indexes too: k-NN per shard, merge, score
        let nb = crate::knn::merge_neighbors(&[nb], p.k)?;
        score_neighbors(
            &nb,
            |c| owner[c as usize],
            self.n_subjects(),
            &self.stats,
            p,
        )
    }

    /// Soft-Jaccard of a query set against every subject.
    pub fn search(
        &self,
        queries: &[u8],
        exclude: Option<usize>,
        allowed: Option<&[bool]>,
        p: &SoftJaccardParams,
    ) -> Result<Vec<f64>> {
        let nq = queries.len() / DESC_LEN;
        let inter = self.intersections(queries, exclude, allowed, p)?;
        Ok(jaccard_scores(&inter, nq, &self.sizes()))
    }

    /// N×N soft-Jaccard matrix (row = query subject, its own subject excluded), row-major.
    /// `symmetric` averages the two soft intersections before forming J. The diagonal is 1.
    pub fn pairwise(&self, p: &SoftJaccardParams, symmetric: bool) -> Result<Vec<f64>> {
        check_params(p)?;
        let n = self.n_subjects();
        let owner = &self.owner;
        let rows = self.per_subject(p, |nb| {
            let nb = crate::knn::merge_neighbors(std::slice::from_ref(nb), p.k)?;
            score_neighbors(&nb, |c| owner[c as usize], n, &self.stats, p)
        })?;
        let rows: Vec<Vec<f64>> = rows.into_iter().collect::<Result<_>>()?;
        Ok(jaccard_matrix(&self.sizes(), symmetric, |a, b| rows[a][b]))
    }

    /// Every indexed keypoint's neighbours among the other subjects, searched as one batch
    /// (the forest orders it for cache locality), then `row(neighbours of subject s)` per
    /// subject in parallel; each row is computed by one task in a fixed order.
    fn per_subject<R: Send, G: Fn(&Neighbors) -> R + Sync>(
        &self,
        p: &SoftJaccardParams,
        row: G,
    ) -> Result<Vec<R>> {
        let owner = &self.owner;
        let nb = if p.exact {
            let prepared = ExactPrepared::cached(&self.exact, &self.data)?;
            knn_all_pairs(&self.data, prepared, &self.offsets[1..], p.k)?
        } else {
            self.knn(
                &self.data,
                p,
                |_| 0..0,
                |q, c| owner[q] != owner[c as usize],
            )?
        };
        crate::cancel::check()?;
        Ok((0..self.n_subjects())
            .into_par_iter()
            .map(|s| row(&nb.rows(self.offsets[s]..self.offsets[s + 1])))
            .collect())
    }

    /// The reference matcher's vote matrix (see [`reference_votes`]) over this cohort.
    pub fn reference_votes(&self, p: &SoftJaccardParams) -> Result<Vec<f64>> {
        check_params(p)?;
        let n = self.n_subjects();
        Ok(self
            .per_subject(p, |nb| vote_row(nb, &self.owner, n))?
            .concat())
    }
}

/// Soft intersections of one query set with each of `n_subjects` subjects from its
/// keypoints' K nearest neighbours over the whole cohort (`nb`, global point ids, as
/// merged by [`crate::knn::merge_neighbors`]); `owner(c)` is point c's subject and `stats`
/// the cohort's descriptor statistics. Every index, sharded or not, scores here.
pub fn score_neighbors<O: Fn(u32) -> u32>(
    nb: &Neighbors,
    owner: O,
    n_subjects: usize,
    stats: &DimStats,
    p: &SoftJaccardParams,
) -> Result<Vec<f64>> {
    check_params(p)?;
    let mut inter = vec![0.0f64; n_subjects];
    for q in 0..nb.n_queries() {
        if nb.row(q).any(|(c, _)| owner(c) as usize >= n_subjects) {
            return Err(KfError::InvalidArgument(
                "neighbour of a subject outside the cohort".into(),
            ));
        }
    }
    accumulate(nb, &owner, alpha2_bounds(p, stats), p.posterior, &mut inter);
    Ok(inter)
}

/// Add every query keypoint's best kernel value per subject into `inter` (published
/// kernel), or its posterior share (see [`SoftJaccardParams::posterior`]).
fn accumulate<O: Fn(u32) -> u32>(
    nb: &Neighbors,
    owner: &O,
    bounds: KernelWidth,
    posterior: bool,
    inter: &mut [f64],
) {
    let mut seen: Vec<u32> = Vec::with_capacity(nb.k);
    // posterior: each neighbour's kernel value, computed once for the sum and the shares
    let mut weights: Vec<f64> = Vec::with_capacity(nb.k);
    // posterior: (indexed keypoint, share), reduced to each keypoint's best share
    let mut shares: Vec<(u32, f64)> = Vec::new();
    for q in 0..nb.n_queries() {
        let mut row = nb.row(q).peekable();
        let Some(&(_, d1)) = row.peek() else { continue };
        let a2 = bounds.alpha2(d1 as f64);
        let kernel = |d: u32| (-(d as f64) / (2.0 * a2)).exp();
        weights.clear();
        let wsum: f64 = if posterior {
            weights.extend(nb.row(q).map(|(_, d)| kernel(d)));
            weights.iter().copied().sum()
        } else {
            1.0
        };
        seen.clear();
        // neighbours come nearest first, so the first one of a subject is its maximum
        for (i, (c, d)) in row.enumerate() {
            let s = owner(c);
            if seen.contains(&s) {
                continue;
            }
            seen.push(s);
            if posterior {
                shares.push((c, weights[i] / wsum));
            } else {
                inter[s as usize] += kernel(d);
            }
        }
    }
    if posterior {
        add_best_shares(shares, owner, inter);
    }
}

/// One query subject's row of the vote matrix.
fn vote_row(nb: &Neighbors, owner: &[u32], n: usize) -> Vec<f64> {
    // (result feature, vote) from every query feature, at most one per other subject
    let mut votes: Vec<(u32, f64)> = Vec::new();
    let mut seen: Vec<u32> = Vec::with_capacity(nb.k);
    for q in 0..nb.n_queries() {
        let row: Vec<(u32, u32)> = nb.row(q).collect();
        let Some(&(_, d1)) = row.first() else {
            continue;
        };
        let dmin2 = (d1 as f64).max(1.0);
        let w: Vec<f64> = row
            .iter()
            .map(|&(_, d)| (-(d as f64) / dmin2).exp())
            .collect();
        let wsum: f64 = w.iter().sum();
        seen.clear();
        for (&(c, _), &wj) in row.iter().zip(&w) {
            let s = owner[c as usize];
            if seen.contains(&s) {
                continue;
            }
            seen.push(s);
            votes.push((c, (1.0 + wj / wsum).log2()));
        }
    }
    // keep each result feature's best vote, then sum per subject in a fixed order
    votes.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut out = vec![0.0f64; n];
    let mut last = u32::MAX;
    for (c, v) in votes {
        if c != last {
            out[owner[c as usize] as usize] += v;
            last = c;
        }
    }
    out
}

/// The reference large-scale matcher's voting (`featMatchMultiple`), made deterministic:
/// each keypoint of image a takes its K nearest neighbours among the other images
/// (default K = 5, kd-forest with 8 trees and 64 checks), votes at most once per other
/// image with `log2(1 + w_j/Σw)`, `w_j = exp(−D_j²/D_min²)`; each feature of image b keeps
/// only its best vote from a; `V[a][b]` sums them. Row-major N×N, asymmetric.
pub fn reference_votes(sets: &[&[u8]], p: &SoftJaccardParams) -> Result<Vec<f64>> {
    // leaves of 8, as when this emulation was compared with the reference's figures (the
    // index's forests use 16 since; docs/decisions.md)
    let mut c = Cohort::new(ForestParams {
        leaf_size: 8,
        ..ForestParams::default()
    });
    for s in sets {
        c.add(s)?;
    }
    if !p.exact {
        c.build_forest()?;
    }
    c.reference_votes(p)
}

/// Keypoint geometry for the soft-Jaccard geometry kernel: world positions (mm, already
/// mapped into a common frame) and scales (mm).
pub struct Geometry<'a> {
    pub xyz_a: &'a [[f64; 3]],
    pub scale_a: &'a [f64],
    pub xyz_b: &'a [[f64; 3]],
    pub scale_b: &'a [f64],
}

/// Soft intersections |A∩B| (A's keypoints into B) and |B∩A| for two sets alone; α_i is
/// f_i's nearest-neighbour distance over `A∖{f_i} ∪ B` (see the module notes). With
/// `geometry`, each kernel value is multiplied by
/// `exp(−‖Δx‖²/(σ_a σ_b)²) · exp(−(ln σ_a − ln σ_b)²)`.
pub fn soft_intersections_pair(
    a: &[u8],
    b: &[u8],
    p: &SoftJaccardParams,
    geometry: Option<&Geometry<'_>>,
) -> Result<(f64, f64)> {
    check_params(p)?;
    let na = check_rows("a", a)?;
    let nb = check_rows("b", b)?;
    if let Some(g) = geometry {
        if g.xyz_a.len() != na
            || g.scale_a.len() != na
            || g.xyz_b.len() != nb
            || g.scale_b.len() != nb
        {
            return Err(KfError::InvalidArgument(
                "geometry arrays must have one row per keypoint".into(),
            ));
        }
        if g.scale_a
            .iter()
            .chain(g.scale_b)
            .any(|s| !(*s > 0.0) || !s.is_finite())
        {
            return Err(KfError::InvalidArgument(
                "keypoint scales must be positive".into(),
            ));
        }
    }
    let mut stats = DimStats::default();
    stats.add(a);
    stats.add(b);
    let bounds = alpha2_bounds(p, &stats);
    let one_way = |x: &[u8], y: &[u8], flip: bool| -> Result<f64> {
        let nx = x.len() / DESC_LEN;
        if nx == 0 || y.is_empty() {
            return Ok(0.0);
        }
        let kw = if p.posterior { p.k } else { 1 };
        let within = knn_exact(x, x, kw, |q, c| c as usize != q)?;
        let cross = if p.exact || nx * (y.len() / DESC_LEN) <= 1 << 22 {
            knn_exact(y, x, p.k, |_, _| true)?
        } else {
            let f = KdForest::build(y, &ForestParams::default())?;
            f.search(y, x, p.k, p.checks, |_, _| true)?
        };
        let geo = |q: usize, c: usize| -> f64 {
            let Some(g) = geometry else { return 1.0 };
            let (xa, sa, xb, sb) = if flip {
                (g.xyz_b[q], g.scale_b[q], g.xyz_a[c], g.scale_a[c])
            } else {
                (g.xyz_a[q], g.scale_a[q], g.xyz_b[c], g.scale_b[c])
            };
            let dx2: f64 = (0..3).map(|i| (xa[i] - xb[i]).powi(2)).sum();
            let ls = sa.ln() - sb.ln();
            (-dx2 / (sa * sb).powi(2)).exp() * (-ls * ls).exp()
        };
        let mut total = 0.0f64;
        let mut shares: Vec<(u32, f64)> = Vec::new();
        let mut merged: Vec<(u32, bool, u32)> = Vec::with_capacity(2 * p.k);
        for q in 0..nx {
            if p.posterior {
                // the K nearest over A∖{f_i} ∪ B (ties: A first, then by index)
                merged.clear();
                merged.extend(within.row(q).map(|(c, d)| (d, false, c)));
                merged.extend(cross.row(q).map(|(c, d)| (d, true, c)));
                merged.sort_unstable();
                merged.truncate(p.k);
                let Some(&(d1, _, _)) = merged.first() else {
                    continue;
                };
                let a2 = bounds.alpha2(d1 as f64);
                let w = |d: u32| (-(d as f64) / (2.0 * a2)).exp();
                let wsum: f64 = merged.iter().map(|&(d, _, _)| w(d)).sum();
                let mut best: Option<(u32, f64)> = None;
                for &(d, in_b, c) in &merged {
                    if in_b {
                        let v = w(d) * geo(q, c as usize) / wsum;
                        if best.is_none_or(|(_, b)| v > b) {
                            best = Some((c, v));
                        }
                    }
                }
                shares.extend(best);
                continue;
            }
            let mut d1 = within.dist2[q] as f64;
            if let Some((_, d)) = cross.row(q).next() {
                d1 = d1.min(d as f64);
            }
            let a2 = bounds.alpha2(d1);
            let mut best = 0.0f64;
            for (c, d) in cross.row(q) {
                best = best.max((-(d as f64) / (2.0 * a2)).exp() * geo(q, c as usize));
            }
            total += best;
        }
        if p.posterior {
            // each keypoint of B keeps its best share
            let mut t = [0.0f64];
            add_best_shares(shares, &|_| 0, &mut t);
            total = t[0];
        }
        Ok(total)
    };
    Ok((one_way(a, b, false)?, one_way(b, a, true)?))
}

/// Soft Jaccard of two keypoint sets (see [`soft_intersections_pair`]); `symmetric`
/// averages |A∩B| and |B∩A|.
pub fn soft_jaccard_pair(
    a: &[u8],
    b: &[u8],
    p: &SoftJaccardParams,
    symmetric: bool,
    geometry: Option<&Geometry<'_>>,
) -> Result<f64> {
    let (ab, ba) = soft_intersections_pair(a, b, p, geometry)?;
    let i = if symmetric { 0.5 * (ab + ba) } else { ab };
    Ok(jaccard_from(i, a.len() / DESC_LEN, b.len() / DESC_LEN))
}

#[cfg(test)]
mod tests;
