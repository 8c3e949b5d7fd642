//! The posterior kernel's last step: per subject, the sum of each indexed keypoint's best
//! share over the query keypoints.

/// Sum, per subject, each indexed keypoint's best share (fixed order: by keypoint).
pub(super) fn add_best_shares<O: Fn(u32) -> u32>(
    shares: Vec<(u32, f64)>,
    owner: &O,
    inter: &mut [f64],
) {
    let top = shares.iter().map(|s| s.0 as usize).max().unwrap_or(0);
    if top < 4 * shares.len() {
        add_best_shares_dense(shares, top, owner, inter)
    } else {
        add_best_shares_sorted(shares, owner, inter)
    }
}

/// [`add_best_shares`] for few distinct ids (a cohort's all-pairs): each id's best share in
/// a dense table, then added in id order: the same values in the same order as
/// [`add_best_shares_sorted`], whose sort took most of a subject's scoring time.
pub(super) fn add_best_shares_dense<O: Fn(u32) -> u32>(
    shares: Vec<(u32, f64)>,
    top: usize,
    owner: &O,
    inter: &mut [f64],
) {
    // below every share in `total_cmp` order (shares are ≥ 0, or NaN)
    let unset = f64::from_bits(u64::MAX);
    let mut best = vec![unset; top + 1];
    for (c, v) in shares {
        let b = &mut best[c as usize];
        if v.total_cmp(b).is_gt() {
            *b = v;
        }
    }
    for (c, v) in best.into_iter().enumerate() {
        if v.to_bits() != unset.to_bits() {
            inter[owner(c as u32) as usize] += v;
        }
    }
}

/// [`add_best_shares`] by sorting the shares by id, best first.
pub(super) fn add_best_shares_sorted<O: Fn(u32) -> u32>(
    mut shares: Vec<(u32, f64)>,
    owner: &O,
    inter: &mut [f64],
) {
    shares.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut last = u32::MAX;
    for (c, v) in shares {
        if c != last {
            inter[owner(c) as usize] += v;
            last = c;
        }
    }
}
