//! One shard of a sharded cohort index: a contiguous run of subjects whose descriptors
//! are one flat file, memory-mapped, with its kd-forest beside it.
//!
//! Shard file (little-endian): a 2048-byte header — magic `KFSHARD\0`, format version
//! (u32), 4 zero bytes, point count n (u64), the descriptor statistics
//! ([`DimStats::to_words`], 129 × u64), an FNV-1a 64 checksum of the header bytes before
//! it, zero padding — then the `n × 64` descriptor bytes. Opening checks the size and the
//! header only (so a large index opens in seconds); [`Shard::verify`] reads every byte.
//!
//! A shard searches with global point ids (`base` + local row) and knows each point's
//! global subject, so per-shard neighbour lists merge ([`crate::knn::merge_neighbors`])
//! and score ([`crate::jaccard::score_neighbors`]) exactly like one unsharded cohort.

use crate::jaccard::{DimStats, SoftJaccardParams};
use crate::knn::{
    check_rows, fnv64, knn_all_pairs, knn_exact_prepared, release_mapped_pages, write_aside,
    write_atomic, ExactPrepared, ForestParams, KdForest, Neighbors,
};
use crate::{KfError, Result, DESC_LEN};
use std::path::Path;
use std::sync::OnceLock;

const MAGIC: &[u8; 8] = b"KFSHARD\0";
/// Version of the shard file format.
pub const SHARD_FORMAT_VERSION: u32 = 1;
/// Bytes before the descriptors in a shard file.
pub const HEADER_BYTES: usize = 2048;
const WORDS: usize = 1 + 2 * DESC_LEN;
const CHECKED: usize = 24 + WORDS * 8;

enum Store {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

/// A shard: descriptors (owned or memory-mapped), where each subject's points end (a
/// point's subject is found by binary search: 4 bytes a subject instead of 4 a point),
/// the descriptor statistics and the kd-forest once built or loaded.
pub struct Shard {
    store: Store,
    base: u32,
    n: usize,
    /// the shard's first subject (global number)
    first: u32,
    /// each subject's end among the shard's points
    ends: Vec<u32>,
    stats: DimStats,
    // set once (built or loaded), then shared: every method takes `&self`, so threads
    // searching a shard never wait on one loading its forest
    forest: OnceLock<KdForest>,
    forest_params: ForestParams,
    // what exact search precomputes from the rows, made on the first exact search
    exact: OnceLock<ExactPrepared>,
}

fn header(n: usize, stats: &DimStats) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_BYTES);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&SHARD_FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&(n as u64).to_le_bytes());
    for w in stats.to_words() {
        h.extend_from_slice(&w.to_le_bytes());
    }
    let c = fnv64(&h);
    h.extend_from_slice(&c.to_le_bytes());
    h.resize(HEADER_BYTES, 0);
    h
}

fn corrupt(why: String) -> KfError {
    KfError::Corrupt(format!("shard file: {why}"))
}

/// Check a shard file's header (magic, version, checksum, point count `n`) and return its
/// descriptor statistics.
fn parse_header(h: &[u8], n: usize) -> Result<DimStats> {
    let word = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
    if &h[..8] != MAGIC {
        return Err(corrupt("not a keyfuse shard".into()));
    }
    let v = u32::from_le_bytes(h[8..12].try_into().unwrap());
    if v != SHARD_FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {v} (this keyfuse reads {SHARD_FORMAT_VERSION})"
        )));
    }
    if fnv64(&h[..CHECKED]) != word(CHECKED) || h[CHECKED + 8..].iter().any(|&b| b != 0) {
        return Err(corrupt("header checksum mismatch".into()));
    }
    if word(16) != n as u64 {
        return Err(corrupt(format!(
            "holds {} keypoints, expected {n}",
            word(16)
        )));
    }
    let words: Vec<u64> = (0..WORDS).map(|i| word(24 + 8 * i)).collect();
    DimStats::from_words(&words)
}

/// Each subject's end among the shard's points, from the subjects' keypoint counts.
fn subject_ends(sizes: &[usize], first_subject: usize, n: usize) -> Result<Vec<u32>> {
    if sizes.iter().sum::<usize>() != n {
        return Err(KfError::InvalidArgument(format!(
            "shard: subject sizes add up to {}, not its {n} points",
            sizes.iter().sum::<usize>()
        )));
    }
    if first_subject + sizes.len() >= u32::MAX as usize {
        return Err(KfError::InvalidArgument("too many subjects".into()));
    }
    Ok(sizes
        .iter()
        .scan(0u32, |end, &m| {
            *end += m as u32;
            Some(*end)
        })
        .collect())
}

