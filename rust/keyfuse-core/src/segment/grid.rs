//! A uniform grid over keypoint positions, for the closest-points queries of the
//! spatially constrained re-matching.

use crate::linalg::sq_dist;

/// The keypoint positions bucketed in a uniform grid of cubic cells (row-major cells,
/// points sorted by cell then index), for the closest-points queries of the re-matching.
#[derive(Debug, Clone, Default)]
pub(super) struct Grid {
    origin: [f64; 3],
    cell: f64,
    dims: [usize; 3],
    /// `start[c]..start[c + 1]` are the points of cell `c` in `xyz` / `index`.
    start: Vec<u32>,
    xyz: Vec<[f64; 3]>,
    index: Vec<u32>,
}

impl Grid {
    pub(super) fn new(xyz: &[[f64; 3]]) -> Grid {
        let n = xyz.len();
        if n == 0 {
            return Grid::default();
        }
        let mut lo = [f64::INFINITY; 3];
        let mut hi = [f64::NEG_INFINITY; 3];
        for p in xyz {
            for d in 0..3 {
                lo[d] = lo[d].min(p[d]);
                hi[d] = hi[d].max(p[d]);
            }
        }
        let ext: Vec<f64> = (0..3).map(|d| (hi[d] - lo[d]).max(1e-6)).collect();
        // about one point per cell over the bounding box, at most 64 cells per axis
        let cell = ((ext[0] * ext[1] * ext[2]) / n as f64)
            .cbrt()
            .max(ext.iter().copied().fold(0.0, f64::max) / 64.0);
        let dims = [0, 1, 2].map(|d| ((ext[d] / cell).floor() as usize + 1).min(65));
        let mut g = Grid {
            origin: lo,
            cell,
            dims,
            ..Grid::default()
        };
        let key: Vec<usize> = xyz.iter().map(|&p| g.cell_of(p)).collect();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by_key(|&i| (key[i as usize], i));
        let n_cells = dims[0] * dims[1] * dims[2];
        let mut start = vec![0u32; n_cells + 1];
        for &k in &key {
            start[k + 1] += 1;
        }
        for c in 0..n_cells {
            start[c + 1] += start[c];
        }
        g.start = start;
        g.xyz = order.iter().map(|&i| xyz[i as usize]).collect();
        g.index = order;
        g
    }

    #[inline]
    fn coord(&self, v: f64, d: usize) -> usize {
        // the cast truncates towards zero and saturates (NaN and negatives to 0): the floor
        // for every cell index ≥ 0, without a call to libm's floor
        (((v - self.origin[d]) / self.cell) as usize).min(self.dims[d] - 1)
    }

    pub(super) fn cell_of(&self, p: [f64; 3]) -> usize {
        let c = [0, 1, 2].map(|d| self.coord(p[d], d));
        (c[0] * self.dims[1] + c[1]) * self.dims[2] + c[2]
    }

    /// Points of the cells that meet the ball of radius `r` around `y`, with squared
    /// distance ≤ `r2`, pushed to `out` as (squared distance, original index). Every point
    /// left out is farther than `r` from `y`.
    pub(super) fn ball(&self, y: [f64; 3], r: f64, r2: f64, out: &mut Vec<u128>) {
        let range =
            |d: usize| -> (usize, usize) { (self.coord(y[d] - r, d), self.coord(y[d] + r, d)) };
        let (z0, z1) = range(0);
        let (y0, y1) = range(1);
        let (x0, x1) = range(2);
        // squared distance from y to the slab of cell index c along axis d (0 inside)
        let gap = |c: usize, d: usize| -> f64 {
            let lo = self.origin[d] + c as f64 * self.cell;
            let hi = lo + self.cell;
            let g = if y[d] < lo {
                lo - y[d]
            } else if y[d] > hi {
                y[d] - hi
            } else {
                0.0
            };
            g * g
        };
        for cz in z0..=z1 {
            let gz = gap(cz, 0);
            for cy in y0..=y1 {
                let gyz = gz + gap(cy, 1);
                if gyz > r2 * (1.0 + 1e-9) + 1e-9 {
                    continue;
                }
                let row = (cz * self.dims[1] + cy) * self.dims[2];
                // the ball's chord along x in this row of cells
                let h = (r2 - gyz).max(0.0).sqrt() * (1.0 + 1e-9) + 1e-9;
                let (xa, xb) = (
                    self.coord(y[2] - h, 2).max(x0),
                    self.coord(y[2] + h, 2).min(x1),
                );
                let (a, b) = (
                    self.start[row + xa] as usize,
                    self.start[row + xb + 1] as usize,
                );
                for k in a..b {
                    let d = sq_dist(self.xyz[k], y);
                    if d <= r2 {
                        out.push(dist_key(d, self.index[k]));
                    }
                }
            }
        }
    }
}

/// A squared distance (≥ 0, not NaN) and an index as one integer in (distance, index) order.
#[inline]
pub(super) fn dist_key(d: f64, index: u32) -> u128 {
    ((d.to_bits() as u128) << 32) | index as u128
}

#[inline]
pub(super) fn key_dist(key: u128) -> f64 {
    f64::from_bits((key >> 32) as u64)
}
