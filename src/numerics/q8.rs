//! 8-bit momentum (`LION_DTYPE_Q8`): the format, the encoder and the decoder, and the step of
//! one block. Every engine computes exactly these operations (the spec is in `numerics`'
//! documentation, "8-bit momentum").
//!
//! A tensor of at least `MIN_NUMEL` elements keeps its momentum as one signed code per
//! element (`i8`, -127..=127) and one f32 scale per block of `BLOCK` elements, blocks counted
//! from the tensor's first element (the last one may be shorter). A smaller tensor (biases,
//! norms) keeps f32 momentum. Code `q` of a block with scale `s` means `q * (s / 127)`.
//!
//! Only f32 operations with one defined rounding each (IEEE round to nearest even; no fused
//! multiply-add, no transcendental function) and integer operations, so that a CUDA twin
//! computes the same bits.
//!
//! MIRROR(q8): src/cuda/lion.cu q8 (pending: the CUDA engine refuses q8 state until its twin
//! exists; `mirrors.rs` accepts this tag's missing twin only while lion.cu has no q8 code)

use crate::config::DType;

/// Elements per block (one scale each); blocks never cross a tensor.
pub(crate) const BLOCK: usize = 256;
/// Tensors with fewer elements keep f32 momentum (bitsandbytes' `min_8bit_size`, 4096).
pub(crate) const MIN_NUMEL: u64 = 4096;
/// The largest code magnitude.
pub(crate) const MAX_CODE: f32 = 127.0;
/// 1.5 * 2^23: `(y + ROUNDER) - ROUNDER` rounds |y| < 2^22 to an integer, ties to even, in
/// two f32 additions (no rounding-mode instruction needed, the same on every device).
pub(crate) const ROUNDER: f32 = 12_582_912.0;
/// The scale of a block whose momentum holds a NaN or an infinity: every element decodes to
/// NaN (the canonical quiet NaN's bits).
pub(crate) const NAN_SCALE_BITS: u32 = 0x7fc0_0000;

/// Whether a tensor of `numel` elements has 8-bit momentum under state dtype `state`.
#[inline]
pub(crate) fn quantized(state: DType, numel: u64) -> bool {
    state == DType::Q8 && numel >= MIN_NUMEL
}

/// Blocks (and scales) of a quantized tensor of `numel` elements.
#[inline]
pub(crate) fn blocks(numel: u64) -> u64 {
    numel.div_ceil(BLOCK as u64)
}

/// Bytes of one tensor's momentum in a checkpoint (and in `Engine::read_state`): `numel`
/// elements of an f32 or bf16 state; for q8, `numel` codes then `blocks` little-endian f32
/// scales, or `4 * numel` bytes of f32 for a small tensor.
pub(crate) fn tensor_state_bytes(state: DType, numel: u64) -> Option<u64> {
    if quantized(state, numel) {
        numel.checked_add(blocks(numel) * 4)
    } else if state == DType::Q8 {
        numel.checked_mul(4)
    } else {
        numel.checked_mul(state.size() as u64)
    }
}

/// The sum of `tensor_state_bytes` over tensors of the given sizes.
pub(crate) fn state_bytes(state: DType, numels: impl Iterator<Item = u64>) -> Option<u64> {
    numels
        .map(|n| tensor_state_bytes(state, n))
        .try_fold(0u64, |a, b| a.checked_add(b?))
}

/// What one code is worth in a block of scale `scale`: `scale / 127`, once per block.
#[inline(always)]
pub(crate) fn unit(scale: f32) -> f32 {
    scale / MAX_CODE
}

/// The momentum a code stands for: `code * unit`.
#[inline(always)]
pub(crate) fn decode(code: i8, unit: f32) -> f32 {
    code as f32 * unit
}

/// The bits of |x| (as an unsigned integer they order like |x|; a NaN is above +inf).
#[inline(always)]
pub(crate) fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// A block's scale from the largest `abs_bits` of its new momentum: that magnitude, or NaN
/// (`NAN_SCALE_BITS`) when it is infinite or NaN.
#[inline(always)]
pub(crate) fn scale_of(max_abs_bits: u32) -> f32 {
    if max_abs_bits >= 0x7f80_0000 {
        f32::from_bits(NAN_SCALE_BITS)
    } else {
        f32::from_bits(max_abs_bits)
    }
}

/// The encoder's multiplier for a finite scale: `min(127 / scale, f32::MAX)` (a scale of 0,
/// or one so small that the quotient overflows, gives f32::MAX).
#[inline(always)]
pub(crate) fn encoder(scale: f32) -> f32 {
    let q = MAX_CODE / scale;
    if q < f32::MAX {
        q
    } else {
        f32::MAX
    }
}

