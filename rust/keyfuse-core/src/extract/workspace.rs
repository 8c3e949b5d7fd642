//! The scale space's volume buffers and a bounded, process-wide pool that keeps them
//! between extractions.
//!
//! A 1 mm MNI-sized scale space holds four ~35 MB volumes. Fresh ones cost the kernel a
//! zeroed page per first touch (`clear_page_rep` in perf; how much depends on whether
//! huge pages back them, docs/decisions.md); a batch of extractions in one process
//! (cohorts, the batch functions' workers) instead reuses the buffers the previous
//! extraction handed back.
//!
//! Bounds: the pool holds at most [`cap_bytes`] (default 192 MiB: one 1 mm MNI-sized
//! scale space; `KF_EXTRACT_POOL_MB` sets it, 0 turns the pool off) while no extraction
//! runs; buffers beyond the cap are freed, the smallest first. An extraction takes
//! buffers out of the pool (so concurrent extractions never share one) and returns them
//! when it finishes: its peak memory is that of an extraction with fresh buffers.
//!
//! A buffer from [`take`] holds unspecified values (an earlier extraction's): every user
//! overwrites all of it, so results do not depend on the pool, the order of calls or the
//! threads (tests in extract/tests.rs fill the pool with NaN to show it).

use crate::{KfError, Result};
use std::sync::{Mutex, OnceLock};

/// Idle buffers, any order, each whole: its length is its capacity (so all of it is
/// initialised, and [`take`] can shorten it without writing).
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// The most bytes the pool keeps between extractions: `KF_EXTRACT_POOL_MB` MiB (read once;
/// 0 = no pool), else 192 MiB.
pub(crate) fn cap_bytes() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var("KF_EXTRACT_POOL_MB")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(192)
            .saturating_mul(1 << 20)
    })
}

fn bytes(v: &Vec<f32>) -> usize {
    v.capacity() * std::mem::size_of::<f32>()
}

/// A buffer of `len` values whose contents are unspecified: the smallest pooled buffer
/// that holds `len` and is no more than twice as large (a much larger one would be
/// taken from a later, larger request), else a fresh one.
pub(crate) fn take(len: usize) -> Result<Vec<f32>> {
    let pooled = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len && v.capacity() / 2 <= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i))
    };
    match pooled {
        Some(mut v) => {
            // pooled buffers are whole (length = capacity ≥ len): the values are kept as
            // they are (they get overwritten)
            v.truncate(len);
            Ok(v)
        }
        None => fresh(len),
    }
}

/// Hand a buffer back to the pool (its values beyond its length set to zero); beyond
/// [`cap_bytes`] the smallest are freed.
pub(crate) fn give_back(mut v: Vec<f32>) {
    v.resize(v.capacity(), 0.0);
    pool_whole(v);
}

/// [`give_back`] of a buffer whose whole capacity is initialised, at its full length as
/// it is: a buffer from [`take`] or [`try_zeros`] that was shortened (a smaller octave's
/// volume) but not reallocated (`Vol` checks its address and capacity). Filling its tail would write up to the whole volume for
/// nothing: a buffer's values are unspecified when it is taken again.
///
/// # Safety
/// All of `v`'s capacity is initialised.
pub(crate) unsafe fn give_back_whole(mut v: Vec<f32>) {
    // SAFETY: the caller vouches for the values up to the capacity (f32 has no invalid
    // bit patterns)
    unsafe { v.set_len(v.capacity()) };
    pool_whole(v);
}

/// Pool `v`, whose length is its capacity; beyond [`cap_bytes`] the smallest buffers are
/// freed.
fn pool_whole(v: Vec<f32>) {
    debug_assert_eq!(v.len(), v.capacity());
    if v.capacity() == 0 {
        return;
    }
    let cap = cap_bytes();
    let mut freed: Vec<Vec<f32>> = Vec::new();
    {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(v);
        let mut total: usize = pool.iter().map(bytes).sum();
        if total > cap {
            pool.sort_by_key(|v| std::cmp::Reverse(v.capacity()));
            while total > cap {
                let v = pool.pop().expect("the total is over 0");
                total -= bytes(&v);
                freed.push(v);
            }
        }
    }
    // freed outside the lock
    drop(freed);
}

/// Free every pooled buffer (tests).
#[cfg(test)]
pub(crate) fn clear() {
    let old = std::mem::take(&mut *POOL.lock().unwrap_or_else(|e| e.into_inner()));
    drop(old);
}

/// Fill every pooled buffer with `value` (tests: a result that read a stale value would
/// change).
#[cfg(test)]
pub(crate) fn poison(value: f32) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    for v in pool.iter_mut() {
        v.fill(value);
    }
}

/// A fresh buffer of `len` zeros from the allocator's zeroed memory (large ones come
/// straight from the kernel, already zero, so they are not written twice), failing
/// cleanly (not aborting) when memory is short.
fn fresh(len: usize) -> Result<Vec<f32>> {
    let short = || {
        KfError::InvalidImage(format!(
            "cannot allocate {} MB for the scale space",
            len.saturating_mul(4) / (1 << 20)
        ))
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(len).map_err(|_| short())?;
    // SAFETY: the layout has a non-zero size; a null pointer is handled; a non-null one
    // is a zeroed allocation of `len` f32 from the global allocator with f32's layout, so
    // the vector owns it with length and capacity `len` (0.0 is all-zero bits)
    let v = unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut f32;
        if p.is_null() {
            return Err(short());
        }
        Vec::from_raw_parts(p, len, len)
    };
    advise_huge_pages(&v);
    Ok(v)
}

/// Allocate `len` zeros, failing cleanly (not aborting) when memory is short.
pub(crate) fn try_zeros(len: usize) -> Result<Vec<f32>> {
    fresh(len)
}

/// Ask Linux to back the 2 MiB-aligned interior of a fresh (untouched) buffer with
/// transparent huge pages where the system leaves that to `madvise`: a 1 mm volume is
/// ~8,500 pages of 4 KiB, each a page fault on first touch and a TLB entry that the
/// scale space's plane sweeps and the descriptors' scattered samples keep missing
/// (docs/decisions.md). Contents and results are unchanged; elsewhere a no-op.
fn advise_huge_pages(v: &Vec<f32>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = v.capacity() * std::mem::size_of::<f32>();
        if bytes < 2 * HUGE {
            return;
        }
        let start = v.as_ptr() as usize;
        let (a, end) = (
            (start + HUGE - 1) & !(HUGE - 1),
            (start + bytes) & !(HUGE - 1),
        );
        if end > a {
            // SAFETY: [a, end) lies inside the vector's allocation; MADV_HUGEPAGE only
            // changes how the kernel backs those pages (a failure is harmless and ignored)
            unsafe {
                libc::madvise(a as *mut libc::c_void, end - a, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_buffers_are_zero() {
        for len in [0, 1, 1000, 3 << 20] {
            let v = fresh(len).unwrap();
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }
}
