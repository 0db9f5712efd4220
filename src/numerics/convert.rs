//! The conversions between f32 and the 16-bit storage types, with their rounding: the bit
//! recipes every engine uses (the CPU kernels through `cpu::elem::Elem`, the F16C and
//! AVX512-BF16 paths for their scalar cases and checks, the checkpoint's f32 -> bf16, and the
//! CUDA kernels in their own copy). Branch-free integer and float arithmetic only, so that a
//! loop over them vectorizes, with no lookup tables and no dependence on the host's denormal
//! flags.
//!
//! MIRROR(conversions): src/cuda/lion.cu bf16_to_f32, bf16_nearest, bf16_stochastic,
//! f16_to_f32, f16_nearest, f16_grid_stochastic; src/cpu/f16c.rs widen, narrow (F16C
//! instructions, tested equal over every f16 and a million f32); src/cpu/avx512bf16.rs widen,
//! narrow (AVX512-BF16, tested equal)

/// bf16 bits -> f32, exactly (bf16 is the top half of an f32).
#[inline(always)]
pub(crate) fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f16 bits -> f32, exactly. Subnormals go through an integer-to-float conversion, so a host
/// that set denormals-are-zero still gets their exact values.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let em = (h & 0x7fff) as u32;
    let normal = (em << 13) + (112 << 23); // rebias the exponent from 15 to 127
    let subnormal = ((em as f32) * (1.0 / 16_777_216.0)).to_bits(); // em * 2^-24
    let special = 0x7f80_0000 | ((em & 0x3ff) << 13); // inf, NaN (payload kept)
    let bits = if em >= 0x7c00 {
        special
    } else if em < 0x400 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// f32 -> f16 bits, round to nearest even; overflow to inf, NaN stays a (quiet) NaN.
#[inline(always)]
pub(crate) fn f16_bits_nearest(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = (b >> 16) & 0x8000;
    let a = b & 0x7fff_ffff;
    let special = 0x7c00
        | if a > 0x7f80_0000 {
            0x200 | ((a >> 13) & 0x3ff)
        } else {
            0
        };
    let t = a.wrapping_sub(0x3800_0000); // rebias the exponent from 127 to 15
    let normal = (t.wrapping_add(0xfff + ((t >> 13) & 1))) >> 13;
    // Below f16's normal range: scale to units of 2^-24 and round to an integer (RNE).
    let scaled = f32::from_bits(a) * 16_777_216.0;
    let subnormal = ((scaled + 8_388_608.0) - 8_388_608.0) as u32;
    let h = if a >= 0x7f80_0000 {
        special
    } else if a >= 0x477f_f000 {
        0x7c00 // 65520 and up round to inf
    } else if a >= 0x3880_0000 {
        normal
    } else {
        subnormal
    };
    (h | sign) as u16
}

