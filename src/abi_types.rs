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
/// 8-bit momentum (a state dtype only): one signed code per element and one f32 scale per
/// block of 256 elements; tensors under 4096 elements keep f32 momentum. About 1.016 bytes
/// per element.
pub const LION_DTYPE_Q8: LionDType = 3;

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
    /// LION_DTYPE_F32; LION_DTYPE_BF16 halves the optimizer's memory, LION_DTYPE_Q8 quarters
    /// it (CPU and CUDA, in vote mode too; the sharded mode refuses it).
    pub state_dtype: LionDType,
    /// false; for F16/BF16 params (and BF16 state).
    pub stochastic_rounding: bool,
    /// 0; seeds stochastic rounding.
    pub seed: u64,
    /// 0 = one per hardware thread (CPU only).
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
/// Pointers are in the step's memory: device memory for CUDA (checked with the driver,
/// `LION_ERROR_INVALID_ARGUMENT` otherwise), host memory for the CPU.
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

/// A struct that starts with `uint32_t struct_size` (`config::read_versioned`), with its size at
/// version 1. A later version adds fields at or past its previous size, never in the tail
/// padding a v1 struct has (LionConfig's bytes 60..64, LionStepOptions' 25..32,
/// LionDistConfig's 52..56), where a v1 caller may leave garbage.
///
/// # Safety
/// Every field is valid when all its bytes are zero (integers, floats, pointers, `Option`s of
/// functions): zero is a new field's v1 behaviour.
pub(crate) unsafe trait Versioned: Copy {
    const V1_SIZE: usize;
}

// SAFETY (all four): integers, floats, bytes for bools, pointers and optional functions.
unsafe impl Versioned for RawConfig {
    const V1_SIZE: usize = 64;
}
unsafe impl Versioned for RawStepOptions {
    const V1_SIZE: usize = 32;
}
unsafe impl Versioned for LionDistConfig {
    const V1_SIZE: usize = 56;
}
unsafe impl Versioned for LionCollectives {
    const V1_SIZE: usize = 40;
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
    // The distributed structs on LP64 (their mirrors are checked against the header by
    // bindings/python/tests/test_layout.py; these pin the Rust side).
    assert!(size_of::<LionCollectives>() == 40);
    assert!(offset_of!(LionCollectives, all_gather) == 32);
    assert!(size_of::<LionDistConfig>() == 56);
    assert!(offset_of!(LionDistConfig, collectives) == 16);
    assert!(offset_of!(LionDistConfig, vote_exchange) == 48);
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

// ---- Distributed Lion (additive to ABI 1): docs/ABI.md, "Distributed modes" ----

/// How the ranks of a distributed optimizer share the work.
pub type LionDistMode = u32;
/// ZeRO-1: each rank keeps the momentum of its 1/W slice of the flattened parameters; a step
/// reduce-scatters the gradients (their mean is used), updates the slice and all-gathers the
/// parameters. Bit-identical to one process stepping on the mean gradient.
pub const LION_DIST_SHARDED: LionDistMode = 1;
/// Distributed Lion (Liu et al. 2024), majority vote: every rank keeps its own momentum of its
/// own gradients; the ranks exchange only the signs of their updates and apply the sign of
/// the vote's sum (a tie gives 0). No gradient is sent.
pub const LION_DIST_VOTE: LionDistMode = 2;

/// Which exchange the vote mode uses.
pub type LionVoteExchange = u32;
/// Chosen by the number of ranks: `LION_VOTE_SUMS` from 5 to 127 ranks, else `LION_VOTE_GATHER`.
pub const LION_VOTE_AUTO: LionVoteExchange = 0;
/// An int8 reduce-scatter of the votes' sums, then an all-gather of the results packed 5 a
/// byte: 1.2 (W-1)/W bytes sent per parameter per rank (exact up to 127 ranks; more is
/// `LION_ERROR_INVALID_ARGUMENT`).
pub const LION_VOTE_SUMS: LionVoteExchange = 1;
/// An all-gather of every rank's 2-bit votes, counted locally: (W-1)/4 bytes per parameter.
pub const LION_VOTE_GATHER: LionVoteExchange = 2;

/// Element type of a buffer handed to a collective. The float values equal `LionDType`'s.
pub type LionCommDType = u32;
pub const LION_COMM_F32: LionCommDType = 0;
pub const LION_COMM_F16: LionCommDType = 1;
pub const LION_COMM_BF16: LionCommDType = 2;
pub const LION_COMM_I8: LionCommDType = 3;
pub const LION_COMM_U8: LionCommDType = 4;
pub const LION_COMM_U64: LionCommDType = 5;

/// One collective of the caller's transport: returns 0 on success, anything else on failure
/// (the call that made it, a creation, a step or a sharded save, then fails with
/// `LION_ERROR_COMM`, naming the code). `stream` is the step's (a `CUstream` for CUDA, NULL on
/// the CPU); buffers are in the step's memory. `count` counts elements of `dtype`: the
/// result's for a reduce-scatter, the input's for an all-gather. Creating an optimizer of more
/// than one rank calls `all_reduce_sum` once too (5 u64), then, where every rank agreed,
/// `all_gather` of one `LION_COMM_U64` per rank (its rank). A sharded save calls
/// `all_reduce_sum` (5 u64), then `all_gather` in rounds, in the state dtype. These are in
/// device memory for CUDA, with stream NULL, each waited for. It must return: an exception
/// out of it aborts the process, and a longjmp out of it leaves the optimizer locked for good
/// (catch inside it and return non-zero). It runs with thread cancellation held off.
pub type LionCollectiveFn = Option<
    unsafe extern "C" fn(
        context: *mut std::ffi::c_void,
        send: *const std::ffi::c_void,
        recv: *mut std::ffi::c_void,
        count: usize,
        dtype: LionCommDType,
        stream: *mut std::ffi::c_void,
    ) -> i32,
>;

/// The open transport: the caller's own collectives (MPI, Gloo, torch.distributed, a game
/// engine's network), in the semantics of NCCL's. Sums are element-wise in `dtype`; the
/// library keeps int8 sums from overflowing. Blocks are in rank order. Callers set
/// `struct_size = sizeof(LionCollectives)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LionCollectives {
    pub struct_size: u32,
    /// Handed back to every call.
    pub context: *mut std::ffi::c_void,
    /// recv[i] = the sum over ranks of send[i], for i < count, on every rank.
    pub all_reduce_sum: LionCollectiveFn,
    /// `send` holds world_size blocks of `count`; rank r receives the sum over ranks of block r.
    pub reduce_scatter_sum: LionCollectiveFn,
    /// `send` holds `count`; `recv` receives world_size blocks of `count`, block r from rank r.
    pub all_gather: LionCollectiveFn,
}