/// Open the shard file `path` of `n` points, check its size and header: the file
/// positioned at its descriptors, and its statistics.
fn read_header(path: &Path, n: usize) -> Result<(std::fs::File, DimStats)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len() as usize;
    if len != HEADER_BYTES + n * DESC_LEN {
        return Err(corrupt(format!(
            "{}: {len} bytes, expected {} for {n} keypoints",
            path.display(),
            HEADER_BYTES + n * DESC_LEN
        )));
    }
    let mut h = vec![0u8; HEADER_BYTES];
    f.read_exact(&mut h)?;
    Ok((f, parse_header(&h, n)?))
}

/// Write shard file `out` atomically ([`write_aside`]): `head`, then the descriptors of
/// `files` in order (streamed, not held in memory).
fn join_files(files: &[(std::path::PathBuf, usize)], out: &Path, head: &[u8]) -> Result<()> {
    use std::io::Write;
    write_aside(out, |f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        w.write_all(head)?;
        for (path, n) in files {
            let (mut src, _) = read_header(path, *n)?;
            let copied = std::io::copy(&mut src, &mut w)?;
            if copied != (n * DESC_LEN) as u64 {
                return Err(corrupt(format!("{}: changed while read", path.display())));
            }
        }
        w.flush()?;
        Ok(())
    })
}

impl Shard {
    fn make(
        store: Store,
        stats: DimStats,
        sizes: &[usize],
        first: usize,
        base: usize,
        fp: ForestParams,
    ) -> Result<Shard> {
        let n = check_rows(
            "shard",
            match &store {
                Store::Owned(v) => v,
                Store::Mapped(m) => &m[HEADER_BYTES..],
            },
        )?;
        if base + n >= u32::MAX as usize {
            return Err(KfError::InvalidArgument(
                "index is full (2³² keypoints)".into(),
            ));
        }
        Ok(Shard {
            ends: subject_ends(sizes, first, n)?,
            n,
            first: first as u32,
            store,
            base: base as u32,
            stats,
            forest: OnceLock::new(),
            exact: OnceLock::new(),
            forest_params: fp,
        })
    }

    /// An in-memory shard over `data` (`n × 64` bytes) of subjects `first_subject..` with
    /// `sizes` keypoints each, whose first point has global id `base`.
    pub fn new(
        data: Vec<u8>,
        sizes: &[usize],
        first_subject: usize,
        base: usize,
        fp: ForestParams,
    ) -> Result<Shard> {
        check_rows("shard", &data)?;
        let mut stats = DimStats::default();
        stats.add(&data);
        Shard::make(Store::Owned(data), stats, sizes, first_subject, base, fp)
    }

    /// Write `data` as a shard file at `path`, atomically.
    pub fn write(path: &Path, data: &[u8]) -> Result<()> {
        let n = check_rows("shard", data)?;
        let mut stats = DimStats::default();
        stats.add(data);
        write_atomic(path, &[&header(n, &stats), data])
    }

    /// Memory-map the shard file at `path`, checking its size and header (not its bytes:
    /// see [`Shard::verify`]).
    pub fn open(
        path: &Path,
        sizes: &[usize],
        first_subject: usize,
        base: usize,
        fp: ForestParams,
    ) -> Result<Shard> {
        let f = std::fs::File::open(path)?;
        // SAFETY: index files are written aside and renamed, never modified in place; a
        // file changed underneath by another program is outside keyfuse's contract.
        let m = unsafe { memmap2::Mmap::map(&f)? };
        let n: usize = sizes.iter().sum();
        if m.len() != HEADER_BYTES + n * DESC_LEN {
            return Err(corrupt(format!(
                "{} bytes, expected {} for {n} keypoints (truncated or extended)",
                m.len(),
                HEADER_BYTES + n * DESC_LEN
            )));
        }
        let stats = parse_header(&m[..HEADER_BYTES], n)?;
        #[cfg(unix)]
        let _ = m.advise(memmap2::Advice::Random);
        Shard::make(Store::Mapped(m), stats, sizes, first_subject, base, fp)
    }

