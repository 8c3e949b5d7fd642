//! A [`KdForest`] on disk: deterministic bytes, validated when read back.
//!
//! Layout, format 3 (little-endian): magic `KFFOREST`, format version (u32), tree count
//! (u32), point count n (u64); per tree its node count (u64), its nodes in the order the
//! build split them (pre-order: a node, its first child's subtree, its second child's),
//! then its point permutation, n indices of ⌈log2 n⌉ bits each packed LSB first (padded
//! to a byte); last, an FNV-1a 64 checksum of everything before it. A node is one tag
//! byte: `0..64` an internal node splitting that dimension, followed by a u16 code of its
//! threshold (`c < 0x8000`: the build's sample mean c / m in f32, m = min(points under the
//! node, 128); `0x8000 + s`: the median split s − 0.5; `0xFFFF`: the f32 bits follow);
//! `64 + c` (c ≤ 190) a leaf of c points, `255` a leaf whose u32 count follows. Children
//! and leaf ranges are implicit: replaying the build's order numbers the nodes exactly as
//! in memory (children as a pair, the first child popped next), and the leaves hold
//! consecutive runs of the permutation. So 3 bytes an internal node and 1 a leaf instead
//! of 9 each, for the same forest and the same search results. [`KdForest::load`] maps
//! the file and searches the permutations where they lie in it (bit-packed, read on
//! demand; [`super::perm`]): only the nodes are unpacked into RAM.
//!
//! Format 2 (9-byte nodes: dim u8, w u32 = the threshold's f32 bits or a leaf's end, a
//! u32 = the first child or a leaf's start; the permutation in the fewest whole bytes
//! that hold n − 1) and format 1 (16-byte nodes with both children, u32 permutation) are
//! still read, and format 2 is written for a forest not in the build's order (one read
//! from an old file that a newer build would not make). Reading checks the magic,
//! version, exact length, checksum and that every node and point index is in bounds
//! (children come after their parent, so a damaged file can never make a search loop or
//! read out of bounds): a bad file is [`KfError::Corrupt`], never a panic.

use super::forest::{Node, Tree, LEAF};
use super::perm::Perm;
use super::KdForest;
use crate::{KfError, Result, DESC_LEN};
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"KFFOREST";
/// Version of the forest file format written.
pub const FOREST_FORMAT_VERSION: u32 = 3;

/// Bits of one permutation index for `n` points in format 3: the fewest that hold
/// `n − 1` (at least 1).
pub fn perm_bits(n: usize) -> usize {
    (usize::BITS - n.saturating_sub(1).leading_zeros()).max(1) as usize
}

/// Bytes of one permutation index for `n` points in format 2: the fewest that hold `n − 1`.
pub fn perm_width(n: usize) -> usize {
    let mut w = 1;
    while w < 8 && (n.saturating_sub(1) >> (8 * w)) != 0 {
        w += 1;
    }
    w
}

/// FNV-1a over 8-byte words (a short tail byte-wise): a cheap integrity check.
pub(crate) fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        h ^= u64::from_le_bytes(c.try_into().unwrap());
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &b in chunks.remainder() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(corrupt("truncated"));
        };
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

fn corrupt(why: &str) -> KfError {
    KfError::Corrupt(format!("kd-forest file: {why}"))
}

/// Threshold codes of format 3 (see the module documentation).
const MEDIAN: u16 = 0x8000;
const RAW: u16 = 0xFFFF;
/// The largest leaf whose count fits in its tag byte.
const SHORT_LEAF: u32 = 190;

/// The code of threshold `bits` of an internal node over `points` points: the build's
/// mean (sum / m in f32, m = min(points, 128)) or median (s − 0.5), else [`RAW`].
fn threshold_code(bits: u32, points: u32) -> u16 {
    let (t, m) = (f32::from_bits(bits), points.min(128) as f32);
    let sum = (t * m).round();
    if (0.0..32768.0).contains(&sum) && (sum / m).to_bits() == bits {
        return sum as u16;
    }
    let s = t + 0.5;
    if (0.0..=256.0).contains(&s) && s.fract() == 0.0 && (s - 0.5).to_bits() == bits {
        return MEDIAN + s as u16;
    }
    RAW
}

/// The threshold bits of a code other than [`RAW`] (`None`: not a code).
fn threshold_bits(code: u16, points: u32) -> Option<u32> {
    match code {
        c if c < MEDIAN => Some((c as f32 / points.min(128) as f32).to_bits()),
        c if c - MEDIAN <= 256 => Some(((c - MEDIAN) as f32 - 0.5).to_bits()),
        _ => None,
    }
}

