//! Tests of the k-NN kernels and the forest.

#[cfg(target_arch = "x86_64")]
use super::amx;
use super::exact::ExactKernel;
use super::forest::{Node, LEAF};
use super::*;
#[cfg(target_arch = "x86_64")]
use crate::simd::dist2_avx2;
use crate::simd::{dist2_scalar, has_avx2};

/// `n` random permutations of 0..64 (rank descriptors), from a seed.
pub(crate) fn random_perms(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let mut out = Vec::with_capacity(n * DESC_LEN);
    for _ in 0..n {
        let mut p: Vec<u8> = (0..64).collect();
        for i in (1..64).rev() {
            p.swap(i, rng.below(i + 1));
        }
        out.extend(p);
    }
    out
}

fn naive(data: &[u8], q: &[u8], k: usize) -> Vec<(u32, u32)> {
    let mut all: Vec<(u32, u32)> = data
        .chunks_exact(64)
        .enumerate()
        .map(|(i, r)| (dist2(q, r), i as u32))
        .collect();
    all.sort();
    all.truncate(k);
    all
}

#[test]
fn simd_distances_match_scalar() {
    let d = random_perms(50, 8);
    let mut w = d.clone();
    w.iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = v.wrapping_mul(4).wrapping_add(i as u8));
    for x in d.chunks_exact(64).chain(w.chunks_exact(64)) {
        for y in d.chunks_exact(64).chain(w.chunks_exact(64)) {
            let (xa, ya) = (x.try_into().unwrap(), y.try_into().unwrap());
            let s = dist2_scalar(xa, ya);
            assert_eq!(dist2(x, y), s);
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                assert_eq!(unsafe { dist2_avx2(x, y) }, s);
            }
        }
    }
}

#[test]
fn exact_matches_naive_sort() {
    let data = random_perms(500, 1);
    let qs = random_perms(17, 2);
    let nb = knn_exact(&data, &qs, 5, |_, _| true).unwrap();
    for q in 0..17 {
        let got: Vec<(u32, u32)> = nb.row(q).map(|(i, d)| (d, i)).collect();
        assert_eq!(got, naive(&data, &qs[q * 64..(q + 1) * 64], 5));
    }
}

/// Every brute-force kernel this machine can run gives the naive answer, on sizes that
/// are not multiples of the tile or block sizes, with a filter, bytes up to 63 that are
/// not permutations (rows of all 0 and all 63: the rank kernel's 16-bit sums at their
/// bounds), bytes up to 127 (the dot kernel's limit) and above, and duplicate distances
/// (ties go to the lower index).
#[test]
fn every_exact_kernel_matches_naive() {
    let mut kernels = vec![ExactKernel::Plain];
    if has_avx2() {
        kernels.extend([ExactKernel::Rank, ExactKernel::Dot, ExactKernel::Avx2]);
    }
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        kernels.push(ExactKernel::Amx);
    }
    let mut rng = SplitMix(11);
    // bytes: 0 permutations of 0..64, 1 any of 0..=63 with extreme rows, 2 up to 127,
    // 3 up to 252; 4 any (rows of unequal norms above 127: every AMX comparison variant)
    for (n, nq, bytes) in [
        (1usize, 3usize, 0u8),
        (37, 45, 0),
        (2100, 132, 0),
        (300, 40, 1),
        (90, 21, 2),
        (300, 40, 3),
        (200, 33, 4),
    ] {
        let mut data = random_perms(n, 12 + n as u64);
        let mut qs = random_perms(nq, 13);
        match bytes {
            1 => {
                for v in data.iter_mut().chain(qs.iter_mut()) {
                    *v = rng.below(64) as u8;
                }
                data[64..128].fill(63);
                data[128..192].fill(0);
                qs[64..128].fill(0);
                qs[128..192].fill(63);
            }
            2 => data
                .iter_mut()
                .chain(qs.iter_mut())
                .for_each(|v| *v = *v * 2 + 1),
            3 => data
                .iter_mut()
                .chain(qs.iter_mut())
                .for_each(|v| *v = v.wrapping_mul(4)),
            4 => {
                for v in data.iter_mut().chain(qs.iter_mut()) {
                    *v = rng.below(256) as u8;
                }
            }
            _ => {}
        }
        let max = data.iter().chain(&qs).copied().max().unwrap();
        // exact duplicates: ties in distance
        if n > 10 {
            let first = data[..64].to_vec();
            data[5 * 64..6 * 64].copy_from_slice(&first);
            qs[..64].copy_from_slice(&first);
        }
        let modulus = rng.below(7) as u32 + 2;
        // a range of rows every query rejects (an all-pairs query's own subject), which
        // the kernels may leave out: any start and length, tile boundaries or not
        let a = rng.below(n);
        let own = a..(a + rng.below(80)).min(n);
        let filter = |q: usize, c: u32| {
            !(c + q as u32).is_multiple_of(modulus) && !own.contains(&(c as usize))
        };
        for &kern in &kernels {
            if (kern == ExactKernel::Rank && max > 63) || (kern == ExactKernel::Dot && max > 127) {
                continue;
            }
            let prep = kern.prepare(&data);
            // k = 20: the AMX kernel's top k beyond its 16-key vectors
            for k in [1usize, 5, 20] {
                let mut heaps = vec![TopK::new(k); nq];
                kern.scan(&data, &prep, &own, &qs, 0, &mut heaps, &filter);
                for q in 0..nq {
                    let qrow = &qs[q * 64..(q + 1) * 64];
                    let mut all: Vec<(u32, u32)> = data
                        .chunks_exact(64)
                        .enumerate()
                        .filter(|&(i, _)| filter(q, i as u32))
                        .map(|(i, r)| (dist2(qrow, r), i as u32))
                        .collect();
                    all.sort();
                    all.truncate(k);
                    assert_eq!(heaps[q].items, all, "{kern:?} n={n} q={q} k={k}");
                }
            }
        }
    }
}

