//! 2D SIFT-Rank on a single image (slice-wise SIFT, the baseline the fusion paper
//! compares against): the same scale space on a `ni × nj × 1` volume, 26-neighbour
//! extrema, a 2×2 structure-tensor edge test (Lowe's r = 10), one 36-bin orientation
//! histogram, and a 64-bin descriptor of 4×4 cells × 4 orientation bins, rank-transformed.

use super::describe::{add_angle, angle_peaks, normalise_patch, ranked, Frame, Patch, ANGLE_BINS};
use super::volume::{self, Vol};
use super::{
    assemble, check_spacing, intensity_scale, scale_space, Analysis, ExtractParams, Keypoints,
};
use crate::{KfError, Result};
use ndarray::ArrayView2;
use rayon::prelude::*;
use std::f32::consts::TAU;

/// Samples per axis of the analysis patch.
const NA: usize = 11;
/// Descriptor samples per axis (4 cells × 4).
const ND: usize = 16;
/// The descriptor window is this many times wider (relative to `descriptor_radius`)
/// than in 3D, since it holds 4×4 cells instead of 2×2×2.
const WIDEN_2D: f32 = 1.75;
/// Lowe's edge test with r = 10: keep if tr² < (r+1)²/r · det.
const EDGE_RATIO_2D: f64 = 12.1;

/// Extract 2D SIFT-Rank keypoints from `image` (index order i, j) with pixel sizes
/// `spacing` (mm). Rows have `ijk[2] == 0`; orientations are 3×3 rotations about the
/// third axis (in-plane rotation in the top-left block).
pub fn extract2d(
    image: ArrayView2<f32>,
    spacing: [f64; 2],
    params: &ExtractParams,
) -> Result<Keypoints> {
    params.validate()?;
    check_spacing(&spacing)?;
    let (ni, nj) = image.dim();
    if (ni as f64) * (nj as f64) > params.max_voxels {
        return Err(KfError::InvalidImage(format!(
            "image ({ni}, {nj}) exceeds the limit of {} pixels (parameter max_voxels)",
            params.max_voxels
        )));
    }
    if ni == 0 || nj == 0 {
        return Ok(Keypoints::default());
    }
    let mut vol = Vol::zeros([ni, nj, 1])?;
    for (d, s) in vol.data.iter_mut().zip(image.iter()) {
        *d = *s;
    }
    let Some(iscale) = intensity_scale(&vol.data)? else {
        return Ok(Keypoints::default());
    };
    vol.data.par_iter_mut().for_each(|x| *x *= iscale);
    let iso = spacing[0].min(spacing[1]);
    let aniso = (spacing[0] - spacing[1]).abs() > 1e-6 * iso;
    let step = [iso / spacing[0], iso / spacing[1], 1.0];
    if aniso {
        let m = [
            ((ni - 1) as f64 * spacing[0] / iso).floor() as usize + 1,
            ((nj - 1) as f64 * spacing[1] / iso).floor() as usize + 1,
            1,
        ];
        if (m[0] as f64) * (m[1] as f64) > params.max_voxels {
            return Err(KfError::InvalidImage(format!(
                "isotropic resampling gives {m:?}, over the limit of {} pixels",
                params.max_voxels
            )));
        }
        vol = volume::resample(&vol, m, step)?;
    }
    let found = scale_space(vol, params, 2)?;
    let step = if aniso { step } else { [1.0; 3] };
    Ok(assemble(
        found,
        |p| [p[0] * step[0], p[1] * step[1], 0.0],
        iso,
    ))
}

