//! The kernels' side of the interface with the host: the constants of the launch shape and
//! the by-value argument structs, exactly as lion.cu declares them.
//!
//! MIRROR(kernel-args): src/cuda/lion.cu, the section between `BEGIN KERNEL INTERFACE` and
//! `END KERNEL INTERFACE`. The mirror is checked by machine, not by eye: the prelude
//! (`prelude.rs`) gives lion.cu these constants, and asserts after its definitions every
//! struct's size and every field's size (NVRTC) and offset (the host compiler, in this
//! crate's tests), as `kernel_structs!` records them here.

use std::ffi::c_void;

/// Tensors per launch: their pointers travel in the kernel's by-value parameters (4 KB).
pub(crate) const MAX_TENSORS: usize = 240;
/// Tensors per launch of `lion_step_tensors` (`TensorsArgs`): each also carries its index
/// and its first block, in the same 4 KB.
pub(crate) const MAX_SLOTS: usize = 160;
/// Elements per thread and iteration (16-byte loads of 16-bit types). Each tensor's momentum
/// starts at a multiple of it.
pub(crate) const ELEMS: u64 = 8;
/// Threads per CUDA block.
pub(crate) const CUDA_THREADS_PER_BLOCK: u32 = 256;
/// The step counters (`StepArgs::step_counters`): the steps taken, and the ticket that the
/// blocks of a launch draw as they finish (the last one resets it).
pub(crate) const COUNTER_STEP: usize = 0;
pub(crate) const COUNTER_TICKET: usize = 1;
pub(crate) const N_COUNTERS: usize = 2;

/// A distributed step's agreement (`StepArgs::agreement`), u64 entries: this rank's flags
/// (`AGREE_SEND`, written by lion_agree), their sums over ranks (`AGREE_SUM`, the all-reduce's
/// result), the world size, and whether a step was skipped because the ranks differ. Each
/// flag block is `dist::Agreement`'s five values, in its order (`AGREE_REFUSED`..`AGREE_FP2`).
pub(crate) const AGREE_SEND: usize = 0;
pub(crate) const AGREE_SUM: usize = 5;
pub(crate) const AGREE_RANKS: usize = 10;
pub(crate) const AGREE_DIFFERED: usize = 11;
pub(crate) const AGREE_LEN: usize = 12;
pub(crate) const AGREE_REFUSED: usize = 0;
pub(crate) const AGREE_FOUND_INF: usize = 1;
pub(crate) const AGREE_NON_FINITE: usize = 2;
pub(crate) const AGREE_FP: usize = 3;
pub(crate) const AGREE_FP2: usize = 4;
/// How lion_vote writes votes (`VoteArgs::exchange`): 2 bits an element, or one i8; and
/// how lion_apply reads them: every rank's 2-bit votes (VOTE_PACKED), or the decided
/// results, 5 a byte (VOTE_TRITS: `cpu::vote_codes`).
pub(crate) const VOTE_PACKED: u32 = 0;
pub(crate) const VOTE_I8: u32 = 1;
pub(crate) const VOTE_TRITS: u32 = 2;
/// Sums a thread of lion_signs packs: 8 bytes of 5 results.
pub(crate) const SIGNS_PER_THREAD: u64 = 40;

/// A struct's layout as Rust lays it out (`repr(C)`, which the C compilers match).
pub(crate) struct Layout {
    pub(crate) name: &'static str,
    pub(crate) size: usize,
    pub(crate) fields: &'static [Field],
}

pub(crate) struct Field {
    pub(crate) name: &'static str,
    pub(crate) offset: usize,
    pub(crate) size: usize,
}

