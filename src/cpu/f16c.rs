//! f16 parameters and gradients through the F16C conversion instructions: the AVX2 and
//! AVX-512 kernels widen a block's f16 arrays into f32 buffers on the stack, run the f32
//! update on them, and narrow the parameters back (`vcvtph2ps` / `vcvtps2ph`, 8 values per
//! instruction, 16 on AVX-512), instead of converting one element at a time in portable integer code
//! (`numerics/convert.rs`), which costs several ns per element.
//!
//! Same bits as the fused kernels, NaN payloads aside: the conversions are exact and round
//! to nearest even like `convert::f16_bits_to_f32` / `f16_bits_nearest` (tested over every
//! f16 and a million f32 values), the update is the same function on the same f32 values, and
//! stochastic rounding moves the value onto the f16 grid with the same draw before the
//! narrowing, as `Elem::from_f32_stochastic` does.

#![allow(clippy::missing_safety_doc)]

use std::arch::x86_64::*;

use super::elem::{Elem, Rounder, Stochastic};
use super::kernel::{update_chunk, RoundingKeys};
use super::prefetch;
use crate::config::DType;
use crate::numerics::convert::{f16_bits_nearest, f16_bits_to_f32, f16_grid_stochastic};
use crate::numerics::rng::Key;
use crate::numerics::update::Coeffs;

// MIRROR(conversions): src/numerics/convert.rs f16_bits_to_f32 (widen), f16_bits_nearest
// (narrow)

/// f16 bits -> f32, exactly.
#[target_feature(enable = "avx,f16c")]
#[inline]
pub(crate) unsafe fn widen(from: *const u16, to: *mut f32, n: usize) {
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(from.add(i) as *const __m128i);
        _mm256_storeu_ps(to.add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    while i < n {
        *to.add(i) = f16_bits_to_f32(*from.add(i));
        i += 1;
    }
}

/// f32 -> f16 bits, round to nearest even.
#[target_feature(enable = "avx,f16c")]
#[inline]
pub(crate) unsafe fn narrow(from: *const f32, to: *mut u16, n: usize) {
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(from.add(i));
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
        _mm_storeu_si128(to.add(i) as *mut __m128i, h);
        i += 8;
    }
    while i < n {
        *to.add(i) = f16_bits_nearest(*from.add(i));
        i += 1;
    }
}

/// `widen`, 16 values per instruction (AVX-512 CPUs).
#[target_feature(enable = "avx512f,avx,f16c")]
#[inline]
pub(crate) unsafe fn widen16(from: *const u16, to: *mut f32, n: usize) {
    let mut i = 0;
    while i + 16 <= n {
        let h = _mm256_loadu_si256(from.add(i) as *const __m256i);
        _mm512_storeu_ps(to.add(i), _mm512_cvtph_ps(h));
        i += 16;
    }
    widen(from.add(i), to.add(i), n - i);
}

/// `narrow`, 16 values per instruction (AVX-512 CPUs).
#[target_feature(enable = "avx512f,avx,f16c")]
#[inline]
pub(crate) unsafe fn narrow16(from: *const f32, to: *mut u16, n: usize) {
    let mut i = 0;
    while i + 16 <= n {
        let x = _mm512_loadu_ps(from.add(i));
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        _mm256_storeu_si256(to.add(i) as *mut __m256i, h);
        i += 16;
    }
    narrow(from.add(i), to.add(i), n - i);
}

/// Whether `update` should handle this combination: an f16 parameter or gradient array.
pub(crate) fn wanted<P: Elem, G: Elem>() -> bool {
    P::DTYPE == DType::F16 || G::DTYPE == DType::F16
}

