//! k-nearest-neighbour search over 64-byte SIFT-Rank descriptors (squared Euclidean).
//!
//! * [`knn_exact`]: brute force, the ground truth. Integer distances (no rounding), one
//!   rayon task per block of queries, AVX2 picked at run time on x86-64.
//! * [`KdForest`]: randomized kd-trees searched best-bin-first across all trees (FLANN's
//!   scheme: split on one of the 5 highest-variance dimensions at its mean; a shared
//!   priority queue of unexplored branches; stop after `checks` distance evaluations).
//!
//! Both are deterministic: trees come from a fixed seed, each query is searched by one
//! thread in a fixed order, ties are broken by point index, so results are bit-identical
//! whatever the thread count.
//!
//! ```
//! use keyfuse_core::knn::{knn_exact, KdForest, ForestParams};
//! let data: Vec<u8> = (0..64 * 100).map(|i| ((i * 7919) % 64) as u8).collect();
//! let exact = knn_exact(&data, &data[..64], 3, |_, _| true).unwrap();
//! assert_eq!(exact.idx[0], 0);
//! let forest = KdForest::build(&data, &ForestParams::default()).unwrap();
//! let approx = forest.search(&data, &data[..64], 3, 64, |_, _| true).unwrap();
//! assert_eq!(approx.idx[0], 0);
//! ```
// Index loops mirror the formulas; `!(x > 0.0)` is deliberate: it also rejects NaN.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

use crate::{KfError, Result, DESC_LEN};
use rayon::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

#[cfg(target_arch = "x86_64")]
mod amx;

/// Marks a missing neighbour (fewer than k candidates passed the filter).
pub const NONE: u32 = u32::MAX;

/// k neighbours per query, row-major (`nq × k`), nearest first; missing slots hold
/// [`NONE`] with distance `u32::MAX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbors {
    pub k: usize,
    pub idx: Vec<u32>,
    pub dist2: Vec<u32>,
}

impl Neighbors {
    pub fn n_queries(&self) -> usize {
        self.idx.len().checked_div(self.k).unwrap_or(0)
    }
    /// The neighbours of queries `r` only, as their own [`Neighbors`].
    pub fn rows(&self, r: std::ops::Range<usize>) -> Neighbors {
        let r = r.start * self.k..r.end * self.k;
        Neighbors {
            k: self.k,
            idx: self.idx[r.clone()].to_vec(),
            dist2: self.dist2[r].to_vec(),
        }
    }
    /// The (index, squared distance) pairs of query `q`, nearest first, missing ones dropped.
    pub fn row(&self, q: usize) -> impl Iterator<Item = (u32, u32)> + '_ {
        let r = q * self.k..(q + 1) * self.k;
        self.idx[r.clone()]
            .iter()
            .zip(&self.dist2[r])
            .filter(|(i, _)| **i != NONE)
            .map(|(i, d)| (*i, *d))
    }
}

/// Squared Euclidean distance between two 64-byte descriptors (exact, integer).
#[inline(always)]
pub fn dist2(a: &[u8], b: &[u8]) -> u32 {
    let a: &[u8; DESC_LEN] = a[..DESC_LEN].try_into().unwrap();
    let b: &[u8; DESC_LEN] = b[..DESC_LEN].try_into().unwrap();
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: SSE2 is part of the x86-64 baseline; the arrays are 64 bytes long.
        unsafe { dist2_sse2(a, b) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        dist2_scalar(a, b)
    }
}

#[allow(dead_code)]
#[inline(always)]
fn dist2_scalar(a: &[u8; DESC_LEN], b: &[u8; DESC_LEN]) -> u32 {
    let mut s = 0u32;
    for i in 0..DESC_LEN {
        let d = a[i] as i32 - b[i] as i32;
        s += (d * d) as u32;
    }
    s
}

/// |a−b| per byte (max − min), widened to i16 and squared-and-paired by `pmaddwd`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dist2_sse2(a: &[u8; DESC_LEN], b: &[u8; DESC_LEN]) -> u32 {
    use std::arch::x86_64::*;
    let zero = _mm_setzero_si128();
    let mut acc = _mm_setzero_si128();
    for c in 0..4 {
        let x = _mm_loadu_si128(a.as_ptr().add(16 * c) as *const __m128i);
        let y = _mm_loadu_si128(b.as_ptr().add(16 * c) as *const __m128i);
        let d = _mm_sub_epi8(_mm_max_epu8(x, y), _mm_min_epu8(x, y));
        let lo = _mm_unpacklo_epi8(d, zero);
        let hi = _mm_unpackhi_epi8(d, zero);
        acc = _mm_add_epi32(acc, _mm_madd_epi16(lo, lo));
        acc = _mm_add_epi32(acc, _mm_madd_epi16(hi, hi));
    }
    let s = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s) as u32
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dist2_avx2(a: &[u8], b: &[u8]) -> u32 {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= DESC_LEN && b.len() >= DESC_LEN);
    let zero = _mm256_setzero_si256();
    let mut acc = _mm256_setzero_si256();
    for c in 0..2 {
        let x = _mm256_loadu_si256(a.as_ptr().add(32 * c) as *const __m256i);
        let y = _mm256_loadu_si256(b.as_ptr().add(32 * c) as *const __m256i);
        let d = _mm256_sub_epi8(_mm256_max_epu8(x, y), _mm256_min_epu8(x, y));
        let lo = _mm256_unpacklo_epi8(d, zero);
        let hi = _mm256_unpackhi_epi8(d, zero);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(lo, lo));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(hi, hi));
    }
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(acc),
        _mm256_extracti128_si256(acc, 1),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s) as u32
}

