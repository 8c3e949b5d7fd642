//! Likelihoods of the shallow+deep fusion model (Chauvin et al., equations 5–9).
//!
//! * [`keypoint_log_likelihood`]: log p({f_i} | C_k) for every class k, the product over
//!   query keypoints (eq. 5) of an adaptive-width kernel density over the training
//!   keypoints of class k plus a uniform background (eqs. 6–7):
//!   p(f_i | C_k) ∝ (1/N_k) Σ_{j ∈ k} exp(−‖f_i − f_j‖² / (1 + dNN_i²)) + b,
//!   dNN_i = min_j ‖f_i − f_j‖ over all training keypoints.
//! * [`vector_log_likelihood`]: log p(v | C_k) (eqs. 8–9),
//!   p(v | C_k) ∝ (1/N_k) Σ_{j ∈ k} exp(−d(v, v_j)² / μ²) + b with μ the mean distance
//!   from v to the training vectors; Euclidean for real vectors (`f64`), Hamming for
//!   binary ones (`u8` holding 0 and 1).
//!
//! Everything is computed in log space as a sum of `ln(S/N + b)` terms, so a product over
//! thousands of keypoints never underflows. Work is split over rayon threads per query
//! row, and every sum runs in a fixed order, so results are bit-identical whatever the
//! thread count. Leave-one-out evaluation is built in: an excluded training sample is
//! ignored everywhere (kernel sums, class counts, dNN and μ).
//!
//! ```
//! use ndarray::array;
//! use keyfuse_core::kde::{vector_log_likelihood, KdeOptions};
//! let train = array![[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]];
//! let classes = array![0_i64, 0, 1];
//! let query = array![[0.05, 0.0]];
//! let ll = vector_log_likelihood(query.view(), train.view(), classes.view(), 2, None,
//!                                &KdeOptions::default()).unwrap();
//! assert!(ll[[0, 0]] > ll[[0, 1]]);
//! ```

use crate::{knn, KfError, Result, DESC_LEN};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use rayon::prelude::*;

/// A kernel exponent beyond this adds less than e^-40 ≈ 4e-18 to a sum that already
/// holds the background b (≥ f64 epsilon relative to it for b ≥ 1e-2), so it is skipped:
/// the result is unchanged at f64 precision and most `exp` calls are saved.
pub const EXP_CUTOFF: f64 = 40.0;

/// The keypoint kernel's values are rounded to multiples of 1/`KERNEL_FIX` (2⁻³², round
/// half to even) before they are summed: the CUDA kernel accumulates them in 32.32 fixed
/// point (`KF_FIX` in score.cu, exact and independent of the summation order), and the CPU
/// rounds the same way so both give the same sums. A term below 2⁻³³ counts 0 on both;
/// against the background b = 1 that moves a log-likelihood by less than 1.2e-10.
pub const KERNEL_FIX: f64 = 4_294_967_296.0;

/// Add the kernel value `exp(−d2/width)`, rounded to a multiple of 2⁻³² (see
/// [`KERNEL_FIX`]), to `out[c]`, unless the exponent reaches [`EXP_CUTOFF`]. The keypoint
/// term's one kernel, shared with the CUDA likelihood; the sums stay exact (multiples of
/// 2⁻³² below 2²¹ are exact in f64).
#[inline]
pub fn add_kernel_term(out: &mut [f64], c: usize, d2: u32, width: f64) {
    if let Some(v) = kernel_value(d2, width) {
        out[c] += v;
    }
}

/// The keypoint kernel `exp(−d2/width)` rounded to a multiple of 2⁻³², or `None` when the
/// exponent reaches [`EXP_CUTOFF`] (see [`add_kernel_term`]).
#[inline]
fn kernel_value(d2: u32, width: f64) -> Option<f64> {
    let x = d2 as f64 / width;
    (x < EXP_CUTOFF).then(|| ((-x).exp() * KERNEL_FIX).round_ties_even() / KERNEL_FIX)
}

