//! Element types as the CPU kernels see them: read into f32, written back rounded to nearest
//! even or stochastically. All loops here are branch-free so that they vectorize.

use crate::config::DType;
use crate::rng::Key;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// How a value computed in f32 is written into a narrower type.
#[derive(Clone, Copy, Debug)]
pub enum Rounding {
    Nearest,
    /// Stochastic, with the draws of `key` for the elements numbered from `first_index`.
    Stochastic {
        key: Key,
        first_index: u64,
    },
}

pub trait Elem: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    /// `src` as f32: the slice itself for f32, else converted into `buf` (same length).
    fn load_mut<'a>(src: &'a mut [Self], buf: &'a mut [f32]) -> &'a mut [f32];
    fn load<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
    /// Writes back what `load_mut` handed out (a no-op for f32, which was updated in place).
    fn store(dst: &mut [Self], buf: &[f32], rounding: Rounding);
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn load_mut<'a>(src: &'a mut [f32], _: &'a mut [f32]) -> &'a mut [f32] {
        src
    }
    #[inline(always)]
    fn load<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
    #[inline(always)]
    fn store(_: &mut [f32], _: &[f32], _: Rounding) {}
}

impl Elem for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn load_mut<'a>(src: &'a mut [bf16], buf: &'a mut [f32]) -> &'a mut [f32] {
        let buf = &mut buf[..src.len()];
        bf16_to_f32(src, buf);
        buf
    }
    #[inline(always)]
    fn load<'a>(src: &'a [bf16], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        bf16_to_f32(src, buf);
        buf
    }
    #[inline(always)]
    fn store(dst: &mut [bf16], buf: &[f32], rounding: Rounding) {
        let dst = dst.reinterpret_cast_mut();
        match rounding {
            Rounding::Nearest => {
                for (d, &x) in dst.iter_mut().zip(buf) {
                    *d = bf16_bits_nearest(x);
                }
            }
            Rounding::Stochastic { key, first_index } => {
                for (i, (d, &x)) in dst.iter_mut().zip(buf).enumerate() {
                    *d = bf16_bits_stochastic(x, key.bits(first_index + i as u64));
                }
            }
        }
    }
}

impl Elem for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn load_mut<'a>(src: &'a mut [f16], buf: &'a mut [f32]) -> &'a mut [f32] {
        let buf = &mut buf[..src.len()];
        src.convert_to_f32_slice(buf);
        buf
    }
    #[inline(always)]
    fn load<'a>(src: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        src.convert_to_f32_slice(buf);
        buf
    }
    #[inline(always)]
    fn store(dst: &mut [f16], buf: &[f32], rounding: Rounding) {
        match rounding {
            Rounding::Nearest => dst.convert_from_f32_slice(buf),
            Rounding::Stochastic { key, first_index } => {
                // Round in f32 to a value f16 holds exactly, then convert (exactly).
                let mut tmp = [0f32; crate::cpu::kernel::BLOCK];
                let tmp = &mut tmp[..buf.len()];
                for (i, (t, &x)) in tmp.iter_mut().zip(buf).enumerate() {
                    *t = f16_grid_stochastic(x, key.bits(first_index + i as u64));
                }
                dst.convert_from_f32_slice(tmp);
            }
        }
    }
}

#[inline(always)]
fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.reinterpret_cast()) {
        *d = f32::from_bits((*s as u32) << 16);
    }
}

/// f32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN.
#[inline(always)]
pub fn bf16_bits_nearest(x: f32) -> u16 {
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
pub fn bf16_bits_stochastic(x: f32, random: u32) -> u16 {
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
/// range), returned as an f32 that converts to f16 exactly. Values past f16's range become
/// inf on conversion, as with nearest rounding.
#[inline(always)]
pub fn f16_grid_stochastic(x: f32, random: u32) -> f32 {
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

    #[test]
    fn bf16_nearest_matches_half() {
        let mut s = 12345u32;
        for _ in 0..100_000 {
            s = crate::rng::hash32(s.wrapping_add(1));
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
            s = crate::rng::hash32(s.wrapping_add(1));
            let x = f32::from_bits(s) * 1e-30; // keep most values in f16's range too
            let x = if x.is_finite() { x } else { 1.5 };
            let r = crate::rng::hash32(s ^ 0xdead);
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
        let key = Key::new(3, 1, 0, crate::rng::Stream::Param);
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