/// Each node's points, `(start, end)` in the permutation, from the leaves up (children
/// come after their parent).
fn node_ranges(nodes: &[Node]) -> Vec<(u32, u32)> {
    let mut r = vec![(0u32, 0u32); nodes.len()];
    for i in (0..nodes.len()).rev() {
        let nd = nodes[i];
        r[i] = if nd.dim == LEAF {
            (nd.a, nd.w)
        } else {
            (r[nd.a as usize].0, r[nd.a as usize + 1].1)
        };
    }
    r
}

/// Append a tree's format-3 nodes to `out`; false when the tree is not in the build's
/// order (then it is written in format 2).
fn compact_nodes(t: &Tree, n: usize, out: &mut Vec<u8>) -> bool {
    let ranges = node_ranges(&t.nodes);
    let (mut stack, mut next, mut cursor) = (vec![0u32], 1u32, 0u32);
    while let Some(ni) = stack.pop() {
        let nd = t.nodes[ni as usize];
        if nd.dim == LEAF {
            if nd.a != cursor {
                return false;
            }
            let c = nd.w - nd.a;
            cursor = nd.w;
            if c <= SHORT_LEAF {
                out.push(64 + c as u8);
            } else {
                out.push(LEAF);
                out.extend_from_slice(&c.to_le_bytes());
            }
        } else {
            if nd.a != next || nd.dim as usize >= DESC_LEN {
                return false;
            }
            next += 2;
            let (lo, hi) = ranges[ni as usize];
            let code = threshold_code(nd.w, hi - lo);
            out.push(nd.dim);
            out.extend_from_slice(&code.to_le_bytes());
            if code == RAW {
                out.extend_from_slice(&nd.w.to_le_bytes());
            }
            stack.push(nd.a + 1);
            stack.push(nd.a);
        }
    }
    next as usize == t.nodes.len() && cursor as usize == n
}

/// Read `nn` format-3 nodes of a tree over `n` points, validating them.
fn read_compact_nodes(r: &mut Reader<'_>, n: usize, nn: usize) -> Result<Vec<Node>> {
    let mut nodes = vec![Node::leaf(0, 0); nn];
    let mut codes = vec![RAW; nn];
    let (mut stack, mut next, mut cursor) = (vec![0usize], 1usize, 0usize);
    while let Some(ni) = stack.pop() {
        let tag = r.take(1)?[0];
        if (tag as usize) < DESC_LEN {
            let code = u16::from_le_bytes(r.take(2)?.try_into().unwrap());
            let w = if code == RAW { r.u32()? } else { 0 };
            if next + 1 >= nn {
                return Err(corrupt("node out of bounds"));
            }
            nodes[ni] = Node {
                dim: tag,
                w,
                a: next as u32,
            };
            codes[ni] = code;
            stack.push(next + 1);
            stack.push(next);
            next += 2;
        } else {
            let c = if tag == LEAF {
                let c = r.u32()?;
                if c <= SHORT_LEAF {
                    return Err(corrupt("leaf count not in its shortest form"));
                }
                c as usize
            } else {
                (tag - 64) as usize
            };
            if cursor + c > n {
                return Err(corrupt("node out of bounds"));
            }
            nodes[ni] = Node::leaf(cursor as u32, (cursor + c) as u32);
            cursor += c;
        }
    }
    if next != nn || cursor != n {
        return Err(corrupt("nodes do not cover the tree"));
    }
    let ranges = node_ranges(&nodes);
    for (i, nd) in nodes.iter_mut().enumerate() {
        if nd.dim == LEAF || codes[i] == RAW {
            continue;
        }
        let (lo, hi) = ranges[i];
        nd.w = threshold_bits(codes[i], hi - lo).ok_or_else(|| corrupt("bad threshold code"))?;
    }
    if nodes
        .iter()
        .any(|nd| nd.dim != LEAF && !nd.split().is_finite())
    {
        return Err(corrupt("node out of bounds"));
    }
    Ok(nodes)
}

/// Check a permutation of `n` points packed in format 3 at the reader's position (every
/// index below n, zero padding bits) and return where its bytes start.
fn check_perm(r: &mut Reader<'_>, n: usize) -> Result<usize> {
    let bits = perm_bits(n);
    let start = r.pos;
    let raw = r.take((n * bits).div_ceil(8))?;
    let mask = (1u64 << bits) - 1;
    let (mut acc, mut have, mut bytes) = (0u64, 0usize, raw.iter());
    for _ in 0..n {
        while have < bits {
            acc |= (*bytes.next().unwrap() as u64) << have;
            have += 8;
        }
        let p = acc & mask;
        acc >>= bits;
        have -= bits;
        if p >= n as u64 {
            return Err(corrupt("point index out of bounds"));
        }
    }
    if acc != 0 {
        return Err(corrupt("nonzero padding bits"));
    }
    Ok(start)
}

