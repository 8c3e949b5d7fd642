//! Label voting: each test keypoint's label from its matches' labels, descriptor
//! likelihoods and p(m) ([`vote_labels`]).

use crate::{KfError, Result};
use rayon::prelude::*;

/// Keypoint label voting.
///
/// Match `m` links test keypoint `query[m]` to a training keypoint of label `label[m]`
/// (> 0) at squared descriptor distance `dist2[m]`, with match probability `pm[m]`.
/// Returns per test keypoint (`0..n_query`) the voted label (0 when it has no match or
/// all weights vanish) and the vote certainty `p(L̂)` in `[0, 1]`. Ties go to the smaller
/// label.
pub fn vote_labels(
    n_query: usize,
    query: &[u32],
    label: &[i32],
    dist2: &[f32],
    pm: &[f32],
) -> Result<(Vec<i32>, Vec<f32>)> {
    let n = query.len();
    if label.len() != n || dist2.len() != n || pm.len() != n {
        return Err(KfError::InvalidArgument(format!(
            "match arrays differ in length: query {}, label {}, dist2 {}, pm {}",
            n,
            label.len(),
            dist2.len(),
            pm.len()
        )));
    }
    if let Some(&q) = query.iter().find(|&&q| q as usize >= n_query) {
        return Err(KfError::InvalidArgument(format!(
            "match query index {q} out of range for {n_query} keypoints"
        )));
    }
    if label.iter().any(|&l| l <= 0) {
        return Err(KfError::InvalidArgument(
            "training keypoint labels must be > 0 (background keypoints are dropped)".into(),
        ));
    }
    if dist2
        .iter()
        .chain(pm)
        .any(|v| !(v.is_finite() && *v >= 0.0))
    {
        return Err(KfError::InvalidArgument(
            "distances and p(m) must be finite and non-negative".into(),
        ));
    }
    // counting sort of the matches by query, stable
    let mut start = vec![0usize; n_query + 1];
    for &q in query {
        start[q as usize + 1] += 1;
    }
    for i in 0..n_query {
        start[i + 1] += start[i];
    }
    let mut order = vec![0usize; n];
    let mut fill = start.clone();
    for (m, &q) in query.iter().enumerate() {
        order[fill[q as usize]] = m;
        fill[q as usize] += 1;
    }
    let out: Vec<(i32, f32)> = (0..n_query)
        .into_par_iter()
        .map(|q| {
            let ms = &order[start[q]..start[q + 1]];
            if ms.is_empty() {
                return (0, 0.0);
            }
            let tau2 = ms.iter().map(|&m| dist2[m] as f64).fold(0.0, f64::max);
            let mut scores: Vec<(i32, f64)> = Vec::new();
            for &m in ms {
                let lik = if tau2 > 0.0 {
                    (-(dist2[m] as f64) / (2.0 * tau2)).exp()
                } else {
                    1.0
                };
                let s = lik * pm[m] as f64;
                match scores.iter_mut().find(|(l, _)| *l == label[m]) {
                    Some(e) => e.1 += s,
                    None => scores.push((label[m], s)),
                }
            }
            scores.sort_unstable_by_key(|e| e.0);
            let total: f64 = scores.iter().map(|e| e.1).sum();
            let mut best = (0i32, 0.0f64);
            for &(l, s) in &scores {
                if s > best.1 {
                    best = (l, s);
                }
            }
            if total > 0.0 && best.0 > 0 {
                (best.0, (best.1 / total) as f32)
            } else {
                (0, 0.0)
            }
        })
        .collect();
    Ok(out.into_iter().unzip())
}
