//! Exact k-NN on Intel AMX tiles (Sapphire Rapids and later), chosen at run time.
//!
//! One `tdpbuud` multiplies 16 descriptors by 16 queries (16×16 dot products of 64
//! bytes, exact unsigned-byte integer arithmetic), so the distances
//! `d² = |q|² + |b|² − 2 q·b` are the same integers as the SIMD kernels': results are
//! bit-identical whichever kernel runs. The data rows are the A operand, read straight
//! from the descriptor array; each block of 32 queries is transposed once into the B
//! operand's layout (4-byte groups; doubled, 2q, where every byte allows it, so the
//! tiles hold 2 q·b). Each step multiplies 16 rows by 32 queries (two tiles), alternate
//! steps on disjoint tiles so that they overlap; AVX-512 then tests the step's 16
//! distances per query against the queries' current k-th distances at once (a tile's
//! best row first, then every row of a passing tile as one mask), and only the rare
//! winners reach a query's top k, kept as 16 sorted keys in two vectors where k ≤ 16
//! (an insertion without a branch). Rows the caller's filter rejects for every query
//! (an all-pairs query's own subject) can be skipped whole.
//! It is the fastest exact kernel where it runs (see docs/decisions.md).
//!
//! Stable Rust has no AMX intrinsics, so the tile instructions are inline assembly. Linux
//! must grant the process the tile state first (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); where
//! that, the CPU or the OS says no, [`available`] is false and the AVX2 kernels run.

use super::best::Tops;
use super::TopK;
use crate::DESC_LEN;
use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

/// Whether the AMX kernel can run in this process (checked, and permission asked, once).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var_os("KEYFUSE_NO_AMX").is_some() {
            return false;
        }
        // SAFETY: CPUID is always available on x86-64 (a safe fn in newer Rust).
        #[allow(unused_unsafe)]
        let leaf7 = unsafe { __cpuid_count(7, 0) };
        let amx = leaf7.edx & (1 << 24) != 0 && leaf7.edx & (1 << 25) != 0;
        if !(amx
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("xsave"))
        {
            return false;
        }
        // SAFETY: XGETBV(0) is valid once CPUID reports XSAVE (checked above).
        let xcr0 = unsafe { _xgetbv(0) };
        if xcr0 & (0b11 << 17) != 0b11 << 17 {
            return false; // the OS does not manage the tile state
        }
        request_tile_permission()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain syscall; the kernel clobbers rcx and r11 only.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// Tile configuration (palette 1): all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
    tail: [u8; 16],
}

const TILE: usize = 16 * DESC_LEN; // bytes in one tile
/// Data rows per cache block: a block stays in L2 while every query group of a task
/// scans it.
const CHUNK: usize = 2048;