/// Σ over query rows of ln(S_qc/N_c + b) for each class c, from the row-major
/// (Nq × C) kernel sums `sums` and the class sizes `n_per_class` (a class with no
/// training keypoint contributes ln b per row). Rows are added in order, so the result is
/// deterministic; the CUDA keypoint likelihood finishes with it too.
pub fn log_likelihood_from_sums(sums: &[f64], n_per_class: &[usize], background: f64) -> Vec<f64> {
    let mut ll = vec![0.0f64; n_per_class.len()];
    for row in sums.chunks_exact(n_per_class.len().max(1)) {
        for (c, &s) in row.iter().enumerate() {
            ll[c] += log_term(s, n_per_class[c], background);
        }
    }
    ll
}

/// Options shared by the likelihood functions.
#[derive(Debug, Clone)]
pub struct KdeOptions {
    /// Uniform background density b added to every kernel sum (the paper's "+1"); > 0.
    pub background: f64,
    /// Keypoint term only: sum the kernel over the `k` nearest training keypoints of each
    /// query keypoint instead of all of them (the paper evaluates it with a kd-tree k-NN).
    /// `None` = exact sum over every training keypoint.
    pub k: Option<usize>,
    /// With `k`: find the neighbours approximately with a randomized kd-forest
    /// ([`crate::knn::KdForest`], 8 trees, deterministic) visiting this many leaves'
    /// points per query, instead of the exact brute force. `None` = exact.
    pub checks: Option<usize>,
}

impl Default for KdeOptions {
    fn default() -> Self {
        Self {
            background: 1.0,
            k: None,
            checks: None,
        }
    }
}

fn check_background(b: f64) -> Result<()> {
    if !(b.is_finite() && b > 0.0) {
        return Err(KfError::InvalidArgument(format!(
            "background must be a finite number > 0, got {b}"
        )));
    }
    Ok(())
}

/// Validate class labels (0 ≤ c < n_classes) and turn them into indices.
fn class_indices(classes: ArrayView1<i64>, n_classes: usize, what: &str) -> Result<Vec<usize>> {
    if n_classes == 0 {
        return Err(KfError::InvalidArgument("n_classes must be ≥ 1".into()));
    }
    classes
        .iter()
        .map(|&c| {
            if c < 0 || c as u64 >= n_classes as u64 {
                Err(KfError::InvalidArgument(format!(
                    "{what} label {c} is outside 0..{n_classes}"
                )))
            } else {
                Ok(c as usize)
            }
        })
        .collect()
}

