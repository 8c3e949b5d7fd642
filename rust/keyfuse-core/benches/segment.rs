//! Keypoint-transfer segmentation: whole-map transfer of atlas organs onto a test grid,
//! and label voting over the matches.

mod common;

use keyfuse_core::segment::{vote_labels, AtlasSet, Transfer};
use ndarray::{s, Array3};

/// A 48³ label map with three box-shaped organs and an intensity per organ.
fn atlas(offset: usize) -> (Array3<i32>, Array3<f32>) {
    let mut l = Array3::<i32>::zeros((48, 48, 48));
    let o = offset;
    l.slice_mut(s![8 + o..24 + o, 10..30, 6..26]).fill(1);
    l.slice_mut(s![26..40, 12 + o..28 + o, 20..40]).fill(2);
    l.slice_mut(s![14..22, 30..44, 30 + o..42 + o]).fill(3);
    let i = l.mapv(|v| v as f32 * 0.3);
    (l, i)
}

fn main() {
    let (l0, i0) = atlas(0);
    let (l1, i1) = atlas(3);
    let set = AtlasSet::new(&[l0.view(), l1.view()], &[i0.view(), i1.view()]).expect("atlases");
    let mut rng = common::Rng::new(7);
    let transfers: Vec<Transfer> = (0..300)
        .map(|k| Transfer {
            atlas: (k % 2) as u32,
            label: 1 + k % 3,
            shift: [0, 1, 2].map(|_| rng.below(7) as i32 - 3),
            weight: 0.1 + rng.below(100) as f64 / 100.0,
        })
        .collect();
    let test = i1.mapv(|v| v + 0.05);
    let g = common::Bench::new("segment");
    g.run("map_transfer_48cube_300", 10, 0, || {
        set.transfer(test.view(), &transfers, &[0.2], 0.15)
    });
    g.run("map_transfer_48cube_300_no_intensity", 10, 0, || {
        set.transfer(test.view(), &transfers, &[f32::INFINITY], 0.15)
    });
    // 5000 test keypoints with 1 to 8 matches each
    let (mut query, mut label, mut dist2, mut pm) = (vec![], vec![], vec![], vec![]);
    for q in 0..5000u32 {
        for _ in 0..1 + rng.below(8) {
            query.push(q);
            label.push(1 + rng.below(3) as i32);
            dist2.push(rng.below(4000) as f32);
            pm.push(rng.below(1000) as f32 / 1000.0);
        }
    }
    g.run("vote_labels_5000", 10, 0, || {
        vote_labels(5000, &query, &label, &dist2, &pm)
    });
}
