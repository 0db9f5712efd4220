//! 8-bit momentum (`LION_DTYPE_Q8`): the format, the encoder and the decoder, and the step of
//! one block. Every engine computes exactly these operations (the spec is in `numerics`'
//! documentation, "8-bit momentum").
//!
//! A tensor of at least `MIN_NUMEL` elements keeps its momentum as one signed code per
//! element (`i8`, -127..=127) and one f32 scale per block of `BLOCK` elements, blocks counted
//! from the tensor's first element (the last one may be shorter). A smaller tensor (biases,
//! norms) keeps f32 momentum. The code map is quadratic ("square"): code `k` of a block with
//! scale `s` means `sign(k) * k^2 * (s / 127^2)`, so that small momentum keeps its precision
//! (the smallest nonzero magnitude is s/16129, against s/127 for linear codes). The scale is
//! the block's largest |m|, kept within [2^-112, the f32 below f32::MAX] (`scale_of`);
//! encoding rounds to the nearest code value (ties toward zero), and a nonzero momentum never
//! encodes to 0, nor decodes to 0 or to an infinity. examples/q8_momentum.rs measured this map against
//! linear codes, small floats and bitsandbytes' dynamic map, nearest and stochastic rounding
//! (BENCHMARKS.md).
//!
//! Only f32 operations with one defined rounding each (IEEE round to nearest even, and the
//! correctly rounded square root; no fused multiply-add, no transcendental function) and
//! integer operations, so that a CUDA twin computes the same bits.
//!
//! MIRROR(q8): src/cuda/lion.cu q8_quantized, q8_unit, q8_decode, q8_abs_bits, q8_scale_of (with
//! the prelude's Q8_MIN_SCALE_BITS and Q8_MAX_SCALE_BITS),
//! q8_encoder, q8_encode_bits (the same codes without a correctly rounded root), q8_decode4,
//! q8_update_chunk and q8_store_block (encode_block); tests/reference.rs check_q8 (the
//! f64 reference)

use crate::config::DType;

/// Elements per block (one scale each); blocks never cross a tensor.
pub(crate) const BLOCK: usize = 256;
/// Tensors with fewer elements keep f32 momentum (bitsandbytes' `min_8bit_size`, 4096).
pub(crate) const MIN_NUMEL: u64 = 4096;
/// The top code's (127) value in units: 127^2.
pub(crate) const MAX_LEVEL: f32 = 16_129.0;
/// The scale of a block whose momentum holds a NaN or an infinity: every element decodes to
/// NaN (the canonical quiet NaN's bits).
pub(crate) const NAN_SCALE_BITS: u32 = 0x7fc0_0000;
/// The smallest scale of a block whose momentum is not all zero: 2^-112. Below it the encoder
/// `16129 / s` overflows (under 16129 / f32::MAX, about 4.7e-35: the block's largest value no
/// longer got code 127) and the unit `s / 16129` is subnormal (its codes' values lost bits,
/// and under about 1.1e-41 decoded to 0, so that a parameter stopped moving where f32
/// momentum, still nonzero, moves it). A block of smaller momentum takes this scale: its
/// codes are small, a nonzero one at least 1, and it decodes to at least 2^-112 / 16129, a
/// normal f32.
pub(crate) const MIN_SCALE_BITS: u32 = 0x0780_0000;
/// The largest scale: the f32 below f32::MAX. f32::MAX's top code decodes to an infinity
/// (`16129 * (f32::MAX / 16129)` rounds up), which made the block NaN at its next step; a
/// block whose largest |m| is f32::MAX takes this one (its codes stay within 127: the
/// encoder's `y` exceeds 16129 by an ulp at most).
pub(crate) const MAX_SCALE_BITS: u32 = 0x7f7f_fffe;

/// Whether a tensor of `numel` elements has 8-bit momentum under state dtype `state`.
#[inline]
pub(crate) fn quantized(state: DType, numel: u64) -> bool {
    state == DType::Q8 && numel >= MIN_NUMEL
}