/// `knn_exact` (whichever kernel runs here) gives the same neighbours on 1 and 3 threads,
/// and the same as the portable kernel, on more queries than one task takes.
#[test]
fn exact_is_identical_across_pools() {
    let data = random_perms(700, 31);
    let qs = random_perms(300, 32);
    let filter = |q: usize, c: u32| !(q as u32 + c).is_multiple_of(5);
    let run = |t: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
            .install(|| knn_exact(&data, &qs, 7, filter).unwrap())
    };
    let one = run(1);
    assert_eq!(one, run(3));
    let prep = ExactKernel::Plain.prepare(&data);
    let mut heaps = vec![TopK::new(7); 300];
    ExactKernel::Plain.scan(&data, &prep, &(0..0), &qs, 0, &mut heaps, &filter);
    for (q, h) in heaps.iter().enumerate() {
        let got: Vec<(u32, u32)> = one.row(q).map(|(i, d)| (d, i)).collect();
        assert_eq!(h.items, got);
    }
}

/// Exact search with the rows prepared once gives `knn_exact`'s answers, also for queries
/// with larger bytes than the rows (another kernel than the one prepared for); rows other
/// than the prepared ones are refused.
#[test]
fn prepared_exact_search_equals_knn_exact() {
    let data = random_perms(700, 21);
    let prepared = ExactPrepared::new(&data).unwrap();
    let mut wide = random_perms(20, 22);
    wide.iter_mut().for_each(|v| *v = v.wrapping_mul(3));
    for qs in [random_perms(50, 23), wide] {
        let filter = |q: usize, c: u32| (c as usize) % 7 != q % 7;
        let want = knn_exact(&data, &qs, 6, filter).unwrap();
        for _ in 0..2 {
            let got = knn_exact_prepared(&data, &prepared, &qs, 6, |_| 0..0, filter).unwrap();
            assert_eq!((got.idx, got.dist2), (want.idx.clone(), want.dist2.clone()));
        }
    }
    let err = knn_exact_prepared(
        &data[..64 * 699],
        &prepared,
        &data[..64],
        1,
        |_| 0..0,
        |_, _| true,
    );
    assert!(matches!(err, Err(KfError::InvalidArgument(_))));
}

#[test]
fn exact_filter_and_short_rows() {
    let data = random_perms(6, 3);
    let nb = knn_exact(&data, &data[..64], 10, |_, c| c % 2 == 1).unwrap();
    let ids: Vec<u32> = nb.row(0).map(|(i, _)| i).collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.iter().all(|i| i % 2 == 1));
    assert_eq!(nb.idx[3], NONE);
}