    /// The shard made of several shard files (`files`: path and point count each, in
    /// order; every size and header checked), e.g. an open shard's segments, memory-mapped
    /// like a sealed shard: one file is mapped in place; several are first joined into
    /// the shard file `joined` (reused when its size, header and statistics match the
    /// files', else written aside and renamed) since a search reads one contiguous array.
    /// Without `joined`, or where it cannot be written (a read-only directory), they are
    /// read into RAM.
    pub fn open_files(
        files: &[(std::path::PathBuf, usize)],
        joined: Option<&Path>,
        sizes: &[usize],
        first_subject: usize,
        base: usize,
        fp: ForestParams,
    ) -> Result<Shard> {
        if let [(path, _)] = files {
            return Shard::open(path, sizes, first_subject, base, fp);
        }
        let Some(joined) = joined else {
            return Shard::read_files(files, sizes, first_subject, base, fp);
        };
        let mut stats = DimStats::default();
        for (path, n) in files {
            stats.merge(&read_header(path, *n)?.1);
        }
        let want = stats.to_words();
        if let Ok(s) = Shard::open(joined, sizes, first_subject, base, fp.clone()) {
            if s.stats.to_words() == want {
                return Ok(s);
            }
        }
        match join_files(files, joined, &header(sizes.iter().sum(), &stats)) {
            Ok(()) => Shard::open(joined, sizes, first_subject, base, fp),
            Err(_) => Shard::read_files(files, sizes, first_subject, base, fp),
        }
    }

    /// An in-memory shard read from several shard files (`files`: path and point count
    /// each, in order; every size and header checked), e.g. an open shard's segments:
    /// read, not mapped, so the file pages are not held beside the copy.
    pub fn read_files(
        files: &[(std::path::PathBuf, usize)],
        sizes: &[usize],
        first_subject: usize,
        base: usize,
        fp: ForestParams,
    ) -> Result<Shard> {
        use std::io::Read;
        let total: usize = files.iter().map(|f| f.1).sum();
        let mut data = Vec::with_capacity(total * DESC_LEN);
        let mut stats = DimStats::default();
        for (path, n) in files {
            let (mut f, s) = read_header(path, *n)?;
            stats.merge(&s);
            let at = data.len();
            data.resize(at + n * DESC_LEN, 0);
            f.read_exact(&mut data[at..])?;
        }
        Shard::make(Store::Owned(data), stats, sizes, first_subject, base, fp)
    }

    /// Read every descriptor and check it against the header's statistics.
    pub fn verify(&self) -> Result<()> {
        let mut s = DimStats::default();
        s.add(self.data());
        if s.to_words() != self.stats.to_words() {
            return Err(corrupt(
                "descriptors differ from the header's statistics".into(),
            ));
        }
        Ok(())
    }

    pub fn data(&self) -> &[u8] {
        match &self.store {
            Store::Owned(v) => v,
            Store::Mapped(m) => &m[HEADER_BYTES..],
        }
    }