/// |row|², the squared norm of one descriptor (for d² = |q|² + |b|² − 2 q·b).
#[inline]
pub(crate) fn sq_norm(row: &[u8]) -> u32 {
    row.iter().map(|&v| v as u32 * v as u32).sum()
}

/// The squared norm of every `64`-byte row.
pub(crate) fn sq_norms(desc: &[u8]) -> Vec<u32> {
    desc.chunks_exact(DESC_LEN).map(sq_norm).collect()
}

pub(crate) fn check_rows(name: &str, data: &[u8]) -> Result<usize> {
    if !data.len().is_multiple_of(DESC_LEN) {
        return Err(KfError::InvalidArgument(format!(
            "{name}: descriptor buffer of {} bytes is not a multiple of {DESC_LEN}",
            data.len()
        )));
    }
    let n = data.len() / DESC_LEN;
    if n >= NONE as usize {
        return Err(KfError::InvalidArgument(format!(
            "{name}: too many descriptors ({n})"
        )));
    }
    Ok(n)
}

/// A bounded, sorted list of the best (distance, index) pairs; ties go to the lower index.
#[derive(Clone)]
pub(crate) struct TopK {
    k: usize,
    items: Vec<(u32, u32)>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        TopK {
            k,
            items: Vec::with_capacity(k + 1),
        }
    }
    #[inline]
    pub(crate) fn worst(&self) -> u32 {
        if self.items.len() < self.k {
            u32::MAX
        } else {
            self.items[self.k - 1].0
        }
    }
    #[inline]
    pub(crate) fn push(&mut self, d: u32, i: u32) {
        let key = (d, i);
        if self.items.len() == self.k {
            if key >= self.items[self.k - 1] {
                return;
            }
        } else {
            self.items.push(key);
        }
        // insertion from the end (k is small: cheaper than a search and a memmove); the
        // last item, duplicated or dropping out, is overwritten
        let items = self.items.as_mut_slice();
        let mut p = items.len() - 1;
        while p > 0 && items[p - 1] > key {
            items[p] = items[p - 1];
            p -= 1;
        }
        items[p] = key;
    }
    fn write(&self, idx: &mut [u32], dist: &mut [u32]) {
        for (s, (d, i)) in self.items.iter().enumerate() {
            idx[s] = *i;
            dist[s] = *d;
        }
        for s in self.items.len()..self.k {
            idx[s] = NONE;
            dist[s] = u32::MAX;
        }
    }
}