/// f32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN.
#[inline(always)]
pub(crate) fn bf16_bits_nearest(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// f32 -> bf16 bits, rounded up in magnitude with probability equal to the dropped fraction.
#[inline(always)]
pub(crate) fn bf16_bits_stochastic(x: f32, random: u32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(random & 0xffff) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// Rounds `x` stochastically onto the f16 grid (spacing 2^(e-10), or 2^-24 below the normal
/// range), returned as an f32 that converts to f16 exactly. Above f16's largest finite value
/// (65504) the grid's next point is inf: a value between 65504 and 65536 rounds up to inf
/// with probability (x - 65504) / 32, where nearest rounding gives 65504 below 65520
/// (docs/ABI.md, the update's notes).
#[inline(always)]
pub(crate) fn f16_grid_stochastic(x: f32, random: u32) -> f32 {
    let a = x.abs();
    let exp = ((a.to_bits() >> 23) as i32 - 127).clamp(-14, 15);
    let ulp = f32::from_bits(((exp - 10 + 127) as u32) << 23);
    let inv_ulp = f32::from_bits(((10 - exp + 127) as u32) << 23);
    let q = a * inv_ulp; // exact: a power-of-two scaling
    let floor = q.floor();
    let threshold = (random >> 8) as f32 * (1.0 / 16_777_216.0); // uniform in [0, 1)
    let up = if q - floor > threshold { 1.0 } else { 0.0 };
    let y = ((floor + up) * ulp).copysign(x);
    if a.is_finite() {
        y
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::rng::Key;
    use half::{bf16, f16};

    #[test]
    fn f16_conversions_match_half_exactly() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_bits_to_f32(h);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#x}"
            );
        }
        let mut s = 777u32;
        for i in 0..2_000_000u32 {
            s = crate::numerics::rng::hash32(s.wrapping_add(i));
            // Every 4th draw near f16's range, so all of its binades are hit often.
            let x = if i % 4 == 0 {
                f32::from_bits(s)
            } else {
                f32::from_bits(0x3000_0000 + (s >> 4))
            };
            let x = if i % 8 == 1 { -x } else { x };
            let want = f16::from_f32(x);
            let got = f16_bits_nearest(x);
            if x.is_nan() {
                assert!(f16::from_bits(got).is_nan(), "{x:e}");
            } else {
                assert_eq!(got, want.to_bits(), "{x:e} ({:#x})", x.to_bits());
            }
        }
        for x in [
            65504.0f32,
            65519.99,
            65520.0,
            6.0e-8,
            2.9e-8,
            3.0e-8,
            6.1e-5,
            6.103e-5,
            f32::MIN_POSITIVE,
            1e-45,
        ] {
            for x in [x, -x] {
                assert_eq!(f16_bits_nearest(x), f16::from_f32(x).to_bits(), "{x:e}");
            }
        }
    }

    #[test]
    fn bf16_nearest_matches_half() {
        let mut s = 12345u32;
        for _ in 0..100_000 {
            s = crate::numerics::rng::hash32(s.wrapping_add(1));
            let x = f32::from_bits(s);
            if x.is_nan() {
                assert!(bf16::from_bits(bf16_bits_nearest(x)).is_nan());
            } else {
                assert_eq!(bf16_bits_nearest(x), bf16::from_f32(x).to_bits(), "{x:e}");
            }
        }
    }

    #[test]
    fn stochastic_rounding_lands_on_a_neighbour() {
        let mut s = 99u32;
        for _ in 0..100_000 {
            s = crate::numerics::rng::hash32(s.wrapping_add(1));
            let x = f32::from_bits(s) * 1e-30; // keep most values in f16's range too
            let x = if x.is_finite() { x } else { 1.5 };
            let r = crate::numerics::rng::hash32(s ^ 0xdead);
            let b = bf16::from_bits(bf16_bits_stochastic(x, r)).to_f32();
            let lo = bf16::from_bits((x.to_bits() >> 16) as u16).to_f32();
            let hi = bf16::from_bits(((x.to_bits() >> 16) + 1) as u16).to_f32();
            assert!(b == lo || b == hi, "bf16 {x:e} -> {b:e}");
            let h = f16_grid_stochastic(x, r);
            if h.abs() <= 65504.0 {
                assert_eq!(
                    f16::from_f32(h).to_f32(),
                    h,
                    "f16 grid value {h:e} from {x:e}"
                );
            } else {
                assert!(f16::from_f32(h).is_infinite(), "{x:e} is past f16's range");
            }
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let key = Key::new(3, 1, 0, crate::numerics::rng::Stream::Param);
        for &x in &[1.0f32 + 1.0 / 3.0, -0.123_456_7, 3.1e-6, -7.7e-8, 1000.3] {
            let n = 200_000u64;
            let (mut sb, mut sh) = (0f64, 0f64);
            for i in 0..n {
                let r = key.bits(i);
                sb += bf16::from_bits(bf16_bits_stochastic(x, r)).to_f64();
                sh += f16::from_f32(f16_grid_stochastic(x, r)).to_f64();
            }
            let ulp_b = (bf16::from_f32(x).to_f64() * 2f64.powi(-7)).abs();
            let ulp_h = (x as f64 * 2f64.powi(-10)).abs().max(2f64.powi(-24));
            assert!(
                (sb / n as f64 - x as f64).abs() < 0.01 * ulp_b,
                "bf16 mean of {x}"
            );
            assert!(
                (sh / n as f64 - x as f64).abs() < 0.01 * ulp_h,
                "f16 mean of {x}"
            );
        }
    }

    #[test]
    fn stochastic_rounding_keeps_specials() {
        for r in [0u32, 0xffff_ffff, 0x1234_5678] {
            assert!(bf16::from_bits(bf16_bits_stochastic(f32::NAN, r)).is_nan());
            assert!(f16_grid_stochastic(f32::NAN, r).is_nan());
            assert_eq!(f16_grid_stochastic(f32::INFINITY, r), f32::INFINITY);
            assert_eq!(
                bf16::from_bits(bf16_bits_stochastic(f32::NEG_INFINITY, r)).to_f32(),
                f32::NEG_INFINITY
            );
            assert_eq!(f16_grid_stochastic(0.0, r), 0.0);
            assert_eq!(f16_grid_stochastic(2.0, r), 2.0);
            assert_eq!(
                bf16_bits_stochastic(-2.0, r),
                bf16::from_f32(-2.0).to_bits()
            );
        }
    }
}
