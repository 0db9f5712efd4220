//! The Lion update (the spec is in `numerics`' documentation): the per-tensor coefficients,
//! derived in f64 and rounded once to f32, and the per-element function in f32 that the CPU
//! kernels inline (`cpu::kernel::update_chunk`).

use crate::config::{DecayMode, Hyper, TensorSpec};
use crate::status::{Error, Result};

/// Everything the per-element update of one tensor needs, for one step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub(crate) struct Coeffs {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// The parameter moves by `step_size * u`, where `u = sign(c) * s`.
    pub step_size: f32,
    /// `1 - d`: the decay factor where decay applies.
    pub decay_keep: f32,
    /// `s` where sign(c) disagrees with the gradient (1 = not cautious).
    pub cautious_factor: f32,
    /// 1.0 when decay applies only where sign(update) == sign(param), else 0.0.
    pub cautious_weight_decay: f32,
    /// Gradients are multiplied by this before use (1 = as given; e.g. 1/loss_scale).
    pub grad_scale: f32,
}

impl Coeffs {
    /// Neither cautious update nor cautious decay: the per-element masks are no-ops.
    pub(crate) fn is_plain(&self) -> bool {
        self.cautious_factor == 1.0 && self.cautious_weight_decay == 0.0
    }
}

/// Cautious Lion's floor on the mean of the mask, as in lion-pytorch.
pub(crate) const CAUTIOUS_MEAN_FLOOR: f64 = 1e-5;

// MIRROR(coeffs): src/cuda/lion.cu coeffs; tests/common/mod.rs reference (the same formulas in
// f64, as the spec's check)
impl Coeffs {
    /// `agreeing` is the number of elements whose sign(c) agrees with the gradient (only used
    /// when cautious): the mean of the mask comes from that integer, so it does not depend
    /// on how the work was split.
    pub(crate) fn new(
        h: &Hyper,
        lr: f32,
        t: &TensorSpec,
        agreeing: u64,
        grad_scale: f32,
    ) -> Coeffs {
        let (lr_t, d) = lr_and_decay(h, lr, t);
        let cf = h.cautious_factor as f64;
        let step_size = if cf < 1.0 && t.numel > 0 {
            let n = t.numel as f64;
            let mean = (agreeing as f64 + cf * (n - agreeing as f64)) / n;
            lr_t / mean.max(CAUTIOUS_MEAN_FLOOR)
        } else {
            lr_t
        };
        Coeffs {
            beta1: h.beta1,
            one_minus_beta1: (1.0 - h.beta1 as f64) as f32,
            beta2: h.beta2,
            one_minus_beta2: (1.0 - h.beta2 as f64) as f32,
            step_size: step_size as f32,
            decay_keep: (1.0 - d) as f32,
            cautious_factor: h.cautious_factor,
            cautious_weight_decay: if h.cautious_weight_decay { 1.0 } else { 0.0 },
            grad_scale,
        }
    }
}

/// The tensor's lr (`lr * lr_scale`) and its decay factor `d` (decay multiplies p by 1 - d),
/// in f64.
fn lr_and_decay(h: &Hyper, lr: f32, t: &TensorSpec) -> (f64, f64) {
    let lr_t = lr as f64 * t.lr_scale as f64;
    let wd_t = h.weight_decay as f64 * t.weight_decay_scale as f64;
    let lr0 = h.lr0 as f64;
    let d = match h.decay_mode {
        DecayMode::Standard => lr_t * wd_t,
        DecayMode::Decoupled if wd_t == 0.0 => 0.0,
        DecayMode::Decoupled => lr_t / lr0 * wd_t,
        DecayMode::Corrected if wd_t == 0.0 => 0.0,
        DecayMode::Corrected => lr_t * lr_t / lr0 * wd_t,
    };
    (lr_t, d)
}

/// Refuses an lr that, with hyperparameters each valid alone, makes a tensor's update
/// nonsense: a step size that is not finite in f32 (for Cautious Lion, the largest the
/// renormalisation can make it), or a decay factor outside [0, 1] (above 1, decay flips the
/// parameters' sign). Checked wherever the lr or the tensors are set: create, set_lr, load,
/// and a host-side step lr.
pub(crate) fn check_products(h: &Hyper, lr: f32, tensors: &[TensorSpec]) -> Result<()> {
    (tensors.iter().enumerate()).try_for_each(|(i, t)| check_product(h, lr, i, t))
}

/// `check_products` for the tensors `indices` only (a `lion_step_tensors` call's `options.lr`,
/// which applies to that call's tensors).
pub(crate) fn check_products_of(
    h: &Hyper,
    lr: f32,
    tensors: &[TensorSpec],
    indices: &[u32],
) -> Result<()> {
    (indices.iter()).try_for_each(|&i| check_product(h, lr, i as usize, &tensors[i as usize]))
}

