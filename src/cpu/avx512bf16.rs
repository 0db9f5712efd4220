//! A hand-written AVX-512 kernel for the commonest mixed-precision step, bf16 parameters,
//! gradients and momentum, plain update (not cautious) rounded to nearest. Where the data
//! comes from cache this step is bound by instructions, not memory, so the kernel is written
//! for few of them: 36 vector instructions per 32 elements in its loop (`cargo bench --bench
//! cpu_step -- --in-cache` gives 0.19 ns per element on a Zen 4 core, 0.44 for the generic
//! AVX-512 kernel):
//!
//! - one 64-byte load per array, split into the even and odd elements as f32 with one shift
//!   and one `and` (no cross-lane widening);
//! - sign(c) * step_size as one bit operation, masked where c is zero or NaN;
//! - the narrowing of both halves in one `vcvtne2ps2bf16` and one `vpermw` back into order;
//! - no multiply by a gradient scale of 1.
//!
//! It computes the same bits as the generic kernels, NaN payloads aside (the same f32
//! operations in the same order; the tests below check). `vcvtne2ps2bf16` flushes f32
//! subnormals, so a group of 32 that holds one is narrowed again the generic way.

#![allow(clippy::missing_safety_doc)]

use std::arch::x86_64::*;

use half::bf16;

use super::isa::avx512;
use super::kernel::RoundingKeys;
use super::prefetch;
use crate::numerics::convert::bf16_bits_nearest;
use crate::numerics::update::Coeffs;

// MIRROR(conversions): src/numerics/convert.rs bf16_bits_to_f32 (widen), bf16_bits_nearest
// (narrow)

/// 32 bf16 as f32: (elements 0, 2, .., 30; elements 1, 3, .., 31).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
#[inline]
unsafe fn widen(x: __m512i) -> (__m512, __m512) {
    let even = _mm512_slli_epi32(x, 16);
    let odd = _mm512_and_si512(x, _mm512_set1_epi32(0xffff_0000u32 as i32));
    (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
}

/// The inverse of `widen` for the lanes that are not f32 subnormals, rounded to nearest
/// even as `bf16_bits_nearest` does.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
#[inline]
unsafe fn narrow(even: __m512, odd: __m512, interleave: __m512i) -> __m512i {
    // Words 0..16 from `even`, 16..32 from `odd`; the permutation puts each back in place.
    let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(odd, even));
    _mm512_permutexvar_epi16(interleave, halves)
}

/// Lanes that `vcvtne2ps2bf16` would flush: f32 subnormals.
#[target_feature(enable = "avx512f,avx512dq")]
#[inline]
unsafe fn subnormal(x: __m512) -> __mmask16 {
    _mm512_fpclass_ps_mask::<0x20>(x)
}

/// Stores 32 elements narrowed one at a time: the rare groups that hold an f32 subnormal.
#[cold]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn store_exactly(to: *mut i16, mask: __mmask32, even: __m512, odd: __m512) {
    let (mut e, mut o) = ([0f32; 16], [0f32; 16]);
    _mm512_storeu_ps(e.as_mut_ptr(), even);
    _mm512_storeu_ps(o.as_mut_ptr(), odd);
    for j in 0..32 {
        if mask & (1 << j) != 0 {
            let x = if j % 2 == 0 { e[j / 2] } else { o[j / 2] };
            *to.add(j) = bf16_bits_nearest(x) as i16;
        }
    }
}

/// The step's coefficients, broadcast.
struct Constants {
    b1: __m512,
    omb1: __m512,
    b2: __m512,
    omb2: __m512,
    keep: __m512,
    scale: __m512,
    sign_bit: __m512i,
    step: __m512i,
    interleave: __m512i,
}

impl Constants {
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn new(k: &Coeffs) -> Constants {
        Constants {
            b1: _mm512_set1_ps(k.beta1),
            omb1: _mm512_set1_ps(k.one_minus_beta1),
            b2: _mm512_set1_ps(k.beta2),
            omb2: _mm512_set1_ps(k.one_minus_beta2),
            keep: _mm512_set1_ps(k.decay_keep),
            scale: _mm512_set1_ps(k.grad_scale),
            sign_bit: _mm512_set1_epi32(0x8000_0000u32 as i32),
            // step_size is +0 or more (`update` checks), so step_size * ±1 is its bits with
            // c's sign, and step_size * 0 is +0, which leaves p * keep as it is.
            step: _mm512_set1_epi32(k.step_size.to_bits() as i32),
            // Output word 2j is even lane j (word j of the packed halves), word 2j+1 is odd
            // lane j (word 16+j).
            interleave: _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            ),
        }
    }
}

