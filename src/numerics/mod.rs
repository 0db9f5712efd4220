//! The numbers every engine must compute alike: the update, the conversions between f32 and
//! the storage types, and the hash behind stochastic rounding. The CPU kernels call these
//! functions (or, in the hand-vectorized paths, compute the same operations in the same order);
//! the CUDA kernels carry a copy in CUDA C, tagged `MIRROR(..)` at both ends, with the shared
//! constants generated from here into their prelude (`src/cuda/prelude.rs`).
//!
//! # The update
//!
//! For each tensor `t` of a step, with `lr` the step's learning rate, `lr0` the one given at
//! creation, `b1`, `b2`, `wd`, `cf` (cautious_factor) from the configuration and `lr_scale_t`,
//! `wd_scale_t` from the tensor's description, the coefficients are computed in f64 and each
//! rounded once to f32 (`update::Coeffs::new`; PyTorch does the same with Python floats):
//!
//! ```text
//! lr_t = lr * lr_scale_t
//! wd_t = wd * wd_scale_t
//! d    = lr_t * wd_t                 LION_DECAY_STANDARD (the paper)
//!      = lr_t / lr0 * wd_t           LION_DECAY_DECOUPLED (lion-pytorch), 0 when wd_t = 0
//!      = lr_t * lr_t / lr0 * wd_t    LION_DECAY_CORRECTED (timm), 0 when wd_t = 0
//! s    = lr_t                                      not cautious (cf = 1)
//!      = lr_t / max(mean, CAUTIOUS_MEAN_FLOOR)     cautious (cf < 1), n > 0 elements
//! mean = (agreeing + cf * (n - agreeing)) / n
//! ```
//!
//! where `agreeing` counts the tensor's elements whose sign(c) agrees with the gradient
//! (`update::signs_agree`, below): an integer, so the mean does not depend on how the work
//! was split. Cautious Lion thus takes two passes over the gradients (count, then update).
//!
//! Then, per element, in f32, every operation rounded to f32 on its own: no fused
//! multiply-add (Rust never fuses; NVRTC compiles with `--fmad=false`), and in this order
//! (`update::lion_element`):
//!
//! ```text
//! g = g * grad_scale                       (the step option; 1 by default)
//! c = b1 * m + (1 - b1) * g
//! u = sign(c)                              +1 or -1; 0 where c is 0 or NaN
//! u = u * (u * g > 0 ? 1 : cf)             cautious only (cf < 1)
//! k = 1 - d, or 1 where !(u * p > 0)       the latter with cautious weight decay only
//! p = p * k - s * u
//! m = b2 * m + (1 - b2) * g
//! ```
//!
//! that is, without the cautious options, `c = b1*m + (1-b1)*g; p = p*(1 - d) - s*sign(c);
//! m = b2*m + (1-b2)*g`, with `b1`, `1 - b1`, `b2`, `1 - b2`, `s` and `1 - d` the f32
//! coefficients above.
//!
//! # Storage
//!
//! p, g and m are read from their dtypes exactly (`convert`). The new p and m are written
//! back rounded to nearest even, or, with stochastic rounding (SR) and a 16-bit dtype,
//! rounded up in magnitude with probability equal to the dropped fraction, drawing 32 bits
//! per element from the counter-based hash `rng::Key::bits(index)` keyed by (seed, step,
//! tensor, stream: parameters and momentum draw apart). The draws depend on nothing else, so
//! every thread count, chunking, instruction set and device gives the same bits.
//!
//! # 8-bit momentum
//!
//! With state dtype Q8 (`q8`), a tensor of at least 4096 elements stores its momentum as one
//! code `k` in -127..=127 per element and one f32 scale `s` per block of 256 elements from the
//! tensor's start; smaller tensors store f32. A step, per block: `unit = s / 16129`; per
//! element `m = (k*|k|) * unit` (exact integer product, one f32 multiply), then
//! `lion_element` as above; then the new momentum of the block is encoded
//! (`q8::encode_block`): `s' = max |m'|` (by the bits of |m'|: a NaN or infinite m' gives a
//! NaN scale and codes 0), kept within [2^-112, the f32 below f32::MAX] unless 0
//! (`q8::scale_of`), `e = min(16129 / s', f32::MAX)`, per element `y = |m'| * e`,
//! `k0 = trunc(sqrt(y))`, `k = k0 + (y > k0*(k0+1) + 0.5)`, `k = 1` where `k = 0` and
//! `m' != 0`, and the code is `k` with the sign of `m'`. Always to nearest: no draw. The
//! parameters round as above (stochastically with SR and a 16-bit parameter dtype).

pub(crate) mod convert;
pub(crate) mod q8;
pub(crate) mod rng;
pub(crate) mod update;

#[cfg(test)]
mod mirrors;
