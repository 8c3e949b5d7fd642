//! Exact scan for descriptors whose bytes are all ≤ 63 (rank descriptors: 0..63), AVX2.
//!
//! The data rows are re-laid once per search in blocks of 8: a block's 16 vectors hold
//! bytes 4g..4g+4 of its 8 rows side by side, so one `maddubs` against a query's bytes
//! 4g..4g+4 (broadcast) gives 16 pair sums, two per row, and no horizontal sums are ever
//! needed: lane r of the result belongs to row r. Queries are shifted to q − 32 (−32..31,
//! signed bytes), so that a pair of products is at most 2·32·63 in magnitude and eight
//! `maddubs` add up in 16-bit lanes without overflow (8·4032 < 32768); one `madd` by twos
//! per half descriptor then widens to 32 bits. The shift comes back out exactly:
//! q·b = (q − 32)·b + 32 Σb, so d² = |q|² + (|b|² − 64 Σb) − 2 (q − 32)·b, with the bracket
//! precomputed per row. Every distance is the same integer as [`super::dist2`]'s.
//!
//! A micro-tile multiplies 4 queries by 2 blocks (16 rows): each data vector loaded
//! serves 4 queries, each broadcast query group 2 blocks. Its 8 vectors of distances are
//! compared with the 4 queries' current k-th distances; only rows that beat one reach the
//! scalar top-k. The multiplies are the arithmetic floor: 2 `maddubs` per dot product,
//! plus a quarter of a `madd` (see docs/decisions.md).

use super::best::Tops;
use super::pairs::Columns;
use super::TopK;
use crate::DESC_LEN;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::{Mutex, TryLockError};

/// Rows per block (one 32-bit lane each).
const ROWS: usize = 8;
/// Bytes of one re-laid block.
const BLOCK: usize = ROWS * DESC_LEN;
/// Queries per micro-tile.
const QT: usize = 4;
/// Blocks per micro-tile.
const BT: usize = 2;
/// Blocks per cache chunk: 256 blocks (2,048 rows, 128 KiB) stay in L2 while every
/// query group of a task scans them.
const CHUNK: usize = 256;
/// Rows per cache chunk (the symmetric pass keeps one [`Columns`] per chunk).
pub(super) const CHUNK_ROWS: usize = CHUNK * ROWS;
/// The shift that makes query bytes signed.
const SHIFT: i32 = 32;
/// The correction term of a padding row: its distance stays far above any real one
/// (padding rows are also skipped by index).
const PAD: i32 = 1 << 30;

/// The largest byte this kernel takes.
pub(super) const MAX_BYTE: u8 = 63;

/// The data rows re-laid for [`scan`], with their correction terms |b|² − 64 Σb.
#[derive(Clone, Debug)]
pub(super) struct RankData {
    blocks: Vec<u8>,
    corr: Vec<i32>,
    n: usize,
}

impl RankData {
    /// Re-lay `data` (`n × 64` bytes, each ≤ [`MAX_BYTE`]), padded to whole micro-tiles.
    pub(super) fn new(data: &[u8]) -> Self {
        let n = data.len() / DESC_LEN;
        let nblk = n.div_ceil(ROWS * BT) * BT;
        let mut blocks = vec![0u8; nblk * BLOCK];
        let mut corr = vec![PAD; nblk * ROWS];
        for (j, row) in data.chunks_exact(DESC_LEN).enumerate() {
            let base = (j / ROWS) * BLOCK + (j % ROWS) * 4;
            for (g, quad) in row.chunks_exact(4).enumerate() {
                blocks[base + g * 32..base + g * 32 + 4].copy_from_slice(quad);
            }
            let (s, sq) = row.iter().fold((0i32, 0i32), |(s, sq), &v| {
                (s + v as i32, sq + v as i32 * v as i32)
            });
            corr[j] = sq - 2 * SHIFT * s;
        }
        RankData { blocks, corr, n }
    }

    /// Rows including the padding to whole micro-tiles.
    pub(super) fn padded_rows(&self) -> usize {
        self.corr.len()
    }

    /// Bytes held.
    pub(super) fn memory_bytes(&self) -> usize {
        self.blocks.len() + self.corr.len() * 4
    }
}

