//! Dense float volumes and the scale-space primitives besides the blur (blur.rs): 2×2×2
//! averaging, trilinear sampling and isotropic resampling.
//!
//! Layout: C order, index `(i, j, k)`, `k` contiguous. Every kernel is written as
//! AXPY over contiguous rows or planes (so it autovectorises) and parallelised over
//! `i`-planes; there are no cross-thread reductions, so results are bit-identical
//! whatever the rayon thread count.

use super::flush::flushed;
use super::workspace;
use crate::Result;
use rayon::prelude::*;

/// A dense 3D float volume (a 2D image is a volume with `n[2] == 1`).
#[derive(Clone, Debug)]
pub(crate) struct Vol {
    pub n: [usize; 3],
    pub data: Vec<f32>,
    /// `Some((address, capacity))` of a workspace buffer, all of whose capacity is
    /// initialised: while `data` is still that allocation (however much it was shortened
    /// or lengthened within its capacity), the pool takes it back whole.
    whole: Option<(usize, usize)>,
    /// Index ranges per axis outside which every voxel is +0.0 (all bits zero): the whole
    /// grid unless known tighter. The scale space measures it on its input and the blur
    /// keeps it (extract/blur.rs skips what is exactly zero); whoever writes `data`
    /// otherwise must widen it.
    pub support: [(usize, usize); 3],
}

impl Vol {
    /// A volume of shape `n` holding `data` (C order).
    pub fn new(n: [usize; 3], data: Vec<f32>) -> Vol {
        Vol {
            n,
            data,
            whole: None,
            support: Vol::full(n),
        }
    }

    /// A volume of a workspace buffer (all of its capacity initialised).
    fn workspace(n: [usize; 3], data: Vec<f32>) -> Vol {
        let whole = Some((data.as_ptr() as usize, data.capacity()));
        Vol {
            n,
            data,
            whole,
            support: Vol::full(n),
        }
    }

    /// The support of a grid `n` with nothing known: all of it.
    pub(crate) fn full(n: [usize; 3]) -> [(usize, usize); 3] {
        n.map(|x| (0, x))
    }

    /// Set [`Vol::support`] to the smallest box holding every voxel whose bits are not
    /// all zero (empty ranges for a volume of +0.0 only).
    pub(crate) fn measure_support(&mut self) {
        let [_, nj, nk] = self.n;
        let plane = nj * nk;
        if plane == 0 || self.data.is_empty() {
            return;
        }
        const NONE: [(usize, usize); 3] = [(usize::MAX, 0); 3];
        let join = |a: [(usize, usize); 3], b: [(usize, usize); 3]| {
            std::array::from_fn(|x| (a[x].0.min(b[x].0), a[x].1.max(b[x].1)))
        };
        let b = self
            .data
            .par_chunks(plane)
            .enumerate()
            .map(|(i, o)| {
                let mut b = NONE;
                for (j, row) in o.chunks_exact(nk).enumerate() {
                    // an OR without an early exit, so that it vectorises
                    if row.iter().fold(0u32, |m, x| m | x.to_bits()) == 0 {
                        continue;
                    }
                    let first = row.iter().position(|x| x.to_bits() != 0).unwrap_or(0);
                    let last = row.iter().rposition(|x| x.to_bits() != 0).unwrap_or(0);
                    b = join(b, [(i, i + 1), (j, j + 1), (first, last + 1)]);
                }
                b
            })
            .reduce(|| NONE, join);
        self.support = match b[0].0 < b[0].1 {
            true => b,
            false => [(0, 0); 3],
        };
    }

    /// Whether `data` is still the workspace allocation it was made with (not reallocated
    /// or replaced), so all of its capacity is initialised.
    fn is_whole(&self) -> bool {
        self.whole == Some((self.data.as_ptr() as usize, self.data.capacity()))
    }

    pub fn zeros(n: [usize; 3]) -> Result<Vol> {
        Ok(Vol::workspace(n, workspace::try_zeros(n[0] * n[1] * n[2])?))
    }

    /// A volume of shape `n` with unspecified values, from the workspace pool (the caller
    /// overwrites every voxel); hand it back with [`Vol::give_back`].
    pub(crate) fn scratch(n: [usize; 3]) -> Result<Vol> {
        Ok(Vol::workspace(n, workspace::take(n[0] * n[1] * n[2])?))
    }

    /// Return volumes' buffers to the workspace pool.
    pub(crate) fn give_back(vols: impl IntoIterator<Item = Vol>) {
        for v in vols {
            if v.is_whole() {
                // SAFETY: the workspace allocation the volume was made with, whole then
                // (safe code cannot de-initialise a `Vec<f32>`'s values)
                unsafe { workspace::give_back_whole(v.data) }
            } else {
                workspace::give_back(v.data)
            }
        }
    }

    /// A volume of shape `m` whose voxel (p, q, r) is `value(p, q, r)`, filled in
    /// parallel over `p`-planes (every voxel is written, so a pooled buffer serves).
    pub(crate) fn from_fn(
        m: [usize; 3],
        value: impl Fn(usize, usize, usize) -> f32 + Sync,
    ) -> Result<Vol> {
        Vol::fill(m, false, value)
    }

