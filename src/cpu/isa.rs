//! Instantiates the kernels once per instruction set and per dtype combination, and picks
//! the one for a tensor at creation (runtime dispatch: one binary for every x86-64).

use super::elem::Elem;
use super::kernel::{
    count_agreeing_chunk, q8_count_agreeing_chunk, q8_update_chunk, update_chunk, RoundingKeys,
};
use super::prefetch;
use crate::config::DType;
use crate::numerics::update::Coeffs;
use half::{bf16, f16};

/// Updates `len` elements from the chunk's first parameter, gradient and momentum element.
pub(crate) type UpdateFn =
    unsafe fn(*mut u8, *const u8, *mut u8, usize, &Coeffs, RoundingKeys, u64);
/// Counts the elements whose signs agree among `len` (gradient, momentum).
pub(crate) type CountFn = unsafe fn(*const u8, *const u8, usize, &Coeffs) -> u64;
/// `UpdateFn` for 8-bit momentum: parameters, gradients, codes, scales (f32, aligned).
pub(crate) type Q8UpdateFn =
    unsafe fn(*mut u8, *const u8, *mut u8, *mut u8, usize, &Coeffs, RoundingKeys, u64);
/// `CountFn` for 8-bit momentum: gradients, codes, scales.
pub(crate) type Q8CountFn = unsafe fn(*const u8, *const u8, *const u8, usize, &Coeffs) -> u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Baseline,
    Avx2,
    Avx512,
    /// AVX-512 and its bf16 conversions (Sapphire Rapids, Zen 4).
    Avx512Bf16,
}

impl Isa {
    /// The best this CPU has, unless `LION_CPU_ISA` (baseline, avx2, avx512) asks for less:
    /// tests use it to check that every level computes the same bits.
    pub(crate) fn detect() -> Isa {
        let best = Self::best_available();
        let asked = match std::env::var("LION_CPU_ISA").as_deref() {
            Ok("baseline") => Isa::Baseline,
            Ok("avx2") => Isa::Avx2,
            Ok("avx512") => Isa::Avx512,
            _ => best,
        };
        asked.min_with(best)
    }

