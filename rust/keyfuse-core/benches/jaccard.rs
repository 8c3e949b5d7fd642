//! Soft Jaccard between keypoint sets: one pair, and the pairwise matrix of a small
//! cohort (every subject's keypoints against every other's).

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use keyfuse_core::jaccard::{soft_jaccard_pair, Cohort, SoftJaccardParams};
use keyfuse_core::knn::ForestParams;
use std::hint::black_box;

/// `n` subjects of `m` keypoints; subjects 2i and 2i+1 share perturbed keypoints (a
/// related pair), the rest are unrelated.
fn subjects(n: usize, m: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|s| {
            let base = common::rank_descriptors(m, 100 + (s / 2) as u64);
            common::perturbed(&base, 4, s as u64)
        })
        .collect()
}

fn jaccard(c: &mut Criterion) {
    let sets = subjects(8, 600);
    let mut g = c.benchmark_group("soft_jaccard");
    g.sample_size(10);
    for (name, p) in [
        ("published", SoftJaccardParams::default()),
        ("posterior", SoftJaccardParams::posterior()),
    ] {
        g.bench_function(format!("pair_{name}"), |b| {
            b.iter(|| soft_jaccard_pair(black_box(&sets[0]), black_box(&sets[1]), &p, true, None))
        });
    }
    let mut cohort = Cohort::new(ForestParams::default());
    for s in &sets {
        cohort.add(s).expect("subject");
    }
    cohort.build_forest().expect("forest");
    let p = SoftJaccardParams::default();
    g.bench_function("pairwise_8x600", |b| {
        b.iter(|| cohort.pairwise(black_box(&p), true))
    });
    g.finish();
}

criterion_group!(benches, jaccard);
criterion_main!(benches);
