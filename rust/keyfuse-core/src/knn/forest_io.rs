//! A [`KdForest`] on disk: deterministic bytes, validated when read back.
//!
//! Layout, format 2 (little-endian): magic `KFFOREST`, format version (u32), tree count
//! (u32), point count n (u64); per tree its node count (u64), the nodes (9 bytes each:
//! dim u8, w u32 = the threshold's f32 bits or a leaf's end, a u32 = the first child or a
//! leaf's start) and its point permutation (n indices of the fewest bytes that hold n − 1:
//! 3 bytes up to 16.7 M points); last, an FNV-1a 64 checksum of everything before it.
//! Format 1 (16-byte nodes with both children, u32 permutation) is still read. Reading
//! checks the magic, version, exact length, checksum and that every node and point index
//! is in bounds (children come after their parent, so a damaged file can never make a
//! search loop or read out of bounds): a bad file is [`KfError::Corrupt`], never a panic.

use super::forest::{Node, Tree, LEAF};
use super::KdForest;
use crate::{KfError, Result, DESC_LEN};
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"KFFOREST";
/// Version of the forest file format written.
pub const FOREST_FORMAT_VERSION: u32 = 2;

/// Bytes of one permutation index for `n` points: the fewest that hold `n − 1`.
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

impl KdForest {
    /// The forest as bytes (the same forest always gives the same bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let pw = perm_width(self.n);
        let size: usize = self
            .trees
            .iter()
            .map(|t| 8 + t.nodes.len() * 9 + t.perm.len() * pw)
            .sum();
        let mut out = Vec::with_capacity(size + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FOREST_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.trees.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.n as u64).to_le_bytes());
        for t in &self.trees {
            out.extend_from_slice(&(t.nodes.len() as u64).to_le_bytes());
            for nd in &t.nodes {
                out.push(nd.dim);
                out.extend_from_slice(&nd.w.to_le_bytes());
                out.extend_from_slice(&nd.a.to_le_bytes());
            }
            for &p in &t.perm {
                out.extend_from_slice(&p.to_le_bytes()[..pw]);
            }
        }
        let h = fnv64(&out);
        out.extend_from_slice(&h.to_le_bytes());
        out
    }

    /// Read a forest written by [`KdForest::to_bytes`] for `n` points, validating it.
    pub fn from_bytes(b: &[u8], n: usize) -> Result<KdForest> {
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
        if v != 1 && v != FOREST_FORMAT_VERSION {
            return Err(corrupt(&format!(
                "format version {v} (this keyfuse reads {FOREST_FORMAT_VERSION})"
            )));
        }
        let n_trees = r.u32()? as usize;
        if r.u64()? != n as u64 {
            return Err(corrupt("built on a different number of points"));
        }
        if n_trees == 0 {
            return Err(corrupt("no trees"));
        }
        let mut trees = Vec::with_capacity(n_trees);
        // format 1: 16-byte nodes (dim, 3 zero bytes, split, a, b), u32 permutation
        let (node_bytes, pw) = if v == 1 { (16, 4) } else { (9, perm_width(n)) };
        for _ in 0..n_trees {
            let nn = r.u64()?;
            if nn == 0 || nn > (body.len() / node_bytes) as u64 {
                return Err(corrupt("bad node count"));
            }
            let nn = nn as usize;
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
            trees.push(Tree { nodes, perm });
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

    /// Read a forest for `n` points from `path` (see [`KdForest::from_bytes`]).
    pub fn load(path: &Path, n: usize) -> Result<KdForest> {
        let b = std::fs::read(path)?;
        KdForest::from_bytes(&b, n)
    }
}

/// Write `chunks` to `path` atomically: into `path.tmp`, flushed, then renamed.
pub(crate) fn write_atomic(path: &Path, chunks: &[&[u8]]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        for c in chunks {
            f.write_all(c)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
