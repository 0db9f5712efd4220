//! The interface between the optimizer and its engines: what an engine is handed for a step,
//! and what it must do. A leaf: it imports neither engine (they import it), and the optimizer
//! only names an engine where it creates one.

use std::ffi::c_void;

use crate::config::{Hyper, StepOptions, TensorSpec};
use crate::status::Result;

/// The caller's parameter and gradient pointers for one step, already checked: non-NULL for
/// every non-empty tensor, aligned to their dtype, and no parameter overlapping anything.
/// For a step of some tensors (`lion_step_tensors`), `params` and `grads` hold one pointer per
/// listed tensor, and `slot_of` maps a tensor's index to its place in them.
pub(crate) struct StepBuffers<'a> {
    params: &'a [*mut c_void],
    grads: &'a [*const c_void],
    tensors: &'a [TensorSpec],
    slot_of: Option<&'a [u32]>,
}

// The pointers are only dereferenced inside disjoint chunks while the step runs.
unsafe impl Sync for StepBuffers<'_> {}

impl<'a> StepBuffers<'a> {
    /// # Safety
    /// The pointers must satisfy the conditions above (see `Optimizer::check_buffers`).
    pub(crate) unsafe fn new(
        params: &'a [*mut c_void],
        grads: &'a [*const c_void],
        tensors: &'a [TensorSpec],
    ) -> Self {
        StepBuffers {
            params,
            grads,
            tensors,
            slot_of: None,
        }
    }

    /// The buffers of some tensors: `params[j]` and `grads[j]` are those of tensor `t` where
    /// `slot_of[t] == j` (only the listed tensors are asked for).
    ///
    /// # Safety
    /// As `new`, for the listed tensors.
    pub(crate) unsafe fn some(
        params: &'a [*mut c_void],
        grads: &'a [*const c_void],
        tensors: &'a [TensorSpec],
        slot_of: &'a [u32],
    ) -> Self {
        StepBuffers {
            params,
            grads,
            tensors,
            slot_of: Some(slot_of),
        }
    }

    fn slot(&self, t: usize) -> usize {
        self.slot_of.map_or(t, |s| s[t] as usize)
    }

    /// Address of element `start` of tensor `t`'s parameters.
    pub(crate) fn param(&self, t: usize, start: u64) -> *mut u8 {
        (self.params[self.slot(t)] as *mut u8)
            .wrapping_add(start as usize * self.tensors[t].param.size())
    }

    /// The same parameters with other gradients (sharded mode: the slice's sums).
    ///
    /// # Safety
    /// As `new`, for the elements the engine reads through them.
    pub unsafe fn with_grads(&self, grads: &'a [*const c_void]) -> StepBuffers<'a> {
        StepBuffers {
            params: self.params,
            grads,
            tensors: self.tensors,
            slot_of: self.slot_of,
        }
    }

    /// Elements of tensor `t`.
    pub(crate) fn numel(&self, t: usize) -> u64 {
        self.tensors[t].numel
    }

    /// Address of element `start` of tensor `t`'s gradient.
    pub(crate) fn grad(&self, t: usize, start: u64) -> *const u8 {
        (self.grads[self.slot(t)] as *const u8)
            .wrapping_add(start as usize * self.tensors[t].grad.size())
    }
}

/// The stretch of one tensor that an engine owns: all of it in a single process; in sharded
/// mode, the part inside this rank's slice of the flattened tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Piece {
    pub tensor: usize,
    /// Index of the piece's first element in its tensor (it numbers the rounding draws).
    pub first: u64,
    pub len: u64,
}

impl Piece {
    /// Every tensor, whole (a table as long as the tensors: OUT_OF_MEMORY, not an abort).
    pub fn whole(tensors: &[TensorSpec]) -> crate::status::Result<Vec<Piece>> {
        let mut pieces = crate::buffer::try_vec(tensors.len(), "the tensors' pieces")?;
        pieces.extend(tensors.iter().enumerate().map(|(tensor, t)| Piece {
            tensor,
            first: 0,
            len: t.numel,
        }));
        Ok(pieces)
    }
}

fn unsupported_some() -> crate::status::Error {
    crate::status::Error::unsupported(
        "a distributed optimizer steps every tensor at once: lion_step_tensors and \
         lion_round_finish are not available (use lion_step)",
    )
}

/// One engine: the momentum, the step count and the work of a step, in its own memory.
/// `tensors` and `hyper` are the optimizer's (validated, the same at every call).
pub(crate) trait Engine: Send {
    /// Applies one step with `lr` (the optimizer's current lr) and the step's `options`, and
    /// counts it: unless `options.found_inf` says to skip it (then nothing is written and the
    /// count stays), and with `options.lr`, where set, instead of `lr`. Refuses options the
    /// engine cannot honour. Runs on the caller's `stream` where the engine has streams.
    ///
    /// # Safety
    /// `buffers` passed `Optimizer::check_buffers` (and this engine's `check_pointers`);
    /// the options' pointers are NULL or valid in the step's memory.
    unsafe fn step(
        &mut self,
        hyper: &Hyper,
        tensors: &[TensorSpec],
        lr: f32,
        options: &StepOptions,
        buffers: &StepBuffers,
        stream: *mut c_void,
    ) -> Result<()>;