/// Exact scan of all `data` rows for one block of queries (`queries.len() / 64` of them,
/// any number), updating `heaps` (one per query). `filter(query, row)` as in
/// [`super::knn_exact`]; steps of 16 rows inside `skip` (rows the filter rejects for
/// every query) are not computed; `data_norms[j] = |data_j|²`, `common_norm` their value
/// where all rows share it.
///
/// # Safety
/// [`available`] must have returned true in this process.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scan<F: Fn(usize, u32) -> bool>(
    data: &[u8],
    data_norms: &[u32],
    common_norm: Option<u32>,
    skip: &Range<usize>,
    queries: &[u8],
    q0: usize,
    heaps: &mut [TopK],
    filter: &F,
) {
    let n = data_norms.len();
    let nq = heaps.len();
    let groups = nq.div_ceil(32);
    // B operands: per group of 32 queries two tiles, row r = bytes 4r..4r+4 of each of
    // 16 queries side by side; missing queries are zero and masked out below
    let mut bt = vec![0u8; groups * 2 * TILE];
    let mut qn = vec![0i32; groups * 32];
    // queries whose bytes are all ≤ 127 are doubled in the B operands (2q still fits a
    // byte): the tiles then hold 2 q·b and the comparisons skip one addition per vector
    let doubled = queries.iter().all(|&v| v <= 127);
    for (q, row) in queries.chunks_exact(DESC_LEN).enumerate() {
        let base = (q / 16) * TILE + (q % 16) * 4;
        for r in 0..16 {
            for (o, &v) in bt[base + r * 64..base + r * 64 + 4]
                .iter_mut()
                .zip(&row[4 * r..])
            {
                *o = if doubled { 2 * v } else { v };
            }
        }
        qn[q] = super::sq_norm(row) as i32;
    }
    // per 16 queries, |q|² − their k-th distance so far, plus the rows' common norm
    // where they share one (then the comparisons need not subtract it row by row); a
    // padding lane: 1, never won. Updated in registers and stored whole (a vector load
    // just after a scalar store to the same line would wait for it)
    let bias = common_norm.map_or(0, |v| v as i32);
    let mut need = vec![_mm512_set1_epi32(1); groups * 2];
    for (q, h) in heaps.iter().enumerate() {
        let v = need.as_mut_ptr().add(q / 16) as *mut i32;
        *v.add(q % 16) = qn[q] - h.worst_i32() + bias;
    }
    // the last rows, zero-padded to a whole step of 16 (tiles always load 16 rows)
    let full = n / 16 * 16;
    let mut tail = vec![0u8; 16 * DESC_LEN];
    tail[..(n - full) * DESC_LEN].copy_from_slice(&data[full * DESC_LEN..n * DESC_LEN]);

    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
        tail: [0; 16],
    };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    // two result buffers: while the tiles of one step compute, the previous step's
    // distances are compared (AMX latency hidden behind the vector work)
    let mut c = [[0i32; 2 * 256]; 2];
    let mut st = Compare {
        tops: Tops::new(heaps),
        data_norms,
        qn: &qn,
        need: &mut need,
        bias,
        q0,
        filter,
    };
    asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
    for c0 in (0..n).step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(n);
        for g in 0..groups {
            let b = bt.as_ptr().add(g * 2 * TILE);
            asm!(
                "tileloadd tmm6, [{b} + {s}*1]",
                "tileloadd tmm7, [{b2} + {s}*1]",
                b = in(reg) b, b2 = in(reg) b.add(TILE), s = in(reg) 64usize,
                options(nostack, readonly)
            );
            // a step's products are stored by the next step's asm, after that step's
            // own products are issued (a store right after its products waited for them),
            // and compared one step later still: step s computes into tile set s % 2,
            // stores step s − 1's tiles into c[(s − 1) % 2] and compares step s − 2's
            // distances, in c[s % 2]
            let mut computed: Option<usize> = None; // r0 of the step in tiles, not stored
            let mut stored: Option<(usize, usize)> = None; // (r0, buffer) not compared
            for (step, r0) in (c0..c1)
                .step_by(16)
                .filter(|&r0| !(skip.start <= r0 && r0 + 16 <= skip.end))
                .enumerate()
            {
                let a = if r0 + 16 <= n {
                    data.as_ptr().add(r0 * DESC_LEN)
                } else {
                    tail.as_ptr()
                };
                let set = step % 2;
                // tiles are not renamed: alternate steps use disjoint tiles (0, 1 with A in
                // 4; 2, 3 with A in 5)
                macro_rules! products {
                    ($c0:literal, $c1:literal, $a:literal) => {
                        asm!(
                            concat!("tilezero tmm", $c0),
                            concat!("tilezero tmm", $c1),
                            concat!("tileloadd tmm", $a, ", [{a} + {s}*1]"),
                            concat!("tdpbuud tmm", $c0, ", tmm", $a, ", tmm6"),
                            concat!("tdpbuud tmm", $c1, ", tmm", $a, ", tmm7"),
                            a = in(reg) a, s = in(reg) 64usize,
                            options(nostack, readonly)
                        )
                    };
                }
                if set == 0 {
                    products!("0", "1", "4");
                } else {
                    products!("2", "3", "5");
                }
                if let Some(pr0) = computed {
                    store_set(1 - set, c[1 - set].as_mut_ptr());
                    if let Some((sr0, sb)) = stored {
                        st.step_any(doubled, common_norm.is_some(), &c[sb], sr0, g, n);
                    }
                    stored = Some((pr0, 1 - set));
                }
                computed = Some(r0);
            }
            // the last two steps: the one in tiles is stored, both are compared in order
            if let Some((sr0, sb)) = stored {
                st.step_any(doubled, common_norm.is_some(), &c[sb], sr0, g, n);
            }
            if let Some(pr0) = computed {
                let set = usize::from(stored.is_some_and(|(_, sb)| sb == 0));
                store_set(set, c[set].as_mut_ptr());
                st.step_any(doubled, common_norm.is_some(), &c[set], pr0, g, n);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    st.tops.finish();
}

/// Store tile set `set`'s two result tiles (tmm0, tmm1 or tmm2, tmm3) into `out` (512
/// i32: the first tile, then the second).
///
/// # Safety
/// The tile state must be configured (`ldtilecfg`) and `out` hold 512 i32.
#[inline(always)]
unsafe fn store_set(set: usize, out: *mut i32) {
    if set == 0 {
        asm!(
            "tilestored [{c} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            c = in(reg) out, c1 = in(reg) out.add(256), s = in(reg) 64usize,
            options(nostack)
        );
    } else {
        asm!(
            "tilestored [{c} + {s}*1], tmm2",
            "tilestored [{c1} + {s}*1], tmm3",
            c = in(reg) out, c1 = in(reg) out.add(256), s = in(reg) 64usize,
            options(nostack)
        );
    }
}

/// The per-query state the distance comparisons update.
struct Compare<'a, F> {
    tops: Tops<'a>,
    data_norms: &'a [u32],
    qn: &'a [i32],
    need: &'a mut [__m512i],
    /// What `need` holds beyond |q|² − k-th distance: the rows' common norm, or 0.
    bias: i32,
    q0: usize,
    filter: &'a F,
}