fn check_product(h: &Hyper, lr: f32, i: usize, t: &TensorSpec) -> Result<()> {
    let (lr_t, d) = lr_and_decay(h, lr, t);
    let cf = h.cautious_factor as f64;
    let largest_step = if cf < 1.0 {
        lr_t / cf.max(CAUTIOUS_MEAN_FLOOR)
    } else {
        lr_t
    };
    if !(largest_step as f32).is_finite() {
        return Err(Error::invalid(format!(
            "tensors[{i}]: lr {lr} times lr_scale {} gives a step size of {largest_step:e}{}, \
             which is not finite in f32",
            t.lr_scale,
            if cf < 1.0 {
                " after Cautious Lion's renormalisation"
            } else {
                ""
            }
        )));
    }
    if !(0.0..=1.0).contains(&d) {
        return Err(Error::invalid(format!(
            "tensors[{i}]: with lr {lr}, the decay factor ({:?} decay, weight_decay {} times \
             weight_decay_scale {}) is {d}, outside [0, 1]: the parameters would be \
             multiplied by {}",
            h.decay_mode,
            h.weight_decay,
            t.weight_decay_scale,
            1.0 - d
        )));
    }
    Ok(())
}

// MIRROR(update): src/cuda/lion.cu sign_of, lion_element, signs_agree; src/cpu/avx512bf16.rs
// half (the plain path on 16 lanes); tests/common/mod.rs reference (in f64, as the spec's check)

/// sign(c) as ±1.0, or 0.0 for a zero (or NaN) c: one and/or, one compare.
#[inline(always)]
fn sign(c: f32) -> f32 {
    let unit = f32::from_bits((c.to_bits() & 0x8000_0000) | 0x3f80_0000);
    if c.abs() > 0.0 {
        unit
    } else {
        0.0
    }
}

/// c = b1*m + (1-b1)*g (g already scaled): the direction whose sign is the update.
#[inline(always)]
fn direction(k: &Coeffs, m: f32, g: f32) -> f32 {
    k.beta1 * m + k.one_minus_beta1 * g
}

/// The momentum after the step: b2*m + (1-b2)*g (g already scaled).
#[inline(always)]
fn next_momentum(k: &Coeffs, m: f32, g: f32) -> f32 {
    k.beta2 * m + k.one_minus_beta2 * g
}

/// The parameter after an update `u` (±1 or 0, scaled where cautious): decayed by the keep
/// factor, unless cautious weight decay spares it, and moved by step_size * u.
#[inline(always)]
fn next_param<const PLAIN: bool>(k: &Coeffs, p: f32, u: f32) -> f32 {
    let mut keep = k.decay_keep;
    // The spec's mask `u*p > 0`, not `u * p <= 0`: a NaN product (an infinite p where u is
    // 0) is spared too (a keep factor of 0 made inf * 0 = NaN of it).
    let aligned = u * p > 0.0;
    if !PLAIN && k.cautious_weight_decay != 0.0 && !aligned {
        keep = 1.0;
    }
    p * keep - k.step_size * u
}

/// The per-element update in f32, the one function every engine computes.
/// Returns (new param, new momentum). `PLAIN` is the common case (not cautious, no cautious
/// weight decay), with the masks compiled out; it computes the same values.
#[inline(always)]
pub(crate) fn lion_element<const PLAIN: bool>(k: &Coeffs, p: f32, g: f32, m: f32) -> (f32, f32) {
    let g = g * k.grad_scale;
    let mut u = sign(direction(k, m, g));
    if !PLAIN {
        u *= if u * g > 0.0 { 1.0 } else { k.cautious_factor };
    }
    (next_param::<PLAIN>(k, p, u), next_momentum(k, m, g))
}

// MIRROR(update): tests/common/dist.rs vote_reference (the vote's operations, in f32)
/// Distributed Lion, one rank's half: its vote sign(c) (-1, 0 or 1) from its own momentum and
/// gradient, and its next momentum. The same operations as `lion_element`'s.
#[inline(always)]
pub(crate) fn vote_element(k: &Coeffs, g: f32, m: f32) -> (i8, f32) {
    let g = g * k.grad_scale;
    let c = direction(k, m, g);
    // sign(c) as an integer by two compares (0 for a zero or NaN c, as `sign`): a float's
    // saturating cast to i8 would be done one element at a time.
    ((c > 0.0) as i8 - (c < 0.0) as i8, next_momentum(k, m, g))
}

/// Distributed Lion, every rank's half: the parameter after a vote whose sum has the sign `u`
/// (-1, 0 or 1). `PLAIN`: no cautious weight decay (cautious updates are not voted).
#[inline(always)]
pub(crate) fn voted_param<const PLAIN: bool>(k: &Coeffs, p: f32, u: f32) -> f32 {
    next_param::<PLAIN>(k, p, u)
}

/// Whether sign(c) agrees with the gradient (Cautious Lion's mask before scaling).
#[inline(always)]
pub(crate) fn signs_agree(k: &Coeffs, g: f32, m: f32) -> bool {
    let g = g * k.grad_scale;
    sign(direction(k, m, g)) * g > 0.0
}
