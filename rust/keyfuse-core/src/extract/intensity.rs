//! The extractor's intensity normalisation and its input copy.
//!
//! The scale maps the 99.5th percentile of |value| over a stride sample (every
//! `stride`-th voxel in C order, at most ~1 M voxels) to 1. A 3D input is read twice: once
//! for the finiteness check and the sample (read in the input's own layout, C or Fortran
//! order: the sample is a set of voxels, and its rank statistics do not depend on the
//! order it is collected in), once for the copy into the extractor's C-ordered buffer,
//! which multiplies by the scale as it goes (the same `x · scale` per voxel as a separate
//! pass: docs/decisions.md).

use super::transpose;
use super::volume::Vol;
use crate::{KfError, Result};
use ndarray::ArrayView3;
use rayon::prelude::*;

/// The sample's stride for a volume of `len` voxels.
fn stride_of(len: usize) -> usize {
    (len / 1_000_000).max(1)
}

/// |value| as bits: for non-negative floats the order of the bits is the order of the
/// values.
#[inline]
fn abs_bits(x: &f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Whether `c` holds a NaN or an infinity: its largest |value| bits have all exponent
/// bits set (a maximum without an early exit, so that it vectorises).
fn non_finite(c: &[f32]) -> bool {
    c.iter().map(abs_bits).fold(0, u32::max) >= 0x7f80_0000
}

fn refused() -> KfError {
    KfError::InvalidImage("image contains NaN or infinite values".into())
}

/// The stride sample of a C-ordered volume, as the |value| bits of its parts; non-finite
/// values anywhere are `InvalidImage`.
fn sample_c(data: &[f32]) -> Result<Vec<Vec<u32>>> {
    let stride = stride_of(data.len());
    // whole strides per chunk, so that a chunk's every stride-th value is the sample's
    let chunk = stride * (1 << 15);
    let parts: Vec<Option<Vec<u32>>> = data
        .par_chunks(chunk)
        .map(|c| (!non_finite(c)).then(|| c.iter().step_by(stride).map(abs_bits).collect()))
        .collect();
    parts.into_iter().collect::<Option<_>>().ok_or_else(refused)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// [`sample_c`] of the C-ordered copy of `src`, a volume of shape `n` in Fortran order
/// (`i` fastest), read in place: the same voxels, in another order. The C index of
/// `(i, j, k)` is `i·plane + r` with `r = j·nk + k`, a multiple of the stride `s` exactly
/// for the `i` in one residue class modulo `s / gcd(plane, s)` (or none), found per `r mod s`.
fn sample_fortran(src: &[f32], [ni, nj, nk]: [usize; 3]) -> Result<Vec<Vec<u32>>> {
    let s = stride_of(src.len());
    let p = (nj * nk) % s;
    let period = s / gcd(p, s);
    let first: Vec<Option<usize>> = (0..s)
        .map(|r| (0..period).find(|&i| (r + i * p).is_multiple_of(s)))
        .collect();
    if ni * nj == 0 {
        return Ok(Vec::new());
    }
    let parts: Vec<Option<Vec<u32>>> = src
        .par_chunks(ni * nj)
        .enumerate()
        .map(|(k, plane)| {
            if non_finite(plane) {
                return None;
            }
            let mut v = Vec::with_capacity(plane.len() / s + nj);
            for (j, col) in plane.chunks(ni).enumerate() {
                if let Some(i0) = first[(j * nk + k) % s] {
                    v.extend((i0..ni).step_by(period).map(|i| abs_bits(&col[i])));
                }
            }
            Some(v)
        })
        .collect();
    parts.into_iter().collect::<Option<_>>().ok_or_else(refused)
}

/// The factor that maps the sample's 99.5th percentile of |value| (its value of rank
/// `q`; its maximum where that is 0) to 1, `None` when the sample is all zero. The value
/// of rank `q` is found by a histogram of the top 16 bits and a selection among the one
/// bin's members.
fn scale_of(parts: &[Vec<u32>]) -> Option<f32> {
    const BINS: usize = 1 << 16;
    // one pass on one thread: ~1 M increments take less than a histogram per task costs
    // to allocate, zero and merge (the time is CPU time summed over threads)
    let mut hist = vec![0u32; BINS];
    let mut max = 0u32;
    for part in parts {
        // bin 0 (zeros, most of a head image's background) is not counted here: it is
        // what the other bins leave (incrementing one bin over and over waits on each
        // store)
        for &b in part {
            if b >> 16 != 0 {
                hist[(b >> 16) as usize] += 1;
            }
            max = max.max(b);
        }
    }
    if max == 0 {
        return None;
    }
    let n: usize = parts.iter().map(Vec::len).sum();
    hist[0] = (n - hist.iter().map(|&c| c as usize).sum::<usize>()) as u32;
    let q = ((n as f64 * 0.995) as usize).min(n - 1);
    // the bin holding rank q, and the sample values below it
    let (mut bin, mut below) = (0usize, 0usize);
    while below + hist[bin] as usize <= q {
        below += hist[bin] as usize;
        bin += 1;
    }
    let mut members: Vec<u32> = parts
        .par_iter()
        .flat_map_iter(|p| p.iter().copied().filter(|b| (b >> 16) as usize == bin))
        .collect();
    let (_, &mut v, _) = members.select_nth_unstable(q - below);
    let v = f32::from_bits(v);
    let v = if v > 0.0 { v } else { f32::from_bits(max) };
    Some(1.0 / v)
}

/// The extractor's intensity normalisation: the factor that maps the 99.5th percentile of
/// |value| (over a stride sample of at most ~1 M voxels: every `stride`-th voxel) to 1.
/// `None` for an all-zero image; non-finite values are `InvalidImage`. The CUDA scale
/// space normalises with it too.
pub fn intensity_scale(data: &[f32]) -> Result<Option<f32>> {
    Ok(scale_of(&sample_c(data)?))
}

/// The extractor's C-ordered copy of `volume` multiplied by its [`intensity_scale`] (the
/// scale of its C-ordered copy, whatever its layout), or `None` for an all-zero volume;
/// non-finite values are `InvalidImage`. C- and Fortran-ordered inputs are sampled in
/// place and copied once; others are copied first. (Fortran order, NIfTI arrays as nibabel
/// loads them, is copied here rather than by numpy, so that no second C-ordered copy of
/// the input stays alive during extraction.)
pub(crate) fn scaled_copy(volume: ArrayView3<f32>) -> Result<Option<Vol>> {
    let (ni, nj, nk) = volume.dim();
    let n = [ni, nj, nk];
    if let Some(src) = volume.as_slice() {
        let Some(s) = scale_of(&sample_c(src)?) else {
            return Ok(None);
        };
        let mut vol = Vol::scratch(n)?;
        vol.data
            .par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, c)| {
                for (d, c) in d.iter_mut().zip(c) {
                    *d = *c * s;
                }
            });
        return Ok(Some(vol));
    }
    if let Some(src) = volume.t().as_slice() {
        let Some(s) = scale_of(&sample_fortran(src, n)?) else {
            return Ok(None);
        };
        let mut vol = Vol::scratch(n)?;
        transpose::copy_fortran(src, &mut vol, s);
        return Ok(Some(vol));
    }
    // every voxel is written
    let mut vol = Vol::scratch(n)?;
    for (d, s) in vol.data.iter_mut().zip(volume.iter()) {
        *d = *s;
    }
    let Some(s) = intensity_scale(&vol.data)? else {
        Vol::give_back([vol]);
        return Ok(None);
    };
    vol.data.par_iter_mut().for_each(|x| *x *= s);
    Ok(Some(vol))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, ShapeBuilder};

    /// The Fortran-order sample is the C-order sample's voxels (sorted, they are equal),
    /// and the scaled copy of a Fortran-ordered volume is that of its C-ordered copy, bit
    /// for bit: shapes whose plane is and is not a multiple of the stride (strides 1 to 8).
    #[test]
    fn fortran_sample_and_copy_are_the_c_order_ones() {
        let mut next = super::super::volume::tests::uniform(0x2545_f491_4f6c_dd1d);
        for n in [
            [3, 4, 5],
            [1, 1, 1],
            [101, 103, 107],
            [150, 151, 97],
            [100, 101, 402],
            [121, 151, 331],
            [193, 211, 181],
            [197, 233, 189],
            [1, 2_000_003, 1],
            [2_000_003, 1, 1],
        ] {
            let c = Array3::from_shape_fn(n, |_| {
                let u = next();
                if u < 0.5 {
                    0.0
                } else {
                    (u - 0.5) * 600.0 - 100.0
                }
            });
            let mut f = Array3::zeros(n.f());
            f.assign(&c);
            assert!(f.as_slice().is_none() || n.iter().filter(|&&x| x > 1).count() < 2);
            let sorted = |parts: Vec<Vec<u32>>| {
                let mut v: Vec<u32> = parts.into_iter().flatten().collect();
                v.sort_unstable();
                v
            };
            let cs = sorted(sample_c(c.as_slice().unwrap()).unwrap());
            assert_eq!(cs.len(), c.len().div_ceil(stride_of(c.len())));
            let fs = sorted(sample_fortran(f.t().as_slice().unwrap(), n).unwrap());
            assert_eq!(cs, fs, "{n:?}");
            let data = |v: Option<Vol>| v.map(|v| v.data);
            let want = data(scaled_copy(c.view()).unwrap());
            assert_eq!(want, data(scaled_copy(f.view()).unwrap()), "{n:?}");
            // neither layout: copied first
            let p = c.view().permuted_axes([1, 0, 2]);
            assert_eq!(
                data(scaled_copy(p).unwrap()),
                data(scaled_copy(p.as_standard_layout().view()).unwrap()),
                "{n:?}"
            );
            // the scale of the old separate pass, and its product per voxel
            let by_pass = intensity_scale(c.as_slice().unwrap())
                .unwrap()
                .map(|s| c.iter().map(|x| x * s).collect::<Vec<f32>>());
            assert_eq!(want, by_pass, "{n:?}");
            assert_eq!(want.is_none(), c.iter().all(|&x| x == 0.0));
        }
        // non-finite values are refused in either layout, all-zero volumes have no scale
        let mut f = Array3::<f32>::zeros([40, 30, 20].f());
        assert!(scaled_copy(f.view()).unwrap().is_none());
        f[[39, 0, 19]] = f32::INFINITY;
        assert!(scaled_copy(f.view()).is_err());
        f[[39, 0, 19]] = f32::NAN;
        let err = scaled_copy(f.view()).unwrap_err().to_string();
        assert!(err.contains("NaN or infinite"), "{err}");
        let c = f.as_standard_layout().to_owned();
        assert!(scaled_copy(c.view()).is_err());
    }
}