/// The plain path of `update::lion_element`, operation for operation, on 16 lanes:
/// (new p, new m).
// MIRROR(update): src/numerics/update.rs lion_element (PLAIN)
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
#[inline]
unsafe fn half<const SCALED: bool>(
    c: &Constants,
    p: __m512,
    g: __m512,
    m: __m512,
) -> (__m512, __m512) {
    let g = if SCALED { _mm512_mul_ps(g, c.scale) } else { g };
    let mix = _mm512_add_ps(_mm512_mul_ps(c.b1, m), _mm512_mul_ps(c.omb1, g));
    // mix != 0 and not NaN: where sign(mix) is ±1.
    let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(mix, _mm512_setzero_ps());
    // (mix & sign) | step = step_size * sign(mix); imm 0xEA is (A & B) | C.
    let signed_step = _mm512_castsi512_ps(_mm512_ternarylogic_epi32::<0xEA>(
        _mm512_castps_si512(mix),
        c.sign_bit,
        c.step,
    ));
    let decayed = _mm512_mul_ps(p, c.keep);
    let new_p = _mm512_mask_sub_ps(decayed, nonzero, decayed, signed_step);
    let new_m = _mm512_add_ps(_mm512_mul_ps(c.b2, m), _mm512_mul_ps(c.omb2, g));
    (new_p, new_m)
}

/// Updates 32 elements (fewer where `mask` says so). `SCALED`: the gradient scale is not 1
/// (multiplying by 1 changes no bits, so it is left out when it is 1).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
#[inline]
unsafe fn group<const SCALED: bool>(
    c: &Constants,
    p: *mut i16,
    g: *const i16,
    m: *mut i16,
    mask: __mmask32,
) {
    let (p_even, p_odd) = widen(_mm512_maskz_loadu_epi16(mask, p));
    let (g_even, g_odd) = widen(_mm512_maskz_loadu_epi16(mask, g));
    let (m_even, m_odd) = widen(_mm512_maskz_loadu_epi16(mask, m));
    let (p_even, m_even) = half::<SCALED>(c, p_even, g_even, m_even);
    let (p_odd, m_odd) = half::<SCALED>(c, p_odd, g_odd, m_odd);
    let flushed = subnormal(p_even) | subnormal(p_odd) | subnormal(m_even) | subnormal(m_odd);
    if flushed == 0 {
        _mm512_mask_storeu_epi16(p, mask, narrow(p_even, p_odd, c.interleave));
        _mm512_mask_storeu_epi16(m, mask, narrow(m_even, m_odd, c.interleave));
    } else {
        store_exactly(p, mask, p_even, p_odd);
        store_exactly(m, mask, m_even, m_odd);
    }
}

