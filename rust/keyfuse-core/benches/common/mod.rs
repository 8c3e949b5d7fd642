//! Small synthetic inputs shared by the benches: deterministic, no extra dependency.
#![allow(dead_code)] // each bench uses only some of the generators

/// A xorshift64 stream (good enough for test data).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// `n` rank descriptors (random permutations of 0..63), row-major `n × 64`.
pub fn rank_descriptors(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n * keyfuse_core::DESC_LEN);
    for _ in 0..n {
        let mut p: Vec<u8> = (0..keyfuse_core::DESC_LEN as u8).collect();
        for i in (1..p.len()).rev() {
            p.swap(i, rng.below(i + 1));
        }
        out.extend(p);
    }
    out
}

/// Copies of `rows` with `swaps` random transpositions each: near neighbours of the
/// originals, as real matches are.
pub fn perturbed(rows: &[u8], swaps: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = rows.to_vec();
    for row in out.chunks_exact_mut(keyfuse_core::DESC_LEN) {
        for _ in 0..swaps {
            row.swap(rng.below(row.len()), rng.below(row.len()));
        }
    }
    out
}