#[test]
fn forest_finds_itself_and_agrees_with_exact() {
    let mut data = random_perms(3000, 4);
    // perturbed copies: each query has a true near neighbour, as for real matches
    let mut rng = SplitMix(9);
    let mut qs = data[..200 * 64].to_vec();
    for row in qs.chunks_exact_mut(64) {
        for _ in 0..6 {
            let (i, j) = (rng.below(64), rng.below(64));
            row.swap(i, j);
        }
    }
    data.extend_from_slice(&random_perms(10, 5));
    let forest = KdForest::build(&data, &ForestParams::default()).unwrap();
    let ex = knn_exact(&data, &qs, 1, |_, _| true).unwrap();
    let ap = forest.search(&data, &qs, 1, 256, |_, _| true).unwrap();
    let agree = (0..200).filter(|&q| ex.idx[q] == ap.idx[q]).count();
    assert!(agree >= 190, "recall@1 {agree}/200");
    // approximate distances can only be worse than the exact ones
    let ap3 = forest.search(&data, &qs, 3, 64, |_, _| true).unwrap();
    let ex3 = knn_exact(&data, &qs, 3, |_, _| true).unwrap();
    assert!(ap3.dist2.iter().zip(&ex3.dist2).all(|(a, e)| a >= e));
}

#[test]
fn forest_is_deterministic_across_pools() {
    let data = random_perms(2000, 6);
    let qs = random_perms(100, 7);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let f = KdForest::build(&data, &ForestParams::default()).unwrap();
            f.search(&data, &qs, 5, 64, |_, _| true).unwrap()
        })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn bad_sizes_are_errors() {
    assert!(knn_exact(&[0u8; 65], &[0u8; 64], 1, |_, _| true).is_err());
    assert!(knn_exact(&[0u8; 64], &[0u8; 64], 0, |_, _| true).is_err());
    let f = KdForest::build(&[0u8; 128], &ForestParams::default()).unwrap();
    assert!(f.search(&[0u8; 64], &[0u8; 64], 1, 8, |_, _| true).is_err());
}

#[test]
fn identical_points_do_not_loop() {
    let data = vec![5u8; 64 * 100];
    let f = KdForest::build(&data, &ForestParams::default()).unwrap();
    let nb = f.search(&data, &data[..64], 4, 16, |_, _| true).unwrap();
    assert_eq!(nb.dist2[0], 0);
}