#[inline(always)]
fn scan_block<F: Fn(usize, u32) -> bool, D: Fn(&[u8], &[u8]) -> u32>(
    data: &[u8],
    queries: &[u8],
    q0: usize,
    heaps: &mut [TopK],
    filter: &F,
    dist: D,
) {
    for (j, b) in data.chunks_exact(DESC_LEN).enumerate() {
        for (qi, heap) in heaps.iter_mut().enumerate() {
            let q = &queries[qi * DESC_LEN..(qi + 1) * DESC_LEN];
            let d = dist(q, b);
            if d <= heap.worst() && filter(q0 + qi, j as u32) {
                heap.push(d, j as u32);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_block_avx2<F: Fn(usize, u32) -> bool>(
    data: &[u8],
    queries: &[u8],
    q0: usize,
    heaps: &mut [TopK],
    filter: &F,
) {
    // SAFETY (of the inner calls): this function only runs where AVX2 was detected.
    scan_block(data, queries, q0, heaps, filter, |a, b| unsafe {
        dist2_avx2(a, b)
    })
}

/// Exact scan of one block of 4 queries by dot products: d² = |q|² + |b|² − 2 q·b, the
/// products by `maddubs` (u8 × i8, exact while every byte is ≤ 127, which the caller
/// checks; rank descriptors are 0..63) and the four horizontal sums done together. The
/// distances are the same integers as [`dist2`], so results are unchanged.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_block4_dot_avx2<F: Fn(usize, u32) -> bool>(
    data: &[u8],
    data_norms: &[u32],
    j0: usize,
    queries: &[u8],
    q0: usize,
    heaps: &mut [TopK],
    filter: &F,
) {
    use std::arch::x86_64::*;
    debug_assert_eq!(queries.len(), 4 * DESC_LEN);
    let ones = _mm256_set1_epi16(1);
    // macros, not closures: closures do not inherit `target_feature`, and the intrinsics
    // would become calls
    macro_rules! ld {
        ($p:expr) => {
            _mm256_loadu_si256($p as *const __m256i)
        };
    }
    macro_rules! dot {
        ($b0:expr, $b1:expr, $x0:expr, $x1:expr) => {
            _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_maddubs_epi16($b0, $x0), ones),
                _mm256_madd_epi16(_mm256_maddubs_epi16($b1, $x1), ones),
            )
        };
    }
    let qp = queries.as_ptr();
    let (q00, q01) = (ld!(qp), ld!(qp.add(32)));
    let (q10, q11) = (ld!(qp.add(64)), ld!(qp.add(96)));
    let (q20, q21) = (ld!(qp.add(128)), ld!(qp.add(160)));
    let (q30, q31) = (ld!(qp.add(192)), ld!(qp.add(224)));
    let qn: [u32; 4] = std::array::from_fn(|i| sq_norm(&queries[i * DESC_LEN..(i + 1) * DESC_LEN]));
    let qn4 = _mm_loadu_si128(qn.as_ptr() as *const __m128i);
    // k-th distances so far, as i32 (≤ i32::MAX: every real d² is far below)
    let worst_of = |h: &[TopK]| {
        let w: [i32; 4] = std::array::from_fn(|i| h[i].worst().min(i32::MAX as u32) as i32);
        _mm_loadu_si128(w.as_ptr() as *const __m128i)
    };
    let mut worst4 = worst_of(heaps);
    for (j, b) in data.chunks_exact(DESC_LEN).enumerate() {
        let (b0, b1) = (ld!(b.as_ptr()), ld!(b.as_ptr().add(32)));
        let a0 = dot!(b0, b1, q00, q01);
        let a1 = dot!(b0, b1, q10, q11);
        let a2 = dot!(b0, b1, q20, q21);
        let a3 = dot!(b0, b1, q30, q31);
        // lanes [a0 a0 a1 a1 | …] → per 128-bit half [a0 a1 a2 a3]; add the halves
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
        let d4 = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        // d² = |q|² + |b|² − 2 q·b for the four queries; scalar work only where one of
        // them beats its current k-th distance
        let bn = _mm_set1_epi32(data_norms[j] as i32);
        let d4 = _mm_sub_epi32(_mm_add_epi32(qn4, bn), _mm_slli_epi32(d4, 1));
        let worse = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(d4, worst4)));
        if worse == 0b1111 {
            continue;
        }
        let mut ds = [0u32; 4];
        _mm_storeu_si128(ds.as_mut_ptr() as *mut __m128i, d4);
        let jj = (j0 + j) as u32;
        for qi in 0..4 {
            if worse & (1 << qi) != 0 {
                continue;
            }
            let heap = &mut heaps[qi];
            if ds[qi] <= heap.worst() && filter(q0 + qi, jj) {
                heap.push(ds[qi], jj);
            }
        }
        worst4 = worst_of(heaps);
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The brute-force kernels, fastest first; all give the same integer distances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExactKernel {
    /// AMX tiles (x86-64 Linux where the CPU and OS allow it).
    Amx,
    /// AVX2 dot products, for descriptors whose bytes are all ≤ 127 (rank descriptors).
    Dot,
    /// AVX2 differences.
    Avx2,
    /// Portable.
    Plain,
}

impl ExactKernel {
    fn pick(data: &[u8], queries: &[u8]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if amx::available() {
            return ExactKernel::Amx;
        }
        if !has_avx2() {
            ExactKernel::Plain
        } else if data.iter().chain(queries).all(|&v| v < 128) {
            ExactKernel::Dot
        } else {
            ExactKernel::Avx2
        }
    }

    /// Scan every data row for one block of queries (one heap per query).
    fn scan<F: Fn(usize, u32) -> bool>(
        self,
        data: &[u8],
        data_norms: &[u32],
        qs: &[u8],
        q0: usize,
        heaps: &mut [TopK],
        filter: &F,
    ) {
        match self {
            // SAFETY: `pick` chose AMX only where `amx::available()` said so.
            #[cfg(target_arch = "x86_64")]
            ExactKernel::Amx => unsafe { amx::scan(data, data_norms, qs, q0, heaps, filter) },
            #[cfg(target_arch = "x86_64")]
            ExactKernel::Dot if heaps.len().is_multiple_of(4) => {
                // cache blocking: a chunk of data rows stays in L2 while every group of 4
                // queries of this block scans it (the order of pushes does not change a
                // TopK: it keeps the smallest (distance, index) pairs)
                const CHUNK: usize = 2048;
                for j0 in (0..data_norms.len()).step_by(CHUNK) {
                    let j1 = (j0 + CHUNK).min(data_norms.len());
                    let dc = &data[j0 * DESC_LEN..j1 * DESC_LEN];
                    for g in 0..heaps.len() / 4 {
                        let qg = &qs[g * 4 * DESC_LEN..(g + 1) * 4 * DESC_LEN];
                        let hg = &mut heaps[g * 4..(g + 1) * 4];
                        // SAFETY: AVX2 was detected and every byte is ≤ 127 (`pick`).
                        unsafe {
                            scan_block4_dot_avx2(
                                dc,
                                &data_norms[j0..j1],
                                j0,
                                qg,
                                q0 + g * 4,
                                hg,
                                filter,
                            )
                        };
                    }
                }
            }
            // SAFETY: AVX2 support was detected at run time (`pick`).
            #[cfg(target_arch = "x86_64")]
            ExactKernel::Dot | ExactKernel::Avx2 => unsafe {
                scan_block_avx2(data, qs, q0, heaps, filter)
            },
            _ => scan_block(data, qs, q0, heaps, filter, dist2),
        }
    }
}

/// Which brute-force kernel [`knn_exact`] runs on this machine for rank descriptors:
/// "amx", "avx2" or "portable" (all give the same results).
pub fn exact_kernel_name() -> &'static str {
    match ExactKernel::pick(&[], &[]) {
        ExactKernel::Amx => "amx",
        ExactKernel::Dot | ExactKernel::Avx2 => "avx2",
        ExactKernel::Plain => "portable",
    }
}