/// log p({f_i} | C_k) for each class k (eqs. 5–7), summed over the query keypoints.
///
/// * `query` (Nq, 64) and `train` (Nt, 64): uint8 SIFT-Rank descriptors.
/// * `train_sample` (Nt,): the training sample (image) each training keypoint comes from.
/// * `sample_class` (S,): the class of each training sample, in `0..n_classes`.
/// * `exclude_sample`: a training sample to ignore (leave-one-out), or `None`.
///
/// Returns `n_classes` values Σ_i ln(S_ik / N_k + b), where N_k counts the training
/// keypoints of class k (a class with none gets ln b per keypoint). An empty query gives
/// zeros. With `opts.k`, S_ik sums over the k nearest training keypoints only, found by
/// the exact k-NN of [`crate::knn::knn_exact`]; otherwise over all of them (exact eq. 7).
pub fn keypoint_log_likelihood(
    query: ArrayView2<u8>,
    train: ArrayView2<u8>,
    train_sample: ArrayView1<i64>,
    sample_class: ArrayView1<i64>,
    n_classes: usize,
    exclude_sample: Option<usize>,
    opts: &KdeOptions,
) -> Result<Array1<f64>> {
    check_background(opts.background)?;
    let dim = DESC_LEN;
    if query.ncols() != dim || train.ncols() != dim {
        return Err(KfError::InvalidArgument(format!(
            "descriptors must have {dim} columns: query has {}, training has {}",
            query.ncols(),
            train.ncols()
        )));
    }
    if train_sample.len() != train.nrows() {
        return Err(KfError::InvalidArgument(format!(
            "train_sample has {} entries for {} training keypoints",
            train_sample.len(),
            train.nrows()
        )));
    }
    if opts.k == Some(0) {
        return Err(KfError::InvalidArgument(
            "k must be ≥ 1 (or None for all)".into(),
        ));
    }
    let sample_cls = class_indices(sample_class, n_classes, "sample_class")?;
    let n_samples = sample_cls.len();
    // class of every training keypoint; usize::MAX marks an excluded keypoint
    let kp_class: Vec<usize> = train_sample
        .iter()
        .map(|&s| {
            if s < 0 || s as u64 >= n_samples as u64 {
                Err(KfError::InvalidArgument(format!(
                    "train_sample index {s} is outside 0..{n_samples}"
                )))
            } else if exclude_sample == Some(s as usize) {
                Ok(usize::MAX)
            } else {
                Ok(sample_cls[s as usize])
            }
        })
        .collect::<Result<_>>()?;
    let mut n_per_class = vec![0usize; n_classes];
    for &c in kp_class.iter().filter(|&&c| c != usize::MAX) {
        n_per_class[c] += 1;
    }
    let b = opts.background;
    let nq = query.nrows();
    if nq == 0 {
        return Ok(Array1::zeros(n_classes));
    }
    let query = query.as_standard_layout();
    let train = train.as_standard_layout();
    let qs = query.as_slice().expect("standard layout");
    let ts = train.as_slice().expect("standard layout");
    let active = kp_class.iter().filter(|&&c| c != usize::MAX).count();
    if active == 0 {
        // no training keypoint at all: background only
        return Ok(Array1::from_elem(n_classes, nq as f64 * b.ln()));
    }

    // per query keypoint: the n_classes kernel sums, in a (Nq, C) buffer
    let mut sums = vec![0.0f64; nq * n_classes];
    match opts.k {
        Some(k) if k < active => {
            // k nearest (ties broken by index: deterministic), excluded sample filtered
            let keep = |_: usize, j: u32| kp_class[j as usize] != usize::MAX;
            let nb =
                match opts.checks {
                    Some(checks) => knn::KdForest::build(ts, &knn::ForestParams::default())?
                        .search(ts, qs, k, checks.max(k), keep)?,
                    None => knn::knn_exact(ts, qs, k, keep)?,
                };
            // the excluded sample's keypoints are filtered out of the lists already
            let class_of = |j: u32| Some(kp_class[j as usize]);
            return neighbor_log_likelihood(&nb, k, class_of, &n_per_class, b).map(Array1::from);
        }
        _ => {
            sums.par_chunks_mut(n_classes).enumerate().for_each_init(
                Vec::<u32>::new,
                |dist, (i, out)| {
                    let q = &qs[i * dim..(i + 1) * dim];
                    dist.clear();
                    dist.extend(ts.chunks_exact(dim).zip(&kp_class).map(|(t, &c)| {
                        if c == usize::MAX {
                            u32::MAX
                        } else {
                            knn::dist2(q, t)
                        }
                    }));
                    let width = 1.0 + dist.iter().copied().min().unwrap_or(0) as f64;
                    for (&d2, &c) in dist.iter().zip(&kp_class) {
                        if c != usize::MAX {
                            add_kernel_term(out, c, d2, width);
                        }
                    }
                },
            );
        }
    }
    Ok(Array1::from(log_likelihood_from_sums(
        &sums,
        &n_per_class,
        b,
    )))
}