/// The update of `len` elements through f32 buffers (see the module's comment). For CPUs
/// with F16C (the AVX2 and AVX-512 kernels call it) and combinations that `wanted` accepts;
/// `LANES` = 16 converts with the AVX-512 instructions, 8 with the 256-bit ones.
#[inline(always)]
pub(crate) unsafe fn update<P: Elem, G: Elem, S: Elem, const LANES: usize>(
    p: *mut u8,
    g: *const u8,
    m: *mut u8,
    len: usize,
    k: &Coeffs,
    keys: RoundingKeys,
    first_index: u64,
) {
    // An f16 array is here, so the kernel is not f32-only.
    let ahead = prefetch::settings(false);
    let (sp, sg, sm) = (size_of::<P>(), size_of::<G>(), size_of::<S>());
    // Two blocks of f32 on the stack: 8 KiB.
    let mut p32 = [0f32; prefetch::CPU_BLOCK_ELEMENTS];
    let mut g32 = [0f32; prefetch::CPU_BLOCK_ELEMENTS];
    for (done, n) in prefetch::blocks(len) {
        let first = first_index + done as u64;
        let (p, g, m) = (p.add(done * sp), g.add(done * sg), m.add(done * sm));
        ahead.arrays(&[(p, sp), (g, sg), (m, sm)], n);
        to_f32::<P, LANES>(p, &mut p32[..n]);
        to_f32::<G, LANES>(g, &mut g32[..n]);
        let only_momentum = RoundingKeys {
            param: None,
            momentum: keys.momentum,
        };
        update_chunk::<f32, f32, S>(
            &mut p32[..n],
            &g32[..n],
            std::slice::from_raw_parts_mut(m as *mut S, n),
            k,
            only_momentum,
            first,
        );
        from_f32::<P, LANES>(&mut p32[..n], p, keys.param, first);
    }
}

#[inline(always)]
unsafe fn to_f32<T: Elem, const LANES: usize>(from: *const u8, to: &mut [f32]) {
    if T::DTYPE == DType::F16 && LANES == 16 {
        widen16(from as *const u16, to.as_mut_ptr(), to.len());
    } else if T::DTYPE == DType::F16 {
        widen(from as *const u16, to.as_mut_ptr(), to.len());
    } else {
        let from = std::slice::from_raw_parts(from as *const T, to.len());
        for (t, f) in to.iter_mut().zip(from) {
            *t = f.to_f32();
        }
    }
}

