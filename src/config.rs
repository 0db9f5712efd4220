//! Checked, typed forms of what callers pass in: every raw integer, byte and float from C is
//! validated here, once, before anything is allocated or written.

use crate::abi_types::*;
use crate::status::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// 8-bit momentum (a state dtype only; `numerics::q8`).
    Q8,
}

impl DType {
    pub fn from_raw(raw: u32, what: &str) -> Result<Self> {
        match raw {
            LION_DTYPE_F32 => Ok(DType::F32),
            LION_DTYPE_F16 => Ok(DType::F16),
            LION_DTYPE_BF16 => Ok(DType::BF16),
            LION_DTYPE_Q8 => Ok(DType::Q8),
            _ => Err(Error::invalid(format!("{what}: unknown LionDType {raw}"))),
        }
    }
    pub fn raw(self) -> LionDType {
        match self {
            DType::F32 => LION_DTYPE_F32,
            DType::F16 => LION_DTYPE_F16,
            DType::BF16 => LION_DTYPE_BF16,
            DType::Q8 => LION_DTYPE_Q8,
        }
    }
    /// Bytes per element; for Q8, of its codes (the scales and small tensors' f32 momentum
    /// come on top: `numerics::q8::tensor_state_bytes`).
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8 => "q8",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayMode {
    Standard,
    Decoupled,
    Corrected,
}

impl DecayMode {
    pub fn from_raw(raw: u32) -> Result<Self> {
        match raw {
            LION_DECAY_STANDARD => Ok(DecayMode::Standard),
            LION_DECAY_DECOUPLED => Ok(DecayMode::Decoupled),
            LION_DECAY_CORRECTED => Ok(DecayMode::Corrected),
            _ => Err(Error::invalid(format!(
                "decay_mode: unknown LionDecayMode {raw}"
            ))),
        }
    }
    pub fn raw(self) -> LionDecayMode {
        match self {
            DecayMode::Standard => LION_DECAY_STANDARD,
            DecayMode::Decoupled => LION_DECAY_DECOUPLED,
            DecayMode::Corrected => LION_DECAY_CORRECTED,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// The hyperparameters that define the update (everything a checkpoint records).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hyper {
    /// The `lr` given at creation: the reference of the decoupled and corrected decay.
    pub lr0: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub weight_decay: f32,
    pub decay_mode: DecayMode,
    pub cautious_factor: f32,
    pub cautious_weight_decay: bool,
    pub state_dtype: DType,
    pub stochastic_rounding: bool,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub hyper: Hyper,
    pub device: Device,
    pub device_index: i32,
    /// 0 = one per hardware thread.
    pub num_threads: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorSpec {
    pub numel: u64,
    pub param: DType,
    pub grad: DType,
    pub lr_scale: f32,
    pub weight_decay_scale: f32,
}

/// A struct_size past this is not a newer header but a bad value (Linux caps at a page too).
const STRUCT_MAX_SIZE: usize = 4096;
/// The most threads a pool may have: at least 256, and four per hardware thread on larger
/// machines. More is a bad value, not a machine (4096 took 22 s to start on 2 cores), and a
/// bandwidth-bound step gains nothing from threads beyond the cores.
pub(crate) fn max_threads() -> u32 {
    let hardware = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(hardware.saturating_mul(4))
        .unwrap_or(u32::MAX)
        .max(256)
}

pub fn check_lr(lr: f32) -> Result<()> {
    if !lr.is_finite() || lr < 0.0 {
        return Err(Error::invalid(format!(
            "lr must be finite and >= 0, got {lr}"
        )));
    }
    Ok(())
}

fn check_unit(name: &str, v: f32) -> Result<()> {
    if !(0.0..=1.0).contains(&v) {
        return Err(Error::invalid(format!("{name} must be in [0, 1], got {v}")));
    }
    Ok(())
}

fn check_nonneg(name: &str, v: f32) -> Result<()> {
    if !v.is_finite() || v < 0.0 {
        return Err(Error::invalid(format!(
            "{name} must be finite and >= 0, got {v}"
        )));
    }
    Ok(())
}

fn read_bool(name: &str, byte: u8) -> Result<bool> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Error::invalid(format!(
            "{name}: a bool must be 0 or 1, got {byte}"
        ))),
    }
}

/// Reads a caller's versioned struct (one that starts with `uint32_t struct_size`): refuses a
/// size smaller than version 1, reads the fields an older caller's size covers (the rest keep
/// their zero value, which means v1's behaviour: docs/ABI.md "Versioning"), and accepts a
/// size larger than this library's struct only when every byte past it is zero, so that no
/// option from a newer header is silently ignored.
///
/// # Safety
/// `ptr` must be non-NULL and point to at least `struct_size` readable bytes.
pub(crate) unsafe fn read_versioned<T: Versioned>(ptr: *const u8, name: &str) -> Result<T> {
    let (v1, known) = (T::V1_SIZE, std::mem::size_of::<T>());
    let size = std::ptr::read_unaligned(ptr as *const u32) as usize;
    if size < v1 {
        return Err(Error::invalid(format!(
            "{name}.struct_size is {size}, smaller than version 1 ({v1}); \
             set it to sizeof({name}) or start from the _default() function"
        )));
    }
    if size > STRUCT_MAX_SIZE {
        return Err(Error::invalid(format!(
            "{name}.struct_size is {size}, larger than any version could be"
        )));
    }
    if size > known {
        let tail = std::slice::from_raw_parts(ptr.add(known), size - known);
        if tail.iter().any(|&b| b != 0) {
            return Err(Error::unsupported(format!(
                "{name} has fields past the {known} bytes this library (ABI \
                 {LION_ABI_VERSION}) knows, and they are not zero: built against a newer \
                 lion.h?"
            )));
        }
    }
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    std::ptr::copy_nonoverlapping(ptr, value.as_mut_ptr() as *mut u8, size.min(known));
    // SAFETY: `Versioned` types are valid when zeroed, and every byte copied is the caller's.
    Ok(value.assume_init())
}

/// Reads and validates a caller's `LionConfig`, honouring `struct_size`.
///
/// # Safety
/// `ptr` must be non-NULL and point to at least `struct_size` readable bytes.
pub unsafe fn read_config(ptr: *const LionConfig) -> Result<Config> {
    parse_raw_config(&read_versioned::<RawConfig>(
        ptr as *const u8,
        "LionConfig",
    )?)
}

/// The device a caller's config names, on an otherwise default config: for a distributed
/// rank whose arguments are refused, which still takes part in creation's check on that
/// device. None where the struct cannot be read or names no device.
///
/// # Safety
/// `ptr` is NULL or points to at least `struct_size` readable bytes.
pub(crate) unsafe fn read_placement(ptr: *const LionConfig) -> Option<Config> {
    if ptr.is_null() {
        return None;
    }
    let raw = read_versioned::<RawConfig>(ptr as *const u8, "LionConfig").ok()?;
    let default = LionConfig::default();
    let mut placed =
        read_versioned::<RawConfig>(&default as *const LionConfig as *const u8, "LionConfig")
            .ok()?;
    placed.device = raw.device;
    placed.device_index = raw.device_index;
    parse_raw_config(&placed).ok()
}

/// A step's options, checked.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    pub grad_scale: f32,
    pub found_inf: *const f32,
    pub lr: *const f32,
    pub check_finite: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            grad_scale: 1.0,
            found_inf: std::ptr::null(),
            lr: std::ptr::null(),
            check_finite: false,
        }
    }
}