/// Exact k nearest neighbours of every query row among the `data` rows (both `n × 64`
/// bytes). `filter(query, candidate)` rejects candidates (e.g. the query's own subject).
pub fn knn_exact<F>(data: &[u8], queries: &[u8], k: usize, filter: F) -> Result<Neighbors>
where
    F: Fn(usize, u32) -> bool + Sync,
{
    check_rows("data", data)?;
    let nq = check_rows("queries", queries)?;
    if k == 0 {
        return Err(KfError::InvalidArgument("k must be at least 1".into()));
    }
    let mut idx = vec![NONE; nq * k];
    let mut dist = vec![u32::MAX; nq * k];
    let kernel = ExactKernel::pick(data, queries);
    let data_norms: Vec<u32> = match kernel {
        ExactKernel::Amx | ExactKernel::Dot => sq_norms(data),
        _ => Vec::new(),
    };
    // queries per task: the blocked kernels read each data chunk from memory once per
    // task, the plain ones each data row once per block of 4
    let qb = match kernel {
        ExactKernel::Amx => 128,
        ExactKernel::Dot => 64,
        _ => 4,
    };
    idx.par_chunks_mut(qb * k)
        .zip(dist.par_chunks_mut(qb * k))
        .enumerate()
        .for_each(|(blk, (ib, db))| {
            crate::return_if_cancelled!();
            let q0 = blk * qb;
            let nb = ib.len() / k;
            let qs = &queries[q0 * DESC_LEN..(q0 + nb) * DESC_LEN];
            let mut heaps = vec![TopK::new(k); nb];
            kernel.scan(data, &data_norms, qs, q0, &mut heaps, &filter);
            for (h, heap) in heaps.iter().enumerate() {
                heap.write(&mut ib[h * k..(h + 1) * k], &mut db[h * k..(h + 1) * k]);
            }
        });
    crate::cancel::check()?;
    Ok(Neighbors {
        k,
        idx,
        dist2: dist,
    })
}

/// Build parameters of a [`KdForest`].
#[derive(Clone, Debug)]
pub struct ForestParams {
    /// Number of randomized trees (FLANN's large-scale matcher uses 8).
    pub trees: usize,
    /// Points per leaf; small leaves keep the trees shallow in memory.
    pub leaf_size: usize,
    /// Seed of the per-tree shuffles and split choices.
    pub seed: u64,
}

impl Default for ForestParams {
    fn default() -> Self {
        ForestParams {
            trees: 8,
            leaf_size: 8,
            seed: 0x6b65_7966_7573_6521,
        }
    }
}

/// SplitMix64: a tiny, good-enough deterministic generator (no extra dependency).
pub(crate) struct SplitMix(pub u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 11) as u128 * n as u128) >> 53) as usize
    }
}

const LEAF: u8 = u8::MAX;

/// One node: internal (`dim`, threshold `split`, children `a`,`b`) or a leaf (`dim == LEAF`,
/// points `perm[a..b]`).
#[derive(Clone, Copy, Debug)]
struct Node {
    dim: u8,
    split: f32,
    a: u32,
    b: u32,
}

#[derive(Clone, Debug)]
struct Tree {
    nodes: Vec<Node>,
    perm: Vec<u32>,
}

/// A randomized kd-forest over `n × 64` descriptors. It stores only the trees; the data
/// is passed again to [`KdForest::search`] (the caller owns it, e.g. an index).
#[derive(Clone, Debug)]
pub struct KdForest {
    n: usize,
    trees: Vec<Tree>,
}