/// Patch statistics, edge test and in-plane orientations at `c` (octave pixels).
pub(crate) fn analyse(kp: &Patch, p: &ExtractParams) -> Option<Analysis> {
    let Patch { g, c, sigma } = *kp;
    let radius = p.orientation_radius as f32 * sigma;
    let h = 2.0 * radius / (NA - 1) as f32;
    let half = (NA / 2) as f32;
    let mut v = [0f32; NA * NA];
    for a in 0..NA {
        for b in 0..NA {
            v[a * NA + b] = g.sample([
                c[0] + (a as f32 - half) * h,
                c[1] + (b as f32 - half) * h,
                0.0,
            ]);
        }
    }
    if !normalise_patch(&mut v) {
        return None;
    }
    let sw = (NA - 1) as f32 / 4.0;
    let (mut txx, mut txy, mut tyy) = (0f64, 0f64, 0f64);
    let mut hist = [0f32; ANGLE_BINS];
    for a in 1..NA - 1 {
        for b in 1..NA - 1 {
            let gx = 0.5 * (v[(a + 1) * NA + b] - v[(a - 1) * NA + b]);
            let gy = 0.5 * (v[a * NA + b + 1] - v[a * NA + b - 1]);
            let r2 = (a as f32 - half).powi(2) + (b as f32 - half).powi(2);
            let w = (-r2 / (2.0 * sw * sw)).exp();
            txx += (w * gx * gx) as f64;
            txy += (w * gx * gy) as f64;
            tyy += (w * gy * gy) as f64;
            let m = (gx * gx + gy * gy).sqrt();
            if m > 0.0 {
                add_angle(&mut hist, gy, gx, w * m);
            }
        }
    }
    let (tr, det) = (txx + tyy, txx * tyy - txy * txy);
    if det <= 0.0 || (tr * tr).partial_cmp(&(EDGE_RATIO_2D * det)) != Some(std::cmp::Ordering::Less)
    {
        return None;
    }
    let disc = ((txx - tyy).powi(2) / 4.0 + txy * txy).sqrt();
    let e = [(tr / 2.0 + disc) as f32, (tr / 2.0 - disc) as f32, 0.0];
    let (hmax, mut peaks) = angle_peaks(&hist, p.primary_peak as f32);
    if hmax <= 0.0 {
        return None;
    }
    peaks.sort_by(|a, b| b.1.total_cmp(&a.1));
    peaks.truncate(p.max_orientations as usize);
    let frames = peaks
        .into_iter()
        .map(|(ang, _)| {
            let (s, c) = ang.sin_cos();
            [[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]]
        })
        .collect();
    Some(Analysis {
        eigenvalues: e,
        frames,
    })
}

/// 4×4 cells × 4 orientation bins over a window of half-width
/// `1.75 · descriptor_radius · σ` in the keypoint frame, rank-transformed.
pub(crate) fn descriptor(kp: &Patch, f: &Frame, p: &ExtractParams) -> Option<[u8; 64]> {
    let Patch { g, c, sigma } = *kp;
    let radius = WIDEN_2D * p.descriptor_radius as f32 * sigma;
    let h = 2.0 * radius / ND as f32;
    const NS: usize = ND + 2;
    let mut v = [0f32; NS * NS];
    for a in 0..NS {
        let ua = -radius + (a as f32 - 0.5) * h;
        for b in 0..NS {
            let ub = -radius + (b as f32 - 0.5) * h;
            v[a * NS + b] = g.sample([
                c[0] + ua * f[0][0] + ub * f[1][0],
                c[1] + ua * f[0][1] + ub * f[1][1],
                0.0,
            ]);
        }
    }
    let mut hist = [0f32; 64];
    let cell = ND as f32 / 4.0;
    for a in 1..=ND {
        for b in 1..=ND {
            let gx = v[(a + 1) * NS + b] - v[(a - 1) * NS + b];
            let gy = v[a * NS + b + 1] - v[a * NS + b - 1];
            let m = (gx * gx + gy * gy).sqrt();
            if m <= 0.0 {
                continue;
            }
            let ua = (a as f32 - 0.5) / (ND as f32 / 2.0) - 1.0;
            let ub = (b as f32 - 0.5) / (ND as f32 / 2.0) - 1.0;
            let w = m * (-(ua * ua + ub * ub) / 2.0).exp();
            // soft (bilinear) cell and linear orientation-bin assignment
            let ca = ((a - 1) as f32 + 0.5) / cell - 0.5;
            let cb = ((b - 1) as f32 + 0.5) / cell - 0.5;
            let mut ang = gy.atan2(gx) / TAU * 4.0;
            if ang < 0.0 {
                ang += 4.0;
            }
            let o0 = ang.floor();
            let fo = ang - o0;
            let o0 = (o0 as usize) % 4;
            let (a0, b0) = (ca.floor(), cb.floor());
            let (fa, fb) = (ca - a0, cb - b0);
            for (da, wa) in [(0isize, 1.0 - fa), (1, fa)] {
                let ia = a0 as isize + da;
                if !(0..4).contains(&ia) {
                    continue;
                }
                for (db, wb) in [(0isize, 1.0 - fb), (1, fb)] {
                    let ib = b0 as isize + db;
                    if !(0..4).contains(&ib) {
                        continue;
                    }
                    let base = ((ia * 4 + ib) * 4) as usize;
                    hist[base + o0] += w * wa * wb * (1.0 - fo);
                    hist[base + (o0 + 1) % 4] += w * wa * wb * fo;
                }
            }
        }
    }
    ranked(&hist)
}
