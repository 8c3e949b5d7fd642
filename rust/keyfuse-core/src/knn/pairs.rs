//! Exact all-pairs k-NN over groups of rows (a cohort's subjects): every row's k nearest
//! among the rows of the other groups, as [`knn_exact_prepared`] finds them with the
//! group's own rows filtered out.
//!
//! Where the AVX2 rank kernel runs (and k ≤ 16), each distance is computed once and
//! serves both of its rows: a block of queries scans only the rows of later groups,
//! keeping the queries' best k as usual and, for every row it scans, that row's best k
//! among the queries of every block that scanned it ([`Columns`], one per cache chunk of
//! rows, locked while a task scans the chunk). Each pair is offered to each of its two
//! lists exactly once; a list keeps the exact best k of what it was offered, pruned only
//! by bounds on the row's final k-th distance (the row's other list so far); the two
//! lists of a row are merged by (distance, id) at the end. So the result is the one-sided
//! search's whatever the thread count or task order. The AMX kernel keeps the one-sided
//! search: its time goes to the comparisons, which the second side would double
//! (docs/decisions.md).

#[cfg(target_arch = "x86_64")]
use super::best::{Best16, MAX_K};
#[cfg(target_arch = "x86_64")]
use super::TopK;
use super::{check_rows, knn_exact_prepared, ExactPrepared, Neighbors};
use crate::{KfError, Result};
use std::ops::Range;

/// Exact k nearest neighbours of every row of `data` among the rows of the other groups;
/// group `g` holds rows `ends[g − 1]..ends[g]` (`ends` non-decreasing, its last entry the
/// number of rows). `prepared` as for [`knn_exact_prepared`] (of the same `data`).
pub fn knn_all_pairs(
    data: &[u8],
    prepared: &ExactPrepared,
    ends: &[usize],
    k: usize,
) -> Result<Neighbors> {
    let n = check_rows("data", data)?;
    if ends.windows(2).any(|w| w[0] > w[1]) || ends.last().copied().unwrap_or(0) != n {
        return Err(KfError::InvalidArgument(format!(
            "group ends must be non-decreasing and end at the {n} rows"
        )));
    }
    if k == 0 {
        return Err(KfError::InvalidArgument("k must be at least 1".into()));
    }
    let mut owner = vec![0u32; n];
    let mut start = 0;
    for (g, &end) in ends.iter().enumerate() {
        owner[start..end].fill(g as u32);
        start = end;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(rd) = prepared.rank_data() {
        if k <= MAX_K && Columns::bytes(n) <= COLUMNS_BUDGET {
            return symmetric(data, rd, ends, &owner, k);
        }
    }
    // a block of queries from one group skips that group's rows
    let own_rows = |qs: Range<usize>| match qs.len() {
        0 => 0..0,
        _ if owner[qs.start] == owner[qs.end - 1] => {
            let g = owner[qs.start] as usize;
            (if g == 0 { 0 } else { ends[g - 1] })..ends[g]
        }
        _ => 0..0,
    };
    knn_exact_prepared(data, prepared, data, k, own_rows, |q, c| {
        owner[q] != owner[c as usize]
    })
}

/// The most bytes the column lists may take; above it the one-sided search runs.
#[cfg(target_arch = "x86_64")]
const COLUMNS_BUDGET: usize = 512 << 20;

/// For the data rows of one chunk, each row's best k among the queries of the blocks
/// that scanned it: keys in [`Best16`] vectors and, for the kernel's comparisons, each
/// row's k-th distance so far (`lim`, capped at [`Columns::OPEN`] while it has fewer
/// than k).
#[cfg(target_arch = "x86_64")]
pub(super) struct Columns {
    k: usize,
    best: Vec<Best16>,
    /// Per row, padded to the kernel's blocks ([`Columns::PAD_ROW`]).
    pub(super) lim: Vec<i32>,
}

#[cfg(target_arch = "x86_64")]
impl Columns {
    /// A row's limit while it has fewer than k: above every squared distance of 64
    /// bytes (< 2¹⁸), so everything passes.
    const OPEN: i32 = 1 << 29;
    /// A padding row's limit: below every real one (never offered).
    const PAD_ROW: i32 = -(1 << 29);
    /// What stands for a padding query's |q|² in the comparisons: a row's limit minus it
    /// is below every real value they are compared with, and cannot overflow.
    pub(super) const PAD_QUERY: i32 = 1 << 30;

    fn new(n: usize, padded: usize, k: usize) -> Self {
        let mut lim = vec![Self::PAD_ROW; padded.max(n)];
        lim[..n].fill(Self::OPEN);
        Columns {
            k,
            best: vec![Best16::from_heap(&TopK::new(k)); n],
            lim,
        }
    }

    /// Bytes of the lists for `n` rows.
    fn bytes(n: usize) -> usize {
        n.saturating_mul(std::mem::size_of::<Best16>() + 4)
    }

    /// Offer query `id` at squared distance `d` to row `j`'s list.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn offer(&mut self, j: usize, d: u32, id: u32) {
        let b = &mut self.best[j];
        let key = (d as u64) << 32 | id as u64;
        if key < b.kth(self.k) {
            b.insert_avx2(key);
            self.lim[j] = self.lim[j].min(b.worst_i32(self.k));
        }
    }
}

