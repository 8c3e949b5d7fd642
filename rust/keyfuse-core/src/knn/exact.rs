//! Exact (brute-force) k-NN: one rayon task per block of queries, the fastest kernel
//! this machine runs (AMX tiles; AVX2 dot products on re-laid rows for rank descriptors,
//! `rank.rs`; AVX2 dot products; AVX2 or portable differences), all giving the same
//! integer distances.

#[cfg(target_arch = "x86_64")]
use super::{amx, rank};
use super::{check_rows, dist2, sq_norm, sq_norms, Neighbors, TopK, NONE};
#[cfg(target_arch = "x86_64")]
use crate::simd::dot64_avx2;
use crate::simd::has_avx2;
use crate::{KfError, Result, DESC_LEN};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::OnceLock;

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
        crate::simd::dist2_avx2(a, b)
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
            dot64_avx2!($b0, $b1, $x0, $x1, ones)
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
        let w: [i32; 4] = std::array::from_fn(|i| h[i].worst_i32());
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

/// What a kernel precomputes from the data rows once per search.
#[derive(Clone, Debug)]
pub(super) struct Prepared {
    /// |row|² (AMX and dot kernels).
    norms: Vec<u32>,
    /// The norm every row shares, if they all do (rank descriptors, permutations of
    /// 0..63, all do): the AMX comparisons then skip the per-row subtraction.
    common_norm: Option<u32>,
    /// The re-laid rows (rank kernel).
    #[cfg(target_arch = "x86_64")]
    rank: Option<rank::RankData>,
}

/// The brute-force kernels, fastest first; all give the same integer distances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ExactKernel {
    /// AMX tiles (x86-64 Linux where the CPU and OS allow it).
    Amx,
    /// AVX2 dot products on re-laid rows, for descriptors whose bytes are all ≤ 63 (rank
    /// descriptors; see `rank.rs`).
    Rank,
    /// AVX2 dot products, for descriptors whose bytes are all ≤ 127.
    Dot,
    /// AVX2 differences.
    Avx2,
    /// Portable.
    Plain,
}

fn max_byte(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |m, &v| m.max(v))
}

impl ExactKernel {
    /// The kernel for rows and queries whose largest byte is `max` (computed only where
    /// the choice depends on it).
    fn pick(max: impl FnOnce() -> u8) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if amx::available() {
                return ExactKernel::Amx;
            }
            if has_avx2() {
                let max = max();
                return if max <= rank::MAX_BYTE {
                    ExactKernel::Rank
                } else if max < 128 {
                    ExactKernel::Dot
                } else {
                    ExactKernel::Avx2
                };
            }
        }
        ExactKernel::Plain
    }

    /// What this kernel precomputes from the data rows once per search.
    pub(super) fn prepare(self, data: &[u8]) -> Prepared {
        let norms = match self {
            ExactKernel::Amx | ExactKernel::Dot => sq_norms(data),
            _ => Vec::new(),
        };
        let common_norm = match norms.first() {
            Some(&first) if norms.iter().all(|&v| v == first) => Some(first),
            _ => None,
        };
        Prepared {
            norms,
            common_norm,
            #[cfg(target_arch = "x86_64")]
            rank: (self == ExactKernel::Rank).then(|| rank::RankData::new(data)),
        }
    }

    /// Scan every data row for one block of queries (one heap per query); rows in `skip`
    /// (which `filter` rejects for every query) may be left out.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn scan<F: Fn(usize, u32) -> bool>(
        self,
        data: &[u8],
        prep: &Prepared,
        skip: &Range<usize>,
        qs: &[u8],
        q0: usize,
        heaps: &mut [TopK],
        filter: &F,
    ) {
        let data_norms = &prep.norms[..];
        match self {
            // SAFETY: `pick` chose this kernel only where AVX2 was detected and every byte
            // is ≤ 63; `prepare` re-laid the rows.
            #[cfg(target_arch = "x86_64")]
            ExactKernel::Rank => unsafe {
                let rd = prep.rank.as_ref().expect("prepared for the rank kernel");
                rank::scan(rd, skip, qs, q0, heaps, filter)
            },
            // SAFETY: `pick` chose AMX only where `amx::available()` said so.
            #[cfg(target_arch = "x86_64")]
            ExactKernel::Amx => unsafe {
                amx::scan(
                    data,
                    data_norms,
                    prep.common_norm,
                    skip,
                    qs,
                    q0,
                    heaps,
                    filter,
                )
            },
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
    match ExactKernel::pick(|| 0) {
        ExactKernel::Amx => "amx",
        ExactKernel::Rank | ExactKernel::Dot | ExactKernel::Avx2 => "avx2",
        ExactKernel::Plain => "portable",
    }
}

/// What exact search precomputes from the data rows (norms, or the rows re-laid for the
/// AVX2 rank kernel), made once and reused by every search of the same rows: a shard or
/// cohort searched subject by subject would otherwise redo it per call (0.3 ms per 40,000
/// rows with AMX, 0.8 ms with AVX2, single-threaded).
#[derive(Clone, Debug)]
pub struct ExactPrepared {
    rows: usize,
    /// The rows' largest byte, where the kernel choice asked for it (not with AMX).
    max_byte: Option<u8>,
    kernel: ExactKernel,
    prep: Prepared,
}

impl ExactPrepared {
    /// Prepare `data` (`n × 64` bytes) for [`knn_exact_prepared`].
    pub fn new(data: &[u8]) -> Result<Self> {
        let rows = check_rows("data", data)?;
        let mut max = None;
        let kernel = ExactKernel::pick(|| *max.get_or_insert_with(|| max_byte(data)));
        Ok(ExactPrepared {
            rows,
            max_byte: max,
            kernel,
            prep: kernel.prepare(data),
        })
    }

    /// [`ExactPrepared::new`] with a chosen kernel (tests: every kernel this machine can
    /// run, not only the fastest).
    #[cfg(test)]
    pub(super) fn with_kernel(data: &[u8], kernel: ExactKernel) -> Self {
        ExactPrepared {
            rows: data.len() / DESC_LEN,
            max_byte: Some(max_byte(data)),
            kernel,
            prep: kernel.prepare(data),
        }
    }

    /// The set-up of `data` kept in `cell`, made on first use (two threads may both make
    /// it: the same rows, one is kept). `cell` must only ever see the same `data`.
    pub fn cached<'a>(cell: &'a OnceLock<ExactPrepared>, data: &[u8]) -> Result<&'a Self> {
        if let Some(e) = cell.get() {
            return Ok(e);
        }
        let _ = cell.set(ExactPrepared::new(data)?);
        Ok(cell.get().expect("set above"))
    }

    /// The rows re-laid for the AVX2 rank kernel, where that is the kernel picked.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn rank_data(&self) -> Option<&rank::RankData> {
        match self.kernel {
            ExactKernel::Rank => self.prep.rank.as_ref(),
            _ => None,
        }
    }

    /// Bytes held (the AVX2 rank kernel keeps a re-laid copy of the rows).
    pub fn memory_bytes(&self) -> usize {
        self.prep.norms.len() * 4 + {
            #[cfg(target_arch = "x86_64")]
            {
                self.prep.rank.as_ref().map_or(0, |r| r.memory_bytes())
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                0
            }
        }
    }
}

