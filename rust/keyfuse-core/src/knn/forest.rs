//! Approximate k-NN by randomized kd-trees searched best-bin-first across all trees
//! (FLANN's scheme).
// Index loops mirror the formulas.
#![allow(clippy::needless_range_loop)]

use super::forest_io::perm_bits;
use super::perm::Perm;
use super::{check_rows, dist2, Neighbors, TopK, NONE};
use crate::{KfError, Result, DESC_LEN};
use rayon::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Build parameters of a [`KdForest`].
#[derive(Clone, Debug)]
pub struct ForestParams {
    /// Number of randomized trees (FLANN's large-scale matcher uses 8).
    pub trees: usize,
    /// Most points in a leaf. 16 rather than 8 halves the nodes (in RAM ≈ 6.5 instead of
    /// 12.7 B a point at 4 trees; in a forest file ≈ 1.4 instead of 2.8); at the same
    /// `checks` the k-NN recall drops a little, and 1.5× the checks give it back at about
    /// the same CPU time (docs/decisions.md).
    pub leaf_size: usize,
    /// Seed of the per-tree shuffles and split choices.
    pub seed: u64,
}

impl Default for ForestParams {
    fn default() -> Self {
        ForestParams {
            trees: 8,
            leaf_size: 16,
            seed: 0x6b65_7966_7573_6521,
        }
    }
}

/// SplitMix64: a tiny, good-enough deterministic generator (no extra dependency).
pub(crate) struct SplitMix(pub u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 11) as u128 * n as u128) >> 53) as usize
    }
}

pub(super) const LEAF: u8 = u8::MAX;

/// One node (9 bytes, packed: no padding in the node arrays): internal (`dim`, threshold
/// `split()`, children `a` and `a + 1`) or a leaf (`dim == LEAF`, points `perm[a..w]`).
/// Children are always created as a pair, so one index locates both, and a leaf's end
/// takes the place of the threshold.
#[derive(Clone, Copy, Debug)]
#[repr(C, packed)]
pub(super) struct Node {
    pub(super) dim: u8,
    /// internal: the threshold's f32 bits; leaf: the end of its points in `perm`
    pub(super) w: u32,
    /// internal: the first child; leaf: the start of its points in `perm`
    pub(super) a: u32,
}

