//! The scale space's arithmetic with subnormals flushed to zero.
//!
//! The blur, the neighbourhood blur of an octave's top level and the 2×2×2 downsampling
//! run with the x86 MXCSR bits FTZ (a subnormal result becomes a zero of its sign) and
//! DAZ (a subnormal operand counts as a zero of its sign) set, on every thread that
//! computes them. Intel CPUs microcode-assist a multiply with a subnormal operand or
//! result (~140 cycles), and the Gaussians of a head volume hold subnormals at the fringe
//! of the blurred head (docs/decisions.md); flushed, they cost nothing. The values that
//! change lie below 2^−126 ≈ 1.2·10^−38, far from every threshold of the extractor.
//!
//! Every instruction-set build of the blur (AVX-512, AVX, baseline) and the scalar
//! neighbourhood blur run under the same flag, so they give the same bits. The CUDA
//! blur and downsampling mirror it with `mul.rn.ftz.f32` / `add.rn.ftz.f32`: x86 flushes
//! a result that is tiny after rounding (to 24 bits, exponent unbounded), and so does the
//! GPU's `.ftz` (checked on an H200 over products within ±4,000 ulps of 2^−126 and random
//! subnormal sums: no difference; keyfuse-cuda/tests/parity.rs).
//!
//! Elsewhere than x86-64 the flags are not set (the blur keeps IEEE subnormals there), so
//! such a build can differ from an x86-64 one at voxels of magnitude below 2^−126.

/// Runs `f` with subnormals flushed (FTZ and DAZ) on this thread, restoring the caller's
/// MXCSR afterwards (also when `f` panics). `f` is called through a function that is never
/// inlined, so its floating-point operations cannot be moved across the MXCSR writes.
#[inline]
pub(crate) fn flushed<R>(f: impl FnOnce() -> R) -> R {
    #[inline(never)]
    fn call<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
    let _guard = Guard::set();
    call(f)
}

#[cfg(target_arch = "x86_64")]
struct Guard(u32);

#[cfg(target_arch = "x86_64")]
impl Guard {
    /// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6).
    const FTZ_DAZ: u32 = 0x8040;

    fn set() -> Guard {
        let old = read_mxcsr();
        if old & Self::FTZ_DAZ != Self::FTZ_DAZ {
            write_mxcsr(old | Self::FTZ_DAZ);
        }
        Guard(old)
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Guard {
    fn drop(&mut self) {
        if self.0 & Self::FTZ_DAZ != Self::FTZ_DAZ {
            write_mxcsr(self.0);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn read_mxcsr() -> u32 {
    let mut v = 0u32;
    // SAFETY: stores the 32-bit MXCSR into `v`
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack, preserves_flags));
    }
    v
}

#[cfg(target_arch = "x86_64")]
fn write_mxcsr(v: u32) {
    // SAFETY: loads a valid MXCSR (the caller's with FTZ/DAZ changed); no exception mask
    // or rounding bit changes
    unsafe {
        std::arch::asm!("ldmxcsr [{}]", in(reg) &v, options(nostack, preserves_flags));
    }
}

#[cfg(not(target_arch = "x86_64"))]
struct Guard;

#[cfg(not(target_arch = "x86_64"))]
impl Guard {
    fn set() -> Guard {
        Guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn flushes_inside_and_restores_outside() {
        // the control bits (the low six are sticky exception flags)
        let control = || read_mxcsr() & !0x3f;
        let before = control();
        let (tiny, w) = (black_box(1e-38f32), black_box(0.01f32));
        // a subnormal product, and a subnormal operand
        let (p, q) = flushed(|| (black_box(tiny) * black_box(w), black_box(1e-40f32) + 0.0));
        assert_eq!(p.to_bits(), 0);
        assert_eq!(q.to_bits(), 0);
        let p = flushed(|| black_box(-tiny) * black_box(w));
        assert_eq!(p.to_bits(), (-0.0f32).to_bits());
        assert_eq!(control(), before);
        assert!(black_box(tiny) * black_box(w) != 0.0);
        // restored after a panic too
        let r = std::panic::catch_unwind(|| flushed(|| panic!("inside")));
        assert!(r.is_err());
        assert_eq!(control(), before);
    }

    /// A product that is tiny only after rounding to 24 bits with an unbounded exponent is
    /// flushed; one that rounds up to 2^−126 is not (the rule the CUDA `.ftz` follows).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tininess_is_detected_after_rounding() {
        let lim = f32::MIN_POSITIVE;
        // x = (2^24 − 1)/3 · 2^−148, so 0.75·x = 2^−126 − 2^−150 exactly: tiny after
        // rounding (24 bits at exponent −127), though IEEE rounding with subnormals (to a
        // multiple of 2^−149, half to even) gives 2^−126
        let x = black_box((5_592_405.0 * f64::powi(2.0, -148)) as f32);
        let exact = 0.75f64 * x as f64;
        assert_eq!(exact, lim as f64 - f64::powi(2.0, -150));
        assert_eq!(black_box(0.75f32) * x, lim);
        assert_eq!(flushed(|| black_box(0.75f32) * x), 0.0);
        // 0.0023·x' within a quarter ulp below 2^−126 rounds up: kept
        let x = black_box(lim / 0.0023);
        let (w, exact) = (black_box(0.0023f32), 0.0023f32 as f64 * x as f64);
        assert!(exact < lim as f64 && lim as f64 - exact < f64::powi(2.0, -151));
        assert_eq!(flushed(|| w * x), lim);
    }
}
