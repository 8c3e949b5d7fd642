//! The AVX-512 prefilter of 3D detection (extract/detect.rs chooses it where the CPU has
//! AVX-512F): the same test as the portable prefilter, sixteen voxels at a time, with the
//! comparisons as mask registers and the set bits read out directly instead of a flag
//! byte per voxel and a scan over the flags.

use std::arch::x86_64::*;

/// A row of the prefilter: the DoG (`hi − lo`) at the centre voxels and at their six face
/// neighbours, as `(hi, lo)` slices of one length.
pub(super) type Row7<'a> = [(&'a [f32], &'a [f32]); 7];

/// Appends `margin + q` to `hits` for every `q` (increasing) where the centre value `v`
/// is above `thr` and above all six neighbours, or below `−thr` and below all six (strict,
/// so a NaN never passes): the portable prefilter's test, the same f32 subtractions and
/// ordered comparisons.
#[target_feature(enable = "avx512f")]
pub(super) fn row_hits(s: &Row7, thr: f32, margin: usize, hits: &mut Vec<usize>) {
    let len = s[0].0.len();
    assert!(s.iter().all(|(h, l)| h.len() == len && l.len() == len));
    let (up, down) = (_mm512_set1_ps(thr), _mm512_set1_ps(-thr));
    let mut q = 0;
    while q < len {
        let m = if len - q >= 16 {
            !0u16
        } else {
            ((1u32 << (len - q)) - 1) as u16
        };
        // SAFETY: lanes of m lie below len in every slice (asserted); the others are not
        // read
        let dog = |i: usize| unsafe {
            let (h, l) = s[i];
            _mm512_sub_ps(
                _mm512_maskz_loadu_ps(m, h.as_ptr().add(q)),
                _mm512_maskz_loadu_ps(m, l.as_ptr().add(q)),
            )
        };
        let v = dog(0);
        let mut mx = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(m, v, up);
        let mut mn = _mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(m, v, down);
        for i in 1..7 {
            if mx | mn == 0 {
                break;
            }
            let y = dog(i);
            mx = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(mx, v, y);
            mn = _mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(mn, v, y);
        }
        let mut bits = (mx | mn) as u32;
        while bits != 0 {
            hits.push(margin + q + bits.trailing_zeros() as usize);
            bits &= bits - 1;
        }
        q += 16;
    }
}