/// Exact k nearest neighbours of every query row among the `data` rows (both `n × 64`
/// bytes). `filter(query, candidate)` rejects candidates (e.g. the query's own subject).
pub fn knn_exact<F>(data: &[u8], queries: &[u8], k: usize, filter: F) -> Result<Neighbors>
where
    F: Fn(usize, u32) -> bool + Sync,
{
    let prepared = ExactPrepared::new(data)?;
    knn_exact_prepared(data, &prepared, queries, k, |_| 0..0, filter)
}

/// [`knn_exact`] with the data side prepared once ([`ExactPrepared::new`] of the same
/// `data`), where `skip(queries)` names rows that `filter` rejects for every query of the
/// range `queries` (e.g. the queries' own subject in all-pairs): the fast kernels do not
/// compute those rows at all. Same results as [`knn_exact`] with the same filter.
pub fn knn_exact_prepared<F, S>(
    data: &[u8],
    prepared: &ExactPrepared,
    queries: &[u8],
    k: usize,
    skip: S,
    filter: F,
) -> Result<Neighbors>
where
    F: Fn(usize, u32) -> bool + Sync,
    S: Fn(Range<usize>) -> Range<usize> + Sync,
{
    let n = check_rows("data", data)?;
    if n != prepared.rows {
        return Err(KfError::InvalidArgument(format!(
            "exact search prepared for {} rows, given {n}",
            prepared.rows
        )));
    }
    let nq = check_rows("queries", queries)?;
    if k == 0 {
        return Err(KfError::InvalidArgument("k must be at least 1".into()));
    }
    let mut idx = vec![NONE; nq * k];
    let mut dist = vec![u32::MAX; nq * k];
    // queries with larger bytes than the rows can need another kernel (and its set-up)
    let kernel = ExactKernel::pick(|| {
        let rows = prepared.max_byte.unwrap_or_else(|| max_byte(data));
        rows.max(max_byte(queries))
    });
    let fresh;
    let prep = if kernel == prepared.kernel {
        &prepared.prep
    } else {
        fresh = kernel.prepare(data);
        &fresh
    };
    // queries per task: the blocked kernels read each data chunk from memory once per
    // task, the plain ones each data row once per block of 4
    let qb = match kernel {
        ExactKernel::Amx => 128,
        ExactKernel::Dot | ExactKernel::Rank => 64,
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
            kernel.scan(data, prep, &skip(q0..q0 + nb), qs, q0, &mut heaps, &filter);
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
