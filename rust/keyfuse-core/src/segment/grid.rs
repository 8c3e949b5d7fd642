//! A uniform grid over keypoint positions, for the closest-points queries of the
//! spatially constrained re-matching, and the exact selection of the closest points.

/// The distinct keypoint positions bucketed in a uniform grid of cubic cells (row-major
/// cells, positions sorted by cell then first index, coordinates stored per axis), for
/// the closest-points queries of the re-matching. Extraction gives about two oriented rows
/// per position, so each position is visited once for all of its rows.
#[derive(Debug, Clone, Default)]
pub(super) struct Grid {
    origin: [f64; 3],
    cell: f64,
    inv_cell: f64,
    dims: [usize; 3],
    /// `start[c]..start[c + 1]` are the positions of cell `c` in `pos` / `first` / `mult`.
    start: Vec<u32>,
    /// x, y and z of the positions in cell order.
    pos: [Vec<f64>; 3],
    /// `index[first[u]..first[u] + mult[u]]` are the keypoints at position `u`.
    first: Vec<u32>,
    mult: Vec<u32>,
    /// Keypoint indices grouped by position, ascending within a position.
    index: Vec<u32>,
}

/// Positions near a query (squared distance, position, its keypoint count), `len` of them
/// in buffers sized for every position of the grid (so a push never reallocates and
/// needs no branch).
#[derive(Debug, Default)]
pub(super) struct Near {
    d: Vec<f64>,
    pos: Vec<u32>,
    mult: Vec<u32>,
    len: usize,
    /// Histogram of the squared distances for [`Near::select`].
    counts: Vec<u32>,
    /// The keypoints of the histogram bin that holds the boundary, as (distance, index).
    tie: Vec<(f64, u32)>,
}

/// Bins of the histogram of squared distances in [`Near::select`].
const BINS: usize = 256;

impl Near {
    fn reset(&mut self, n: usize) {
        if self.d.len() < n {
            self.d.resize(n, 0.0);
            self.pos.resize(n, 0);
            self.mult.resize(n, 0);
        }
        self.len = 0;
    }

