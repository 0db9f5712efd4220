//! The C-visible types of the ABI contract (docs/ABI.md), exactly as cbindgen exports them.
//!
//! Enum-typed fields are plain integers here (`LionDType` is a `uint32_t` typedef with named
//! constants): a C caller may store any integer in them, and reading an out-of-range value
//! through a Rust enum would be undefined behaviour. They are checked in `config.rs`.

/// Where an optimizer runs.
pub type LionDevice = u32;
pub const LION_DEVICE_CPU: LionDevice = 0;
pub const LION_DEVICE_CUDA: LionDevice = 1;

/// Element type of parameters, gradients or optimizer state.
pub type LionDType = u32;
pub const LION_DTYPE_F32: LionDType = 0;
pub const LION_DTYPE_F16: LionDType = 1;
pub const LION_DTYPE_BF16: LionDType = 2;

/// How weight decay scales with the learning rate.
pub type LionDecayMode = u32;
/// p *= 1 - lr*wd, as in the paper.
pub const LION_DECAY_STANDARD: LionDecayMode = 0;
/// p *= 1 - (lr/lr0)*wd: lion-pytorch's `decoupled_weight_decay`.
pub const LION_DECAY_DECOUPLED: LionDecayMode = 1;
/// p *= 1 - (lr*lr/lr0)*wd: timm's `corrected_weight_decay`.
pub const LION_DECAY_CORRECTED: LionDecayMode = 2;

/// The version of the ABI this library implements.
pub const LION_ABI_VERSION: u32 = 1;

/// Optimizer configuration. Callers set `struct_size = sizeof(LionConfig)`
/// (`lion_config_default()` does).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LionConfig {
    pub struct_size: u32,
    /// Learning rate (1e-4). Also `lr0`, the reference for the decoupled and corrected decay.
    pub lr: f32,
    /// 0.9
    pub beta1: f32,
    /// 0.99
    pub beta2: f32,
    /// 0.0
    pub weight_decay: f32,
    /// LION_DECAY_STANDARD
    pub decay_mode: LionDecayMode,
    /// 1.0 = off; 0.0 = Cautious Lion (updates that disagree with the gradient are masked).
    pub cautious_factor: f32,
    /// false; true: decay only where sign(update) == sign(param).
    pub cautious_weight_decay: bool,
    /// LION_DEVICE_CPU
    pub device: LionDevice,
    /// 0
    pub device_index: i32,
    /// LION_DTYPE_F32; LION_DTYPE_BF16 halves the optimizer's memory.
    pub state_dtype: LionDType,
    /// false; for F16/BF16 params (and BF16 state).
    pub stochastic_rounding: bool,
    /// 0; seeds stochastic rounding.
    pub seed: u64,
    /// 0 = all cores (CPU only).
    pub num_threads: u32,
}

/// One tensor the optimizer updates.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LionTensorDesc {
    pub numel: u64,
    pub param_dtype: LionDType,
    pub grad_dtype: LionDType,
    /// 1.0: this tensor's lr is lr * lr_scale.
    pub lr_scale: f32,
    /// 1.0: 0.0 exempts biases and norms from decay.
    pub weight_decay_scale: f32,
}

/// Options of one step (`lion_step_with_options`), for mixed precision and CUDA graphs.
/// Callers set `struct_size = sizeof(LionStepOptions)` (`lion_step_options_default()` does).
/// Pointers are in the step's memory: device memory for CUDA, host memory for the CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LionStepOptions {
    pub struct_size: u32,
    /// 1.0: gradients are multiplied by this before use (e.g. 1/loss_scale); finite.
    pub grad_scale: f32,
    /// NULL, or a float read when the step runs: if it is non-zero the whole step is skipped
    /// (nothing is written and the step count does not advance), as PyTorch's GradScaler expects.
    pub found_inf: *const f32,
    /// NULL, or the learning rate as a float read when the step runs (instead of the lr set
    /// with `lion_set_lr`): a step captured in a CUDA graph then follows the schedule.
    pub lr: *const f32,
    /// false; true: refuse the step (LION_ERROR_NON_FINITE, nothing written) when a gradient
    /// holds NaN or Inf. CPU only: on CUDA, where the host cannot see the gradients without
    /// waiting, pass `found_inf` instead (LION_ERROR_UNSUPPORTED otherwise).
    pub check_finite: bool,
}

/// `LionStepOptions` as this library reads it (bool as a byte).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawStepOptions {
    pub struct_size: u32,
    pub grad_scale: f32,
    pub found_inf: *const f32,
    pub lr: *const f32,
    pub check_finite: u8,
}

impl Default for LionStepOptions {
    fn default() -> Self {
        LionStepOptions {
            struct_size: std::mem::size_of::<LionStepOptions>() as u32,
            grad_scale: 1.0,
            found_inf: std::ptr::null(),
            lr: std::ptr::null(),
            check_finite: false,
        }
    }
}

/// `LionConfig` as this library reads it: the same layout with the `bool` fields as bytes, so
/// that a byte other than 0 or 1 from C is an error rather than undefined behaviour.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawConfig {
    pub struct_size: u32,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub weight_decay: f32,
    pub decay_mode: u32,
    pub cautious_factor: f32,
    pub cautious_weight_decay: u8,
    pub device: u32,
    pub device_index: i32,
    pub state_dtype: u32,
    pub stochastic_rounding: u8,
    pub seed: u64,
    pub num_threads: u32,
}

const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RawConfig>() == size_of::<LionConfig>());
    assert!(align_of::<RawConfig>() == align_of::<LionConfig>());
    assert!(
        offset_of!(RawConfig, cautious_weight_decay)
            == offset_of!(LionConfig, cautious_weight_decay)
    );
    assert!(
        offset_of!(RawConfig, stochastic_rounding) == offset_of!(LionConfig, stochastic_rounding)
    );
    assert!(offset_of!(RawConfig, num_threads) == offset_of!(LionConfig, num_threads));
    assert!(size_of::<LionConfig>() == 64);
    assert!(size_of::<LionTensorDesc>() == 24);
    assert!(size_of::<LionStepOptions>() == 32);
    assert!(size_of::<RawStepOptions>() == size_of::<LionStepOptions>());
    assert!(offset_of!(RawStepOptions, check_finite) == offset_of!(LionStepOptions, check_finite));
};

impl Default for LionConfig {
    fn default() -> Self {
        LionConfig {
            struct_size: std::mem::size_of::<LionConfig>() as u32,
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.0,
            decay_mode: LION_DECAY_STANDARD,
            cautious_factor: 1.0,
            cautious_weight_decay: false,
            device: LION_DEVICE_CPU,
            device_index: 0,
            state_dtype: LION_DTYPE_F32,
            stochastic_rounding: false,
            seed: 0,
            num_threads: 0,
        }
    }
}

impl LionTensorDesc {
    /// A tensor whose gradient has the parameter's dtype, with both scales 1.
    pub fn new(numel: u64, dtype: LionDType) -> Self {
        LionTensorDesc {
            numel,
            param_dtype: dtype,
            grad_dtype: dtype,
            lr_scale: 1.0,
            weight_decay_scale: 1.0,
        }
    }
}