/// Reads and validates a caller's `LionStepOptions`, honouring `struct_size`.
///
/// # Safety
/// `ptr` must be non-NULL and point to at least `struct_size` readable bytes.
pub unsafe fn read_step_options(ptr: *const LionStepOptions) -> Result<StepOptions> {
    let raw = read_versioned::<RawStepOptions>(ptr as *const u8, "LionStepOptions")?;
    if !raw.grad_scale.is_finite() {
        return Err(Error::invalid(format!(
            "grad_scale must be finite, got {}",
            raw.grad_scale
        )));
    }
    for (name, p) in [("found_inf", raw.found_inf), ("lr", raw.lr)] {
        if !(p as usize).is_multiple_of(4) {
            return Err(Error::invalid(format!(
                "options.{name} is not aligned for a float"
            )));
        }
    }
    Ok(StepOptions {
        grad_scale: raw.grad_scale,
        found_inf: raw.found_inf,
        lr: raw.lr,
        check_finite: read_bool("check_finite", raw.check_finite)?,
    })
}

fn parse_raw_config(raw: &RawConfig) -> Result<Config> {
    check_lr(raw.lr)?;
    check_unit("beta1", raw.beta1)?;
    check_unit("beta2", raw.beta2)?;
    check_nonneg("weight_decay", raw.weight_decay)?;
    let decay_mode = DecayMode::from_raw(raw.decay_mode)?;
    if decay_mode != DecayMode::Standard && raw.weight_decay != 0.0 && raw.lr <= 0.0 {
        return Err(Error::invalid(
            "decoupled and corrected weight decay divide by the initial lr, which must then be > 0",
        ));
    }
    check_unit("cautious_factor", raw.cautious_factor)?;
    let cautious_weight_decay = read_bool("cautious_weight_decay", raw.cautious_weight_decay)?;
    let device = match raw.device {
        LION_DEVICE_CPU => Device::Cpu,
        LION_DEVICE_CUDA => Device::Cuda,
        d => return Err(Error::invalid(format!("device: unknown LionDevice {d}"))),
    };
    if raw.device_index < 0 {
        return Err(Error::invalid(format!(
            "device_index must be >= 0, got {}",
            raw.device_index
        )));
    }
    let state_dtype = DType::from_raw(raw.state_dtype, "state_dtype")?;
    if state_dtype == DType::F16 {
        return Err(Error::unsupported(
            "state_dtype F16 is not supported (its range is too small for momentum); use F32, BF16 or Q8",
        ));
    }
    let stochastic_rounding = read_bool("stochastic_rounding", raw.stochastic_rounding)?;
    if raw.num_threads > max_threads() {
        return Err(Error::invalid(format!(
            "num_threads must be at most {} on this machine (max(256, 4 x its {} hardware \
             threads); 0 = one per hardware thread), got {}",
            max_threads(),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            raw.num_threads
        )));
    }
    Ok(Config {
        hyper: Hyper {
            lr0: raw.lr,
            beta1: raw.beta1,
            beta2: raw.beta2,
            weight_decay: raw.weight_decay,
            decay_mode,
            cautious_factor: raw.cautious_factor,
            cautious_weight_decay,
            state_dtype,
            stochastic_rounding,
            seed: raw.seed,
        },
        device,
        device_index: raw.device_index,
        num_threads: raw.num_threads,
    })
}

