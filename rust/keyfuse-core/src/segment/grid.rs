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
    /// x, y and z of the positions in cell order, and their keypoint counts as f64 (each
    /// padded with [`PAD`] zeros, so a 4-wide load at the last position stays in bounds).
    pos: [Vec<f64>; 3],
    multf: Vec<f64>,
    /// `index[first[u]..first[u] + mult[u]]` are the keypoints at position `u`.
    first: Vec<u32>,
    mult: Vec<u32>,
    /// Keypoint indices grouped by position, ascending within a position.
    index: Vec<u32>,
    /// The AVX2 gather applies (detected once).
    simd: bool,
}

/// Padding of the per-position arrays (and of [`Near`]'s buffers) for 4-wide access.
const PAD: usize = 4;

/// Positions near a query (squared distance, position, its keypoint count), `len` of them
/// in buffers sized for every position of the grid plus [`PAD`] (so a push never
/// reallocates and a 4-wide store needs no branch).
#[derive(Debug, Default)]
pub(super) struct Near {
    d: Vec<f64>,
    pos: Vec<u32>,
    mult: Vec<f64>,
    len: usize,
    /// Histogram of the squared distances for [`Near::select`].
    counts: Vec<u32>,
    /// Positions of the bins below the boundary, for [`Near::select`].
    kept: Vec<u32>,
    /// The keypoints of the histogram bin that holds the boundary, as (distance, index).
    tie: Vec<(f64, u32)>,
}

/// Bins of the histogram of squared distances in [`Near::select`].
const BINS: usize = 256;

/// For a 4-bit mask of selected 64-bit lanes, the 32-bit lane indices that move them to
/// the front in order (`_mm256_permutevar8x32_ps`).
const PACK64: [[u32; 8]; 16] = pack_table::<8>();
/// For a 4-bit mask of selected lanes, their lane numbers moved to the front in order.
const PACK32: [[u32; 4]; 16] = pack_table::<4>();

const fn pack_table<const W: usize>() -> [[u32; W]; 16] {
    let per = W / 4;
    let mut t = [[0u32; W]; 16];
    let mut m = 0;
    while m < 16 {
        let (mut out, mut lane) = (0, 0);
        while lane < 4 {
            if (m >> lane) & 1 == 1 {
                let mut p = 0;
                while p < per {
                    t[m][out * per + p] = (lane * per + p) as u32;
                    p += 1;
                }
                out += 1;
            }
            lane += 1;
        }
        m += 1;
    }
    t
}