    /// [`Vol::from_fn`] with subnormals flushed (extract/flush.rs), as the scale space
    /// computes.
    pub(crate) fn from_fn_flushed(
        m: [usize; 3],
        value: impl Fn(usize, usize, usize) -> f32 + Sync,
    ) -> Result<Vol> {
        Vol::fill(m, true, value)
    }

    fn fill(
        m: [usize; 3],
        flush: bool,
        value: impl Fn(usize, usize, usize) -> f32 + Sync,
    ) -> Result<Vol> {
        let mut out = Vol::scratch(m)?;
        let mplane = m[1] * m[2];
        if mplane == 0 {
            return Ok(out);
        }
        out.data
            .par_chunks_mut(mplane)
            .enumerate()
            .for_each(|(p, o)| {
                let plane = |o: &mut [f32]| {
                    for q in 0..m[1] {
                        for r in 0..m[2] {
                            o[q * m[2] + r] = value(p, q, r);
                        }
                    }
                };
                if flush {
                    flushed(|| plane(o))
                } else {
                    plane(o)
                }
            });
        Ok(out)
    }

    #[inline]
    pub fn idx(&self, i: usize, j: usize, k: usize) -> usize {
        (i * self.n[1] + j) * self.n[2] + k
    }

    #[inline]
    pub fn at(&self, i: usize, j: usize, k: usize) -> f32 {
        self.data[self.idx(i, j, k)]
    }

    /// Trilinear interpolation at a continuous index position, clamped to the grid
    /// (replicated border), so any finite position is safe. One formula everywhere, the
    /// CUDA sampler's too (`kf_trilinear` in scale.cu): `lerp(a, b, f) = a + f·(b − a)`
    /// along axis 2, then 1, then 0, with f = x − ⌊x⌋.
    #[inline]
    pub fn sample(&self, p: [f32; 3]) -> f32 {
        // fast path: strictly inside the grid, no clamping needed
        match cell_of(p, self.n) {
            Some((c, f)) => trilinear_fast(&self.data, self.n, c, f),
            None => self.sample_clamped(p),
        }
    }

    /// Trilinear interpolation with the position clamped to the grid (the fast path's
    /// formula and order of operations: bit-identical to it inside the grid).
    fn sample_clamped(&self, p: [f32; 3]) -> f32 {
        trilinear_clamped(self.n, p, |i, j, k| self.at(i, j, k))
    }
}

/// The cell `⌊p⌋` and the fractions `p − ⌊p⌋` when `p` lies strictly inside a grid of
/// shape `n` (the trilinear fast path needs no clamping), else `None`.
#[inline(always)]
pub(crate) fn cell_of(p: [f32; 3], n: [usize; 3]) -> Option<([usize; 3], [f32; 3])> {
    let inside = (0..3).all(|a| p[a] >= 0.0 && p[a] < (n[a] - 1) as f32);
    inside.then(|| {
        let c = p.map(|x| x as usize);
        (c, [0, 1, 2].map(|a| p[a] - c[a] as f32))
    })
}

/// [`Vol::sample`]'s fast path: the trilinear formula on the voxels `(x, y, z) + {0, 1}³`
/// of `data`, a C-ordered grid of shape `n`, with the fractions `[fx, fy, fz]` in that cell.
#[inline(always)]
pub(crate) fn trilinear_fast(
    data: &[f32],
    n: [usize; 3],
    [x, y, z]: [usize; 3],
    [fx, fy, fz]: [f32; 3],
) -> f32 {
    let (sj, si) = (n[2], n[1] * n[2]);
    let b = (x * n[1] + y) * n[2] + z;
    let d = &data[b..b + si + sj + 2];
    let l = |o: usize| d[o] + fz * (d[o + 1] - d[o]);
    let c0 = l(0) + fy * (l(sj) - l(0));
    let c1 = l(si) + fy * (l(si + sj) - l(si));
    c0 + fx * (c1 - c0)
}

/// Trilinear interpolation at `p`, clamped to a grid of shape `n` whose voxel `(i, j, k)`
/// is `at(i, j, k)`: [`Vol::sample`]'s formula and order of operations.
#[inline(always)]
pub(crate) fn trilinear_clamped(
    n: [usize; 3],
    p: [f32; 3],
    at: impl Fn(usize, usize, usize) -> f32,
) -> f32 {
    let mut i0 = [0usize; 3];
    let mut i1 = [0usize; 3];
    let mut f = [0f32; 3];
    for a in 0..3 {
        let hi = (n[a] - 1) as f32;
        let x = if p[a].is_finite() {
            p[a].clamp(0.0, hi)
        } else {
            0.0
        };
        let fl = x.floor();
        i0[a] = fl as usize;
        i1[a] = (i0[a] + 1).min(n[a] - 1);
        f[a] = x - fl;
    }
    let l = |i: usize, j: usize| {
        let a = at(i, j, i0[2]);
        a + f[2] * (at(i, j, i1[2]) - a)
    };
    let c0 = l(i0[0], i0[1]) + f[1] * (l(i0[0], i1[1]) - l(i0[0], i0[1]));
    let c1 = l(i1[0], i0[1]) + f[1] * (l(i1[0], i1[1]) - l(i1[0], i0[1]));
    c0 + f[0] * (c1 - c0)
}