/// Declares `repr(C)` structs whose names and field names are lion.cu's, and `LAYOUTS`, their
/// layouts. Each struct must have no padding: then a field added on one side only always
/// changes a size that the prelude asserts.
macro_rules! kernel_structs {
    ($(
        $(#[$meta:meta])*
        struct $name:ident {
            $($(#[$field_meta:meta])* $field:ident: $ty:ty,)*
        }
    )*) => {
        $(
            $(#[$meta])*
            #[repr(C)]
            #[derive(Clone, Copy)]
            pub(crate) struct $name {
                $($(#[$field_meta])* pub(crate) $field: $ty,)*
            }

            const _: () = assert!(
                std::mem::size_of::<$name>() == 0 $(+ std::mem::size_of::<$ty>())*,
                concat!(stringify!($name), " has padding: make it explicit")
            );
        )*

        /// The layout of every struct that lion.cu shares with the host.
        pub(crate) const LAYOUTS: &[Layout] = &[$(
            Layout {
                name: stringify!($name),
                size: std::mem::size_of::<$name>(),
                fields: &[$(
                    Field {
                        name: stringify!($field),
                        offset: std::mem::offset_of!($name, $field),
                        size: std::mem::size_of::<$ty>(),
                    },
                )*],
            },
        )*];
    };
}

kernel_structs! {
    /// The hyperparameters, per step.
    struct HyperArgs {
        beta1: f32,
        beta2: f32,
        weight_decay: f32,
        lr0: f32,
        cautious_factor: f32,
        grad_scale: f32,
        /// A `LionDecayMode` (`DecayMode::raw`).
        decay_mode: u32,
        cautious_wd: u32,
        stochastic_rounding: u32,
        /// A `LionDType` (`DType::raw`).
        state_dtype: u32,
        seed: u64,
    }

    /// Per tensor, uploaded once at creation.
    struct TensorInfo {
        numel: u64,
        /// In elements, a multiple of ELEMS; under q8 state in bytes, a multiple of
        /// `plan::STATE_ALIGN` (`plan::state_layout`).
        state_offset: u64,
        lr_scale: f32,
        wd_scale: f32,
        param_dtype: u32,
        grad_dtype: u32,
    }

    /// Per CUDA block: its slice of one tensor, uploaded once at creation.
    struct BlockChunk {
        /// The tensor's index among all of them.
        tensor: u32,
        len: u32,
        start: u64,
    }

    /// The kernels' one by-value parameter (both kernels take the same).
    struct StepArgs {
        h: HyperArgs,
        /// Used when `lr_ptr` is NULL.
        lr: f32,
        /// This launch's tensors are [first_tensor, first_tensor + n_tensors).
        first_tensor: u32,
        n_tensors: u32,
        /// 1 in the launch that advances the step count (the step's last).
        last_launch: u32,
        /// NULL, or the lr, read by the kernels (CUDA graphs).
        lr_ptr: *const f32,
        /// NULL, or: skip the step where non-zero.
        found_inf: *const f32,
        /// Device pointers: N_COUNTERS u64, the per-tensor counts of signs that agree
        /// (Cautious Lion), the TensorInfo table, this launch's BlockChunks, the momentum.
        step_counters: u64,
        agreeing: u64,
        tensors: u64,
        chunks: u64,
        state: u64,
        /// Distributed: the step's agreement (`AGREE_*`), and (sharded) the ranks' count of
        /// non-finite gradient sums; 0 for a single process.
        agreement: u64,
        sums_bad: u64,
        /// 0, or a pointer table (`pointer_tables.rs`) into which block 0 of the update
        /// kernel writes this launch's pointers: tensor t's at u64 `2t` and `2t + 1`.
        fill_table: u64,
        params: [*mut c_void; MAX_TENSORS],
        grads: [*const c_void; MAX_TENSORS],
    }

    /// The same kernels' twins that read the tensors' addresses from device memory
    /// (`pointer_tables.rs`): `StepArgs` without its pointer arrays, a smaller launch.
    struct TableArgs {
        h: HyperArgs,
        lr: f32,
        first_tensor: u32,
        n_tensors: u32,
        last_launch: u32,
        lr_ptr: *const f32,
        found_inf: *const f32,
        step_counters: u64,
        agreeing: u64,
        tensors: u64,
        chunks: u64,
        state: u64,
        agreement: u64,
        sums_bad: u64,
        /// Tensor t's parameter address at u64 `2t`, its gradient's at `2t + 1`.
        pointers: u64,
    }

    /// lion_agree's: this rank's flags and what its fingerprint hashes.
    struct AgreeArgs {
        agreement: u64,
        step_counters: u64,
        found_inf: *const f32,
        lr_ptr: *const f32,
        setup: u64,
        lr: f32,
        refused: u32,
    }

    /// lion_copy's: between the caller's tensors and a flat buffer.
    struct CopyArgs {
        flat: u64,
        /// The flat element at `flat`.
        flat_base: u64,
        /// Non-zero: copy only in a step every rank agreed to.
        agreement: u64,
        sums_bad: u64,
        tensors: u64,
        chunks: u64,
        first_tensor: u32,
        elem_size: u32,
        to_flat: u32,
        unused: u32,
        ptrs: [*mut c_void; MAX_TENSORS],
    }

    /// lion_check_sums's: a non-finite scaled sum sets `*bad`.
    struct CheckArgs {
        sums: u64,
        bad: u64,
        n: u64,
        scale: f32,
        grad_dtype: u32,
    }

    /// lion_vote's and lion_apply's.
    struct VoteArgs {
        s: StepArgs,
        votes: u64,
        rank_bytes: u64,
        ranks: u32,
        exchange: u32,
        /// lion_vote under q8 state: per tensor, its first vote's flattened element (u64s;
        /// `s.tensors` then places the momentum); 0: `s.tensors`' offsets serve both.
        flat: u64,
    }

    /// lion_signs's: the signs of `n` i8 sums (a multiple of SIGNS_PER_THREAD), packed 5 a
    /// byte.
    struct SignsArgs {
        sums: u64,
        packed: u64,
        n: u64,
    }

    /// The by-value parameter of the kernels of `lion_step_tensors` (`lion_count_tensors`,
    /// `lion_update_tensors_*`): any list of tensors, each in a slot. Block `b` works on chunk
    /// `b - slot_block[s]` of slot `s`'s tensor, `s` the last slot whose first block is at most
    /// `b`; chunks are `chunk_elems` long (the last of a tensor shorter), as a whole step's.
    struct TensorsArgs {
        h: HyperArgs,
        /// Used when `lr_ptr` is NULL.
        lr: f32,
        n_slots: u32,
        /// Blocks with work (the launch has at least one: an idle block when this is 0).
        n_blocks: u32,
        chunk_elems: u32,
        /// 1 in the launch that completes a round: it advances the step count.
        completes_round: u32,
        _pad: u32,
        /// As in `StepArgs`.
        lr_ptr: *const f32,
        found_inf: *const f32,
        step_counters: u64,
        agreeing: u64,
        tensors: u64,
        state: u64,
        /// Per slot: the tensor's buffers, its index, and its first block.
        params: [*mut c_void; MAX_SLOTS],
        grads: [*const c_void; MAX_SLOTS],
        slot_tensor: [u32; MAX_SLOTS],
        slot_block: [u32; MAX_SLOTS],
    }
}

impl TableArgs {
    /// The same launch with its tensors' pointers in its parameters (`StepArgs`), tensor
    /// `first_tensor + t`'s from `pointers(t)`, writing them into the table at `fill_table`
    /// too where it is not 0.
    pub(crate) fn by_value(
        &self,
        pointers: impl Fn(usize) -> (*mut c_void, *const c_void),
        fill_table: u64,
    ) -> StepArgs {
        let mut args = StepArgs {
            h: self.h,
            lr: self.lr,
            first_tensor: self.first_tensor,
            n_tensors: self.n_tensors,
            last_launch: self.last_launch,
            lr_ptr: self.lr_ptr,
            found_inf: self.found_inf,
            step_counters: self.step_counters,
            agreeing: self.agreeing,
            tensors: self.tensors,
            chunks: self.chunks,
            state: self.state,
            agreement: self.agreement,
            sums_bad: self.sums_bad,
            fill_table,
            params: [std::ptr::null_mut(); MAX_TENSORS],
            grads: [std::ptr::null(); MAX_TENSORS],
        };
        for t in 0..self.n_tensors as usize {
            (args.params[t], args.grads[t]) = pointers(t);
        }
        args
    }
}

// A kernel's parameters must fit in 4 KB (every CUDA version and device).
const _: () =
    assert!(std::mem::size_of::<StepArgs>() == 3984 && std::mem::size_of::<HyperArgs>() == 48);
const _: () = assert!(std::mem::size_of::<TableArgs>() == 144);
const _: () = assert!(std::mem::size_of::<VoteArgs>() <= 4096);
const _: () = assert!(std::mem::size_of::<TensorsArgs>() <= 4096);