/// The code of `x` (finite, |x| <= the block's scale) with the block's `encoder`:
/// `y = x * encoder`, rounded to the nearest integer (ties to even) by `ROUNDER`; a nonzero
/// `x` whose code would be 0 gets ±1 instead, so that no momentum loses its sign (Lion's
/// update is the sign of `b1*m + (1-b1)*g`).
#[inline(always)]
pub(crate) fn encode(x: f32, encoder: f32) -> i8 {
    let y = x * encoder;
    let r = (y + ROUNDER) - ROUNDER;
    let keep_sign = f32::from_bits((x.to_bits() & 0x8000_0000) | 0x3f80_0000);
    let r = if r == 0.0 && x != 0.0 { keep_sign } else { r };
    r as i8
}

/// Encodes one block's new momentum `x` into `codes` and returns its scale: the largest
/// |x|; every code 0 and a NaN scale when a value is NaN or infinite.
#[inline(always)]
pub(crate) fn encode_block(x: &[f32], codes: &mut [i8]) -> f32 {
    let codes = &mut codes[..x.len()];
    let mut max = 0u32;
    for &v in x {
        max = max.max(abs_bits(v));
    }
    let scale = scale_of(max);
    if max >= 0x7f80_0000 {
        codes.fill(0);
        return scale;
    }
    let e = encoder(scale);
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = encode(v, e);
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoder against f64: the nearest code to x * 127 / scale (either one where f32
    /// rounding could decide), with the sign kept.
    #[test]
    fn encode_matches_f64() {
        let mut s = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for trial in 0..2000 {
            let n = [1, 7, 255, 256][trial % 4];
            let mag = 10f32.powi((next() % 60) as i32 - 40);
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    let u = (next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    // Some exact zeros and some tiny values beside large ones.
                    match next() % 16 {
                        0 => 0.0,
                        1 => u * mag * 1e-6,
                        _ => u * mag,
                    }
                })
                .collect();
            let mut codes = vec![0i8; n];
            let scale = encode_block(&x, &mut codes);
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(scale, amax);
            for (&v, &c) in x.iter().zip(&codes) {
                let y = v as f64 * 127.0 / amax as f64;
                let (lo, hi) = (y - 1e-5 * y.abs(), y + 1e-5 * y.abs());
                let ok = |k: f64| k >= lo.round() - 0.0 && k <= hi.round();
                let c = c as f64;
                if (127.0 / amax).is_infinite() {
                    // A scale below 127 / f32::MAX: the encoder saturates, signs are kept.
                    let sign = |z: f64| (z > 0.0) as i8 - (z < 0.0) as i8;
                    assert_eq!(sign(c), sign(v as f64));
                    continue;
                }
                if v == 0.0 {
                    assert_eq!(c, 0.0);
                } else if y.abs() < 0.5 + 1e-5 {
                    assert_eq!(c, v.signum() as f64, "x {v} scale {amax}");
                } else {
                    assert!(ok(c) || (c - y).abs() <= 0.5 + 1e-5, "x {v} y {y} code {c}");
                }
                let back = decode(c as i8, unit(scale)) as f64;
                assert!(
                    (back - v as f64).abs() <= amax as f64 / 127.0 * 0.5 * (1.0 + 1e-5)
                        || y.abs() < 0.5 + 1e-5
                );
            }
        }
    }

    #[test]
    fn ties_round_to_even() {
        // scale 127: the encoder is 1, codes are x rounded.
        let x = [127.0, 2.5, -2.5, 3.5, 0.5, -0.5, 0.0, -0.0, 1e-30];
        let mut c = [0i8; 9];
        assert_eq!(encode_block(&x, &mut c), 127.0);
        assert_eq!(c, [127, 2, -2, 4, 1, -1, 0, 0, 1]);
    }

    #[test]
    fn non_finite_blocks_decode_to_nan() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let x = [1.0, bad, -3.0];
            let mut c = [5i8; 3];
            let s = encode_block(&x, &mut c);
            assert_eq!(s.to_bits(), NAN_SCALE_BITS);
            assert_eq!(c, [0, 0, 0]);
            assert!(decode(0, unit(s)).is_nan());
        }
        let mut c = [5i8; 2];
        assert_eq!(encode_block(&[0.0, -0.0], &mut c), 0.0);
        assert_eq!(c, [0, 0]);
        assert_eq!(decode(0, unit(0.0)), 0.0);
    }

    #[test]
    fn tiny_scales_keep_signs() {
        let x = [f32::from_bits(1), -f32::from_bits(1), 0.0];
        let mut c = [0i8; 3];
        let s = encode_block(&x, &mut c);
        assert_eq!(s, f32::from_bits(1));
        assert_eq!(c, [1, -1, 0]);
    }

    #[test]
    fn sizes() {
        assert_eq!(tensor_state_bytes(DType::Q8, 4095), Some(4 * 4095));
        assert_eq!(tensor_state_bytes(DType::Q8, 4096), Some(4096 + 16 * 4));
        assert_eq!(tensor_state_bytes(DType::Q8, 4097), Some(4097 + 17 * 4));
        assert_eq!(tensor_state_bytes(DType::BF16, 5), Some(10));
        assert_eq!(
            state_bytes(DType::Q8, [1u64, 1 << 20].into_iter()),
            Some(4 + (1 << 20) + (1 << 12) * 4)
        );
    }
}