impl Near {
    fn reset(&mut self, n: usize) {
        if self.d.len() < n + PAD {
            self.d.resize(n + PAD, 0.0);
            self.pos.resize(n + PAD, 0);
            self.mult.resize(n + PAD, 0.0);
            self.kept.resize(n + PAD, 0);
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
        let mut total = 0.0;
        for (&v, &m) in d.iter().zip(mult) {
            self.counts[bin(v)] += m as u32;
            total += m;
        }
        if (total as usize) < keep {
            return None;
        }
        let (mut below, mut b) = (0usize, 0usize);
        while below + (self.counts[b] as usize) < keep {
            below += self.counts[b] as usize;
            b += 1;
        }
        // positions below the boundary bin packed without a branch, the boundary bin's
        // (few) keypoints with their distances
        let mut nk = 0;
        self.tie.clear();
        for k in 0..n {
            let bk = bin(d[k]);
            self.kept[nk] = pos[k];
            nk += (bk < b) as usize;
            if bk == b {
                self.tie
                    .extend(grid.rows(pos[k] as usize).iter().map(|&i| (d[k], i)));
            }
        }
        cand.clear();
        for &u in &self.kept[..nk] {
            cand.extend_from_slice(grid.rows(u as usize));
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
            simd: crate::simd::has_avx2(),
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
        g.multf = g.mult.iter().map(|&m| m as f64).collect();
        for v in g.pos.iter_mut().chain([&mut g.multf]) {
            v.extend([0.0; PAD]);
        }
        g.start = start;
        g.index = order;
        g
    }

    /// The same grid with the AVX2 gather on or off (off: the portable loop).
    #[cfg(test)]
    pub(super) fn with_simd(mut self, on: bool) -> Grid {
        self.simd = on && crate::simd::has_avx2();
        self
    }

    /// Number of distinct positions.
    pub(super) fn len(&self) -> usize {
        self.mult.len()
    }

    /// The keypoints at position `u`.
    #[inline]
    fn rows(&self, u: usize) -> &[u32] {
        &self.index[self.first[u] as usize..][..self.mult[u] as usize]
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
    #[inline]
    fn gather(&self, y: [f64; 3], a: usize, b: usize, r2: f64, out: &mut Near) {
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            // SAFETY: AVX2 was detected when the grid was built
            unsafe { self.gather_avx2(y, a, b, r2, out) };
            return;
        }
        let mut n = out.len;
        for k in a..b {
            let (dx, dy, dz) = (
                self.pos[0][k] - y[0],
                self.pos[1][k] - y[1],
                self.pos[2][k] - y[2],
            );
            let v = dx * dx + dy * dy + dz * dz;
            // written always, counted when inside: n ≤ positions visited, so it stays in
            // bounds
            out.d[n] = v;
            out.pos[n] = k as u32;
            out.mult[n] = self.multf[k];
            n += (v <= r2) as usize;
        }
        out.len = n;
    }

    /// [`Self::gather`] four positions at a time: the same distances (no fused
    /// multiply-add) and order, the lanes inside packed to the front of each store by a
    /// table (no branch).
    ///
    /// # Safety
    /// AVX2 must be available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn gather_avx2(&self, y: [f64; 3], a: usize, b: usize, r2: f64, out: &mut Near) {
        use std::arch::x86_64::*;
        let (yx, yy, yz) = (
            _mm256_set1_pd(y[0]),
            _mm256_set1_pd(y[1]),
            _mm256_set1_pd(y[2]),
        );
        let r2v = _mm256_set1_pd(r2);
        let (px, py, pz) = (
            self.pos[0].as_ptr(),
            self.pos[1].as_ptr(),
            self.pos[2].as_ptr(),
        );
        let mp = self.multf.as_ptr();
        let (od, op, om) = (
            out.d.as_mut_ptr() as *mut f32,
            out.pos.as_mut_ptr() as *mut __m128i,
            out.mult.as_mut_ptr() as *mut f32,
        );
        let mut n = out.len;
        let mut k = a;
        while k < b {
            let dx = _mm256_sub_pd(_mm256_loadu_pd(px.add(k)), yx);
            let dy = _mm256_sub_pd(_mm256_loadu_pd(py.add(k)), yy);
            let dz = _mm256_sub_pd(_mm256_loadu_pd(pz.add(k)), yz);
            let d = _mm256_add_pd(
                _mm256_add_pd(_mm256_mul_pd(dx, dx), _mm256_mul_pd(dy, dy)),
                _mm256_mul_pd(dz, dz),
            );
            // lanes past b belong to the next range (or the padding): masked off
            let valid = (1usize << (b - k).min(4)) - 1;
            let mask = _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_LE_OQ>(d, r2v)) as usize & valid;
            let perm = _mm256_loadu_si256(PACK64[mask].as_ptr() as *const __m256i);
            let m = _mm256_loadu_pd(mp.add(k));
            _mm256_storeu_ps(
                od.add(2 * n),
                _mm256_permutevar8x32_ps(_mm256_castpd_ps(d), perm),
            );
            _mm256_storeu_ps(
                om.add(2 * n),
                _mm256_permutevar8x32_ps(_mm256_castpd_ps(m), perm),
            );
            let lanes = _mm_loadu_si128(PACK32[mask].as_ptr() as *const __m128i);
            let p = _mm_add_epi32(_mm_set1_epi32(k as i32), lanes);
            _mm_storeu_si128((op as *mut u32).add(n) as *mut __m128i, p);
            n += mask.count_ones() as usize;
            k += 4;
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
                let (a, b) = (
                    self.start[row + x0] as usize,
                    self.start[row + x1 + 1] as usize,
                );
                self.gather(y, a, b, r2, out);
            }
        }
    }
}