/// The bytes format 1 wrote (16-byte nodes with both children, u32 permutation).
fn format1_bytes(f: &KdForest) -> Vec<u8> {
    let mut out = b"KFFOREST".to_vec();
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(f.trees.len() as u32).to_le_bytes());
    out.extend_from_slice(&(f.n as u64).to_le_bytes());
    for t in &f.trees {
        out.extend_from_slice(&(t.nodes.len() as u64).to_le_bytes());
        for nd in &t.nodes {
            let leaf = nd.dim == LEAF;
            let (split, b) = if leaf { (0, nd.w) } else { (nd.w, nd.a + 1) };
            out.extend_from_slice(&[nd.dim, 0, 0, 0]);
            out.extend_from_slice(&split.to_le_bytes());
            out.extend_from_slice(&nd.a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
        for p in t.perm.to_vec() {
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
    let h = fnv64(&out);
    out.extend_from_slice(&h.to_le_bytes());
    out
}

/// Recompute a forest file's checksum after editing its body.
fn reseal(b: &mut [u8]) {
    let body = b.len() - 8;
    let h = fnv64(&b[..body]);
    b[body..].copy_from_slice(&h.to_le_bytes());
}

#[test]
fn forest_files_are_compact_and_older_formats_still_read() {
    let mut leaf8_len = 0;
    for (n, leaf_size) in [(3000, 8), (3000, 16), (700, 300), (1, 8)] {
        let data = random_perms(n, 5);
        let params = ForestParams {
            leaf_size,
            ..ForestParams::default()
        };
        let f = KdForest::build(&data, &params).unwrap();
        let q = random_perms(40, 6);
        let want = f.search(&data, &q, 5, 64, |_, _| true).unwrap();
        let (v3, v2, v1) = (f.to_bytes(), f.format2_bytes(), format1_bytes(&f));
        assert_eq!(v3[8], 3);
        if (n, leaf_size) == (3000, 8) {
            // 3 bytes an internal node, 1 a leaf, 12-bit permutation indices: 43 % of format 2
            assert!(v3.len() * 2 < v2.len(), "{} vs {}", v3.len(), v2.len());
            leaf8_len = v3.len();
        }
        if (n, leaf_size) == (3000, 16) {
            // the default leaf size: half the nodes, the same permutations
            // header and checksum 32 bytes; a tree's node count 8 and permutation 4,500
            let nodes = |len: usize| len - 32 - f.trees.len() * (8 + 4500);
            let (nodes8, nodes16) = (nodes(leaf8_len), nodes(v3.len()));
            assert!(nodes16 * 3 < nodes8 * 2, "{nodes16} vs {nodes8}");
        }
        for bytes in [&v3, &v2, &v1] {
            let g = KdForest::from_bytes(bytes, n).unwrap();
            for (a, b) in g.trees.iter().zip(&f.trees) {
                assert_eq!(a.perm.to_vec(), b.perm.to_vec());
                let same = a
                    .nodes
                    .iter()
                    .zip(&b.nodes)
                    .all(|(x, y)| (x.dim, x.w, x.a) == (y.dim, y.w, y.a));
                assert!(same && a.nodes.len() == b.nodes.len());
            }
            let got = g.search(&data, &q, 5, 64, |_, _| true).unwrap();
            assert_eq!((got.idx, got.dist2), (want.idx.clone(), want.dist2.clone()));
            assert_eq!(g.to_bytes(), v3);
        }
    }
    assert_eq!(perm_width(3000), 2);
    assert_eq!(perm_width(1 << 24), 3);
    assert_eq!(perm_width((1 << 24) + 1), 4);
    assert_eq!((perm_bits(1), perm_bits(2), perm_bits(3000)), (1, 1, 12));
    assert_eq!((perm_bits(1 << 24), perm_bits(20_000_000)), (24, 25));
    let data = random_perms(3000, 5);
    let f = KdForest::build(&data, &ForestParams::default()).unwrap();
    // a format-1 internal node whose second child is not next to the first is refused
    let mut bad = format1_bytes(&f);
    let at = 8 + 4 + 4 + 8 + 8 + 12; // first tree, root node's second child
    bad[at] ^= 4;
    reseal(&mut bad);
    assert!(KdForest::from_bytes(&bad, 3000).is_err());
    // a format-2 forest not in the build's order is written back in format 2
    let mut moved = f.clone();
    let t = &mut moved.trees[0];
    let last = t.nodes.len() - 1;
    let (a, b) = (t.nodes[last - 1], t.nodes[last]);
    if a.dim == LEAF && b.dim == LEAF {
        t.nodes[last - 1] = Node::leaf(b.a, b.w);
        t.nodes[last] = Node::leaf(a.a, a.w);
        let bytes = moved.to_bytes();
        assert_eq!(bytes[8], 2);
        assert_eq!(
            KdForest::from_bytes(&bytes, 3000).unwrap().to_bytes(),
            bytes
        );
    }
    // format 3: a damaged tag, threshold code or leaf count is refused even when resealed
    let v3 = f.to_bytes();
    let root = 8 + 4 + 4 + 8 + 8;
    let mut leaf = root; // the first leaf: internal nodes before it take 3 bytes each
    while v3[leaf] < 64 {
        leaf += 3;
    }
    for (at, val) in [
        (root, 200u8),
        (root + 2, 0x90),
        (leaf, 64 + 191 - 1),
        (leaf, LEAF),
    ] {
        let mut b = v3.clone();
        b[at] = val;
        reseal(&mut b);
        assert!(KdForest::from_bytes(&b, 3000).is_err(), "byte {at} = {val}");
    }
}

#[test]
fn loaded_forest_maps_its_permutations() {
    // a saved forest read back keeps its bit-packed permutations in the mapped file: the
    // same searches and bytes, only the nodes in RAM
    let n = 5000;
    let data = random_perms(n, 9);
    let params = ForestParams {
        trees: 4,
        ..ForestParams::default()
    };
    let f = KdForest::build(&data, &params).unwrap();
    let dir = std::env::temp_dir().join(format!("kf-forest-map-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("f.kff");
    f.save(&path).unwrap();
    let g = KdForest::load(&path, n).unwrap();
    let q = random_perms(60, 10);
    for (k, checks) in [(1, 16), (5, 64), (10, 300)] {
        let a = f.search(&data, &q, k, checks, |_, _| true).unwrap();
        let b = g.search(&data, &q, k, checks, |_, _| true).unwrap();
        assert_eq!((a.idx, a.dist2), (b.idx, b.dist2));
    }
    assert_eq!(g.to_bytes(), f.to_bytes());
    let nodes: usize = g.trees.iter().map(|t| t.nodes.len() * 9).sum();
    assert_eq!(g.memory_bytes(), nodes);
    // built here: packed in RAM, 13 bits a point and tree (+ 8 bytes of padding a tree)
    assert_eq!(f.memory_bytes(), nodes + 4 * ((n * 13).div_ceil(8) + 8));
    let gone = KdForest::load(&dir.join("missing.kff"), n);
    assert!(gone.is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn atomic_writes_of_one_file_at_once_never_mix() {
    // several writers of the same cache file (processes opening one index): each writes
    // its own file aside, so the file is always one writer's whole content
    let dir = std::env::temp_dir().join(format!("kf-atomic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("open-000001.kff");
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let path = &path;
            s.spawn(move || {
                let body = vec![t; 1 << 16];
                for _ in 0..25 {
                    write_atomic(path, &[&body[..4096], &body[4096..]]).unwrap();
                }
            });
        }
    });
    let got = std::fs::read(&path).unwrap();
    assert_eq!(got.len(), 1 << 16);
    assert!(got.iter().all(|&b| b == got[0]) && got[0] < 4);
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1, "no file left aside");
    use super::forest_io::aside_path;
    assert_ne!(aside_path(&path), aside_path(&path));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// All-pairs over groups gives the one-sided search's neighbours with each row's own
/// group filtered out: with the kernel picked here and with the AVX2 rank kernel's
/// symmetric pass (forced: this machine may run AMX), on 1 and 3 threads; groups of every
/// size (empty, one row, across block boundaries), exact duplicates in other groups
/// (ties), k up to 16 and above (the one-sided search). Bad group ends are errors.
#[test]
fn all_pairs_equal_the_one_sided_search() {
    let n = 1500;
    let mut data = random_perms(n, 41);
    for (from, to) in [(0usize, 700usize), (0, 1400), (66, 67), (300, 1499)] {
        let row = data[from * 64..(from + 1) * 64].to_vec();
        data[to * 64..(to + 1) * 64].copy_from_slice(&row);
    }
    let ends = [0usize, 1, 65, 66, 300, 300, 811, 1200, 1500];
    let mut owner = vec![0usize; n];
    let mut start = 0;
    for (g, &end) in ends.iter().enumerate() {
        owner[start..end].fill(g);
        start = end;
    }
    let mut prepared = vec![ExactPrepared::new(&data).unwrap()];
    if has_avx2() {
        prepared.push(ExactPrepared::with_kernel(&data, ExactKernel::Rank));
    }
    let pool = |t: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
    };
    for k in [1usize, 10, 16, 20] {
        let want = knn_exact(&data, &data, k, |q, c| owner[q] != owner[c as usize]).unwrap();
        for prep in &prepared {
            for t in [1, 3] {
                let got = pool(t).install(|| knn_all_pairs(&data, prep, &ends, k).unwrap());
                assert_eq!(got, want, "k={k} threads={t}");
            }
        }
    }
    let prep = &prepared[0];
    for bad in [&[1500usize, 1400][..], &[10, 1499], &[]] {
        let err = knn_all_pairs(&data, prep, bad, 3);
        assert!(matches!(err, Err(KfError::InvalidArgument(_))), "{bad:?}");
    }
    assert!(knn_all_pairs(&data, prep, &ends, 0).is_err());
    // several cache chunks of column lists (2,048 rows each), groups across their
    // boundaries, three threads contending for them
    let n = 4500;
    let data = random_perms(n, 43);
    let ends = [2000usize, 2100, 4095, 4097, 4500];
    let mut owner = vec![0usize; n];
    let mut start = 0;
    for (g, &end) in ends.iter().enumerate() {
        owner[start..end].fill(g);
        start = end;
    }
    let want = knn_exact(&data, &data, 10, |q, c| owner[q] != owner[c as usize]).unwrap();
    let prep = match has_avx2() {
        true => ExactPrepared::with_kernel(&data, ExactKernel::Rank),
        false => ExactPrepared::new(&data).unwrap(),
    };
    let got = pool(3).install(|| knn_all_pairs(&data, &prep, &ends, 10).unwrap());
    assert_eq!(got, want);
}
