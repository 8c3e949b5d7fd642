//! Extract 3D SIFT-Rank keypoints from two synthetic volumes (the second is the first
//! moved by a known translation), match them with the Hough translation vote, and recover
//! the translation.
//!
//! Run with `cargo run -p keyfuse-core --release --example match_volumes`.

use keyfuse_core::extract::{extract3d, ExtractParams, Keypoints};
use keyfuse_core::matching::{match_sets, KeypointView, MatchParams};
use ndarray::Array3;

/// A textured volume: Gaussian blobs of both signs at reproducible random places,
/// moved by `shift` voxels.
fn phantom(n: usize, shift: [f32; 3]) -> Array3<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32
    };
    let blobs: Vec<([f32; 3], f32, f32)> = (0..80)
        .map(|_| {
            let c = [0, 1, 2].map(|a| 8.0 + rnd() * (n as f32 - 16.0) + shift[a]);
            let sigma = 1.5 + 2.5 * rnd();
            let amp = if rnd() < 0.5 { -1.0 } else { 1.0 } * (0.5 + rnd());
            (c, sigma, amp)
        })
        .collect();
    Array3::from_shape_fn((n, n, n), |(i, j, k)| {
        let p = [i as f32, j as f32, k as f32];
        blobs
            .iter()
            .map(|(c, s, a)| {
                let d2: f32 = (0..3).map(|x| (p[x] - c[x]).powi(2)).sum();
                a * (-d2 / (2.0 * s * s)).exp()
            })
            .sum()
    })
}

/// Positions in mm (1 mm voxels: the voxel coordinates) and scales as the matcher wants.
fn geometry(k: &Keypoints) -> (Vec<u8>, Vec<[f64; 3]>, Vec<f64>) {
    let desc = k.descriptors.concat();
    let scale = k.scale.iter().map(|&s| s as f64).collect();
    (desc, k.ijk.clone(), scale)
}

fn main() -> keyfuse_core::Result<()> {
    let shift = [3.0, -2.0, 4.0];
    let params = ExtractParams::default();
    let a = extract3d(phantom(56, [0.0; 3]).view(), [1.0; 3], &params)?;
    let b = extract3d(phantom(56, shift).view(), [1.0; 3], &params)?;
    println!("keypoints: {} and {}", a.len(), b.len());

    let (da, xa, sa) = geometry(&a);
    let (db, xb, sb) = geometry(&b);
    let va = KeypointView::new(&da, &xa, &sa);
    let vb = KeypointView::new(&db, &xb, &sb);
    let m = match_sets(
        &va,
        &vb,
        &MatchParams {
            hough: true,
            ..MatchParams::default()
        },
    )?;
    let mode = m.mode.expect("a Hough mode");
    println!("matches: {}", m.ia.len());
    println!(
        "translation: [{:.2}, {:.2}, {:.2}] mm (true: {shift:?})",
        mode[0], mode[1], mode[2]
    );
    assert!((0..3).all(|d| (mode[d] - shift[d] as f64).abs() < 1.0));
    Ok(())
}