/// The symmetric pass (see the module notes) with the AVX2 rank kernel.
#[cfg(target_arch = "x86_64")]
fn symmetric(
    data: &[u8],
    rd: &super::rank::RankData,
    ends: &[usize],
    owner: &[u32],
    k: usize,
) -> Result<Neighbors> {
    use super::NONE;
    use crate::DESC_LEN;
    use rayon::prelude::*;
    use std::sync::Mutex;

    use super::rank::CHUNK_ROWS;
    // queries per task: a divisor of the chunk, so that a task's queries are the rows of
    // one chunk
    const QB: usize = 64;
    const _: () = assert!(CHUNK_ROWS.is_multiple_of(QB));
    let n = owner.len();
    let padded = rd.padded_rows();
    let chunks: Vec<Mutex<Columns>> = (0..padded.div_ceil(CHUNK_ROWS))
        .map(|c| {
            let (a, b) = (c * CHUNK_ROWS, ((c + 1) * CHUNK_ROWS).min(padded));
            Mutex::new(Columns::new(n.clamp(a, b) - a, b - a, k))
        })
        .collect();
    let mut idx = vec![NONE; n * k];
    let mut dist = vec![u32::MAX; n * k];
    // a pair is taken in one order only: the row of the earlier group is the query
    let filter = |q: usize, c: u32| owner[c as usize] > owner[q];
    idx.par_chunks_mut(QB * k)
        .zip(dist.par_chunks_mut(QB * k))
        .enumerate()
        .for_each(|(blk, (ib, db))| {
            crate::return_if_cancelled!();
            let q0 = blk * QB;
            let nb = ib.len() / k;
            let qs = &data[q0 * DESC_LEN..(q0 + nb) * DESC_LEN];
            // the rows after the first query's group (earlier rows pair with these
            // queries in their own blocks)
            let first = ends[owner[q0] as usize];
            let mut heaps = vec![TopK::new(k); nb];
            // SAFETY: `rank_data` exists only where the rank kernel was picked (AVX2
            // detected, every byte ≤ 63)
            unsafe { super::rank::scan_pairs(rd, first, qs, q0, &mut heaps, &chunks, &filter) };
            for (h, heap) in heaps.iter().enumerate() {
                heap.write(&mut ib[h * k..(h + 1) * k], &mut db[h * k..(h + 1) * k]);
            }
        });
    crate::cancel::check()?;
    let chunks: Vec<Columns> = chunks
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect();
    idx.par_chunks_mut(k)
        .zip(dist.par_chunks_mut(k))
        .enumerate()
        .for_each(|(j, (ib, db))| {
            let mut top = TopK::new(k);
            for (&i, &d) in ib.iter().zip(db.iter()) {
                if i != NONE {
                    top.push(d, i);
                }
            }
            for (d, i) in chunks[j / CHUNK_ROWS].best[j % CHUNK_ROWS].items(k) {
                top.push(d, i);
            }
            top.write(ib, db);
        });
    Ok(Neighbors {
        k,
        idx,
        dist2: dist,
    })
}
