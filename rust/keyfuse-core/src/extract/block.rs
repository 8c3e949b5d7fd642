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