/// Writes the block back in `T`, rounded as the fused kernels round (`key`: stochastic).
// MIRROR(rounding): src/cpu/elem.rs Elem::from_f32_stochastic (f16: onto the grid, then to
// nearest)
#[inline(always)]
unsafe fn from_f32<T: Elem, const LANES: usize>(
    values: &mut [f32],
    to: *mut u8,
    key: Option<Key>,
    first: u64,
) {
    if T::DTYPE == DType::F16 {
        if let Some(key) = key {
            for (i, x) in values.iter_mut().enumerate() {
                *x = f16_grid_stochastic(*x, key.bits(first + i as u64));
            }
        }
        if LANES == 16 {
            narrow16(values.as_ptr(), to as *mut u16, values.len());
        } else {
            narrow(values.as_ptr(), to as *mut u16, values.len());
        }
    } else {
        let to = std::slice::from_raw_parts_mut(to as *mut T, values.len());
        for (i, (t, &x)) in to.iter_mut().zip(values.iter()).enumerate() {
            *t = match key {
                Some(key) => Stochastic(key).round(x, first + i as u64),
                None => T::from_f32_nearest(x),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::rng::hash32;

    type Widen = unsafe fn(*const u16, *mut f32, usize);
    type Narrow = unsafe fn(*const f32, *mut u16, usize);

    /// Both conversions, the 256-bit and the AVX-512 ones. The tests that use them are
    /// #[ignore]d, so that a CPU without F16C and AVX-512F skips them instead of passing them
    /// empty; scripts/test.sh runs them where the CPU has both, and asked for elsewhere they fail.
    fn conversions() -> Vec<(&'static str, Widen, Narrow)> {
        assert!(
            std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("avx512f"),
            "this CPU lacks F16C or AVX-512F"
        );
        vec![("8 lanes", widen, narrow), ("16 lanes", widen16, narrow16)]
    }

    fn same(a: u32, b: u32) -> bool {
        let nan = |x: u32| f32::from_bits(x).is_nan();
        a == b || (nan(a) && nan(b))
    }

    #[test]
    #[ignore = "needs F16C and AVX-512F (scripts/test.sh runs it where the CPU has them)"]
    fn widening_matches_the_portable_conversion_for_every_f16() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        for (name, widen, _) in conversions() {
            let mut out = vec![0f32; all.len()];
            // Odd lengths, so the narrower loops and the scalar tail run too.
            let split = all.len() - 11;
            unsafe { widen(all.as_ptr(), out.as_mut_ptr(), split) };
            unsafe { widen(all[split..].as_ptr(), out[split..].as_mut_ptr(), 11) };
            for (&h, &x) in all.iter().zip(&out) {
                let want = f16_bits_to_f32(h).to_bits();
                let got = x.to_bits();
                assert!(same(got, want), "{name}, {h:#06x}: {got:#x} vs {want:#x}");
            }
        }
    }

    #[test]
    #[ignore = "needs F16C and AVX-512F (scripts/test.sh runs it where the CPU has them)"]
    fn narrowing_matches_the_portable_rounding() {
        // Random bit patterns, values near f16's range, ties, and the edges.
        let mut values: Vec<f32> = Vec::new();
        let mut s = 7u32;
        for i in 0..1_000_000u32 {
            s = hash32(s ^ i);
            values.push(match i % 4 {
                0 => f32::from_bits(s),
                1 => f32::from_bits(s) * 1e-35,
                // f16 values, and (below) the midpoints between neighbours.
                2 => f16_bits_to_f32((s >> 16) as u16),
                _ => {
                    let h = f16_bits_to_f32((s >> 16) as u16 & 0x7bff);
                    let next = f16_bits_to_f32(((s >> 16) as u16 & 0x7bff) + 1);
                    (h + next) * 0.5
                }
            });
        }
        values.extend([
            0.0,
            -0.0,
            65504.0,
            65519.99,
            65520.0,
            -65520.0,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            2.99e-8,
            f32::MIN_POSITIVE,
            1e-45,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        let nan = |b: u16| b & 0x7c00 == 0x7c00 && b & 0x3ff != 0;
        for (name, _, narrow) in conversions() {
            let mut out = vec![0u16; values.len()];
            unsafe { narrow(values.as_ptr(), out.as_mut_ptr(), values.len()) };
            for (&x, &h) in values.iter().zip(&out) {
                let want = f16_bits_nearest(x);
                assert!(
                    h == want || (nan(h) && nan(want)),
                    "{name}, {x:e}: {h:#06x} vs {want:#06x}"
                );
            }
        }
    }

    /// A host may run with denormals-are-zero and flush-to-zero set (games, audio, some
    /// trainers): the conversions must still be exact, as the portable ones are.
    #[test]
    #[ignore = "needs F16C and AVX-512F (scripts/test.sh runs it where the CPU has them)"]
    #[allow(deprecated)] // _mm_getcsr/_mm_setcsr: the way to set MXCSR from Rust
    fn conversions_ignore_the_hosts_denormal_flags() {
        let subnormals: Vec<u16> = (1..0x400u16).chain(0x8001..0x8400).collect();
        for (name, widen, narrow) in conversions() {
            let mut wide = vec![0f32; subnormals.len()];
            let mut back = vec![0u16; subnormals.len()];
            let saved = unsafe { _mm_getcsr() };
            unsafe {
                _mm_setcsr(saved | 0x8040); // FTZ | DAZ
                widen(subnormals.as_ptr(), wide.as_mut_ptr(), subnormals.len());
                narrow(wide.as_ptr(), back.as_mut_ptr(), wide.len());
                _mm_setcsr(saved);
            }
            for (i, &h) in subnormals.iter().enumerate() {
                let want = f16_bits_to_f32(h).to_bits();
                assert_eq!(wide[i].to_bits(), want, "{name}, {h:#06x}");
                assert_eq!(back[i], h, "{name}, {h:#06x} round trip");
            }
        }
    }
}