impl<F: Fn(usize, u32) -> bool> Compare<'_, F> {
    /// [`Self::step`] for tiles of 2 q·b (`doubled`) or of q·b, rows with a common norm
    /// (`common`, held in `need`) or not.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn step_any(
        &mut self,
        doubled: bool,
        common: bool,
        c: &[i32; 2 * 256],
        r0: usize,
        g: usize,
        n: usize,
    ) {
        match (doubled, common) {
            (true, true) => self.step::<true, true>(c, r0, g, n),
            (true, false) => self.step::<true, false>(c, r0, g, n),
            (false, true) => self.step::<false, true>(c, r0, g, n),
            (false, false) => self.step::<false, false>(c, r0, g, n),
        }
    }

    /// Compare one step's 16 rows × 32 queries of dot products (tile t: rows r0 ..,
    /// queries 32·g + 16·t ..) with the queries' k-th distances. `DOUBLED`: the tiles
    /// hold 2 q·b (the queries were doubled in the B operands), else q·b. `COMMON`: every
    /// row's |b_j|² is `bias`, already added to `need`, so the gain is 2 q·b_j alone.
    /// Row j can enter query q's top k only if d² = |q|² + |b_j|² − 2 q·b_j ≤ worst_q, i.e.
    /// gain = 2 q·b_j − |b_j|² ≥ |q|² − worst_q = need_q: the gains' maximum over a tile's 16 rows
    /// is tested first; when it passes, every row is compared at once (masks, no branch
    /// per row) and only the (row, query) pairs that pass reach the scalar top-k, which
    /// checks them against its current k-th distance (pushes earlier in the tile may have
    /// lowered it).
    #[target_feature(enable = "avx512f")]
    unsafe fn step<const DOUBLED: bool, const COMMON: bool>(
        &mut self,
        c: &[i32; 2 * 256],
        r0: usize,
        g: usize,
        n: usize,
    ) {
        let rows = 16.min(n.saturating_sub(r0));
        if rows == 0 {
            return; // padding past the last row
        }
        let norms = self.data_norms.as_ptr().add(r0);
        for t in 0..2 {
            let qb = g * 32 + 16 * t;
            let ct = c.as_ptr().add(t * 256);
            let need = self.need[qb / 16];
            let mut need_now = need;
            // 2 q·b − |b|² of row i for the 16 queries (macro: a closure would not inherit
            // the target features, and the intrinsics would become calls)
            macro_rules! gain {
                ($i:expr) => {{
                    let dot = _mm512_loadu_si512(ct.add($i * 16) as *const _);
                    let dot2 = if DOUBLED {
                        dot
                    } else {
                        _mm512_add_epi32(dot, dot)
                    };
                    if COMMON {
                        dot2
                    } else {
                        _mm512_sub_epi32(dot2, _mm512_set1_epi32(*norms.add($i) as i32))
                    }
                }};
            }
            let best = if rows == 16 {
                // two independent maximum chains
                let (mut b0, mut b1) = (gain!(0), gain!(1));
                for i in (2..16).step_by(2) {
                    b0 = _mm512_max_epi32(b0, gain!(i));
                    b1 = _mm512_max_epi32(b1, gain!(i + 1));
                }
                _mm512_max_epi32(b0, b1)
            } else {
                let mut b = gain!(0);
                for i in 1..rows {
                    b = _mm512_max_epi32(b, gain!(i));
                }
                b
            };
            if _mm512_cmpge_epi32_mask(best, need) == 0 {
                continue;
            }
            // the 16 rows' masks, four rows to a 64-bit word (bit 16·(i % 4) + lane)
            let mut words = [0u64; 4];
            for (w, word) in words.iter_mut().enumerate() {
                let mut bits = 0u64;
                for i in 4 * w..(4 * w + 4).min(rows) {
                    let m = _mm512_cmpge_epi32_mask(gain!(i), need) as u64;
                    bits |= m << (16 * (i % 4));
                }
                *word = bits;
            }
            for (w, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let b = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let (i, lane) = (4 * w + b / 16, b % 16);
                    let q = qb + lane;
                    let j = (r0 + i) as u32;
                    if (self.filter)(self.q0 + q, j) {
                        let dot = *ct.add(i * 16 + lane);
                        let dot2 = if DOUBLED { dot } else { 2 * dot };
                        let d = self.qn[q] - dot2 + *norms.add(i) as i32;
                        let worst = self.tops.offer::<true>(q, d as u32, j);
                        need_now = _mm512_mask_set1_epi32(
                            need_now,
                            1 << lane,
                            self.qn[q] - worst + self.bias,
                        );
                    }
                }
            }
            self.need[qb / 16] = need_now;
        }
    }
}
