//! k-NN over rank descriptors: the exact brute force (whichever kernel this machine
//! runs) and the kd-forest, on a few thousand synthetic descriptors.

mod common;

use keyfuse_core::knn::{exact_kernel_name, knn_exact, ForestParams, KdForest};

fn main() {
    let data = common::rank_descriptors(4000, 1);
    let queries = common::perturbed(&data[..1000 * 64], 6, 2);
    let nq = queries.len() / 64;
    let g = common::Bench::new("knn");
    for k in [2usize, 10] {
        g.run(
            &format!("exact_{}/k{k}", exact_kernel_name()),
            10,
            nq as u64,
            || knn_exact(&data, &queries, k, |_, _| true),
        );
    }
    let forest = KdForest::build(&data, &ForestParams::default()).expect("forest");
    g.run("forest_build", 10, 0, || {
        KdForest::build(&data, &ForestParams::default())
    });
    g.run("forest_search_k10_checks128", 10, nq as u64, || {
        forest.search(&data, &queries, 10, 128, |_, _| true)
    });
}