    /// The `keep` (≥ 1) keypoints of `grid` at the gathered positions closest to the
    /// query by (squared distance, index) into `cand` (any order); returns the `keep`-th
    /// smallest squared distance, or `None` when fewer keypoints were gathered. `top`
    /// bounds every gathered distance from above.
    ///
    /// A histogram of the distances over `[0, top]` finds the bin of the `keep`-th
    /// keypoint: the keypoints of the bins below are kept, the boundary bin's are ordered
    /// exactly. The bin is a monotonic function of the distance, so this is the order of a
    /// full sort.
    pub(super) fn select(
        &mut self,
        grid: &Grid,
        keep: usize,
        top: f64,
        cand: &mut Vec<u32>,
    ) -> Option<f64> {
        let n = self.len;
        let (d, pos, mult) = (&self.d[..n], &self.pos[..n], &self.mult[..n]);
        let scale = BINS as f64 / top;
        // NaN (0 × ∞ when top = 0) and the top itself saturate into the end bins
        let bin = |v: f64| ((v * scale) as usize).min(BINS - 1);
        self.counts.clear();
        self.counts.resize(BINS, 0);
        for (&v, &m) in d.iter().zip(mult) {
            self.counts[bin(v)] += m;
        }
        if mult.iter().map(|&m| m as usize).sum::<usize>() < keep {
            return None;
        }
        let (mut below, mut b) = (0usize, 0usize);
        while below + (self.counts[b] as usize) < keep {
            below += self.counts[b] as usize;
            b += 1;
        }
        cand.clear();
        self.tie.clear();
        for k in 0..n {
            let bk = bin(d[k]);
            if bk > b {
                continue;
            }
            let u = pos[k] as usize;
            let rows = &grid.index[grid.first[u] as usize..][..mult[k] as usize];
            if bk < b {
                for &i in rows {
                    cand.push(i);
                }
            } else {
                self.tie.extend(rows.iter().map(|&i| (d[k], i)));
            }
        }
        self.tie
            .sort_unstable_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
        let need = keep - below;
        cand.extend(self.tie[..need].iter().map(|e| e.1));
        Some(self.tie[need - 1].0)
    }
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
            inv_cell: 1.0 / cell,
            dims,
            ..Grid::default()
        };
        let key: Vec<usize> = xyz.iter().map(|&p| g.cell_of(p)).collect();
        // by cell, then position (equal positions together), then index
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_unstable_by_key(|&i| (key[i as usize], xyz[i as usize].map(f64::to_bits), i));
        let n_cells = dims[0] * dims[1] * dims[2];
        let mut start = vec![0u32; n_cells + 1];
        for (k, &i) in order.iter().enumerate() {
            let p = xyz[i as usize];
            if k > 0 && xyz[order[k - 1] as usize] == p {
                *g.mult.last_mut().expect("a position before") += 1;
                continue;
            }
            start[key[i as usize] + 1] += 1;
            for (axis, &v) in g.pos.iter_mut().zip(&p) {
                axis.push(v);
            }
            g.first.push(k as u32);
            g.mult.push(1);
        }
        for c in 0..n_cells {
            start[c + 1] += start[c];
        }
        g.start = start;
        g.index = order;
        g
    }

    /// Number of distinct positions.
    pub(super) fn len(&self) -> usize {
        self.pos[0].len()
    }

    #[inline]
    fn coord(&self, v: f64, d: usize) -> usize {
        // the cast truncates towards zero and saturates (NaN and negatives to 0): the floor
        // for every cell index ≥ 0, without a call to libm's floor
        (((v - self.origin[d]) * self.inv_cell) as usize).min(self.dims[d] - 1)
    }

    pub(super) fn cell_of(&self, p: [f64; 3]) -> usize {
        let c = [0, 1, 2].map(|d| self.coord(p[d], d));
        (c[0] * self.dims[1] + c[1]) * self.dims[2] + c[2]
    }

    /// Gather the positions `a..b` (cell order) with squared distance ≤ `r2` from `y`.
    /// The distance is [`crate::linalg::sq_dist`]'s, term for term.
    #[inline(always)]
    fn gather(&self, y: [f64; 3], a: usize, b: usize, r2: f64, out: &mut Near) {
        let (px, py, pz) = (&self.pos[0][a..b], &self.pos[1][a..b], &self.pos[2][a..b]);
        let mult = &self.mult[a..b];
        let (d, pos, m) = (&mut out.d[..], &mut out.pos[..], &mut out.mult[..]);
        let mut n = out.len;
        for k in 0..px.len() {
            let (dx, dy, dz) = (px[k] - y[0], py[k] - y[1], pz[k] - y[2]);
            let v = dx * dx + dy * dy + dz * dz;
            // written always, counted when inside: n ≤ positions visited, so it stays in
            // bounds
            d[n] = v;
            pos[n] = (a + k) as u32;
            m[n] = mult[k];
            n += (v <= r2) as usize;
        }
        out.len = n;
    }

    /// Every position with its squared distance from `y`; returns the largest.
    pub(super) fn all(&self, y: [f64; 3], out: &mut Near) -> f64 {
        out.reset(self.len());
        self.gather(y, 0, self.len(), f64::INFINITY, out);
        out.d[..out.len].iter().copied().fold(0.0, f64::max)
    }

    /// Positions in the cells that meet the ball of radius `r` around `y`, with squared
    /// distance ≤ `r2`, into `out` (replacing its contents). Every position left out is
    /// farther than `r` from `y`.
    pub(super) fn ball(&self, y: [f64; 3], r: f64, r2: f64, out: &mut Near) {
        out.reset(self.len());
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
        let limit = r2 * (1.0 + 1e-9) + 1e-9;
        for cz in z0..=z1 {
            let gz = gap(cz, 0);
            for cy in y0..=y1 {
                let gyz = gz + gap(cy, 1);
                if gyz > limit {
                    continue;
                }
                let row = (cz * self.dims[1] + cy) * self.dims[2];
                // the whole x range of the ball's cube: a chord per row (a sqrt and a
                // short loop) costs more than the few extra positions it would skip
                let (a, b) = (
                    self.start[row + x0] as usize,
                    self.start[row + x1 + 1] as usize,
                );
                self.gather(y, a, b, r2, out);
            }
        }
    }
}