    fn min_with(self, other: Isa) -> Isa {
        let rank = |i: Isa| i as u8;
        if rank(self) <= rank(other) {
            self
        } else {
            other
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn best_available() -> Isa {
        use std::arch::is_x86_feature_detected as has;
        let avx512 =
            has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("fma") && has!("f16c");
        if avx512 && has!("avx512dq") && has!("avx512bf16") {
            Isa::Avx512Bf16
        } else if avx512 {
            Isa::Avx512
        } else if has!("avx2") && has!("fma") && has!("f16c") {
            Isa::Avx2
        } else {
            Isa::Baseline
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn best_available() -> Isa {
        Isa::Baseline
    }
}

/// Whether the CPU is AMD's (or Hygon's, the same cores).
pub(crate) fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let vendor = [id.ebx, id.edx, id.ecx].map(u32::to_le_bytes).concat();
        vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

macro_rules! variant {
    // `$f16c`: the values per F16C conversion instruction the features allow (f16 arrays go
    // through `f16c::update`), 0 for none.
    ($name:ident, $f16c:literal $(, $features:literal)?) => {
        pub(super) mod $name {
            use super::*;

            $(#[target_feature(enable = $features)])?
            pub(crate) unsafe fn update<P: Elem, G: Elem, S: Elem>(
                p: *mut u8,
                g: *const u8,
                m: *mut u8,
                len: usize,
                k: &Coeffs,
                keys: RoundingKeys,
                first_index: u64,
            ) {
                #[cfg(target_arch = "x86_64")]
                if $f16c > 0 && super::super::f16c::wanted::<P, G>() {
                    return super::super::f16c::update::<P, G, S, $f16c>(
                        p, g, m, len, k, keys, first_index,
                    );
                }
                let (sp, sg, sm) = (size_of::<P>(), size_of::<G>(), size_of::<S>());
                let ahead = prefetch::settings(sp == 4 && sg == 4 && sm == 4);
                for (done, n) in prefetch::blocks(len) {
                    let (p, g, m) = (p.add(done * sp), g.add(done * sg), m.add(done * sm));
                    ahead.arrays(&[(p, sp), (g, sg), (m, sm)], n);
                    update_chunk(
                        std::slice::from_raw_parts_mut(p as *mut P, n),
                        std::slice::from_raw_parts(g as *const G, n),
                        std::slice::from_raw_parts_mut(m as *mut S, n),
                        k,
                        keys,
                        first_index + done as u64,
                    );
                }
            }

            $(#[target_feature(enable = $features)])?
            pub(crate) unsafe fn count<G: Elem, S: Elem>(
                g: *const u8,
                m: *const u8,
                len: usize,
                k: &Coeffs,
            ) -> u64 {
                let (sg, sm) = (size_of::<G>(), size_of::<S>());
                let ahead = prefetch::settings(sg == 4 && sm == 4);
                let mut total = 0;
                for (done, n) in prefetch::blocks(len) {
                    let (g, m) = (g.add(done * sg), m.add(done * sm));
                    ahead.arrays(&[(g, sg), (m, sm)], n);
                    total += count_agreeing_chunk(
                        std::slice::from_raw_parts(g as *const G, n),
                        std::slice::from_raw_parts(m as *const S, n),
                        k,
                    );
                }
                total
            }

            /// 8-bit momentum: `len` elements from a block boundary (`kernel::q8_update_chunk`).
            $(#[target_feature(enable = $features)])?
            #[allow(clippy::too_many_arguments)]
            pub(crate) unsafe fn q8_update<P: Elem, G: Elem>(
                p: *mut u8,
                g: *const u8,
                codes: *mut u8,
                scales: *mut u8,
                len: usize,
                k: &Coeffs,
                keys: RoundingKeys,
                first_index: u64,
            ) {
                q8_update_chunk(
                    std::slice::from_raw_parts_mut(p as *mut P, len),
                    std::slice::from_raw_parts(g as *const G, len),
                    std::slice::from_raw_parts_mut(codes as *mut i8, len),
                    std::slice::from_raw_parts_mut(
                        scales as *mut f32,
                        len.div_ceil(crate::numerics::q8::BLOCK),
                    ),
                    k,
                    keys,
                    first_index,
                    prefetch::settings_q8(),
                );
            }

            $(#[target_feature(enable = $features)])?
            pub(crate) unsafe fn q8_count<G: Elem>(
                g: *const u8,
                codes: *const u8,
                scales: *const u8,
                len: usize,
                k: &Coeffs,
            ) -> u64 {
                let blocks = len.div_ceil(crate::numerics::q8::BLOCK);
                q8_count_agreeing_chunk(
                    std::slice::from_raw_parts(g as *const G, len),
                    std::slice::from_raw_parts(codes as *const i8, len),
                    std::slice::from_raw_parts(scales as *const f32, blocks),
                    k,
                )
            }
        }
    };
}

variant!(baseline, 0);
#[cfg(target_arch = "x86_64")]
variant!(avx2, 8, "avx2,fma,f16c");
#[cfg(target_arch = "x86_64")]
variant!(avx512, 16, "avx512f,avx512bw,avx512vl,avx2,fma,f16c");

// Expands a runtime DType into a type parameter.
macro_rules! with_dtype {
    ($d:expr, $T:ident => $body:expr) => {
        match $d {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::Q8 => unreachable!("a Q8 array has its own kernels (q8_update_fn)"),
        }
    };
}

/// `$f` (with its type arguments) of the module for `$isa`: `avx512`, `avx2` or `baseline`,
/// as the caller's scope names them (this file's `variant!` modules, vote.rs's own).
macro_rules! by_isa {
    ($isa:expr, $f:ident $(:: <$($T:tt),*>)?) => {
        match $isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 => avx512::$f $(::<$($T),*>)? as _,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::$f $(::<$($T),*>)? as _,
            _ => baseline::$f $(::<$($T),*>)? as _,
        }
    };
}
pub(crate) use by_isa;

pub(crate) fn update_fn(isa: Isa, param: DType, grad: DType, state: DType) -> UpdateFn {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Bf16 && (param, grad, state) == (DType::BF16, DType::BF16, DType::BF16) {
        return super::avx512bf16::update;
    }
    with_dtype!(param, P => with_dtype!(grad, G => with_dtype!(state, S => by_isa!(isa, update::<P, G, S>))))
}

pub(crate) fn count_fn(isa: Isa, grad: DType, state: DType) -> CountFn {
    with_dtype!(grad, G => with_dtype!(state, S => by_isa!(isa, count::<G, S>)))
}

/// The kernels of a tensor with 8-bit momentum (`numerics::q8::quantized`).
pub(crate) fn q8_update_fn(isa: Isa, param: DType, grad: DType) -> Q8UpdateFn {
    with_dtype!(param, P => with_dtype!(grad, G => by_isa!(isa, q8_update::<P, G>)))
}

pub(crate) fn q8_count_fn(isa: Isa, grad: DType) -> Q8CountFn {
    with_dtype!(grad, G => by_isa!(isa, q8_count::<G>))
}