fn build_tree(data: &[u8], n: usize, leaf_size: usize, seed: u64) -> Tree {
    let mut rng = SplitMix(seed);
    let mut perm: Vec<u32> = (0..n as u32).collect();
    // Fisher–Yates: the first points of every range are then a random sample for the mean
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        perm.swap(i, j);
    }
    let mut nodes: Vec<Node> = Vec::with_capacity(2 * n / leaf_size.max(1) + 1);
    nodes.push(Node {
        dim: LEAF,
        split: 0.0,
        a: 0,
        b: n as u32,
    });
    let mut stack = vec![0usize];
    while let Some(ni) = stack.pop() {
        let (lo, hi) = (nodes[ni].a as usize, nodes[ni].b as usize);
        if hi - lo <= leaf_size {
            continue;
        }
        // mean and variance per dimension over a sample of at most 128 points
        let m = (hi - lo).min(128);
        let mut sum = [0u32; DESC_LEN];
        let mut sq = [0u32; DESC_LEN];
        for &p in &perm[lo..lo + m] {
            let row = &data[p as usize * DESC_LEN..(p as usize + 1) * DESC_LEN];
            for d in 0..DESC_LEN {
                sum[d] += row[d] as u32;
                sq[d] += (row[d] as u32) * (row[d] as u32);
            }
        }
        // m²·variance per dimension, exact in integers; keep the 5 largest (ties → lower dim)
        let mut var = [(0u64, 0usize); 5];
        let mut top = 0usize;
        for d in 0..DESC_LEN {
            let v = m as u64 * sq[d] as u64 - (sum[d] as u64) * (sum[d] as u64);
            if v == 0 || (top == 5 && v <= var[4].0) {
                continue;
            }
            let mut pos = top.min(4);
            var[pos] = (v, d);
            while pos > 0 && var[pos - 1].0 < v {
                var.swap(pos - 1, pos);
                pos -= 1;
            }
            top = (top + 1).min(5);
        }
        if top == 0 {
            continue; // all sampled points identical: keep as a (large) leaf
        }
        let dim = var[rng.below(top)].1;
        let mut split = sum[dim] as f32 / m as f32;
        let slice = &mut perm[lo..hi];
        let key = |p: u32| data[p as usize * DESC_LEN + dim];
        let mut mid = partition(slice, |p| (key(p) as f32) < split);
        if mid == 0 || mid == slice.len() {
            // a skewed sample: split at the median value instead
            let half = slice.len() / 2;
            slice.select_nth_unstable_by_key(half, |&p| (key(p), p));
            let med = key(slice[half]);
            split = med as f32 + 0.5;
            mid = partition(slice, |p| (key(p) as f32) < split);
            if mid == 0 || mid == slice.len() {
                split = med as f32 - 0.5;
                mid = partition(slice, |p| (key(p) as f32) < split);
            }
            if mid == 0 || mid == slice.len() {
                continue;
            }
        }
        let l = nodes.len();
        nodes.push(Node {
            dim: LEAF,
            split: 0.0,
            a: lo as u32,
            b: (lo + mid) as u32,
        });
        nodes.push(Node {
            dim: LEAF,
            split: 0.0,
            a: (lo + mid) as u32,
            b: hi as u32,
        });
        nodes[ni] = Node {
            dim: dim as u8,
            split,
            a: l as u32,
            b: l as u32 + 1,
        };
        stack.push(l + 1);
        stack.push(l);
    }
    Tree { nodes, perm }
}

/// Stable-order-free in-place partition; returns the number of elements satisfying `pred`.
fn partition<P: Fn(u32) -> bool>(s: &mut [u32], pred: P) -> usize {
    let mut i = 0;
    for j in 0..s.len() {
        if pred(s[j]) {
            s.swap(i, j);
            i += 1;
        }
    }
    i
}

/// An untaken branch queued for later: (bound, tree, node) packed into one integer whose
/// order is the lexicographic order of the triple (a total order, so pops are
/// deterministic; one integer compares faster than a tuple). Bounds are ≥ 0, where the
/// bits of an f32 sort like the values.
type Branch = u128;

#[inline(always)]
fn branch(bound: f32, t: usize, node: u32) -> Branch {
    ((bound.to_bits() as u128) << 64) | ((t as u128) << 32) | node as u128
}

#[inline(always)]
fn unbranch(b: Branch) -> (f32, usize, u32) {
    (
        f32::from_bits((b >> 64) as u32),
        (b >> 32) as u32 as usize,
        b as u32,
    )
}

/// Ask for the descriptor rows of `pts` ahead of their use (they are scattered in memory).
#[inline(always)]
fn prefetch_rows(data: &[u8], pts: &[u32]) {
    #[cfg(target_arch = "x86_64")]
    for &p in pts {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let ptr = data[p as usize * DESC_LEN..].as_ptr();
        // SAFETY: prefetch is a hint; both addresses lie inside the row.
        unsafe {
            _mm_prefetch(ptr as *const i8, _MM_HINT_T0);
            _mm_prefetch(ptr.add(DESC_LEN - 1) as *const i8, _MM_HINT_T0);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, pts);
}

/// The state of one query's best-bin-first walk.
struct Walk<'a, F> {
    data: &'a [u8],
    query: &'a [u8],
    q: usize,
    filter: &'a F,
    vis: &'a mut Visited,
    top: &'a mut TopK,
    done: &'a mut usize,
}

/// Open-addressing set of visited point ids, cleared in O(1) by a generation stamp.
struct Visited {
    keys: Vec<u32>,
    stamp: Vec<u32>,
    gen: u32,
    len: usize,
}

impl Visited {
    fn new() -> Self {
        Visited {
            keys: vec![0; 1024],
            stamp: vec![0; 1024],
            gen: 1,
            len: 0,
        }
    }
    fn clear(&mut self) {
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.gen = 1;
        }
        self.len = 0;
    }
    /// True when `id` was not yet in the set (and inserts it).
    #[inline]
    fn insert(&mut self, id: u32) -> bool {
        if 2 * (self.len + 1) > self.keys.len() {
            self.grow();
        }
        let mask = self.keys.len() - 1;
        let mut h = (id.wrapping_mul(0x9e37_79b1) as usize) & mask;
        loop {
            if self.stamp[h] != self.gen {
                self.stamp[h] = self.gen;
                self.keys[h] = id;
                self.len += 1;
                return true;
            }
            if self.keys[h] == id {
                return false;
            }
            h = (h + 1) & mask;
        }
    }
    fn grow(&mut self) {
        let old: Vec<u32> = (0..self.keys.len())
            .filter(|&h| self.stamp[h] == self.gen)
            .map(|h| self.keys[h])
            .collect();
        let cap = self.keys.len() * 2;
        self.keys = vec![0; cap];
        self.stamp = vec![0; cap];
        self.gen = 1;
        self.len = 0;
        for id in old {
            self.insert(id);
        }
    }
}

