//! A query's best k (k ≤ 16) as 16 sorted keys in vector registers, for the exact
//! kernels: an insertion is a few vector operations without a branch, where the scalar
//! [`TopK`] insertion loop's exit was mispredicted about once per insertion (≈ 92
//! insertions per query in an all-pairs of 40,000 keypoints, see docs/decisions.md).

use super::TopK;
use std::arch::x86_64::*;

/// The largest k kept in vectors; larger k use [`TopK`].
pub(super) const MAX_K: usize = 16;

/// Keys `distance << 32 | row`, ascending; unused slots hold [`Best16::EMPTY`], above
/// every key (distances of 64-byte descriptors are far below 2³¹). The order of keys is
/// [`TopK`]'s: by distance, ties to the lower row.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct Best16(pub(super) [u64; 16]);

impl Best16 {
    const EMPTY: u64 = i64::MAX as u64;

    pub(super) fn from_heap(h: &TopK) -> Self {
        let mut b = Best16([Self::EMPTY; 16]);
        for (slot, &(d, i)) in b.0.iter_mut().zip(&h.items) {
            *slot = (d as u64) << 32 | i as u64;
        }
        b
    }

    pub(super) fn to_heap(self, h: &mut TopK) {
        h.items.clear();
        h.items.extend(self.items(h.k()));
    }

    /// The first `k` (distance, row) pairs held, nearest first.
    pub(super) fn items(&self, k: usize) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.0
            .iter()
            .take(k)
            .filter(|&&key| key != Self::EMPTY)
            .map(|&key| ((key >> 32) as u32, key as u32))
    }

    /// The k-th key (a key enters only below it).
    #[inline(always)]
    pub(super) fn kth(&self, k: usize) -> u64 {
        self.0[k - 1]
    }

    /// The k-th distance as [`TopK::worst_i32`] gives it (i32::MAX while fewer than k).
    #[inline(always)]
    pub(super) fn worst_i32(&self, k: usize) -> i32 {
        match self.0[k - 1] {
            Self::EMPTY => i32::MAX,
            key => (key >> 32) as i32,
        }
    }

    /// Insert `key` (below [`Self::kth`]: checked by the caller): the keys above it move
    /// up one slot, the first of them taking `key`.
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn insert_avx512(&mut self, key: u64) {
        let p = self.0.as_mut_ptr() as *mut __m512i;
        let (lo, hi) = (
            _mm512_load_si512(p as *const _),
            _mm512_load_si512(p.add(1) as *const _),
        );
        let kv = _mm512_set1_epi64(key as i64);
        let (mlo, mhi) = (
            _mm512_cmpgt_epi64_mask(lo, kv),
            _mm512_cmpgt_epi64_mask(hi, kv),
        );
        let prev_lo = _mm512_permutexvar_epi64(_mm512_set_epi64(6, 5, 4, 3, 2, 1, 0, 0), lo);
        let prev_hi =
            _mm512_permutex2var_epi64(lo, _mm512_set_epi64(14, 13, 12, 11, 10, 9, 8, 7), hi);
        let (plo, phi) = (mlo << 1, (mhi << 1) | (mlo >> 7));
        let new_lo = _mm512_mask_blend_epi64(mlo, lo, _mm512_mask_blend_epi64(plo, kv, prev_lo));
        let new_hi = _mm512_mask_blend_epi64(mhi, hi, _mm512_mask_blend_epi64(phi, kv, prev_hi));
        _mm512_store_si512(p as *mut _, new_lo);
        _mm512_store_si512(p.add(1) as *mut _, new_hi);
    }

    /// [`Self::insert_avx512`] with AVX2: four vectors of four keys.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn insert_avx2(&mut self, key: u64) {
        let p = self.0.as_mut_ptr() as *mut __m256i;
        let kv = _mm256_set1_epi64x(key as i64);
        let v: [__m256i; 4] = [
            _mm256_load_si256(p),
            _mm256_load_si256(p.add(1)),
            _mm256_load_si256(p.add(2)),
            _mm256_load_si256(p.add(3)),
        ];
        // per slot: holds a larger key (all ones) or not
        let m = [
            _mm256_cmpgt_epi64(v[0], kv),
            _mm256_cmpgt_epi64(v[1], kv),
            _mm256_cmpgt_epi64(v[2], kv),
            _mm256_cmpgt_epi64(v[3], kv),
        ];
        // each vector's slots shifted up by one, slot 0 from the previous vector's slot 3
        // (macro, not a closure: a closure would not inherit the target feature)
        macro_rules! up {
            ($x:expr, $i:expr) => {{
                let r = _mm256_permute4x64_epi64::<0b10_01_00_00>($x[$i]);
                if $i == 0 {
                    r
                } else {
                    let last = _mm256_permute4x64_epi64::<0b11_11_11_11>($x[$i - 1]);
                    _mm256_blend_epi32::<0b0000_0011>(r, last)
                }
            }};
        }
        macro_rules! slot {
            ($i:expr) => {{
                let (prev, pm) = (up!(v, $i), up!(m, $i));
                // lane 0 of vector 0 has no previous slot: it can only take `key`
                let pm = if $i == 0 {
                    _mm256_blend_epi32::<0b0000_0011>(pm, _mm256_setzero_si256())
                } else {
                    pm
                };
                let moved = _mm256_blendv_epi8(kv, prev, pm);
                _mm256_store_si256(p.add($i), _mm256_blendv_epi8(v[$i], moved, m[$i]));
            }};
        }
        slot!(0);
        slot!(1);
        slot!(2);
        slot!(3);
    }
}

