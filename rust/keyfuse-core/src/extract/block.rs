//! Keypoint blocks: the cube of a Gaussian level around a keypoint that its orientation
//! and descriptor patches sample, read in place.

use super::volume::{cell_of, trilinear_clamped, trilinear_fast, Vol};

#[inline]
fn clampi(x: isize, n: usize) -> usize {
    x.clamp(0, n as isize - 1) as usize
}

/// The cube of half-width `r` voxels around `c` of `src`, border replicated, read in place:
/// voxel `(x, y, z)` of the block is `src[clamp(origin + (x, y, z))]`, so sampling it
/// equals clamped sampling of `src`. Positions are given in the block's voxels (relative
/// to `origin`): a keypoint's patches are sampled at `(c − origin) + u`, the same f32
/// arithmetic whichever memory holds the voxels. (It once was a copy; reading `src` in
/// place touches only the cache lines the samples need: docs/decisions.md.)
#[derive(Clone, Copy)]
pub(crate) struct Block<'a> {
    src: &'a Vol,
    pub origin: [isize; 3],
    /// the block's shape
    pub n: [usize; 3],
    /// the whole block lies inside `src` (no clamping needed)
    inside: bool,
}

impl<'a> Block<'a> {
    /// The block of half-width `r` around `c` (2D images: one voxel thick).
    pub fn new(src: &'a Vol, c: [f32; 3], r: usize) -> Block<'a> {
        let flat = src.n[2] == 1;
        let origin = [0, 1, 2].map(|a| {
            if a == 2 && flat {
                0
            } else {
                c[a].round() as isize - r as isize
            }
        });
        let side = 2 * r + 2;
        let n = [side, side, if flat { 1 } else { side }];
        let inside = (0..3).all(|a| origin[a] >= 0 && origin[a] as usize + n[a] <= src.n[a]);
        Block {
            src,
            origin,
            n,
            inside,
        }
    }

    /// The `src` index of block voxel `(x, y, z)` (clamped to `src`).
    #[inline(always)]
    fn src_index(&self, x: usize, y: usize, z: usize) -> usize {
        let [ni, nj, nk] = self.src.n;
        let o = self.origin;
        let i = clampi(o[0] + x as isize, ni);
        let j = clampi(o[1] + y as isize, nj);
        let k = clampi(o[2] + z as isize, nk);
        (i * nj + j) * nk + k
    }

    #[inline(always)]
    fn at(&self, x: usize, y: usize, z: usize) -> f32 {
        self.src.data[self.src_index(x, y, z)]
    }

    /// [`Vol::sample`] of the block (the same formula and order of operations).
    #[inline(always)]
    pub fn sample(&self, p: [f32; 3]) -> f32 {
        if self.inside {
            if let Some(([x, y, z], f)) = cell_of(p, self.n) {
                // the fast path of `Vol::sample` on `src`'s memory: the cell's position in
                // `src`, the fractions from the block position
                let o = self.origin;
                let cell = [x as isize + o[0], y as isize + o[1], z as isize + o[2]];
                return trilinear_fast(&self.src.data, self.src.n, cell.map(|v| v as usize), f);
            }
        }
        self.sample_clamped(p)
    }

    /// Inside the block the clamped formula is the fast path's, bit for bit.
    #[cold]
    #[inline(never)]
    fn sample_clamped(&self, p: [f32; 3]) -> f32 {
        trilinear_clamped(self.n, p, |x, y, z| self.at(x, y, z))
    }

    /// [`Block::sample`] at each of `pts` into `out`, bit for bit: eight points at a time
    /// with AVX2 gathers where the CPU has them and all eight take the fast path (the same
    /// IEEE operations in the same order, no fused multiply-adds).
    pub fn sample_points(&self, pts: &[[f32; 3]], out: &mut [f32]) {
        assert_eq!(out.len(), pts.len());
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if self.inside
            && self.src.data.len() < i32::MAX as usize
            && super::blur::isa_cap() >= 1
            && std::is_x86_feature_detected!("avx2")
        {
            // SAFETY: AVX2 was detected
            done = unsafe { self.sample_points_avx2(pts, out) };
        }
        for (o, &p) in out[done..].iter_mut().zip(&pts[done..]) {
            *o = self.sample(p);
        }
    }

    /// The whole chunks of eight of [`Block::sample_points`]; returns how many points it
    /// sampled. Needs `self.inside` and `src` shorter than `i32::MAX`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn sample_points_avx2(&self, pts: &[[f32; 3]], out: &mut [f32]) -> usize {
        use std::arch::x86_64::*;
        let [_, nj, nk] = self.src.n;
        let (sj, si) = (nk as i32, (nj * nk) as i32);
        let data = self.src.data.as_ptr();
        let zero = _mm256_setzero_ps();
        let hi = self.n.map(|x| _mm256_set1_ps((x - 1) as f32));
        let org = self.origin.map(|o| _mm256_set1_epi32(o as i32));
        let (vnj, vnk) = (_mm256_set1_epi32(nj as i32), _mm256_set1_epi32(nk as i32));
        let chunks = pts.len() / 8;
        for (ch, o) in pts
            .chunks_exact(8)
            .zip(out.chunks_exact_mut(8))
            .take(chunks)
        {
            let axis = |a: usize| {
                _mm256_setr_ps(
                    ch[0][a], ch[1][a], ch[2][a], ch[3][a], ch[4][a], ch[5][a], ch[6][a], ch[7][a],
                )
            };
            let p = [axis(0), axis(1), axis(2)];
            // `cell_of`'s test: 0 ≤ p < n − 1 on every axis (false for NaN)
            let mut ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
            for a in 0..3 {
                ok = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_GE_OQ>(p[a], zero));
                ok = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_LT_OQ>(p[a], hi[a]));
            }
            if _mm256_movemask_ps(ok) != 0xff {
                for (o, &q) in o.iter_mut().zip(ch) {
                    *o = self.sample(q);
                }
                continue;
            }
            // the cell (truncation of a non-negative position) and the fractions
            let c = p.map(|x| _mm256_cvttps_epi32(x));
            let f: [__m256; 3] =
                std::array::from_fn(|a| _mm256_sub_ps(p[a], _mm256_cvtepi32_ps(c[a])));
            let s: [__m256i; 3] = std::array::from_fn(|a| _mm256_add_epi32(c[a], org[a]));
            let b = _mm256_add_epi32(
                _mm256_mullo_epi32(_mm256_add_epi32(_mm256_mullo_epi32(s[0], vnj), s[1]), vnk),
                s[2],
            );
            let at = |off: i32| {
                _mm256_i32gather_ps::<4>(data, _mm256_add_epi32(b, _mm256_set1_epi32(off)))
            };
            // `trilinear_fast`: along z, then y, then x
            let l = |off: i32| {
                let d0 = at(off);
                _mm256_add_ps(d0, _mm256_mul_ps(f[2], _mm256_sub_ps(at(off + 1), d0)))
            };
            let (l00, l01, l10, l11) = (l(0), l(sj), l(si), l(si + sj));
            let c0 = _mm256_add_ps(l00, _mm256_mul_ps(f[1], _mm256_sub_ps(l01, l00)));
            let c1 = _mm256_add_ps(l10, _mm256_mul_ps(f[1], _mm256_sub_ps(l11, l10)));
            let r = _mm256_add_ps(c0, _mm256_mul_ps(f[0], _mm256_sub_ps(c1, c0)));
            _mm256_storeu_ps(o.as_mut_ptr(), r);
        }
        chunks * 8
    }

    /// [`Block::sample`] at every point `(xs[a], ys[b], zs[d])` of an axis-aligned grid, in
    /// C order into `out` (`xs.len() · ys.len() · zs.len()` values), bit for bit: where the
    /// whole grid takes the fast path, each axis's cells and fractions are found once.
    pub fn sample_grid(&self, [xs, ys, zs]: [&[f32]; 3], out: &mut [f32]) {
        assert_eq!(out.len(), xs.len() * ys.len() * zs.len());
        // `cell_of`'s test, axis by axis
        let fast = |v: &[f32], a: usize| v.iter().all(|&p| p >= 0.0 && p < (self.n[a] - 1) as f32);
        if !(self.inside && fast(xs, 0) && fast(ys, 1) && fast(zs, 2)) {
            let mut i = 0;
            for &x in xs {
                for &y in ys {
                    for &z in zs {
                        out[i] = self.sample([x, y, z]);
                        i += 1;
                    }
                }
            }
            return;
        }
        // the cell in `src` and the fraction, as `cell_of` computes them
        let cells = |v: &[f32], a: usize| -> Vec<(usize, f32)> {
            v.iter()
                .map(|&p| {
                    let c = p as usize;
                    ((c as isize + self.origin[a]) as usize, p - c as f32)
                })
                .collect()
        };
        let (cx, cy, cz) = (cells(xs, 0), cells(ys, 1), cells(zs, 2));
        let mut i = 0;
        for &(x, fx) in &cx {
            for &(y, fy) in &cy {
                for &(z, fz) in &cz {
                    out[i] = trilinear_fast(&self.src.data, self.src.n, [x, y, z], [fx, fy, fz]);
                    i += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::volume::tests::uniform;
    use super::*;

    /// The block as a copy (what the extractor once sampled): voxel (x, y, z) is
    /// `src[clamp(origin + (x, y, z))]`.
    fn block_copy(b: &Block) -> Vol {
        Vol::from_fn(b.n, |x, y, z| b.at(x, y, z)).unwrap()
    }

    #[test]
    fn block_sampling_equals_volume_sampling() {
        let mut v = Vol::zeros([9, 10, 11]).unwrap();
        for (x, val) in v.data.iter_mut().enumerate() {
            *val = ((x * 7919) % 101) as f32;
        }
        let b = Block::new(&v, [1.2, 8.7, 5.0], 4);
        let o = b.origin;
        for p in [[0.3f32, 7.9, 4.2], [-1.0, 9.5, 2.0], [4.9, 5.1, 8.4]] {
            let q = [0, 1, 2].map(|a| p[a] - o[a] as f32);
            assert!((b.sample(q) - v.sample(p)).abs() < 1e-3, "{p:?}");
        }
    }

    #[test]
    fn block_sampling_is_bit_identical_to_sampling_a_copy() {
        let mut v = Vol::zeros([23, 19, 27]).unwrap();
        let mut next = uniform(0x9e37_79b9_7f4a_7c15u64);
        for x in v.data.iter_mut() {
            *x = 50.0 * next() - 10.0;
        }
        // blocks inside the volume, across faces and corners, and larger than it
        for (c, r) in [
            ([11.3f32, 9.6, 13.2], 4usize),
            ([1.2, 17.7, 5.0], 4),
            ([21.9, 0.4, 26.5], 3),
            ([11.0, 9.0, 13.0], 15),
        ] {
            let b = Block::new(&v, c, r);
            let copy = block_copy(&b);
            let side = b.n[0] as f32;
            for _ in 0..3000 {
                // mostly inside the block, some outside it (the clamped path)
                let q = [0, 1, 2].map(|_| (1.2 * next() - 0.1) * side);
                assert_eq!(
                    b.sample(q).to_bits(),
                    copy.sample(q).to_bits(),
                    "{c:?} {q:?}"
                );
            }
        }
        // scattered points, in chunks of eight all inside or not, inside the volume or not
        for c in [[11.3f32, 9.6, 13.2], [1.2, 17.7, 5.0]] {
            let b = Block::new(&v, c, 6);
            let side = b.n[0] as f32;
            let mut pts: Vec<[f32; 3]> = (0..803)
                .map(|_| [0, 1, 2].map(|_| (0.98 * next() + 0.01) * (side - 1.0)))
                .collect();
            for i in (40..803).step_by(97) {
                pts[i] = [-0.5, 3.0, side];
            }
            pts[9] = [f32::NAN, 1.0, 1.0];
            let mut out = vec![0f32; pts.len()];
            b.sample_points(&pts, &mut out);
            for (o, &p) in out.iter().zip(&pts) {
                assert_eq!(o.to_bits(), b.sample(p).to_bits(), "{c:?} {p:?}");
            }
        }
        // an axis-aligned grid: inside the volume (the fast path) and across a face
        for c in [[11.3f32, 9.6, 13.2], [1.2, 17.7, 5.0]] {
            let b = Block::new(&v, c, 4);
            let axes: [Vec<f32>; 3] = std::array::from_fn(|a| {
                (0..7)
                    .map(|i| c[a] - b.origin[a] as f32 + 0.93 * i as f32 - 2.9)
                    .collect()
            });
            let mut out = vec![0f32; 7 * 7 * 7];
            b.sample_grid([&axes[0], &axes[1], &axes[2]], &mut out);
            let mut i = 0;
            for &x in &axes[0] {
                for &y in &axes[1] {
                    for &z in &axes[2] {
                        assert_eq!(out[i].to_bits(), b.sample([x, y, z]).to_bits(), "{c:?}");
                        i += 1;
                    }
                }
            }
        }
        // a 2D image: the block is one voxel thick
        let mut f = Vol::zeros([17, 13, 1]).unwrap();
        for x in f.data.iter_mut() {
            *x = next();
        }
        let b = Block::new(&f, [3.3, 11.2, 0.0], 5);
        assert_eq!(b.n[2], 1);
        let copy = block_copy(&b);
        for _ in 0..2000 {
            let q = [14.0 * next() - 1.0, 14.0 * next() - 1.0, 0.0];
            assert_eq!(b.sample(q).to_bits(), copy.sample(q).to_bits(), "{q:?}");
        }
    }
}