impl KdForest {
    /// The forest as bytes (the same forest always gives the same bytes): format 3, or
    /// format 2 for a forest not in the build's order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let compact = self.trees.iter().all(|t| {
            body.extend_from_slice(&(t.nodes.len() as u64).to_le_bytes());
            let ok = compact_nodes(t, self.n, &mut body);
            body.extend_from_slice(t.perm.packed_bytes()); // always perm_bits(n) bits
            ok
        });
        if compact {
            self.file_bytes(FOREST_FORMAT_VERSION, &body)
        } else {
            self.format2_bytes()
        }
    }

    /// The forest in format 2 (what `to_bytes` writes for a forest not in build order).
    pub(super) fn format2_bytes(&self) -> Vec<u8> {
        self.file_bytes(2, &self.format2_trees())
    }

    /// A whole file: header (magic, `version`, tree and point counts), `body`, checksum.
    fn file_bytes(&self, version: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(self.trees.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.n as u64).to_le_bytes());
        out.extend_from_slice(body);
        let h = fnv64(&out);
        out.extend_from_slice(&h.to_le_bytes());
        out
    }

    /// The trees in format 2 (9-byte nodes, whole-byte permutation indices).
    fn format2_trees(&self) -> Vec<u8> {
        let pw = perm_width(self.n);
        let mut out = Vec::new();
        for t in &self.trees {
            out.extend_from_slice(&(t.nodes.len() as u64).to_le_bytes());
            for nd in &t.nodes {
                out.push(nd.dim);
                out.extend_from_slice(&nd.w.to_le_bytes());
                out.extend_from_slice(&nd.a.to_le_bytes());
            }
            for p in t.perm.range(0, self.n) {
                out.extend_from_slice(&p.to_le_bytes()[..pw]);
            }
        }
        out
    }

    /// Read a forest written by [`KdForest::to_bytes`] for `n` points, validating it.
    pub fn from_bytes(b: &[u8], n: usize) -> Result<KdForest> {
        let bits = perm_bits(n);
        KdForest::parse(b, n, &|start| {
            Perm::packed_from(&b[start..start + (n * bits).div_ceil(8)], n, bits)
        })
    }

    /// Read and validate a forest file's bytes `b`; `perm(start)` makes a format-3 tree's
    /// permutation from its packed bytes at `start`.
    fn parse(b: &[u8], n: usize, perm: &dyn Fn(usize) -> Perm) -> Result<KdForest> {
        if b.len() < 32 {
            return Err(corrupt("truncated"));
        }
        let (body, tail) = b.split_at(b.len() - 8);
        if fnv64(body) != u64::from_le_bytes(tail.try_into().unwrap()) {
            return Err(corrupt("checksum mismatch"));
        }
        let mut r = Reader { b: body, pos: 0 };
        if r.take(8)? != MAGIC {
            return Err(corrupt("not a keyfuse kd-forest"));
        }
        let v = r.u32()?;
        if !(1..=FOREST_FORMAT_VERSION).contains(&v) {
            return Err(corrupt(&format!(
                "format version {v} (this keyfuse reads 1 to {FOREST_FORMAT_VERSION})"
            )));
        }
        let n_trees = r.u32()? as usize;
        if r.u64()? != n as u64 {
            return Err(corrupt("built on a different number of points"));
        }
        if n_trees == 0 {
            return Err(corrupt("no trees"));
        }
        let mut trees = Vec::with_capacity(n_trees.min(64));
        for _ in 0..n_trees {
            let nn = r.u64()?;
            if nn == 0 || nn > body.len() as u64 {
                return Err(corrupt("bad node count"));
            }
            trees.push(if v == 3 {
                let nodes = read_compact_nodes(&mut r, n, nn as usize)?;
                Tree {
                    nodes,
                    perm: perm(check_perm(&mut r, n)?),
                }
            } else {
                read_old_tree(&mut r, n, nn as usize, v)?
            });
        }
        if r.pos != body.len() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(KdForest { n, trees })
    }

    /// Write the forest to `path` atomically (written aside, flushed, renamed).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &[&self.to_bytes()])
    }

    /// Read a forest for `n` points from `path` (see [`KdForest::from_bytes`]): the file is
    /// memory-mapped, validated, and a format-3 forest keeps its permutations there (file
    /// pages, read on demand and reclaimable) instead of 4 bytes a point and tree in RAM.
    pub fn load(path: &Path, n: usize) -> Result<KdForest> {
        let f = std::fs::File::open(path)?;
        // SAFETY: a read-only mapping of a file that keyfuse writes once and renames into
        // place (never modifies); bounds are checked on every access.
        let map = std::sync::Arc::new(unsafe { memmap2::Mmap::map(&f)? });
        let bits = perm_bits(n);
        let forest = KdForest::parse(&map, n, &|start| Perm::mapped(map.clone(), start, n, bits))?;
        // validation read every page: let them go from this process (they stay cached), a
        // search touches only the leaves it visits
        release_mapped_pages(&map);
        let _ = map.advise(memmap2::Advice::Random);
        Ok(forest)
    }
}