    /// Whether this engine steps some tensors at a time (`step_tensors`, `finish_round`);
    /// the distributed engines do not.
    fn steps_some_tensors(&self) -> bool {
        false
    }

    /// One call of a round of `lion_step_tensors`: steps the tensors `indices` (distinct, none
    /// stepped yet in this round; checked by the optimizer) exactly as `step` would step them,
    /// with the step number `step_count() + 1` for every call of the round; counts the step
    /// only where `completes` (this call steps the round's last tensors) and `found_inf` does
    /// not skip it. `buffers` hold one slot per index (`StepBuffers::some`).
    ///
    /// # Safety
    /// As `step`, for the listed tensors.
    #[allow(clippy::too_many_arguments)] // one call's inputs
    unsafe fn step_tensors(
        &mut self,
        hyper: &Hyper,
        tensors: &[TensorSpec],
        lr: f32,
        options: &StepOptions,
        indices: &[u32],
        buffers: &StepBuffers,
        completes: bool,
        stream: *mut c_void,
    ) -> Result<()> {
        let _ = (
            hyper, tensors, lr, options, indices, buffers, completes, stream,
        );
        Err(unsupported_some())
    }

    /// Ends an open round whose other tensors will not be stepped: counts the step.
    fn finish_round(&mut self, stream: *mut c_void) -> Result<()> {
        let _ = stream;
        Err(unsupported_some())
    }

    /// Steps taken (a skipped step does not count).
    fn step_count(&self) -> Result<u64>;

    /// A distributed CUDA engine skips, on the device, a step whose ranks differ (setup, step
    /// count, lr); the host learns of it here, once (`lion_step_count`, which waits anyway).
    /// Not in `step_count`: a collective save reads the count, and must not fail on one rank
    /// only.
    fn report_disagreement(&self) -> Result<()> {
        Ok(())
    }

    /// A step refused on this rank before the engine saw it (bad buffers or options): a
    /// distributed engine still takes part in the step's first exchange of flags (on the
    /// CUDA engine, in every collective of the step, on `stream`), so that every rank refuses
    /// the step instead of waiting for this one.
    fn refuse_collectively(&mut self, stream: *mut c_void) {
        let _ = stream;
    }

    /// Whether saving a checkpoint is a collective (sharded mode: it gathers the momentum),
    /// which a rank must take part in even when it refuses the caller's buffer.
    fn collective_checkpoint(&self) -> bool {
        false
    }

    /// Called in a child of fork() before its first use there (see `crate::fork`): rebuild
    /// what lived in the parent's threads. An engine whose resources cannot survive a fork
    /// (CUDA) refuses its calls instead, by itself.
    fn revive_after_fork(&mut self) -> Result<()> {
        Ok(())
    }

    /// Refuses buffers that pass the optimizer's checks but that this engine cannot use.
    /// `params[j]` and `grads[j]` are tensor `indices[j]`'s (tensor `j`'s without `indices`);
    /// `accepted` holds the (param, grad) addresses that passed last time, per tensor.
    fn check_pointers(
        &self,
        tensors: &[TensorSpec],
        indices: Option<&[u32]>,
        params: &[*mut c_void],
        grads: &[*const c_void],
        accepted: &[(usize, usize)],
    ) -> Result<()> {
        let _ = (tensors, indices, params, grads, accepted);
        Ok(())
    }

    /// Refuses a step's option pointers (`found_inf`, `lr`) that this engine cannot read where
    /// the step runs; `accepted` holds the (found_inf, lr) addresses that passed last time,
    /// which are not asked about again.
    fn check_option_pointers(&self, options: &StepOptions, accepted: (usize, usize)) -> Result<()> {
        let _ = (options, accepted);
        Ok(())
    }

    /// The momentum as little-endian bytes of the state dtype, tensors in order, unpadded
    /// (`out` holds exactly that many bytes). Where saving is collective
    /// (`collective_checkpoint`), every rank takes part, with `out` None where its own save
    /// was refused, and the ranks first agree that they share their setup, step count and
    /// `lr` (the optimizer's); elsewhere `lr` is not read, and None reads nothing.
    fn read_state(&self, tensors: &[TensorSpec], lr: f32, out: Option<&mut [u8]>) -> Result<()>;

    /// Replaces the momentum (as `read_state` gives it) and the step count: values a
    /// checkpoint held, verified by the caller.
    fn restore(&mut self, tensors: &[TensorSpec], step: u64, state: &[u8]) -> Result<()>;
}