impl Node {
    #[inline(always)]
    pub(super) fn split(&self) -> f32 {
        f32::from_bits(self.w)
    }
    #[inline(always)]
    pub(super) fn leaf(a: u32, b: u32) -> Node {
        Node { dim: LEAF, w: b, a }
    }
    /// (near, far) child for a query coordinate `diff` = value − threshold.
    #[inline(always)]
    pub(super) fn children(&self, diff: f32) -> (u32, u32) {
        if diff < 0.0 {
            (self.a, self.a + 1)
        } else {
            (self.a + 1, self.a)
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Tree {
    pub(super) nodes: Vec<Node>,
    /// the points, leaf after leaf (bit-packed; mapped from the file a forest was read from)
    pub(super) perm: Perm,
}

/// A randomized kd-forest over `n × 64` descriptors. It stores only the trees; the data
/// is passed again to [`KdForest::search`] (the caller owns it, e.g. an index).
#[derive(Clone, Debug)]
pub struct KdForest {
    pub(super) n: usize,
    pub(super) trees: Vec<Tree>,
}

fn build_tree(data: &[u8], n: usize, leaf_size: usize, seed: u64) -> Tree {
    let mut rng = SplitMix(seed);
    let mut perm: Vec<u32> = (0..n as u32).collect();
    // Fisher–Yates: the first points of every range are then a random sample for the mean
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        perm.swap(i, j);
    }
    let mut nodes: Vec<Node> = Vec::with_capacity(2 * n / leaf_size.max(1) + 1);
    nodes.push(Node::leaf(0, n as u32));
    let mut stack = vec![0usize];
    while let Some(ni) = stack.pop() {
        let (lo, hi) = (nodes[ni].a as usize, nodes[ni].w as usize);
        if hi - lo <= leaf_size {
            continue;
        }
        // mean and variance per dimension over a sample of at most 128 points
        let m = (hi - lo).min(128);
        let mut sum = [0u32; DESC_LEN];
        let mut sq = [0u32; DESC_LEN];
        for &p in &perm[lo..lo + m] {
            let row = &data[p as usize * DESC_LEN..(p as usize + 1) * DESC_LEN];
            for d in 0..DESC_LEN {
                sum[d] += row[d] as u32;
                sq[d] += (row[d] as u32) * (row[d] as u32);
            }
        }
        // m²·variance per dimension, exact in integers; keep the 5 largest (ties → lower dim)
        let mut var = [(0u64, 0usize); 5];
        let mut top = 0usize;
        for d in 0..DESC_LEN {
            let v = m as u64 * sq[d] as u64 - (sum[d] as u64) * (sum[d] as u64);
            if v == 0 || (top == 5 && v <= var[4].0) {
                continue;
            }
            let mut pos = top.min(4);
            var[pos] = (v, d);
            while pos > 0 && var[pos - 1].0 < v {
                var.swap(pos - 1, pos);
                pos -= 1;
            }
            top = (top + 1).min(5);
        }
        if top == 0 {
            continue; // all sampled points identical: keep as a (large) leaf
        }
        let dim = var[rng.below(top)].1;
        let mut split = sum[dim] as f32 / m as f32;
        let slice = &mut perm[lo..hi];
        let key = |p: u32| data[p as usize * DESC_LEN + dim];
        let mut mid = partition(slice, |p| (key(p) as f32) < split);
        if mid == 0 || mid == slice.len() {
            // a skewed sample: split at the median value instead
            let half = slice.len() / 2;
            slice.select_nth_unstable_by_key(half, |&p| (key(p), p));
            let med = key(slice[half]);
            split = med as f32 + 0.5;
            mid = partition(slice, |p| (key(p) as f32) < split);
            if mid == 0 || mid == slice.len() {
                split = med as f32 - 0.5;
                mid = partition(slice, |p| (key(p) as f32) < split);
            }
            if mid == 0 || mid == slice.len() {
                continue;
            }
        }
        let l = nodes.len();
        nodes.push(Node::leaf(lo as u32, (lo + mid) as u32));
        nodes.push(Node::leaf((lo + mid) as u32, hi as u32));
        nodes[ni] = Node {
            dim: dim as u8,
            w: split.to_bits(),
            a: l as u32,
        };
        stack.push(l + 1);
        stack.push(l);
    }
    Tree {
        nodes,
        perm: Perm::packed(&perm, perm_bits(n)),
    }
}

/// Stable-order-free in-place partition; returns the number of elements satisfying `pred`.
fn partition<P: Fn(u32) -> bool>(s: &mut [u32], pred: P) -> usize {
    let mut i = 0;
    for j in 0..s.len() {
        if pred(s[j]) {
            s.swap(i, j);
            i += 1;
        }
    }
    i
}

/// An untaken branch queued for later: (bound, tree, node) packed into one integer whose
/// order is the lexicographic order of the triple (a total order, so pops are
/// deterministic; one integer compares faster than a tuple). Bounds are ≥ 0, where the
/// bits of an f32 sort like the values.
type Branch = u128;

#[inline(always)]
fn branch(bound: f32, t: usize, node: u32) -> Branch {
    ((bound.to_bits() as u128) << 64) | ((t as u128) << 32) | node as u128
}

#[inline(always)]
fn unbranch(b: Branch) -> (f32, usize, u32) {
    (
        f32::from_bits((b >> 64) as u32),
        (b >> 32) as u32 as usize,
        b as u32,
    )
}

/// Ask for the descriptor rows of points `a..b` of `perm` ahead of their use (they are
/// scattered in memory).
#[inline(always)]
fn prefetch_rows(data: &[u8], perm: &Perm, a: u32, b: u32) {
    #[cfg(target_arch = "x86_64")]
    for p in perm.range(a as usize, b as usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let ptr = data[p as usize * DESC_LEN..].as_ptr();
        // SAFETY: prefetch is a hint; both addresses lie inside the row.
        unsafe {
            _mm_prefetch(ptr as *const i8, _MM_HINT_T0);
            _mm_prefetch(ptr.add(DESC_LEN - 1) as *const i8, _MM_HINT_T0);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, perm, a, b);
}

/// The state of one query's best-bin-first walk.
struct Walk<'a, F> {
    data: &'a [u8],
    query: &'a [u8],
    q: usize,
    filter: &'a F,
    vis: &'a mut Visited,
    top: &'a mut TopK,
    done: &'a mut usize,
}

/// Open-addressing set of visited point ids, cleared in O(1) by a generation stamp.
struct Visited {
    keys: Vec<u32>,
    stamp: Vec<u32>,
    gen: u32,
    len: usize,
}

impl Visited {
    fn new() -> Self {
        Visited {
            keys: vec![0; 1024],
            stamp: vec![0; 1024],
            gen: 1,
            len: 0,
        }
    }
    fn clear(&mut self) {
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.gen = 1;
        }
        self.len = 0;
    }
    /// True when `id` was not yet in the set (and inserts it).
    #[inline]
    fn insert(&mut self, id: u32) -> bool {
        if 2 * (self.len + 1) > self.keys.len() {
            self.grow();
        }
        let mask = self.keys.len() - 1;
        let mut h = (id.wrapping_mul(0x9e37_79b1) as usize) & mask;
        loop {
            if self.stamp[h] != self.gen {
                self.stamp[h] = self.gen;
                self.keys[h] = id;
                self.len += 1;
                return true;
            }
            if self.keys[h] == id {
                return false;
            }
            h = (h + 1) & mask;
        }
    }
    fn grow(&mut self) {
        let old: Vec<u32> = (0..self.keys.len())
            .filter(|&h| self.stamp[h] == self.gen)
            .map(|h| self.keys[h])
            .collect();
        let cap = self.keys.len() * 2;
        self.keys = vec![0; cap];
        self.stamp = vec![0; cap];
        self.gen = 1;
        self.len = 0;
        for id in old {
            self.insert(id);
        }
    }
}

impl KdForest {
    /// Build the forest over `data` (`n × 64` bytes), one rayon task per tree.
    pub fn build(data: &[u8], params: &ForestParams) -> Result<KdForest> {
        let n = check_rows("data", data)?;
        if params.trees == 0 || params.leaf_size == 0 {
            return Err(KfError::InvalidArgument(
                "forest needs at least one tree and a leaf size of at least 1".into(),
            ));
        }
        let mut seeder = SplitMix(params.seed);
        let seeds: Vec<u64> = (0..params.trees).map(|_| seeder.next_u64()).collect();
        let trees = seeds
            .par_iter()
            .map(|&s| build_tree(data, n, params.leaf_size, s))
            .collect();
        Ok(KdForest { n, trees })
    }