/// How an optimizer joins a group of ranks (`lion_create_distributed`). Exactly one transport:
/// the caller's `collectives`, the caller's `nccl_comm`, or an `nccl_unique_id` from which the
/// library makes (and with the optimizer destroys) its own communicator. Callers set
/// `struct_size = sizeof(LionDistConfig)` (`lion_dist_config_default()` does).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LionDistConfig {
    pub struct_size: u32,
    /// LION_DIST_SHARDED or LION_DIST_VOTE.
    pub mode: LionDistMode,
    /// This process's rank, in [0, world_size): its place in the collectives (block `rank`
    /// of an all-gather), which creation checks.
    pub rank: i32,
    /// The number of ranks (1 is allowed: a group of one).
    pub world_size: i32,
    /// NULL, or the caller's collectives (read at create; the table is copied).
    pub collectives: *const LionCollectives,
    /// NULL, or an `ncclComm_t` of the libnccl this process has loaded (e.g. PyTorch's).
    pub nccl_comm: *mut std::ffi::c_void,
    /// NULL, or the 128 bytes of an `ncclUniqueId` (`lion_nccl_unique_id` on one rank, sent to
    /// every rank by the caller's means).
    pub nccl_unique_id: *const u8,
    /// NULL (a libnccl.so.2 already loaded in this process, else the loader's search for
    /// libnccl.so.2, then libnccl.so), or the path of the NCCL library to load.
    pub nccl_library: *const std::ffi::c_char,
    /// LION_VOTE_AUTO.
    pub vote_exchange: LionVoteExchange,
}

impl Default for LionDistConfig {
    fn default() -> Self {
        LionDistConfig {
            struct_size: std::mem::size_of::<LionDistConfig>() as u32,
            mode: LION_DIST_SHARDED,
            rank: 0,
            world_size: 1,
            collectives: std::ptr::null(),
            nccl_comm: std::ptr::null_mut(),
            nccl_unique_id: std::ptr::null(),
            nccl_library: std::ptr::null(),
            vote_exchange: LION_VOTE_AUTO,
        }
    }
}

/// The bytes of an `ncclUniqueId`.
pub const LION_NCCL_UNIQUE_ID_BYTES: usize = 128;
