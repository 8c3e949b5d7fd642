//! k-NN over rank descriptors: the exact brute force (whichever kernel this machine
//! runs) and the kd-forest, on a few thousand synthetic descriptors.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keyfuse_core::knn::{exact_kernel_name, knn_exact, ForestParams, KdForest};
use std::hint::black_box;

fn knn(c: &mut Criterion) {
    let data = common::rank_descriptors(4000, 1);
    let queries = common::perturbed(&data[..1000 * 64], 6, 2);
    let nq = queries.len() / 64;
    let mut g = c.benchmark_group("knn");
    g.sample_size(10);
    g.throughput(Throughput::Elements(nq as u64));
    for k in [2usize, 10] {
        g.bench_with_input(
            BenchmarkId::new(format!("exact_{}", exact_kernel_name()), k),
            &k,
            |b, &k| b.iter(|| knn_exact(black_box(&data), black_box(&queries), k, |_, _| true)),
        );
    }
    let forest = KdForest::build(&data, &ForestParams::default()).expect("forest");
    g.bench_function("forest_build", |b| {
        b.iter(|| KdForest::build(black_box(&data), &ForestParams::default()))
    });
    g.bench_function("forest_search_k10_checks128", |b| {
        b.iter(|| forest.search(black_box(&data), black_box(&queries), 10, 128, |_, _| true))
    });
    g.finish();
}

criterion_group!(benches, knn);
criterion_main!(benches);