/// The momentum dtype of a tensor that is not quantized: `state`, or f32 for a small tensor
/// under q8 state.
#[inline]
pub(crate) fn dense_state(state: DType) -> DType {
    if state == DType::Q8 {
        DType::F32
    } else {
        state
    }
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

/// What one unit of a code's square is worth in a block of scale `scale`: `scale / 16129`,
/// once per block.
#[inline(always)]
pub(crate) fn unit(scale: f32) -> f32 {
    scale / MAX_LEVEL
}

/// The momentum a code stands for: `(k * |k|) * unit`. `|k| <= 128`, so `k * |k|` is exact
/// in f32: the integer product's value (CUDA's form), without an integer multiply (a slow
/// one on x86's vector units).
#[inline(always)]
pub(crate) fn decode(code: i8, unit: f32) -> f32 {
    let k = code as f32;
    (k * k.abs()) * unit
}

/// The bits of |x| (as an unsigned integer they order like |x|; a NaN is above +inf).
#[inline(always)]
pub(crate) fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// A block's scale from the largest `abs_bits` of its new momentum: that magnitude kept
/// within [`MIN_SCALE_BITS`, `MAX_SCALE_BITS`], 0 for a block of zeros, or NaN
/// (`NAN_SCALE_BITS`) when it is infinite or NaN.
#[inline(always)]
pub(crate) fn scale_of(max_abs_bits: u32) -> f32 {
    if max_abs_bits >= 0x7f80_0000 {
        f32::from_bits(NAN_SCALE_BITS)
    } else if max_abs_bits == 0 {
        0.0
    } else {
        f32::from_bits(max_abs_bits.clamp(MIN_SCALE_BITS, MAX_SCALE_BITS))
    }
}

/// The encoder's multiplier for a finite scale: `min(16129 / scale, f32::MAX)` (a scale of 0,
/// a block of zeros, gives f32::MAX; `scale_of`'s others do not overflow).
#[inline(always)]
pub(crate) fn encoder(scale: f32) -> f32 {
    let q = MAX_LEVEL / scale;
    if q < f32::MAX {
        q
    } else {
        f32::MAX
    }
}

/// The code of `x` (finite, |x| <= the block's scale) with the block's `encoder`:
/// `y = |x| * encoder` (in units, 0..=16129), `k0 = trunc(sqrt(y))`, and `k = k0 + 1` where
/// `y > k0 * (k0 + 1) + 0.5` (the midpoint of k0^2 and (k0+1)^2: nearest, ties toward zero),
/// else `k0`; a nonzero `x` whose `k` is 0 gets 1 instead, so that no momentum loses its sign
/// (Lion's update is the sign of `b1*m + (1-b1)*g`); the code is `k` with the sign of `x`.
/// sqrt is IEEE's correctly rounded square root: when it rounds up to an integer, `y` is
/// within an f32 ulp of that integer's square and the midpoint test still gives the nearest.
/// The integers k0, k and the midpoint are carried as f32 (exact: all below 2^24), so that
/// the vector loop needs no integer multiply; `integer_form` in the tests is CUDA's form.
#[inline(always)]
pub(crate) fn encode(x: f32, encoder: f32) -> i8 {
    let y = x.abs() * encoder;
    // SAFETY: y is finite and in [0, 16129 * (1 + 2^-22)] (|x| <= scale), so its square root
    // truncates to an i32 in 0..=127 (`as` would add saturation checks that do not vectorize).
    let k0 = unsafe { y.sqrt().to_int_unchecked::<i32>() } as f32;
    let mid = k0 * (k0 + 1.0) + 0.5;
    let k = if y > mid { k0 + 1.0 } else { k0 };
    let k = if x != 0.0 { k.max(1.0) } else { k };
    // k with x's sign (a -0.0 converts to 0).
    let signed = f32::from_bits(k.to_bits() | (x.to_bits() & 0x8000_0000));
    // SAFETY: signed is an integer in -128..=128 (k <= 128).
    unsafe { signed.to_int_unchecked::<i32>() as i8 }
}

/// Encodes one block's new momentum `x` into `codes` and returns its scale: the largest
/// |x| (`scale_of`); every code 0 and a NaN scale when a value is NaN or infinite.
#[inline(always)]
pub(crate) fn encode_block(x: &[f32], codes: &mut [i8]) -> f32 {
    let mut max = 0u32;
    for &v in x {
        max = max.max(abs_bits(v));
    }
    encode_block_with_max(x, codes, max)
}

/// `encode_block` where the caller has the largest `abs_bits` of `x` already.
#[inline(always)]
pub(crate) fn encode_block_with_max(x: &[f32], codes: &mut [i8], max: u32) -> f32 {
    let codes = &mut codes[..x.len()];
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

    /// The nearest code value to y = |x| * 16129 / scale in f64 (either where f32 rounding
    /// could decide), at least 1 for a nonzero x, with x's sign.
    fn f64_codes(y: f64) -> [i32; 2] {
        let k0 = y.sqrt().floor();
        let mid = k0 * k0 + k0 + 0.5;
        let slack = 1e-5 * y;
        let lo = if y > mid + slack { k0 + 1.0 } else { k0 };
        let hi = if y >= mid - slack { k0 + 1.0 } else { k0 };
        [lo.max(1.0) as i32, hi.max(1.0) as i32]
    }

    #[test]
    fn encode_matches_f64() {
        let mut s = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for trial in 0..4000 {
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
            let kept = (amax as f64).max(2f64.powi(-112)); // all these are below the top bound
            assert_eq!(scale as f64, if amax == 0.0 { 0.0 } else { kept });
            let sign = |z: f64| (z > 0.0) as i32 - (z < 0.0) as i32;
            for (&v, &c) in x.iter().zip(&codes) {
                let c = c as i32;
                assert_eq!(sign(c as f64), sign(v as f64), "x {v}: code {c}");
                if v == 0.0 {
                    continue;
                }
                let y = v.abs() as f64 * 16129.0 / kept;
                let [lo, hi] = f64_codes(y);
                assert!(
                    (lo..=hi).contains(&c.abs()),
                    "x {v} scale {amax}: y {y}, code {c}, f64 {lo}..={hi}"
                );
                let back = decode(c as i8, unit(scale)) as f64;
                let exact = (c * c.abs()) as f64 * kept / 16129.0;
                assert!(
                    (back - exact).abs() <= 2.5e-7 * exact.abs(),
                    "{back} {exact}"
                );
            }
        }
    }

    #[test]
    fn extreme_blocks_keep_every_sign_and_decode_finite_and_nonzero() {
        // The smallest and largest momentum f32 holds, each a block's largest and beside
        // smaller ones: every nonzero value keeps its sign through encode and decode, no
        // value decodes to 0 or an infinity, and the codes are the nearest for the scale kept.
        let tiny = f32::from_bits(1); // 1.4e-45
        let blocks: [&[f32]; 5] = [
            &[tiny, -tiny, 0.0, 3.0 * tiny],
            &[1e-38, -2e-41, tiny, 4.7e-35, -1e-36],
            &[f32::MAX, -1.0, -f32::MAX, 1e30, tiny],
            &[f32::from_bits(MAX_SCALE_BITS), -3e38],
            &[
                f32::from_bits(MIN_SCALE_BITS),
                -f32::from_bits(MIN_SCALE_BITS - 1),
            ],
        ];
        for x in blocks {
            let mut codes = vec![0i8; x.len()];
            let scale = encode_block(x, &mut codes);
            let bits = scale.to_bits();
            assert!(
                (MIN_SCALE_BITS..=MAX_SCALE_BITS).contains(&bits),
                "{x:?}: scale {scale}"
            );
            let u = unit(scale);
            for (&v, &c) in x.iter().zip(&codes) {
                let back = decode(c, u);
                assert!(
                    back.is_finite(),
                    "{v} (scale {scale}): code {c} decodes to {back}"
                );
                if v == 0.0 {
                    assert_eq!(c, 0);
                    continue;
                }
                assert!(
                    back != 0.0 && back.is_sign_negative() == v.is_sign_negative(),
                    "{v}: {back}"
                );
                let y = (v.abs() as f64 * 16129.0 / scale as f64).min(16129.0);
                let [lo, hi] = f64_codes(y);
                assert!(
                    (lo..=hi).contains(&(c as i32).abs()),
                    "{v} (scale {scale}): code {c}, f64 {lo}..={hi}"
                );
            }
        }
        // The bounds: f32::MAX's top code decoded to an infinity, and a unit under 2^-126 lost bits.
        assert!(decode(127, unit(f32::MAX)).is_infinite());
        assert!(decode(127, unit(f32::from_bits(MAX_SCALE_BITS))).is_finite());
        assert!(unit(f32::from_bits(MIN_SCALE_BITS)).is_normal());
        assert!(!unit(f32::from_bits(MIN_SCALE_BITS - 0x80_0000)).is_normal());
    }

    /// `encode` in integers, as the encoder's definition states it (src/cuda/lion.cu's
    /// codes are these; its q8_decode is the integer form of `decode`).
    fn integer_form(x: f32, encoder: f32) -> i8 {
        let y = x.abs() * encoder;
        let k0 = y.sqrt() as i32;
        let k = k0 + (y > (k0 * (k0 + 1)) as f32 + 0.5) as i32;
        let k = if k == 0 && x != 0.0 { 1 } else { k };
        (if x < 0.0 { -k } else { k }) as i8
    }

    #[test]
    fn float_form_is_the_integer_form() {
        for k in -128i32..=127 {
            let unit = 0.37f32;
            assert_eq!(decode(k as i8, unit), (k * k.abs()) as f32 * unit);
        }
        // Every y near a code's midpoint or square (the decisions), then a stride through
        // all of 0..=16129 (an exhaustive sweep took 16 s and found no difference).
        let near = (0..=128u32).flat_map(|k| {
            let mid = (k * (k + 1)) as f32 + 0.5;
            let square = (k * k) as f32;
            [mid, square].into_iter().flat_map(|v| {
                (0..64u32).flat_map(move |d| [v.to_bits() + d, v.to_bits().saturating_sub(d)])
            })
        });
        let top = (MAX_LEVEL * (1.0 + 2f32.powi(-22))).to_bits();
        let stride = (0..=top).step_by(101);
        for bits in near.chain(stride).filter(|&b| b <= top) {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                assert_eq!(encode(x, 1.0), integer_form(x, 1.0), "y {x}");
            }
        }
    }

    #[test]
    fn every_code_round_trips_and_midpoints_round_toward_zero() {
        // scale 16129: the encoder is 1, a code k is worth k^2.
        for k in -127i32..=127 {
            let v = decode(k as i8, unit(MAX_LEVEL));
            assert_eq!(v, (k * k.abs()) as f32);
            assert_eq!(encode(v, 1.0) as i32, if k == 0 { 0 } else { k });
        }
        let x = [16129.0, 2.5, -2.6, 6.5, 0.4, -0.4, 0.0, -0.0, 1e-30];
        let mut c = [0i8; 9];
        assert_eq!(encode_block(&x, &mut c), 16129.0);
        assert_eq!(c, [127, 1, -2, 2, 1, -1, 0, 0, 1]);
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