/// The top k of a block of queries while a kernel scans: in [`Best16`] vectors where
/// k ≤ [`MAX_K`], else in the [`TopK`] lists themselves; [`Tops::finish`] writes the
/// vectors back into the lists.
pub(super) struct Tops<'a> {
    k: usize,
    best: Vec<Best16>,
    heaps: &'a mut [TopK],
}

impl<'a> Tops<'a> {
    pub(super) fn new(heaps: &'a mut [TopK]) -> Self {
        let k = heaps.first().map_or(1, |h| h.k());
        let best = if k <= MAX_K {
            heaps.iter().map(Best16::from_heap).collect()
        } else {
            Vec::new()
        };
        Tops { k, best, heaps }
    }

    /// Offer row `j` at squared distance `d` to query `q`; returns the query's k-th
    /// distance afterwards (as [`TopK::worst_i32`]). `AVX512`: the vector insertion to
    /// use (inlined into the kernel, whose target features it then shares).
    ///
    /// # Safety
    /// AVX2, and AVX-512F where `AVX512`, must be available.
    #[inline(always)]
    pub(super) unsafe fn offer<const AVX512: bool>(&mut self, q: usize, d: u32, j: u32) -> i32 {
        if self.best.is_empty() {
            let heap = &mut self.heaps[q];
            heap.push(d, j);
            return heap.worst_i32();
        }
        let b = &mut self.best[q];
        let key = (d as u64) << 32 | j as u64;
        if key < b.kth(self.k) {
            if AVX512 {
                b.insert_avx512(key);
            } else {
                b.insert_avx2(key);
            }
        }
        b.worst_i32(self.k)
    }

    /// Write the vectors back into the [`TopK`] lists.
    pub(super) fn finish(self) {
        for (b, h) in self.best.into_iter().zip(self.heaps.iter_mut()) {
            b.to_heap(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knn::SplitMix;

    /// Both insertions keep the same keys as [`TopK`] on random streams with ties.
    #[test]
    fn vector_insertions_match_topk() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let avx512 = std::is_x86_feature_detected!("avx512f");
        let mut rng = SplitMix(5);
        for k in [1usize, 3, 10, 16] {
            for round in 0..200 {
                let mut top = TopK::new(k);
                let mut a = Best16::from_heap(&top);
                let mut b = a;
                for j in 0..(round % 40) as u32 {
                    let d = rng.below(50) as u32;
                    top.push(d, j);
                    let key = (d as u64) << 32 | j as u64;
                    if key < b.kth(k) {
                        unsafe { b.insert_avx2(key) };
                        if avx512 {
                            unsafe { a.insert_avx512(key) };
                            assert_eq!(a.0, b.0);
                        }
                    }
                    assert_eq!(b.worst_i32(k), top.worst_i32());
                }
                let mut back = TopK::new(k);
                b.to_heap(&mut back);
                assert_eq!(back.items, top.items, "k = {k}");
            }
        }
    }
}