/// Exact scan of every row of `rd` for one block of queries (`queries.len() / 64` of
/// them, any number, bytes ≤ [`MAX_BYTE`]), updating `heaps` (one per query);
/// `filter(query, row)` as in [`super::knn_exact`]; micro-tiles whose rows all lie in
/// `skip` (rows the filter rejects for every query) are not computed.
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn scan<F: Fn(usize, u32) -> bool>(
    rd: &RankData,
    skip: &Range<usize>,
    queries: &[u8],
    q0: usize,
    heaps: &mut [TopK],
    filter: &F,
) {
    scan_with::<false, F>(rd, skip, queries, q0, heaps, &[], filter)
}

/// [`scan`] that also keeps, for every data row, its own best k among the block's
/// queries (by global query id `q0 + q`) in `cols`, one [`Columns`] per chunk of
/// [`CHUNK_ROWS`] rows, each locked while a task scans its rows (a chunk another task
/// holds is left for later): the pass of a symmetric all-pairs, where each distance
/// serves both of its rows (`pairs.rs`). `filter` must accept a pair for at most one of
/// its two orders; rows before `first` are not visited; the queries are rows of one
/// chunk.
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn scan_pairs<F: Fn(usize, u32) -> bool>(
    rd: &RankData,
    first: usize,
    queries: &[u8],
    q0: usize,
    heaps: &mut [TopK],
    cols: &[Mutex<Columns>],
    filter: &F,
) {
    scan_with::<true, F>(rd, &(0..first), queries, q0, heaps, cols, filter)
}

/// Run `body` for each lane of `e` (8 rows' values, a vector) not above `limit`, lowest
/// lane first, with the lane and its value (a macro: a closure would not inherit the
/// target features, and the intrinsics would become calls).
macro_rules! passing_lanes {
    ($e:expr, $limit:expr, |$lane:ident, $val:ident| $body:block) => {{
        let e = $e;
        let above = _mm256_cmpgt_epi32(e, $limit);
        let mut m = !(_mm256_movemask_ps(_mm256_castsi256_ps(above)) as u32) & 0xff;
        if m != 0 {
            let mut vals = [0i32; ROWS];
            _mm256_storeu_si256(vals.as_mut_ptr() as *mut _, e);
            while m != 0 {
                let $lane = m.trailing_zeros() as usize;
                m &= m - 1;
                let $val = vals[$lane];
                $body
            }
        }
    }};
}

