//! A kd-tree's point permutation, bit-packed as the forest file stores it (⌈log2 n⌉
//! bits an index, LSB first): held in RAM for a forest built here, or a view into the
//! memory-mapped file a saved forest was read from, so that a sealed shard's
//! permutations are file pages (clean, shared with the page cache, reclaimable) instead
//! of 4 bytes a point and tree of anonymous memory.

use std::sync::Arc;

/// Where the packed bytes lie.
#[derive(Clone, Debug)]
enum Bytes {
    /// packed indices and 8 zero bytes of padding (so every read is one 8-byte load)
    Owned(Vec<u8>),
    /// the mapped forest file, its packed indices from `start` (at least 8 bytes follow
    /// any of them in the file: the checksum ends it)
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
    },
}

/// A permutation of `0..n` packed in `bits`-bit indices.
#[derive(Clone, Debug)]
pub(crate) struct Perm {
    bytes: Bytes,
    bits: u32,
    n: usize,
}

impl Perm {
    /// Pack `perm` (indices below 2^`bits`) into RAM.
    pub(crate) fn packed(perm: &[u32], bits: usize) -> Perm {
        let mut out = Vec::with_capacity((perm.len() * bits).div_ceil(8) + 8);
        pack_bits(perm, bits, &mut out);
        out.extend_from_slice(&[0; 8]);
        Perm {
            bytes: Bytes::Owned(out),
            bits: bits as u32,
            n: perm.len(),
        }
    }

    /// A copy of `n` indices of `bits` bits already packed in `packed`.
    pub(crate) fn packed_from(packed: &[u8], n: usize, bits: usize) -> Perm {
        let mut out = Vec::with_capacity(packed.len() + 8);
        out.extend_from_slice(packed);
        out.extend_from_slice(&[0; 8]);
        Perm {
            bytes: Bytes::Owned(out),
            bits: bits as u32,
            n,
        }
    }

    /// A view of `n` indices of `bits` bits packed in `map` from byte `start` (checked
    /// by the caller: in bounds, every index below n, at least 8 bytes after the last).
    pub(crate) fn mapped(map: Arc<memmap2::Mmap>, start: usize, n: usize, bits: usize) -> Perm {
        debug_assert!(start + (n * bits).div_ceil(8) + 8 <= map.len());
        Perm {
            bytes: Bytes::Mapped { map, start },
            bits: bits as u32,
            n,
        }
    }

    /// Bytes held in RAM (0 when mapped).
    pub(crate) fn memory_bytes(&self) -> usize {
        match &self.bytes {
            Bytes::Owned(v) => v.len(),
            Bytes::Mapped { .. } => 0,
        }
    }

    /// Drop this process's pages of a mapped permutation (they stay in the page cache; a
    /// later read maps them again): see [`crate::shard::Shard::knn`].
    pub(crate) fn release_pages(&self) {
        if let Bytes::Mapped { map, .. } = &self.bytes {
            super::forest_io::release_mapped_pages(map);
        }
    }

    #[inline(always)]
    fn raw(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Owned(v) => v,
            Bytes::Mapped { map, start } => &map[*start..],
        }
    }

    /// The packed indices as the file stores them ((n · bits) / 8 bytes, rounded up).
    pub(crate) fn packed_bytes(&self) -> &[u8] {
        &self.raw()[..(self.n * self.bits as usize).div_ceil(8)]
    }

    /// Index `i` (`i < n`).
    #[inline(always)]
    pub(crate) fn get(&self, i: usize) -> u32 {
        let bit = i * self.bits as usize;
        let raw = self.raw();
        let word = u64::from_le_bytes(raw[bit >> 3..(bit >> 3) + 8].try_into().unwrap());
        ((word >> (bit & 7)) & ((1u64 << self.bits) - 1)) as u32
    }

    /// Indices `a..b`.
    #[inline(always)]
    pub(crate) fn range(&self, a: usize, b: usize) -> impl Iterator<Item = u32> + '_ {
        (a..b).map(move |i| self.get(i))
    }

    /// Every index, in order.
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<u32> {
        self.range(0, self.n).collect()
    }
}

/// Append `vals` as `bits`-bit integers, LSB first, the last byte zero-padded.
fn pack_bits(vals: &[u32], bits: usize, out: &mut Vec<u8>) {
    let (mut acc, mut have) = (0u64, 0usize);
    for &v in vals {
        acc |= (v as u64) << have;
        have += bits;
        while have >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            have -= 8;
        }
    }
    if have > 0 {
        out.push(acc as u8);
    }
}