impl KdForest {
    /// Build the forest over `data` (`n × 64` bytes), one rayon task per tree.
    pub fn build(data: &[u8], params: &ForestParams) -> Result<KdForest> {
        let n = check_rows("data", data)?;
        if params.trees == 0 || params.leaf_size == 0 {
            return Err(KfError::InvalidArgument(
                "forest needs at least one tree and a leaf size of at least 1".into(),
            ));
        }
        let mut seeder = SplitMix(params.seed);
        let seeds: Vec<u64> = (0..params.trees).map(|_| seeder.next_u64()).collect();
        let trees = seeds
            .par_iter()
            .map(|&s| build_tree(data, n, params.leaf_size, s))
            .collect();
        Ok(KdForest { n, trees })
    }

    /// Number of indexed points.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes held by the trees (not counting the data).
    pub fn memory_bytes(&self) -> usize {
        self.trees
            .iter()
            .map(|t| t.perm.len() * 4 + t.nodes.len() * std::mem::size_of::<Node>())
            .sum()
    }

    /// Approximate k-NN of every query; `checks` bounds the number of distance evaluations
    /// per query (more = better recall, slower). `data` must be the array the forest was
    /// built on.
    pub fn search<F>(
        &self,
        data: &[u8],
        queries: &[u8],
        k: usize,
        checks: usize,
        filter: F,
    ) -> Result<Neighbors>
    where
        F: Fn(usize, u32) -> bool + Sync,
    {
        if check_rows("data", data)? != self.n {
            return Err(KfError::InvalidArgument(
                "data does not match the forest it was built on".into(),
            ));
        }
        let nq = check_rows("queries", queries)?;
        if k == 0 {
            return Err(KfError::InvalidArgument("k must be at least 1".into()));
        }
        // Queries run in the order of their leaf in the first tree: consecutive queries
        // then walk the same nodes and read the same data rows while these are still in
        // cache. Each query's result does not depend on the order, so this is only faster.
        let order = self.leaf_order(queries, nq);
        const BLOCK: usize = 32;
        let blocks: Vec<(Vec<u32>, Vec<u32>)> = order
            .par_chunks(BLOCK)
            .map_init(
                || (Visited::new(), BinaryHeap::new(), Vec::new(), Vec::new()),
                |(vis, heap, pending, leaves), qs| {
                    crate::return_if_cancelled!();
                    let mut ib = vec![NONE; qs.len() * k];
                    let mut db = vec![u32::MAX; qs.len() * k];
                    for (j, &q) in qs.iter().enumerate() {
                        let q = q as usize;
                        let query = &queries[q * DESC_LEN..(q + 1) * DESC_LEN];
                        let top = self.search_one(
                            data, query, q, k, checks, &filter, vis, heap, pending, leaves,
                        );
                        top.write(&mut ib[j * k..(j + 1) * k], &mut db[j * k..(j + 1) * k]);
                    }
                    (ib, db)
                },
            )
            .collect();
        crate::cancel::check()?;
        let mut idx = vec![NONE; nq * k];
        let mut dist = vec![u32::MAX; nq * k];
        for (qs, (ib, db)) in order.chunks(BLOCK).zip(&blocks) {
            for (j, &q) in qs.iter().enumerate() {
                let (q, r) = (q as usize * k, j * k);
                idx[q..q + k].copy_from_slice(&ib[r..r + k]);
                dist[q..q + k].copy_from_slice(&db[r..r + k]);
            }
        }
        Ok(Neighbors {
            k,
            idx,
            dist2: dist,
        })
    }

    /// Query numbers sorted by the position of their leaf in the first tree (ties by
    /// number): a fixed order in which neighbouring queries are close in descriptor space.
    fn leaf_order(&self, queries: &[u8], nq: usize) -> Vec<u32> {
        let tree = &self.trees[0];
        let mut keyed: Vec<(u32, u32)> = (0..nq)
            .into_par_iter()
            .map(|q| {
                let query = &queries[q * DESC_LEN..(q + 1) * DESC_LEN];
                let mut ni = 0usize;
                loop {
                    let node = tree.nodes[ni];
                    if node.dim == LEAF {
                        return (node.a, q as u32);
                    }
                    let diff = query[node.dim as usize] as f32 - node.split;
                    ni = if diff < 0.0 { node.a } else { node.b } as usize;
                }
            })
            .collect();
        keyed.par_sort_unstable();
        keyed.into_iter().map(|(_, q)| q).collect()
    }

    /// From node `ni` of tree `t`: follow the closer side down to a leaf, queueing the other
    /// side with its bound; then check the leaf's points.
    fn descend<F: Fn(usize, u32) -> bool>(
        &self,
        st: &mut Walk<'_, F>,
        t: usize,
        mut ni: u32,
        mindist: f32,
        queue: &mut impl FnMut(Reverse<Branch>),
    ) {
        let tree = &self.trees[t];
        loop {
            let node = tree.nodes[ni as usize];
            if node.dim == LEAF {
                prefetch_rows(st.data, &tree.perm[node.a as usize..node.b as usize]);
                self.check_leaf(st, t, node);
                return;
            }
            let diff = st.query[node.dim as usize] as f32 - node.split;
            let (near, far) = if diff < 0.0 {
                (node.a, node.b)
            } else {
                (node.b, node.a)
            };
            let bound = mindist + diff * diff;
            // (bound, tree, node) orders the queue totally: deterministic pops
            queue(Reverse(branch(bound, t, far)));
            ni = near;
        }
    }

