//! Neighbour lists: the public [`Neighbors`] result and the bounded best-k list each
//! search fills per query.

use super::NONE;

/// k neighbours per query, row-major (`nq × k`), nearest first; missing slots hold
/// [`NONE`] with distance `u32::MAX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbors {
    pub k: usize,
    pub idx: Vec<u32>,
    pub dist2: Vec<u32>,
}

impl Neighbors {
    pub fn n_queries(&self) -> usize {
        self.idx.len().checked_div(self.k).unwrap_or(0)
    }
    /// The neighbours of queries `r` only, as their own [`Neighbors`].
    pub fn rows(&self, r: std::ops::Range<usize>) -> Neighbors {
        let r = r.start * self.k..r.end * self.k;
        Neighbors {
            k: self.k,
            idx: self.idx[r.clone()].to_vec(),
            dist2: self.dist2[r].to_vec(),
        }
    }
    /// The (index, squared distance) pairs of query `q`, nearest first, missing ones dropped.
    pub fn row(&self, q: usize) -> impl Iterator<Item = (u32, u32)> + '_ {
        let r = q * self.k..(q + 1) * self.k;
        self.idx[r.clone()]
            .iter()
            .zip(&self.dist2[r])
            .filter(|(i, _)| **i != NONE)
            .map(|(i, d)| (*i, *d))
    }
}

/// A bounded, sorted list of the best (distance, index) pairs; ties go to the lower index.
#[derive(Clone)]
pub(crate) struct TopK {
    k: usize,
    pub(super) items: Vec<(u32, u32)>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        TopK {
            k,
            items: Vec::with_capacity(k + 1),
        }
    }
    pub(crate) fn k(&self) -> usize {
        self.k
    }
    #[inline]
    pub(crate) fn worst(&self) -> u32 {
        if self.items.len() < self.k {
            u32::MAX
        } else {
            self.items[self.k - 1].0
        }
    }
    /// [`Self::worst`] as i32, for the SIMD comparisons (every real d² is far below
    /// i32::MAX).
    #[inline]
    pub(crate) fn worst_i32(&self) -> i32 {
        self.worst().min(i32::MAX as u32) as i32
    }
    #[inline]
    pub(crate) fn push(&mut self, d: u32, i: u32) {
        let key = (d, i);
        if self.items.len() == self.k {
            if key >= self.items[self.k - 1] {
                return;
            }
        } else {
            self.items.push(key);
        }
        // insertion from the end (k is small: cheaper than a search and a memmove); the
        // last item, duplicated or dropping out, is overwritten
        let items = self.items.as_mut_slice();
        let mut p = items.len() - 1;
        while p > 0 && items[p - 1] > key {
            items[p] = items[p - 1];
            p -= 1;
        }
        items[p] = key;
    }
    pub(super) fn write(&self, idx: &mut [u32], dist: &mut [u32]) {
        for (s, (d, i)) in self.items.iter().enumerate() {
            idx[s] = *i;
            dist[s] = *d;
        }
        for s in self.items.len()..self.k {
            idx[s] = NONE;
            dist[s] = u32::MAX;
        }
    }
}

/// Merge the neighbour lists of the same queries found in several shards (global point
/// ids) into each query's `k` best, ordered by (distance, id): the order of an unsharded
/// search, so merging never depends on how the cohort was split or searched.
pub fn merge_neighbors(parts: &[Neighbors], k: usize) -> crate::Result<Neighbors> {
    if k == 0 {
        return Err(crate::KfError::InvalidArgument(
            "k must be at least 1".into(),
        ));
    }
    let nq = parts.first().map_or(0, |p| p.n_queries());
    if parts
        .iter()
        .any(|p| p.n_queries() != nq || p.idx.len() != p.dist2.len() || p.k == 0)
    {
        return Err(crate::KfError::InvalidArgument(
            "neighbour lists to merge cover different queries".into(),
        ));
    }
    let mut idx = vec![NONE; nq * k];
    let mut dist2 = vec![u32::MAX; nq * k];
    let mut top = TopK::new(k);
    for q in 0..nq {
        top.items.clear();
        for p in parts {
            for (i, d) in p.row(q) {
                top.push(d, i);
            }
        }
        top.write(&mut idx[q * k..(q + 1) * k], &mut dist2[q * k..(q + 1) * k]);
    }
    Ok(Neighbors { k, idx, dist2 })
}
