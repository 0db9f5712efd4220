//! Element types as the CPU kernels see them: converted to f32 and back, one element at a
//! time, through the branch-free conversions of `numerics::convert`, so that the fused update
//! loop vectorizes for every dtype.

use crate::config::DType;
use crate::numerics::convert::{
    bf16_bits_nearest, bf16_bits_stochastic, bf16_bits_to_f32, f16_bits_nearest, f16_bits_to_f32,
    f16_grid_stochastic,
};
use crate::numerics::rng::Key;
use half::{bf16, f16};

pub(crate) trait Elem: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32_nearest(x: f32) -> Self;
    /// Rounded up in magnitude with probability equal to the dropped fraction.
    fn from_f32_stochastic(x: f32, random: u32) -> Self;
}

// MIRROR(rounding): src/cuda/lion.cu Elem, Half::round (to nearest, or stochastically: bf16
// directly, f16 onto its grid and then to nearest); src/cpu/f16c.rs from_f32
impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32_nearest(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn from_f32_stochastic(x: f32, _: u32) -> f32 {
        x
    }
}

impl Elem for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn from_f32_nearest(x: f32) -> bf16 {
        bf16::from_bits(bf16_bits_nearest(x))
    }
    #[inline(always)]
    fn from_f32_stochastic(x: f32, random: u32) -> bf16 {
        bf16::from_bits(bf16_bits_stochastic(x, random))
    }
}

impl Elem for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn from_f32_nearest(x: f32) -> f16 {
        f16::from_bits(f16_bits_nearest(x))
    }
    #[inline(always)]
    fn from_f32_stochastic(x: f32, random: u32) -> f16 {
        f16::from_bits(f16_bits_nearest(f16_grid_stochastic(x, random)))
    }
}

/// How a value computed in f32 is written back into its storage type.
pub(crate) trait Rounder: Copy {
    fn round<T: Elem>(self, x: f32, index: u64) -> T;
}

#[derive(Clone, Copy)]
pub(crate) struct Nearest;

impl Rounder for Nearest {
    #[inline(always)]
    fn round<T: Elem>(self, x: f32, _: u64) -> T {
        T::from_f32_nearest(x)
    }
}

/// Stochastic, with the draw of `key` for the element's index in its tensor.
#[derive(Clone, Copy)]
pub(crate) struct Stochastic(pub Key);

impl Rounder for Stochastic {
    #[inline(always)]
    fn round<T: Elem>(self, x: f32, index: u64) -> T {
        T::from_f32_stochastic(x, self.0.bits(index))
    }
}