    /// Distance to every not yet visited point of a leaf.
    #[inline]
    fn check_leaf<F: Fn(usize, u32) -> bool>(&self, st: &mut Walk<'_, F>, t: usize, leaf: Node) {
        for &p in &self.trees[t].perm[leaf.a as usize..leaf.b as usize] {
            if !st.vis.insert(p) {
                continue;
            }
            *st.done += 1;
            let d = dist2(st.query, &st.data[p as usize * DESC_LEN..]);
            if d <= st.top.worst() && (st.filter)(st.q, p) {
                st.top.push(d, p);
            }
        }
    }

    /// The first descent of every tree from its root, all trees a level at a time so
    /// that their node loads overlap in memory instead of waiting on each other; the
    /// untaken branches go to `pending`, the leaves are checked in tree order after. Same
    /// result as descending the trees one after the other.
    fn descend_all<F: Fn(usize, u32) -> bool>(
        &self,
        st: &mut Walk<'_, F>,
        leaves: &mut Vec<Node>,
        pending: &mut Vec<Reverse<Branch>>,
    ) {
        let nt = self.trees.len();
        leaves.clear();
        leaves.extend(self.trees.iter().map(|t| t.nodes[0]));
        let mut walking = true;
        while walking {
            walking = false;
            for t in 0..nt {
                let node = leaves[t];
                if node.dim == LEAF {
                    continue;
                }
                walking = true;
                let diff = st.query[node.dim as usize] as f32 - node.split;
                let (near, far) = if diff < 0.0 {
                    (node.a, node.b)
                } else {
                    (node.b, node.a)
                };
                pending.push(Reverse(branch(diff * diff, t, far)));
                let next = self.trees[t].nodes[near as usize];
                if next.dim == LEAF {
                    prefetch_rows(
                        st.data,
                        &self.trees[t].perm[next.a as usize..next.b as usize],
                    );
                }
                leaves[t] = next;
            }
        }
        for t in 0..nt {
            self.check_leaf(st, t, leaves[t]);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn search_one<F: Fn(usize, u32) -> bool>(
        &self,
        data: &[u8],
        query: &[u8],
        q: usize,
        k: usize,
        checks: usize,
        filter: &F,
        vis: &mut Visited,
        heap: &mut BinaryHeap<Reverse<Branch>>,
        pending: &mut Vec<Reverse<Branch>>,
        leaves: &mut Vec<Node>,
    ) -> TopK {
        vis.clear();
        heap.clear();
        let mut top = TopK::new(k);
        let mut done = 0usize;
        let mut st = Walk {
            data,
            query,
            q,
            filter,
            vis,
            top: &mut top,
            done: &mut done,
        };
        // First one descent per tree, keeping the untaken branches aside: when those leaves
        // already use up `checks` (the usual case), the priority queue is never needed.
        pending.clear();
        self.descend_all(&mut st, leaves, pending);
        if *st.done < checks {
            heap.extend(pending.drain(..));
        }
        while *st.done < checks {
            let Some(Reverse(e)) = heap.pop() else {
                break;
            };
            let (b, t, ni) = unbranch(e);
            if (b as f64) > st.top.worst() as f64 {
                break; // (FLANN's approximate bound) nothing left is likely to beat the k-th
            }
            self.descend(&mut st, t, ni, b, &mut |e| heap.push(e));
        }
        top
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `n` random permutations of 0..64 (rank descriptors), from a seed.
    pub(crate) fn random_perms(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = SplitMix(seed);
        let mut out = Vec::with_capacity(n * DESC_LEN);
        for _ in 0..n {
            let mut p: Vec<u8> = (0..64).collect();
            for i in (1..64).rev() {
                p.swap(i, rng.below(i + 1));
            }
            out.extend(p);
        }
        out
    }

    fn naive(data: &[u8], q: &[u8], k: usize) -> Vec<(u32, u32)> {
        let mut all: Vec<(u32, u32)> = data
            .chunks_exact(64)
            .enumerate()
            .map(|(i, r)| (dist2(q, r), i as u32))
            .collect();
        all.sort();
        all.truncate(k);
        all
    }

    #[test]
    fn simd_distances_match_scalar() {
        let d = random_perms(50, 8);
        let mut w = d.clone();
        w.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = v.wrapping_mul(4).wrapping_add(i as u8));
        for x in d.chunks_exact(64).chain(w.chunks_exact(64)) {
            for y in d.chunks_exact(64).chain(w.chunks_exact(64)) {
                let (xa, ya) = (x.try_into().unwrap(), y.try_into().unwrap());
                let s = dist2_scalar(xa, ya);
                assert_eq!(dist2(x, y), s);
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    assert_eq!(unsafe { dist2_avx2(x, y) }, s);
                }
            }
        }
    }

    #[test]
    fn exact_matches_naive_sort() {
        let data = random_perms(500, 1);
        let qs = random_perms(17, 2);
        let nb = knn_exact(&data, &qs, 5, |_, _| true).unwrap();
        for q in 0..17 {
            let got: Vec<(u32, u32)> = nb.row(q).map(|(i, d)| (d, i)).collect();
            assert_eq!(got, naive(&data, &qs[q * 64..(q + 1) * 64], 5));
        }
    }

    /// Every brute-force kernel this machine can run gives the naive answer, on sizes that
    /// are not multiples of the tile or block sizes, with a filter, bytes above 127 (the
    /// dot kernel's limit) and duplicate distances (ties go to the lower index).
    #[test]
    fn every_exact_kernel_matches_naive() {
        let mut kernels = vec![ExactKernel::Plain];
        if has_avx2() {
            kernels.extend([ExactKernel::Dot, ExactKernel::Avx2]);
        }
        #[cfg(target_arch = "x86_64")]
        if amx::available() {
            kernels.push(ExactKernel::Amx);
        }
        let mut rng = SplitMix(11);
        for (n, nq, wide) in [
            (1usize, 3usize, false),
            (37, 45, false),
            (2100, 132, false),
            (300, 40, true),
        ] {
            let mut data = random_perms(n, 12 + n as u64);
            let mut qs = random_perms(nq, 13);
            if wide {
                data.iter_mut()
                    .chain(qs.iter_mut())
                    .for_each(|v| *v = v.wrapping_mul(4));
            }
            // exact duplicates: ties in distance
            if n > 10 {
                let first = data[..64].to_vec();
                data[5 * 64..6 * 64].copy_from_slice(&first);
                qs[..64].copy_from_slice(&first);
            }
            let norms = sq_norms(&data);
            let skip = rng.below(7) as u32 + 2;
            let filter = |q: usize, c: u32| !(c + q as u32).is_multiple_of(skip);
            for &kern in &kernels {
                if kern == ExactKernel::Dot && wide {
                    continue;
                }
                for k in [1usize, 5] {
                    let mut heaps = vec![TopK::new(k); nq];
                    kern.scan(&data, &norms, &qs, 0, &mut heaps, &filter);
                    for q in 0..nq {
                        let qrow = &qs[q * 64..(q + 1) * 64];
                        let mut all: Vec<(u32, u32)> = data
                            .chunks_exact(64)
                            .enumerate()
                            .filter(|&(i, _)| filter(q, i as u32))
                            .map(|(i, r)| (dist2(qrow, r), i as u32))
                            .collect();
                        all.sort();
                        all.truncate(k);
                        assert_eq!(heaps[q].items, all, "{kern:?} n={n} q={q} k={k}");
                    }
                }
            }
        }
    }

    #[test]
    fn exact_filter_and_short_rows() {
        let data = random_perms(6, 3);
        let nb = knn_exact(&data, &data[..64], 10, |_, c| c % 2 == 1).unwrap();
        let ids: Vec<u32> = nb.row(0).map(|(i, _)| i).collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().all(|i| i % 2 == 1));
        assert_eq!(nb.idx[3], NONE);
    }

