//! What the benches share: a small timing harness and deterministic synthetic inputs.
//!
//! The harness replaces criterion, which cost every `make test` two extra minutes of
//! compiling for three micro-benches (see docs/decisions.md). `cargo bench -p keyfuse-core
//! [-- FILTER]` runs the benches whose name contains FILTER.
#![allow(dead_code)] // each bench uses only some of the generators

use std::time::{Duration, Instant};

/// Runs and reports named timings: one warm-up call, then timed calls until `samples` are
/// taken (at least 3, and more while under half a second in all); prints the median and
/// the fastest call, and the throughput when the work has a size.
pub struct Bench {
    group: &'static str,
    filter: Option<String>,
}

impl Bench {
    /// A group of timings; the first argument that is not a flag (as `cargo bench -- X`
    /// passes it) keeps only the timings whose `group/name` contains it.
    pub fn new(group: &'static str) -> Self {
        let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        println!("{group}");
        Bench { group, filter }
    }

    /// Times `f`, `elements` items of work per call (0: no throughput line).
    pub fn run<R>(&self, name: &str, samples: usize, elements: u64, mut f: impl FnMut() -> R) {
        let full = format!("{}/{name}", self.group);
        if self
            .filter
            .as_ref()
            .is_some_and(|x| !full.contains(x.as_str()))
        {
            return;
        }
        std::hint::black_box(f());
        let mut times: Vec<Duration> = Vec::new();
        let start = Instant::now();
        while times.len() < samples.max(3)
            || (start.elapsed() < Duration::from_millis(500) && times.len() < 1000)
        {
            let t = Instant::now();
            std::hint::black_box(f());
            times.push(t.elapsed());
        }
        times.sort();
        let median = times[times.len() / 2];
        let rate = if elements > 0 {
            format!(
                "  {:.3e} elements/s",
                elements as f64 / median.as_secs_f64()
            )
        } else {
            String::new()
        };
        println!(
            "  {name:<40} median {median:>10.3?}  fastest {:>10.3?}  ({} calls){rate}",
            times[0],
            times.len()
        );
    }
}

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