/// Halve the grid by averaging 2×2×2 blocks (2×2 for a 2D image): child index `p`
/// covers parent indices `2p, 2p+1`, i.e. sits at parent coordinate `2p + 0.5`; with
/// subnormals flushed, like the blur (extract/flush.rs).
pub(crate) fn downsample(src: &Vol) -> Result<Vol> {
    let [ni, nj, nk] = src.n;
    let flat = nk == 1;
    let m = [ni / 2, nj / 2, if flat { 1 } else { nk / 2 }];
    let mut out = Vol::from_fn_flushed(m, |p, q, r| {
        let mut s = 0.0f32;
        for di in 0..2 {
            for dj in 0..2 {
                if flat {
                    s += src.at(2 * p + di, 2 * q + dj, 0);
                } else {
                    s += src.at(2 * p + di, 2 * q + dj, 2 * r)
                        + src.at(2 * p + di, 2 * q + dj, 2 * r + 1);
                }
            }
        }
        if flat {
            s * 0.25
        } else {
            s * 0.125
        }
    })?;
    // a child whose eight parents are +0.0 is +0.0
    if !flat {
        out.support = std::array::from_fn(|a| match src.support[a] {
            (lo, hi) if lo < hi => (lo / 2, hi.div_ceil(2).min(m[a])),
            _ => (0, 0),
        });
    }
    Ok(out)
}

/// Trilinear resampling onto a grid of shape `m` where new index `q` sits at old index
/// `q * step` (per axis).
pub(crate) fn resample(src: &Vol, m: [usize; 3], step: [f64; 3]) -> Result<Vol> {
    Vol::from_fn(m, |p, q, r| {
        src.sample([
            (p as f64 * step[0]) as f32,
            (q as f64 * step[1]) as f32,
            (r as f64 * step[2]) as f32,
        ])
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A workspace volume stays whole (pooled back at full length) when shortened and
    /// lengthened within its capacity, not when reallocated; a volume from elsewhere is
    /// not whole.
    #[test]
    fn whole_tracks_reallocation() {
        let mut v = Vol::zeros([4, 5, 6]).unwrap();
        assert!(v.is_whole());
        v.data.truncate(7);
        v.data.resize(120, 0.0);
        assert!(v.is_whole() && v.data.len() == 120);
        v.data.resize(121, 0.0);
        assert!(!v.is_whole());
        let mut w = Vol::zeros([2, 2, 2]).unwrap();
        w.data = vec![0.0; 8];
        assert!(!w.is_whole());
        assert!(!Vol::new([1, 1, 2], vec![1.0, 2.0]).is_whole());
        Vol::give_back([v, w, Vol::new([1, 1, 2], vec![1.0, 2.0])]);
    }

    #[test]
    fn downsample_averages_blocks() {
        let mut v = Vol::zeros([4, 4, 4]).unwrap();
        for (x, val) in v.data.iter_mut().enumerate() {
            *val = x as f32;
        }
        let d = downsample(&v).unwrap();
        assert_eq!(d.n, [2, 2, 2]);
        let want = (0..2)
            .flat_map(|a| (0..2).flat_map(move |b| (0..2).map(move |c| (a, b, c))))
            .map(|(a, b, c)| v.at(a, b, c))
            .sum::<f32>()
            / 8.0;
        assert!((d.at(0, 0, 0) - want).abs() < 1e-6);
    }

    #[test]
    fn sample_interpolates_and_clamps() {
        let mut v = Vol::zeros([2, 2, 2]).unwrap();
        let c = v.idx(1, 1, 1);
        v.data[c] = 8.0;
        assert!((v.sample([0.5, 0.5, 0.5]) - 1.0).abs() < 1e-6);
        assert_eq!(v.sample([5.0, 5.0, 5.0]), 8.0);
        assert_eq!(v.sample([f32::NAN, -3.0, 0.0]), 0.0);
    }

    /// Uniform numbers in [0, 1) from a xorshift generator seeded with `s`.
    pub(crate) fn uniform(mut s: u64) -> impl FnMut() -> f32 {
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    #[test]
    fn sample_paths_share_one_formula() {
        // inside the grid the fast path and the clamped path (the CUDA sampler's
        // formula) give bit-identical values
        let mut v = Vol::zeros([7, 6, 5]).unwrap();
        let mut next = uniform(0x2545_f491_4f6c_dd1du64);
        for x in v.data.iter_mut() {
            *x = 100.0 * next() - 30.0;
        }
        for _ in 0..2000 {
            let p = [5.99 * next(), 4.99 * next(), 3.99 * next()];
            assert_eq!(
                v.sample(p).to_bits(),
                v.sample_clamped(p).to_bits(),
                "{p:?}"
            );
        }
    }
}