    #[test]
    fn forest_finds_itself_and_agrees_with_exact() {
        let mut data = random_perms(3000, 4);
        // perturbed copies: each query has a true near neighbour, as for real matches
        let mut rng = SplitMix(9);
        let mut qs = data[..200 * 64].to_vec();
        for row in qs.chunks_exact_mut(64) {
            for _ in 0..6 {
                let (i, j) = (rng.below(64), rng.below(64));
                row.swap(i, j);
            }
        }
        data.extend_from_slice(&random_perms(10, 5));
        let forest = KdForest::build(&data, &ForestParams::default()).unwrap();
        let ex = knn_exact(&data, &qs, 1, |_, _| true).unwrap();
        let ap = forest.search(&data, &qs, 1, 256, |_, _| true).unwrap();
        let agree = (0..200).filter(|&q| ex.idx[q] == ap.idx[q]).count();
        assert!(agree >= 190, "recall@1 {agree}/200");
        // approximate distances can only be worse than the exact ones
        let ap3 = forest.search(&data, &qs, 3, 64, |_, _| true).unwrap();
        let ex3 = knn_exact(&data, &qs, 3, |_, _| true).unwrap();
        assert!(ap3.dist2.iter().zip(&ex3.dist2).all(|(a, e)| a >= e));
    }

    #[test]
    fn forest_is_deterministic_across_pools() {
        let data = random_perms(2000, 6);
        let qs = random_perms(100, 7);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let f = KdForest::build(&data, &ForestParams::default()).unwrap();
                f.search(&data, &qs, 5, 64, |_, _| true).unwrap()
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(knn_exact(&[0u8; 65], &[0u8; 64], 1, |_, _| true).is_err());
        assert!(knn_exact(&[0u8; 64], &[0u8; 64], 0, |_, _| true).is_err());
        let f = KdForest::build(&[0u8; 128], &ForestParams::default()).unwrap();
        assert!(f.search(&[0u8; 64], &[0u8; 64], 1, 8, |_, _| true).is_err());
    }

    #[test]
    fn identical_points_do_not_loop() {
        let data = vec![5u8; 64 * 100];
        let f = KdForest::build(&data, &ForestParams::default()).unwrap();
        let nb = f.search(&data, &data[..64], 4, 16, |_, _| true).unwrap();
        assert_eq!(nb.dist2[0], 0);
    }
}