#[target_feature(enable = "avx2")]
unsafe fn scan_with<const SYM: bool, F: Fn(usize, u32) -> bool>(
    rd: &RankData,
    skip: &Range<usize>,
    queries: &[u8],
    q0: usize,
    heaps: &mut [TopK],
    cols: &[Mutex<Columns>],
    filter: &F,
) {
    let nq = heaps.len();
    let groups = nq.div_ceil(QT);
    // shifted queries (padding queries are zero and never win: k-th distance i32::MIN)
    let mut qs = vec![0u8; groups * QT * DESC_LEN];
    let mut qn = vec![0i32; groups * QT];
    // per query: its k-th distance so far minus |q|² (padding queries never win)
    let mut lim = vec![i32::MIN; groups * QT];
    // SYM: what a data row's k-th distance is compared with, d² − e = |q|²; padding
    // queries: so large that a row's limit minus it is below every e (never offered)
    let mut qcol = vec![Columns::PAD_QUERY; groups * QT];
    // SYM: a bound on each query's final k-th distance, known before its scan
    let mut bound = vec![i32::MAX; groups * QT];
    for (q, row) in queries.chunks_exact(DESC_LEN).enumerate() {
        for (o, &v) in qs[q * DESC_LEN..(q + 1) * DESC_LEN].iter_mut().zip(row) {
            *o = (v as i32 - SHIFT) as i8 as u8;
        }
        qn[q] = super::sq_norm(row) as i32;
        qcol[q] = qn[q];
        lim[q] = heaps[q].worst_i32() - qn[q];
    }
    if SYM && nq > 0 {
        // a row's best k among the queries already offered it as a data row bounds its
        // final k-th distance: its own search need not keep anything above that
        let c = q0 / CHUNK_ROWS;
        debug_assert_eq!(c, (q0 + nq - 1) / CHUNK_ROWS);
        let cc = cols[c].lock().unwrap_or_else(|e| e.into_inner());
        for q in 0..nq {
            bound[q] = cc.lim[q0 + q - c * CHUNK_ROWS];
            lim[q] = (lim[q] + qn[q]).min(bound[q]) - qn[q];
        }
    }
    let mut tops = Tops::new(heaps);
    let nblk = rd.corr.len() / ROWS;
    // `madd` by twos widens and doubles at once (2 q·b is what the distance needs)
    let twos = _mm256_set1_epi16(2);
    let mut order: Vec<usize> = (0..nblk).step_by(CHUNK).collect();
    let tried = order.len();
    let mut pos = 0;
    while pos < order.len() {
        let c0 = order[pos];
        pos += 1;
        let c1 = (c0 + CHUNK).min(nblk);
        if skip.start <= c0 * ROWS && c1 * ROWS <= skip.end {
            continue;
        }
        // SYM: this chunk's column lists, held while its rows are scanned; one that
        // another task holds is scanned after the others
        let mut held = None;
        if SYM {
            let m = &cols[c0 / CHUNK];
            held = Some(match m.try_lock() {
                Ok(g) => g,
                Err(TryLockError::WouldBlock) if pos <= tried => {
                    order.push(c0);
                    continue;
                }
                Err(_) => m.lock().unwrap_or_else(|e| e.into_inner()),
            });
        }
        let base = c0 * ROWS;
        let col_lim = held.as_ref().map_or(std::ptr::null(), |c| c.lim.as_ptr());
        for g in 0..groups {
            let qp = qs.as_ptr().add(g * QT * DESC_LEN);
            for t in (c0..c1).step_by(BT) {
                if skip.start <= t * ROWS && (t + BT) * ROWS <= skip.end {
                    continue;
                }
                let bp = rd.blocks.as_ptr().add(t * BLOCK);
                // dot products of the QT queries with the BT blocks' rows, by half
                // descriptor: 16-bit sums of 8 `maddubs`, widened by `madd`
                let (lo, hi) = (half_tile(bp, qp), half_tile(bp.add(256), qp.add(32)));
                // e = corr_b − 2 (q − 32)·b = d² − |q|², against lim_q = k-th d² − |q|²;
                // one test for the whole tile, the lanes gone through only when some row
                // beats some query's k-th distance
                let corr = [0, 1]
                    .map(|b| _mm256_loadu_si256(rd.corr.as_ptr().add((t + b) * ROWS) as *const _));
                let mut e = [[_mm256_setzero_si256(); BT]; QT];
                let mut worse = _mm256_set1_epi32(-1);
                // SYM: the rows' own k-th distances, against d² = e + |q|²
                let cw = if SYM {
                    [0, 1]
                        .map(|b| _mm256_loadu_si256(col_lim.add((t + b) * ROWS - base) as *const _))
                } else {
                    [_mm256_setzero_si256(); BT]
                };
                let mut worse_col = _mm256_set1_epi32(-1);
                for q in 0..QT {
                    let l = _mm256_set1_epi32(lim[g * QT + q]);
                    let qc = _mm256_set1_epi32(qcol[g * QT + q]);
                    for b in 0..BT {
                        let dot2 = _mm256_add_epi32(
                            _mm256_madd_epi16(lo[q][b], twos),
                            _mm256_madd_epi16(hi[q][b], twos),
                        );
                        e[q][b] = _mm256_sub_epi32(corr[b], dot2);
                        worse = _mm256_and_si256(worse, _mm256_cmpgt_epi32(e[q][b], l));
                        if SYM {
                            let lc = _mm256_sub_epi32(cw[b], qc);
                            worse_col =
                                _mm256_and_si256(worse_col, _mm256_cmpgt_epi32(e[q][b], lc));
                        }
                    }
                }
                if SYM && _mm256_movemask_epi8(worse_col) != -1 {
                    for (q, eq) in e.iter().enumerate() {
                        let qi = g * QT + q;
                        let qc = _mm256_set1_epi32(qcol[qi]);
                        for (b, &ev) in eq.iter().enumerate() {
                            passing_lanes!(ev, _mm256_sub_epi32(cw[b], qc), |lane, e| {
                                let j = (t + b) * ROWS + lane;
                                if j < rd.n && qi < nq && (filter)(q0 + qi, j as u32) {
                                    if let Some(c) = held.as_mut() {
                                        c.offer(j - base, (e + qn[qi]) as u32, (q0 + qi) as u32);
                                    }
                                }
                            });
                        }
                    }
                }
                if _mm256_movemask_epi8(worse) == -1 {
                    continue;
                }
                for (q, eq) in e.iter().enumerate() {
                    let qi = g * QT + q;
                    for (b, &ev) in eq.iter().enumerate() {
                        passing_lanes!(ev, _mm256_set1_epi32(lim[qi]), |lane, e| {
                            let j = (t + b) * ROWS + lane;
                            if j < rd.n && (filter)(q0 + qi, j as u32) {
                                let d = (e + qn[qi]) as u32;
                                lim[qi] =
                                    tops.offer::<false>(qi, d, j as u32).min(bound[qi]) - qn[qi];
                            }
                        });
                    }
                }
            }
        }
    }
    tops.finish();
}