    /// Number of indexed points.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes held in RAM by the trees (not counting the data, nor permutations mapped from
    /// a forest file).
    pub fn memory_bytes(&self) -> usize {
        self.trees
            .iter()
            .map(|t| t.perm.memory_bytes() + t.nodes.len() * std::mem::size_of::<Node>())
            .sum()
    }

    /// Approximate k-NN of every query; `checks` bounds the number of distance evaluations
    /// per query (more = better recall, slower). `data` must be the array the forest was
    /// built on.
    pub fn search<F>(
        &self,
        data: &[u8],
        queries: &[u8],
        k: usize,
        checks: usize,
        filter: F,
    ) -> Result<Neighbors>
    where
        F: Fn(usize, u32) -> bool + Sync,
    {
        if check_rows("data", data)? != self.n {
            return Err(KfError::InvalidArgument(
                "data does not match the forest it was built on".into(),
            ));
        }
        let nq = check_rows("queries", queries)?;
        if k == 0 {
            return Err(KfError::InvalidArgument("k must be at least 1".into()));
        }
        // Queries run in the order of their leaf in the first tree: consecutive queries
        // then walk the same nodes and read the same data rows while these are still in
        // cache. Each query's result does not depend on the order, so this is only faster.
        let order = self.leaf_order(queries, nq);
        const BLOCK: usize = 32;
        let blocks: Vec<(Vec<u32>, Vec<u32>)> = order
            .par_chunks(BLOCK)
            .map_init(
                || (Visited::new(), BinaryHeap::new(), Vec::new(), Vec::new()),
                |(vis, heap, pending, leaves), qs| {
                    crate::return_if_cancelled!();
                    let mut ib = vec![NONE; qs.len() * k];
                    let mut db = vec![u32::MAX; qs.len() * k];
                    for (j, &q) in qs.iter().enumerate() {
                        let q = q as usize;
                        let query = &queries[q * DESC_LEN..(q + 1) * DESC_LEN];
                        let top = self.search_one(
                            data, query, q, k, checks, &filter, vis, heap, pending, leaves,
                        );
                        top.write(&mut ib[j * k..(j + 1) * k], &mut db[j * k..(j + 1) * k]);
                    }
                    (ib, db)
                },
            )
            .collect();
        crate::cancel::check()?;
        let mut idx = vec![NONE; nq * k];
        let mut dist = vec![u32::MAX; nq * k];
        for (qs, (ib, db)) in order.chunks(BLOCK).zip(&blocks) {
            for (j, &q) in qs.iter().enumerate() {
                let (q, r) = (q as usize * k, j * k);
                idx[q..q + k].copy_from_slice(&ib[r..r + k]);
                dist[q..q + k].copy_from_slice(&db[r..r + k]);
            }
        }
        Ok(Neighbors {
            k,
            idx,
            dist2: dist,
        })
    }