/// Validates one tensor description (`index` is for the message).
pub fn parse_tensor(desc: &LionTensorDesc, index: usize) -> Result<TensorSpec> {
    let what = |field: &str| format!("tensors[{index}].{field}");
    let param = DType::from_raw(desc.param_dtype, &what("param_dtype"))?;
    let grad = DType::from_raw(desc.grad_dtype, &what("grad_dtype"))?;
    for (field, d) in [("param_dtype", param), ("grad_dtype", grad)] {
        if d == DType::Q8 {
            return Err(Error::invalid(format!(
                "{}: LION_DTYPE_Q8 is a state dtype only (8-bit momentum); parameters and \
                 gradients are F32, F16 or BF16",
                what(field)
            )));
        }
    }
    check_nonneg(&what("lr_scale"), desc.lr_scale)?;
    check_nonneg(&what("weight_decay_scale"), desc.weight_decay_scale)?;
    // Every buffer of this tensor must be addressable: numel * 4 bytes fits in isize.
    if desc.numel > (isize::MAX as u64) / 4 {
        return Err(Error::invalid(format!(
            "{} = {} is larger than any buffer can be",
            what("numel"),
            desc.numel
        )));
    }
    Ok(TensorSpec {
        numel: desc.numel,
        param,
        grad,
        lr_scale: desc.lr_scale,
        weight_decay_scale: desc.weight_decay_scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::LionStatus;

    /// A struct at its version 2: a field added past version 1's 16 bytes.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct V2 {
        struct_size: u32,
        a: u32,
        b: u64,
        added: u64,
    }
    // SAFETY: integers only.
    unsafe impl Versioned for V2 {
        const V1_SIZE: usize = 16;
    }

    fn read(bytes: &[u8]) -> Result<V2> {
        // Aligned, as a caller's struct is.
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `words` holds at least `bytes.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                words.as_mut_ptr() as *mut u8,
                bytes.len(),
            );
            read_versioned::<V2>(words.as_ptr() as *const u8, "V2")
        }
    }

    fn bytes(size: u32, a: u32, b: u64, rest: &[u8]) -> Vec<u8> {
        let mut v = [size.to_le_bytes(), a.to_le_bytes()].concat();
        v.extend(b.to_le_bytes());
        v.extend(rest);
        v
    }

    #[test]
    fn an_older_callers_struct_reads_its_fields_and_zero_for_the_newer_ones() {
        // 16 bytes, then garbage past the caller's struct that must not be read.
        let v1 = bytes(16, 7, 9, &[0xAB; 8]);
        assert_eq!(
            read(&v1).unwrap(),
            V2 {
                struct_size: 16,
                a: 7,
                b: 9,
                added: 0
            }
        );
        let v2 = bytes(24, 7, 9, &5u64.to_le_bytes());
        assert_eq!(read(&v2).unwrap().added, 5);
        // Smaller than version 1: refused.
        assert_eq!(
            read(&bytes(12, 7, 9, &[])).unwrap_err().status,
            LionStatus::LION_ERROR_INVALID_ARGUMENT
        );
        // A newer caller's: zero past what this library knows, else refused.
        let mut v3 = bytes(32, 7, 9, &5u64.to_le_bytes());
        v3.extend([0; 8]);
        assert_eq!(read(&v3).unwrap().added, 5);
        *v3.last_mut().unwrap() = 1;
        assert_eq!(
            read(&v3).unwrap_err().status,
            LionStatus::LION_ERROR_UNSUPPORTED
        );
    }
}