/// log p({f_i} | C_c) for every class c (eqs. 5–7) from the query keypoints' nearest
/// training keypoints `nb` (nearest first, e.g. merged from an index's shards by
/// [`knn::merge_neighbors`]): the kernel sums over the first `k` of each list, the width
/// 1 + d²(first neighbour). `class_of(j)` is training point j's class, `None` for a
/// point to ignore (an excluded sample's); `n_per_class` counts each class's training
/// keypoints (those ignored left out). This is the k-nearest branch of
/// [`keypoint_log_likelihood`] without its search.
///
/// The kernel values are multiples of 2⁻³² (see [`KERNEL_FIX`]), so each sum is exact in
/// any order; with b = 1 (ln b = 0) only the classes a row reaches are visited, and the
/// result equals the dense Σ over every class and row bit for bit.
pub fn neighbor_log_likelihood<C: Fn(u32) -> Option<usize> + Sync>(
    nb: &knn::Neighbors,
    k: usize,
    class_of: C,
    n_per_class: &[usize],
    background: f64,
) -> Result<Vec<f64>> {
    check_background(background)?;
    let n_classes = n_per_class.len();
    if k == 0 || k > nb.k {
        return Err(KfError::InvalidArgument(format!(
            "k = {k}: the likelihood takes 1 to {} neighbours of each list",
            nb.k
        )));
    }
    let nq = nb.n_queries();
    if let Some(bad) = (0..nq)
        .flat_map(|q| nb.row(q).take(k))
        .filter_map(|(j, _)| class_of(j))
        .find(|&c| c >= n_classes)
    {
        return Err(KfError::InvalidArgument(format!(
            "a neighbour of class {bad}, outside 0..{n_classes}"
        )));
    }
    // one row's (class, kernel sum) pairs, classes in order of first appearance
    let row_sums = |q: usize, out: &mut Vec<(usize, f64)>| {
        out.clear();
        let mut width = None;
        for (j, d2) in nb.row(q).take(k) {
            let Some(c) = class_of(j) else { continue };
            let w = *width.get_or_insert(1.0 + d2 as f64);
            let v = kernel_value(d2, w).unwrap_or(0.0);
            match out.iter_mut().find(|(oc, _)| *oc == c) {
                Some((_, s)) => *s += v,
                None => out.push((c, v)),
            }
        }
    };
    if background != 1.0 {
        // ln b ≠ 0 per untouched (row, class): the dense sums, as the full search sums
        let mut sums = vec![0.0f64; nq * n_classes];
        sums.par_chunks_mut(n_classes.max(1))
            .enumerate()
            .for_each_init(Vec::new, |row, (q, out)| {
                row_sums(q, row);
                for &(c, s) in row.iter() {
                    out[c] = s;
                }
            });
        return Ok(log_likelihood_from_sums(&sums, n_per_class, background));
    }
    // b = 1: the ln(S/N + 1) terms of the classes each row reaches (every other is 0)
    let mut terms = vec![(usize::MAX, 0.0f64); nq * k];
    terms
        .par_chunks_mut(k)
        .enumerate()
        .for_each_init(Vec::new, |row, (q, out)| {
            row_sums(q, row);
            for (o, &(c, s)) in out.iter_mut().zip(row.iter()) {
                *o = (c, log_term(s, n_per_class[c], background));
            }
        });
    let mut ll = vec![0.0f64; n_classes];
    for &(c, t) in terms.iter().filter(|(c, _)| *c != usize::MAX) {
        ll[c] += t;
    }
    Ok(ll)
}

/// ln(S/N + b), with an empty class contributing the background only.
#[inline]
fn log_term(s: f64, n: usize, b: f64) -> f64 {
    if n == 0 {
        b.ln()
    } else {
        let p = s / n as f64;
        // ln(b) + ln(1 + p/b): exact near b where p ≪ b
        b.ln() + (p / b).ln_1p()
    }
}

/// Shared per-query logic of eqs. 8–9 once the distances d(v, v_j) are known.
fn vector_row(
    dists: &[f64],
    train_cls: &[usize],
    skip: Option<usize>,
    counts: &[usize],
    b: f64,
    out: &mut [f64],
) {
    let mut n_used = 0usize;
    let mut total = 0.0;
    for (j, &d) in dists.iter().enumerate() {
        if Some(j) != skip {
            total += d;
            n_used += 1;
        }
    }
    let mu = if n_used > 0 {
        total / n_used as f64
    } else {
        0.0
    };
    let mu2 = mu * mu;
    let mut sums = vec![0.0f64; out.len()];
    for (j, (&d, &c)) in dists.iter().zip(train_cls).enumerate() {
        if Some(j) == skip {
            continue;
        }
        // μ = 0 means every training vector equals v: the kernel is 1 at distance 0
        let x = if mu2 > 0.0 {
            d * d / mu2
        } else if d == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        if x < EXP_CUTOFF {
            sums[c] += (-x).exp();
        }
    }
    for (c, o) in out.iter_mut().enumerate() {
        let mut n = counts[c];
        if let Some(s) = skip {
            if train_cls[s] == c {
                n -= 1;
            }
        }
        *o = log_term(sums[c], n, b);
    }
}