    pub fn n_points(&self) -> usize {
        self.n
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.store, Store::Mapped(_))
    }

    pub fn stats(&self) -> &DimStats {
        &self.stats
    }

    /// Bytes held in RAM (owned descriptors, subject ends, forest, exact-search set-up;
    /// mapped pages not counted).
    pub fn memory_bytes(&self) -> usize {
        let own = match &self.store {
            Store::Owned(v) => v.len(),
            Store::Mapped(_) => 0,
        };
        own + self.ends.len() * 4
            + self.forest.get().map_or(0, |f| f.memory_bytes())
            + self.exact.get().map_or(0, |e| e.memory_bytes())
    }

    pub fn has_forest(&self) -> bool {
        self.forest.get().is_some()
    }

    pub fn forest(&self) -> Option<&KdForest> {
        self.forest.get()
    }

    /// Build the kd-forest now, when missing (two threads may both build it: the same
    /// deterministic forest, one is kept).
    pub fn build_forest(&self) -> Result<()> {
        if self.forest.get().is_none() {
            let _ = self
                .forest
                .set(KdForest::build(self.data(), &self.forest_params)?);
        }
        Ok(())
    }

    /// Load the forest saved at `path` (validated; see [`KdForest::from_bytes`]) unless
    /// the shard has one already.
    pub fn load_forest(&self, path: &Path) -> Result<()> {
        if self.forest.get().is_none() {
            let _ = self.forest.set(KdForest::load(path, self.n_points())?);
        }
        Ok(())
    }

    /// Each query's `p.k` nearest points of this shard (global ids), skipping the points of
    /// subject `exclude` and of subjects whose `allowed` entry (global subjects) is false.
    pub fn knn(
        &self,
        queries: &[u8],
        p: &SoftJaccardParams,
        exclude: Option<usize>,
        allowed: Option<&[bool]>,
    ) -> Result<Neighbors> {
        check_rows("query descriptors", queries)?;
        let ex = exclude.map_or(u32::MAX, |e| e as u32);
        let (ends, first) = (&self.ends, self.first);
        if let Some(a) = allowed {
            if a.len() < first as usize + ends.len() {
                return Err(KfError::InvalidArgument(
                    "restriction mask shorter than the number of subjects".into(),
                ));
            }
        }
        // the excluded subject's rows [lo, hi), tested without a search: this filter runs
        // for every candidate that beats a query's k-th distance
        let (lo, hi) = match ex.checked_sub(first).map(|i| i as usize) {
            Some(i) if i < ends.len() => (if i == 0 { 0 } else { ends[i - 1] }, ends[i]),
            _ => (0, 0),
        };
        let filter = |_: usize, c: u32| {
            c.wrapping_sub(lo) >= hi - lo
                && allowed
                    .is_none_or(|a| a[(first + ends.partition_point(|&e| e <= c) as u32) as usize])
        };
        let mut nb = if p.exact {
            let prepared = ExactPrepared::cached(&self.exact, self.data())?;
            knn_exact_prepared(
                self.data(),
                prepared,
                queries,
                p.k,
                |_| lo as usize..hi as usize,
                filter,
            )?
        } else {
            match self.forest.get() {
                Some(f) => f.search(self.data(), queries, p.k, p.checks, filter)?,
                None => {
                    return Err(KfError::InvalidArgument(
                        "approximate search needs the shard's forest (build_forest)".into(),
                    ))
                }
            }
        };
        self.to_global(&mut nb);
        Ok(nb)
    }

    /// Neighbour lists of this shard's rows as global point ids (`base` + row).
    fn to_global(&self, nb: &mut Neighbors) {
        for i in nb.idx.iter_mut() {
            if *i != crate::knn::NONE {
                *i += self.base;
            }
        }
    }

    /// Every point's `k` nearest points among the shard's other subjects (exact; global
    /// ids): the all-pairs of the subjects one shard holds, each pair computed once where
    /// the kernel allows it ([`knn_all_pairs`]). Equal to [`Shard::knn`] of each
    /// subject's points with that subject excluded.
    pub fn knn_all_pairs(&self, k: usize) -> Result<Neighbors> {
        let prepared = ExactPrepared::cached(&self.exact, self.data())?;
        let ends: Vec<usize> = self.ends.iter().map(|&e| e as usize).collect();
        let mut nb = knn_all_pairs(self.data(), prepared, &ends, k)?;
        self.to_global(&mut nb);
        Ok(nb)
    }

    /// Drop this process's pages of the shard's mapped files (descriptors, the forest's
    /// permutations), which stay in the OS page cache: the next search maps them again
    /// (minor faults); what bounds a process's resident set of mapped pages.
    pub fn release_pages(&self) {
        if let Store::Mapped(m) = &self.store {
            release_mapped_pages(m);
        }
        if let Some(f) = self.forest.get() {
            f.release_pages();
        }
    }

    /// Resident bytes of the shard's mapped descriptors in this process's page tables
    /// (`mincore` would report page-cache residency instead, so this reads
    /// `/proc/self/smaps` for the mapping); 0 for an in-memory shard.
    pub fn mapped_resident_bytes(&self) -> Result<usize> {
        let Store::Mapped(m) = &self.store else {
            return Ok(0);
        };
        let start = format!("{:x}-", m.as_ptr() as usize & !4095);
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        lines.next();
        for l in lines {
            if let Some(v) = l.strip_prefix("Rss:") {
                let kb = v.trim().trim_end_matches("kB").trim();
                return kb
                    .parse::<usize>()
                    .map(|k| k * 1024)
                    .map_err(|_| KfError::InvalidArgument("unreadable /proc/self/smaps".into()));
            }
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jaccard::{score_neighbors, Cohort};
    use crate::knn::merge_neighbors;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut r = crate::knn::SplitMix(seed);
        (0..n * DESC_LEN).map(|_| r.below(40) as u8).collect()
    }

    #[test]
    fn sharded_scores_equal_unsharded() {
        let sizes = [30usize, 20, 25, 40, 15, 30];
        let sets: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| data(n, i as u64))
            .collect();
        let mut c = Cohort::new(ForestParams::default());
        for s in &sets {
            c.add(s).unwrap();
        }
        let p = SoftJaccardParams {
            exact: true,
            ..SoftJaccardParams::posterior()
        };
        // shards: subjects 0..2, 2..5, 5..6
        let cuts = [0usize, 2, 5, 6];
        let mut shards = Vec::new();
        let mut stats = DimStats::default();
        let mut base = 0;
        for w in cuts.windows(2) {
            let d: Vec<u8> = sets[w[0]..w[1]].concat();
            let sh =
                Shard::new(d, &sizes[w[0]..w[1]], w[0], base, ForestParams::default()).unwrap();
            base += sh.n_points();
            stats.merge(sh.stats());
            shards.push(sh);
        }
        let offsets: Vec<usize> = std::iter::once(0)
            .chain(sizes.iter().scan(0, |a, &n| {
                *a += n;
                Some(*a)
            }))
            .collect();
        let owner = |c: u32| (offsets.partition_point(|&o| o <= c as usize) - 1) as u32;
        let q = data(12, 99);
        let parts: Vec<Neighbors> = shards
            .iter()
            .map(|s| s.knn(&q, &p, Some(1), None).unwrap())
            .collect();
        let nb = merge_neighbors(&parts, p.k).unwrap();
        let got = score_neighbors(&nb, owner, sizes.len(), &stats, &p).unwrap();
        let want = c.intersections(&q, Some(1), None, &p).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn files_joined_and_mapped() {
        let dir = std::env::temp_dir().join(format!("kf-shard-join-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (data(30, 5), data(20, 6));
        let files = vec![(dir.join("a.kfs"), 30), (dir.join("b.kfs"), 20)];
        Shard::write(&files[0].0, &a).unwrap();
        Shard::write(&files[1].0, &b).unwrap();
        let joined = dir.join("ab.kfs");
        let fp = ForestParams::default();
        let s = Shard::open_files(&files, Some(&joined), &[30, 20], 0, 0, fp.clone()).unwrap();
        assert!(s.is_mapped() && joined.exists());
        assert_eq!(s.data(), &[a.clone(), b.clone()].concat()[..]);
        let mut stats = DimStats::default();
        stats.add(s.data());
        assert_eq!(s.stats().to_words(), stats.to_words());
        std::hint::black_box(s.data().iter().map(|&x| x as u64).sum::<u64>());
        assert!(s.mapped_resident_bytes().unwrap() > 0);
        s.release_pages();
        assert_eq!(s.mapped_resident_bytes().unwrap(), 0);
        // a joined file of other descriptors is replaced; one file is mapped in place
        Shard::write(&joined, &data(50, 7)).unwrap();
        let s = Shard::open_files(&files, Some(&joined), &[30, 20], 0, 0, fp.clone()).unwrap();
        assert_eq!(s.data(), &[a.clone(), b.clone()].concat()[..]);
        // without a joined file, several are read into RAM
        let s = Shard::open_files(&files, None, &[30, 20], 0, 0, fp.clone()).unwrap();
        assert!(!s.is_mapped());
        assert_eq!(s.data(), &[a.clone(), b].concat()[..]);
        let one =
            Shard::open_files(&files[..1], Some(&dir.join("x.kfs")), &[30], 0, 0, fp).unwrap();
        assert!(one.is_mapped() && !dir.join("x.kfs").exists());
        assert_eq!(one.data(), &a[..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_round_trip_and_damage() {
        let dir = std::env::temp_dir().join(format!("kf-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.kfs");
        let d = data(50, 3);
        Shard::write(&path, &d).unwrap();
        let s = Shard::open(&path, &[20, 30], 4, 100, ForestParams::default()).unwrap();
        assert_eq!(s.data(), &d[..]);
        s.verify().unwrap();
        s.build_forest().unwrap();
        let fpath = dir.join("s.kff");
        s.forest().unwrap().save(&fpath).unwrap();
        let bytes = std::fs::read(&fpath).unwrap();
        assert_eq!(bytes, s.forest().unwrap().to_bytes());
        s.load_forest(&fpath).unwrap();
        // every single-byte flip and every truncation of the forest is refused
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            assert!(KdForest::from_bytes(&b, 50).is_err());
            assert!(KdForest::from_bytes(&bytes[..i], 50).is_err());
        }
        assert!(KdForest::from_bytes(&bytes, 51).is_err());
        // a wrong size, a damaged header
        assert!(Shard::open(&path, &[20, 31], 4, 100, ForestParams::default()).is_err());
        let mut raw = std::fs::read(&path).unwrap();
        raw[20] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        assert!(Shard::open(&path, &[20, 30], 4, 100, ForestParams::default()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