/// The 16-bit pair sums of half a descriptor (groups 0..8 of the blocks at `bp` and
/// `bp + BLOCK`, bytes 0..32 of the 4 queries at `qp`, shifted): `[query][block]`.
///
/// Inline assembly, one group per statement: written with intrinsics, LLVM re-associates
/// the sums into trees that hold every data vector at once and spills them to the stack.
/// The sums cannot overflow: 8 · 2 · 32 · 63 < 32768.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn half_tile(bp: *const u8, qp: *const u8) -> [[__m256i; BT]; QT] {
    let z = _mm256_setzero_si256();
    let (mut a00, mut a01, mut a10, mut a11) = (z, z, z, z);
    let (mut a20, mut a21, mut a30, mut a31) = (z, z, z, z);
    // one query of a group: broadcast its 4 bytes, multiply both blocks, add
    macro_rules! query {
        ($off:literal, $a0:literal, $a1:literal) => {
            concat!(
                "vpbroadcastd {x}, dword ptr [{q} + ",
                $off,
                "]\n",
                "vpmaddubsw {t0}, {d0}, {x}\n",
                "vpmaddubsw {t1}, {d1}, {x}\n",
                "vpaddw ",
                $a0,
                ", ",
                $a0,
                ", {t0}\n",
                "vpaddw ",
                $a1,
                ", ",
                $a1,
                ", {t1}"
            )
        };
    }
    macro_rules! group {
        ($gi:literal) => {
            std::arch::asm!(
                "vmovdqu {d0}, ymmword ptr [{b}]",
                "vmovdqu {d1}, ymmword ptr [{b} + 512]",
                query!("0", "{a00}", "{a01}"),
                query!("64", "{a10}", "{a11}"),
                query!("128", "{a20}", "{a21}"),
                query!("192", "{a30}", "{a31}"),
                b = in(reg) bp.add($gi * 32),
                q = in(reg) qp.add($gi * 4),
                d0 = out(ymm_reg) _,
                d1 = out(ymm_reg) _,
                x = out(ymm_reg) _,
                t0 = out(ymm_reg) _,
                t1 = out(ymm_reg) _,
                a00 = inout(ymm_reg) a00,
                a01 = inout(ymm_reg) a01,
                a10 = inout(ymm_reg) a10,
                a11 = inout(ymm_reg) a11,
                a20 = inout(ymm_reg) a20,
                a21 = inout(ymm_reg) a21,
                a30 = inout(ymm_reg) a30,
                a31 = inout(ymm_reg) a31,
                options(nostack, readonly, preserves_flags)
            )
        };
    }
    group!(0);
    group!(1);
    group!(2);
    group!(3);
    group!(4);
    group!(5);
    group!(6);
    group!(7);
    [[a00, a01], [a10, a11], [a20, a21], [a30, a31]]
}
