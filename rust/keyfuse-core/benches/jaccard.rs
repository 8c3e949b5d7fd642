//! Soft Jaccard between keypoint sets: one pair, and the pairwise matrix of a small
//! cohort (every subject's keypoints against every other's).

mod common;

use keyfuse_core::jaccard::{soft_jaccard_pair, Cohort, SoftJaccardParams};
use keyfuse_core::knn::ForestParams;

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

fn main() {
    let sets = subjects(8, 600);
    let g = common::Bench::new("soft_jaccard");
    for (name, p) in [
        ("published", SoftJaccardParams::default()),
        ("posterior", SoftJaccardParams::posterior()),
    ] {
        g.run(&format!("pair_{name}"), 10, 0, || {
            soft_jaccard_pair(&sets[0], &sets[1], &p, true, None)
        });
    }
    let mut cohort = Cohort::new(ForestParams::default());
    for s in &sets {
        cohort.add(s).expect("subject");
    }
    cohort.build_forest().expect("forest");
    let p = SoftJaccardParams::default();
    g.run("pairwise_8x600", 10, 0, || cohort.pairwise(&p, true));
}