    /// Query numbers sorted by the position of their leaf in the first tree (ties by
    /// number): a fixed order in which neighbouring queries are close in descriptor space.
    fn leaf_order(&self, queries: &[u8], nq: usize) -> Vec<u32> {
        let tree = &self.trees[0];
        let mut keyed: Vec<(u32, u32)> = (0..nq)
            .into_par_iter()
            .map(|q| {
                let query = &queries[q * DESC_LEN..(q + 1) * DESC_LEN];
                let mut ni = 0usize;
                loop {
                    let node = tree.nodes[ni];
                    if node.dim == LEAF {
                        return (node.a, q as u32);
                    }
                    let diff = query[node.dim as usize] as f32 - node.split();
                    ni = node.children(diff).0 as usize;
                }
            })
            .collect();
        keyed.par_sort_unstable();
        keyed.into_iter().map(|(_, q)| q).collect()
    }

    /// From node `ni` of tree `t`: follow the closer side down to a leaf, queueing the other
    /// side with its bound; then check the leaf's points.
    fn descend<F: Fn(usize, u32) -> bool>(
        &self,
        st: &mut Walk<'_, F>,
        t: usize,
        mut ni: u32,
        mindist: f32,
        queue: &mut impl FnMut(Reverse<Branch>),
    ) {
        let tree = &self.trees[t];
        loop {
            let node = tree.nodes[ni as usize];
            if node.dim == LEAF {
                prefetch_rows(st.data, &tree.perm, node.a, node.w);
                self.check_leaf(st, t, node);
                return;
            }
            let diff = st.query[node.dim as usize] as f32 - node.split();
            let (near, far) = node.children(diff);
            let bound = mindist + diff * diff;
            // (bound, tree, node) orders the queue totally: deterministic pops
            queue(Reverse(branch(bound, t, far)));
            ni = near;
        }
    }

    /// Distance to every not yet visited point of a leaf.
    #[inline]
    fn check_leaf<F: Fn(usize, u32) -> bool>(&self, st: &mut Walk<'_, F>, t: usize, leaf: Node) {
        for p in self.trees[t].perm.range(leaf.a as usize, leaf.w as usize) {
            if !st.vis.insert(p) {
                continue;
            }
            *st.done += 1;
            let d = dist2(st.query, &st.data[p as usize * DESC_LEN..]);
            if d <= st.top.worst() && (st.filter)(st.q, p) {
                st.top.push(d, p);
            }
        }
    }

    /// The first descent of every tree from its root, all trees a level at a time so
    /// that their node loads overlap in memory instead of waiting on each other; the
    /// untaken branches go to `pending`, the leaves are checked in tree order after. Same
    /// result as descending the trees one after the other.
    fn descend_all<F: Fn(usize, u32) -> bool>(
        &self,
        st: &mut Walk<'_, F>,
        leaves: &mut Vec<Node>,
        pending: &mut Vec<Reverse<Branch>>,
    ) {
        let nt = self.trees.len();
        leaves.clear();
        leaves.extend(self.trees.iter().map(|t| t.nodes[0]));
        let mut walking = true;
        while walking {
            walking = false;
            for t in 0..nt {
                let node = leaves[t];
                if node.dim == LEAF {
                    continue;
                }
                walking = true;
                let diff = st.query[node.dim as usize] as f32 - node.split();
                let (near, far) = node.children(diff);
                pending.push(Reverse(branch(diff * diff, t, far)));
                let next = self.trees[t].nodes[near as usize];
                if next.dim == LEAF {
                    prefetch_rows(st.data, &self.trees[t].perm, next.a, next.w);
                }
                leaves[t] = next;
            }
        }
        for t in 0..nt {
            self.check_leaf(st, t, leaves[t]);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn search_one<F: Fn(usize, u32) -> bool>(
        &self,
        data: &[u8],
        query: &[u8],
        q: usize,
        k: usize,
        checks: usize,
        filter: &F,
        vis: &mut Visited,
        heap: &mut BinaryHeap<Reverse<Branch>>,
        pending: &mut Vec<Reverse<Branch>>,
        leaves: &mut Vec<Node>,
    ) -> TopK {
        vis.clear();
        heap.clear();
        let mut top = TopK::new(k);
        let mut done = 0usize;
        let mut st = Walk {
            data,
            query,
            q,
            filter,
            vis,
            top: &mut top,
            done: &mut done,
        };
        // First one descent per tree, keeping the untaken branches aside: when those leaves
        // already use up `checks` (the usual case), the priority queue is never needed.
        pending.clear();
        self.descend_all(&mut st, leaves, pending);
        if *st.done < checks {
            heap.extend(pending.drain(..));
        }
        while *st.done < checks {
            let Some(Reverse(e)) = heap.pop() else {
                break;
            };
            let (b, t, ni) = unbranch(e);
            if (b as f64) > st.top.worst() as f64 {
                break; // (FLANN's approximate bound) nothing left is likely to beat the k-th
            }
            self.descend(&mut st, t, ni, b, &mut |e| heap.push(e));
        }
        top
    }
}