/// `UpdateFn` for (bf16, bf16, bf16) on CPUs with AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
pub(crate) unsafe fn update(
    p: *mut u8,
    g: *const u8,
    m: *mut u8,
    len: usize,
    k: &Coeffs,
    keys: RoundingKeys,
    first: u64,
) {
    // sign(c) * step_size as a bit operation needs a finite step size with its sign bit clear
    // (a step size that overflowed f32 makes 0 * inf = NaN in the generic kernel, and an lr
    // of -0.0, which is accepted, turns the signs of zeros).
    let plain = k.is_plain() && keys.param.is_none() && keys.momentum.is_none();
    if !plain || !k.step_size.is_finite() || k.step_size.is_sign_negative() {
        return avx512::update::<bf16, bf16, bf16>(p, g, m, len, k, keys, first);
    }
    let (p, g, m) = (p as *mut i16, g as *const i16, m as *mut i16);
    let c = Constants::new(k);
    if k.grad_scale == 1.0 {
        groups::<false>(&c, p, g, m, len)
    } else {
        groups::<true>(&c, p, g, m, len)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
#[inline]
unsafe fn groups<const SCALED: bool>(
    c: &Constants,
    p: *mut i16,
    g: *const i16,
    m: *mut i16,
    len: usize,
) {
    let full = len / 32 * 32;
    let ahead = prefetch::settings(false);
    for i in (0..full).step_by(32) {
        // A group is one 64-byte line of each array.
        if ahead.distance != 0 && (2 * i) & (ahead.stride - 1) == 0 {
            ahead.line(p.add(i) as *const u8);
            ahead.line(g.add(i) as *const u8);
            ahead.line(m.add(i) as *const u8);
        }
        group::<SCALED>(c, p.add(i), g.add(i), m.add(i), !0);
    }
    if full < len {
        let mask = (1u32 << (len - full)) - 1;
        group::<SCALED>(c, p.add(full), g.add(full), m.add(full), mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::isa::UpdateFn;
    use crate::numerics::rng::hash32;

    /// Coefficient sets that take each path: scaled and unscaled gradients, no decay, a zero
    /// step, and step sizes of inf and -0.0 (the generic kernel's fallback).
    fn coefficient_sets() -> Vec<Coeffs> {
        let base = Coeffs {
            beta1: 0.9,
            one_minus_beta1: 0.1,
            beta2: 0.99,
            one_minus_beta2: (1.0 - 0.99f64) as f32,
            step_size: 0.01,
            decay_keep: 0.999,
            cautious_factor: 1.0,
            cautious_weight_decay: 0.0,
            grad_scale: 0.5,
        };
        vec![
            base,
            Coeffs {
                grad_scale: 1.0,
                ..base
            },
            Coeffs {
                decay_keep: 1.0,
                grad_scale: 1.0,
                ..base
            },
            Coeffs {
                step_size: 0.0,
                ..base
            },
            Coeffs {
                step_size: f32::INFINITY,
                ..base
            },
            Coeffs {
                step_size: -0.0,
                ..base
            },
        ]
    }

    /// bf16 bits with every NaN made one NaN: which operand's NaN an f32 add or multiply
    /// passes on is not fixed (LLVM may swap the operands of either), so payloads may differ.
    fn canonical(bits: Vec<u16>) -> Vec<u16> {
        let nan = |b: u16| b & 0x7f80 == 0x7f80 && b & 0x7f != 0;
        bits.into_iter()
            .map(|b| if nan(b) { 0x7fc0 } else { b })
            .collect()
    }

    /// bf16 bits that include zeros, subnormals of f32, huge values, inf and NaN.
    fn tricky(seed: u32, n: usize) -> Vec<u16> {
        let specials = [
            0x0000u16, 0x8000, 0x0001, 0x807f, 0x0040, 0x7f7f, 0xff7f, 0x7f80, 0xff80, 0x7fc0,
            0x7f81, 0x3f80,
        ];
        (0..n)
            .map(|i| {
                let r = hash32(seed ^ (i as u32).wrapping_mul(0x9e37_79b9));
                if r.is_multiple_of(4) {
                    specials[(r >> 8) as usize % specials.len()]
                } else {
                    (r >> 16) as u16
                }
            })
            .collect()
    }

    /// Runs this kernel and the generic one on copies of (p, m) with the same g: their
    /// (p, m) afterwards, NaNs made one.
    fn both(k: &Coeffs, p: &[u16], g: &[u16], m: &[u16]) -> [(Vec<u16>, Vec<u16>); 2] {
        let keys = RoundingKeys {
            param: None,
            momentum: None,
        };
        let kernels: [UpdateFn; 2] = [update, avx512::update::<bf16, bf16, bf16>];
        kernels.map(|kernel| {
            let (mut p, mut m) = (p.to_vec(), m.to_vec());
            unsafe {
                kernel(
                    p.as_mut_ptr().cast(),
                    g.as_ptr().cast(),
                    m.as_mut_ptr().cast(),
                    g.len(),
                    k,
                    keys,
                    0,
                )
            };
            (canonical(p), canonical(m))
        })
    }

    /// The tests below are #[ignore]d, so that a CPU without AVX512-BF16 skips them instead of
    /// passing them empty; scripts/test.sh runs them where the CPU has it.
    fn require_avx512bf16() {
        assert!(
            std::arch::is_x86_feature_detected!("avx512bf16"),
            "this CPU has no AVX512-BF16"
        );
    }

    #[test]
    #[ignore = "needs AVX512-BF16 (scripts/test.sh runs it where the CPU has it)"]
    fn same_bits_as_the_generic_kernel() {
        require_avx512bf16();
        for (set, k) in coefficient_sets().iter().enumerate() {
            for len in (0..70).chain([1000, 4099]) {
                let [ours, generic] = both(k, &tricky(2, len), &tricky(1, len), &tricky(3, len));
                assert_eq!(ours, generic, "coefficients {set}, len {len}");
            }
        }
    }

    /// Groups without subnormals take the vector narrowing (the tricky data above has
    /// subnormals nearly everywhere): ordinary values, odd lengths.
    #[test]
    #[ignore = "needs AVX512-BF16 (scripts/test.sh runs it where the CPU has it)"]
    fn same_bits_on_ordinary_values() {
        require_avx512bf16();
        let ordinary = |seed: u32, n: usize| -> Vec<u16> {
            (0..n)
                .map(|i| {
                    let r = hash32(seed ^ (i as u32).wrapping_mul(0x85eb_ca6b));
                    // Exponents 2^-20 .. 2^11, either sign.
                    let exponent = 107 + (r >> 8) % 32;
                    ((r & 0x8000) | (exponent << 7) | (r & 0x7f)) as u16
                })
                .collect()
        };
        for k in coefficient_sets() {
            for len in [31, 32, 33, 95, 16384 + 7] {
                let [ours, generic] =
                    both(&k, &ordinary(2, len), &ordinary(1, len), &ordinary(3, len));
                assert_eq!(ours, generic, "len {len}, {k:?}");
            }
        }
    }
}