/// A checked vector-likelihood problem (eqs. 8–9), shared by the real and the binary
/// versions: everything but the distances.
struct VectorTask<'a> {
    nq: usize,
    ntrain: usize,
    /// Training classes as indices.
    cls: Vec<usize>,
    n_classes: usize,
    exclude: Option<&'a [i64]>,
    background: f64,
}

impl<'a> VectorTask<'a> {
    /// Check the arguments common to both versions.
    fn new<T>(
        query: &ArrayView2<T>,
        train: &ArrayView2<T>,
        train_class: ArrayView1<i64>,
        n_classes: usize,
        exclude: Option<&'a [i64]>,
        opts: &KdeOptions,
    ) -> Result<Self> {
        check_background(opts.background)?;
        let (nq, qcols) = query.dim();
        let (trows, tcols) = train.dim();
        if qcols != tcols {
            return Err(KfError::InvalidArgument(format!(
                "query vectors have {qcols} elements but training vectors have {tcols}"
            )));
        }
        if train_class.len() != trows {
            return Err(KfError::InvalidArgument(format!(
                "train_class has {} entries for {trows} training vectors",
                train_class.len()
            )));
        }
        if let Some(ex) = exclude {
            if ex.len() != nq {
                return Err(KfError::InvalidArgument(format!(
                    "exclude has {} entries for {nq} queries",
                    ex.len()
                )));
            }
            if let Some(bad) = ex.iter().find(|&&e| e >= trows as i64) {
                return Err(KfError::InvalidArgument(format!(
                    "exclude index {bad} is outside 0..{trows}"
                )));
            }
        }
        Ok(VectorTask {
            nq,
            ntrain: trows,
            cls: class_indices(train_class, n_classes, "train_class")?,
            n_classes,
            exclude,
            background: opts.background,
        })
    }

    /// The (Q, n_classes) log-likelihoods, given `dist_row(i, dists)`: the distances from
    /// query `i` to every training vector.
    fn solve<F>(&self, dist_row: F) -> Array2<f64>
    where
        F: Fn(usize, &mut [f64]) + Sync,
    {
        let (train_cls, n_classes) = (&self.cls, self.n_classes);
        let mut counts = vec![0usize; n_classes];
        for &c in train_cls {
            counts[c] += 1;
        }
        let mut out = Array2::<f64>::zeros((self.nq, n_classes));
        out.as_slice_mut()
            .expect("fresh array is contiguous")
            .par_chunks_mut(n_classes.max(1))
            .enumerate()
            .for_each_init(
                || vec![0.0f64; self.ntrain],
                |dists, (i, row)| {
                    dist_row(i, dists);
                    let skip = self.exclude.and_then(|ex| usize::try_from(ex[i]).ok());
                    vector_row(dists, train_cls, skip, &counts, self.background, row);
                },
            );
        out
    }
}

/// The vectors of eqs. 8–9 and their distance: real vectors (`f64`) by the Euclidean
/// distance, 0/1 vectors (`u8`) by the Hamming distance. The one thing in which
/// [`vector_log_likelihood`]'s two versions differ.
pub trait VectorElement: Copy + Sync + Sized + sealed::Sealed {
    /// The rows prepared for repeated distances.
    #[doc(hidden)]
    type Rows<'a>: Sync
    where
        Self: 'a;
    /// `m`'s rows, checked (finite values; only 0 and 1).
    #[doc(hidden)]
    fn prepare(m: ArrayView2<'_, Self>) -> Result<Self::Rows<'_>>;
    /// The distances from row `i` of `q` to every row of `t`, into `out`.
    #[doc(hidden)]
    fn distances(q: &Self::Rows<'_>, i: usize, t: &Self::Rows<'_>, out: &mut [f64]);
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f64 {}
    impl Sealed for u8 {}
}

/// Real vectors: rows back to back (row length `.1`), Euclidean distance.
impl VectorElement for f64 {
    type Rows<'a> = (ndarray::CowArray<'a, f64, ndarray::Ix2>, usize);

