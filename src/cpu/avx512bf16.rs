//! A hand-written AVX-512 kernel for the commonest mixed-precision step, bf16 parameters,
//! gradients and momentum, plain update (not cautious) rounded to nearest: the narrowing to
//! bf16 is one `vcvtneps2bf16` instead of seven integer instructions. Every other case goes
//! to the generic AVX-512 kernel. It computes the same bits as the generic kernels (the same
//! f32 operations in the same order; `isa.rs`'s test checks): `vcvtneps2bf16` flushes f32
//! subnormals, so lanes holding one are rounded again the generic way.

#![allow(clippy::missing_safety_doc)]

use std::arch::x86_64::*;

use half::bf16;

use super::isa::avx512;
use super::kernel::RoundingKeys;
use crate::update::Coeffs;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn load(ptr: *const u16, mask: __mmask16) -> __m512 {
    let half = _mm256_maskz_loadu_epi16(mask, ptr as *const i16);
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn store(ptr: *mut u16, mask: __mmask16, x: __m512) {
    let mut narrow: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(x));
    // f32 subnormals (exponent 0, mantissa not 0): round to nearest even in integers.
    let bits = _mm512_castps_si512(x);
    let exponent = _mm512_and_si512(bits, _mm512_set1_epi32(0x7f80_0000));
    let mantissa = _mm512_and_si512(bits, _mm512_set1_epi32(0x007f_ffff));
    let subnormal = _mm512_cmpeq_epi32_mask(exponent, _mm512_setzero_si512())
        & _mm512_cmpneq_epi32_mask(mantissa, _mm512_setzero_si512());
    if subnormal != 0 {
        let lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
        let exact = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
        narrow = _mm256_mask_mov_epi16(narrow, subnormal, exact);
    }
    _mm256_mask_storeu_epi16(ptr as *mut i16, mask, narrow);
}

/// `UpdateFn` for (bf16, bf16, bf16) on CPUs with AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")]
pub unsafe fn update(
    p: *mut u8,
    g: *const u8,
    m: *mut u8,
    len: usize,
    k: &Coeffs,
    keys: RoundingKeys,
    first: u64,
) {
    if !k.is_plain() || keys.param.is_some() || keys.momentum.is_some() {
        return avx512::update::<bf16, bf16, bf16>(p, g, m, len, k, keys, first);
    }
    let (p, g, m) = (p as *mut u16, g as *const u16, m as *mut u16);
    let [b1, omb1, b2, omb2] =
        [k.beta1, k.one_minus_beta1, k.beta2, k.one_minus_beta2].map(|v| _mm512_set1_ps(v));
    let [step, keep, scale] = [k.step_size, k.decay_keep, k.grad_scale].map(|v| _mm512_set1_ps(v));
    let sign_bit = _mm512_set1_epi32(0x8000_0000u32 as i32);
    let one = _mm512_set1_epi32(0x3f80_0000);
    let mut i = 0;
    while i < len {
        let n = (len - i).min(16);
        let mask: __mmask16 = if n == 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        };
        let pv = load(p.add(i), mask);
        let gv = _mm512_mul_ps(load(g.add(i), mask), scale);
        let mv = load(m.add(i), mask);
        // The plain path of update::lion_element, operation for operation.
        let c = _mm512_add_ps(_mm512_mul_ps(b1, mv), _mm512_mul_ps(omb1, gv));
        let c_bits = _mm512_castps_si512(c);
        let unit = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(c_bits, sign_bit), one));
        let abs_c = _mm512_castsi512_ps(_mm512_andnot_si512(sign_bit, c_bits));
        let nonzero = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(abs_c, _mm512_setzero_ps());
        let u = _mm512_maskz_mov_ps(nonzero, unit);
        let new_p = _mm512_sub_ps(_mm512_mul_ps(pv, keep), _mm512_mul_ps(step, u));
        let new_m = _mm512_add_ps(_mm512_mul_ps(b2, mv), _mm512_mul_ps(omb2, gv));
        store(p.add(i), mask, new_p);
        store(m.add(i), mask, new_m);
        i += 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::hash32;

    fn coeffs() -> Coeffs {
        Coeffs {
            beta1: 0.9,
            one_minus_beta1: 0.1,
            beta2: 0.99,
            one_minus_beta2: (1.0 - 0.99f64) as f32,
            step_size: 0.01,
            decay_keep: 0.999,
            cautious_factor: 1.0,
            cautious_weight_decay: 0.0,
            grad_scale: 0.5,
        }
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

    #[test]
    fn same_bits_as_the_generic_kernel() {
        if !std::arch::is_x86_feature_detected!("avx512bf16") {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let keys = RoundingKeys {
            param: None,
            momentum: None,
        };
        for len in (0..40).chain([1000, 4099]) {
            let g = tricky(1, len);
            let (mut p1, mut m1) = (tricky(2, len), tricky(3, len));
            let (mut p2, mut m2) = (p1.clone(), m1.clone());
            unsafe {
                update(
                    p1.as_mut_ptr().cast(),
                    g.as_ptr().cast(),
                    m1.as_mut_ptr().cast(),
                    len,
                    &coeffs(),
                    keys,
                    0,
                );
                avx512::update::<bf16, bf16, bf16>(
                    p2.as_mut_ptr().cast(),
                    g.as_ptr().cast(),
                    m2.as_mut_ptr().cast(),
                    len,
                    &coeffs(),
                    keys,
                    0,
                );
            }
            assert_eq!(p1, p2, "params, len {len}");
            assert_eq!(m1, m2, "momentum, len {len}");
        }
    }
}