impl KdForest {
    /// Drop this process's pages of the forest file's permutations (loaded forests; they
    /// stay in the page cache): see [`crate::shard::Shard::knn`].
    pub fn release_pages(&self) {
        for t in &self.trees {
            t.perm.release_pages();
        }
    }
}

/// One tree of a format-1 or format-2 file (`v`), `nn` nodes over `n` points.
fn read_old_tree(r: &mut Reader<'_>, n: usize, nn: usize, v: u32) -> Result<Tree> {
    // format 1: 16-byte nodes (dim, 3 zero bytes, split, a, b), u32 permutation
    let (node_bytes, pw) = if v == 1 { (16, 4) } else { (9, perm_width(n)) };
    if nn > r.b.len() / node_bytes {
        return Err(corrupt("bad node count"));
    }
    let raw = r.take(nn * node_bytes)?;
    let mut nodes = Vec::with_capacity(nn);
    for (i, c) in raw.chunks_exact(node_bytes).enumerate() {
        let w = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
        let (nd, ok) = if v == 1 {
            let (split, a, b) = (w(4), w(8), w(12));
            let pad = c[1..4] == [0, 0, 0];
            if c[0] == LEAF {
                (Node::leaf(a, b), pad)
            } else {
                let nd = Node {
                    dim: c[0],
                    w: split,
                    a,
                };
                (nd, pad && a.checked_add(1) == Some(b))
            }
        } else {
            (
                Node {
                    dim: c[0],
                    w: w(1),
                    a: w(5),
                },
                true,
            )
        };
        let ok = ok
            && if nd.dim == LEAF {
                nd.a <= nd.w && nd.w as usize <= n
            } else {
                (nd.dim as usize) < DESC_LEN
                    && nd.split().is_finite()
                    && nd.a as usize > i
                    && (nd.a as usize) + 1 < nn
            };
        if !ok {
            return Err(corrupt("node out of bounds"));
        }
        nodes.push(nd);
    }
    let raw = r.take(n * pw)?;
    let mut perm = Vec::with_capacity(n);
    for c in raw.chunks_exact(pw) {
        let mut b = [0u8; 8];
        b[..pw].copy_from_slice(c);
        let p = u64::from_le_bytes(b);
        if p >= n as u64 {
            return Err(corrupt("point index out of bounds"));
        }
        perm.push(p as u32);
    }
    Ok(Tree {
        nodes,
        perm: Perm::packed(&perm, perm_bits(n)),
    })
}

/// The file beside `path` that a write goes to before it is renamed: `path.<pid>-<n>.tmp`,
/// named for this process and call, since two processes (or threads) may write the same
/// cache file at once and must not write into each other's.
pub(super) fn aside_path(path: &Path) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}-{call}.tmp", std::process::id()));
    tmp.into()
}

/// Write `path` atomically: `fill` writes a file beside it ([`aside_path`]), which is
/// flushed to disk and renamed into place; on any error it is removed and `path` is
/// untouched.
pub(crate) fn write_aside(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    let tmp = aside_path(path);
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Write `chunks` to `path` atomically ([`write_aside`]).
pub(crate) fn write_atomic(path: &Path, chunks: &[&[u8]]) -> Result<()> {
    write_aside(path, |f| {
        for c in chunks {
            f.write_all(c)?;
        }
        Ok(())
    })
}

/// Drop this process's pages of a read-only file mapping (they stay in the OS page cache;
/// a later read maps them again with minor faults).
pub(crate) fn release_mapped_pages(map: &memmap2::Mmap) {
    // SAFETY: DontNeed on a read-only shared file mapping only drops this process's page
    // table entries; the pages are read from the file again on access.
    let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
}