    fn prepare(m: ArrayView2<'_, f64>) -> Result<Self::Rows<'_>> {
        if m.iter().any(|v| !v.is_finite()) {
            return Err(KfError::InvalidArgument(
                "vectors contain NaN or Inf".into(),
            ));
        }
        let d = m.ncols();
        let rows = if m.is_standard_layout() {
            ndarray::CowArray::from(m)
        } else {
            ndarray::CowArray::from(m.as_standard_layout().into_owned())
        };
        Ok((rows, d))
    }

    fn distances(q: &Self::Rows<'_>, i: usize, t: &Self::Rows<'_>, out: &mut [f64]) {
        let d = q.1;
        if d == 0 {
            out.iter_mut().for_each(|o| *o = 0.0);
            return;
        }
        let qs = q.0.as_slice().expect("standard layout");
        let q = &qs[i * d..(i + 1) * d];
        let ts = t.0.as_slice().expect("standard layout");
        for (o, t) in out.iter_mut().zip(ts.chunks_exact(d)) {
            let s: f64 = q.iter().zip(t).map(|(a, b)| (a - b) * (a - b)).sum();
            *o = s.sqrt();
        }
    }
}

/// 0/1 vectors: bits packed into words (`.1` a row), Hamming distance.
impl VectorElement for u8 {
    type Rows<'a> = (Vec<u64>, usize);

    fn prepare(m: ArrayView2<'_, u8>) -> Result<Self::Rows<'_>> {
        let words = m.ncols().div_ceil(64);
        let mut out = vec![0u64; m.nrows() * words];
        for (r, row) in m.rows().into_iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                match v {
                    0 => {}
                    1 => out[r * words + c / 64] |= 1u64 << (c % 64),
                    _ => {
                        return Err(KfError::InvalidArgument(format!(
                            "binary vectors must hold only 0 and 1, found {v}"
                        )))
                    }
                }
            }
        }
        Ok((out, words))
    }

    fn distances(q: &Self::Rows<'_>, i: usize, t: &Self::Rows<'_>, out: &mut [f64]) {
        let words = q.1;
        if words == 0 {
            out.iter_mut().for_each(|o| *o = 0.0);
            return;
        }
        let q = &q.0[i * words..(i + 1) * words];
        for (o, t) in out.iter_mut().zip(t.0.chunks_exact(words)) {
            *o = q
                .iter()
                .zip(t)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum::<u32>() as f64;
        }
    }
}

/// log p(v | C_k) (eqs. 8–9), one row per query: for real vectors (`T = f64`, Euclidean
/// distance) or 0/1 vectors (`T = u8`, Hamming distance d_H: kernel exp(−d_H²/μ²), μ =
/// mean d_H).
///
/// * `query` (Q, D), `train` (N, D); `train_class` (N,) in `0..n_classes`.
/// * `exclude`: per query, the index of a training vector to ignore (leave-one-out:
///   pass `0..Q` when the queries are the training vectors), negative = none.
///
/// Returns (Q, n_classes) values ln((1/N_k) Σ_{j∈k} exp(−d(v, v_j)²/μ²) + b),
/// μ = mean d(v, v_j) over the (non-excluded) training vectors.
pub fn vector_log_likelihood<T: VectorElement>(
    query: ArrayView2<T>,
    train: ArrayView2<T>,
    train_class: ArrayView1<i64>,
    n_classes: usize,
    exclude: Option<&[i64]>,
    opts: &KdeOptions,
) -> Result<Array2<f64>> {
    let task = VectorTask::new(&query, &train, train_class, n_classes, exclude, opts)?;
    let (q, t) = (T::prepare(query)?, T::prepare(train)?);
    Ok(task.solve(|i, dists| T::distances(&q, i, &t, dists)))
}

#[cfg(test)]
mod tests;
