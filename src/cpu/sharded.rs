//! The sharded mode (ZeRO-1) on the CPU: each rank keeps the momentum of its slice of the
//! flattened tensors (`dist::layout`). A step:
//!
//! 1. lays this rank's gradients end to end (or takes the caller's buffer where they lie so
//!    already) and reduce-scatters them: each rank gets the sum over ranks of its slice;
//! 2. updates its slice with that sum times 1/W (times `grad_scale`, rounded once), through
//!    the CPU engine over the slice's pieces: the same kernels, coefficients, rounding keys
//!    and element numbers as one process stepping every tensor, and Cautious Lion's counts
//!    summed over ranks, so the result is bit-identical to one process stepping on the mean
//!    gradient;
//! 3. all-gathers the parameters, straight into the caller's tensors where they are one flat
//!    buffer of the layout, else into a buffer copied back into them.
//!
//! A checkpoint is the single-process one: saving gathers the momentum (every rank must call
//! it), loading keeps this rank's slice, so a checkpoint loads on any number of ranks.

use std::ffi::c_void;

use super::CpuEngine;
use crate::buffer::{try_vec, ZeroedBuf};
use crate::config::{DType, Hyper, StepOptions, TensorSpec};
use crate::dist::layout::Layout;
use crate::dist::{
    agree_on_save, agree_on_step, create_after_check, refuse_step, setup_hash, Agreement,
    CommDType, Transport,
};
use crate::engine::{Engine, Piece, StepBuffers};
use crate::status::{Error, LionStatus, Result};

pub(crate) fn comm_dtype(d: DType) -> CommDType {
    match d {
        DType::F32 => CommDType::F32,
        DType::F16 => CommDType::F16,
        DType::BF16 => CommDType::BF16,
        DType::Q8 => unreachable!("the sharded mode refuses q8 state"),
    }
}

/// The one dtype of every tensor's `which` (sharded mode lays them end to end).
pub(crate) fn one_dtype(
    tensors: &[TensorSpec],
    which: fn(&TensorSpec) -> DType,
    what: &str,
) -> Result<DType> {
    let first = which(&tensors[0]);
    match tensors.iter().position(|t| which(t) != first) {
        None => Ok(first),
        Some(i) => Err(Error::unsupported(format!(
            "the sharded mode needs every tensor's {what} to be the same; tensors[0] is {} and \
             tensors[{i}] is {}",
            first.name(),
            which(&tensors[i]).name()
        ))),
    }
}

pub(crate) struct ShardedCpu {
    inner: CpuEngine,
    transport: Box<dyn Transport>,
    layout: Layout,
    /// The stretches of tensors in this rank's slice.
    pieces: Vec<Piece>,
    grad: DType,
    param: DType,
    state: DType,
    /// This rank's gradients laid end to end, padded to every slice (the reduce-scatter's
    /// input; the padding stays zero).
    grads_out: ZeroedBuf,
    /// The sum over ranks of this rank's slice.
    grads_in: ZeroedBuf,
    /// Per tensor, where `grads_in` would hold its element 0: only the elements of this
    /// rank's pieces are read through it (the address may lie outside the buffer).
    slice_grads: Vec<*const c_void>,
    params_out: ZeroedBuf,
    params_in: ZeroedBuf,
    /// Cautious Lion's counts, per tensor: this rank's, then the sum over ranks.
    counts: Vec<u64>,
    steps: u64,
    /// The hash of what every rank must share (`dist::fingerprint`).
    setup: u64,
    /// A checkpoint's gather, in rounds of `gather_chunk` elements of each rank's slice:
    /// this rank's part and every rank's, made at creation so that a save allocates nothing
    /// here (a rank out of memory there would leave the others in the gather).
    gather_mine: ZeroedBuf,
    gather_all: ZeroedBuf,
}

/// A round of a checkpoint's gather, in elements of each rank's slice (`Layout::gather_chunk`:
/// at most 2^16, 256 KiB of f32 momentum, and 2^20 for all ranks).
fn gather_chunk(layout: &Layout) -> u64 {
    layout.gather_chunk(1 << 16, 1 << 20)
}

// The raw pointers point into this engine's own buffers.
unsafe impl Send for ShardedCpu {}

impl ShardedCpu {
    /// `refusal`: this rank's arguments were refused before the engine (`Optimizer::build`);
    /// it still takes part in creation's check, so that the other ranks fail with it.
    pub fn new(
        hyper: &Hyper,
        tensors: &[TensorSpec],
        num_threads: u32,
        transport: Box<dyn Transport>,
        refusal: Option<Error>,
    ) -> Result<ShardedCpu> {
        let world = transport.world_size();
        let setup = setup_hash(format_args!("sharded {world:?} {hyper:?} {tensors:?}"));
        create_after_check(transport, setup, refusal, |rank, world| {
            Self::build(hyper, tensors, num_threads, rank, world)
        })
    }

    /// The engine of rank `rank` of `world`, less its transport and setup hash, which the
    /// returned function takes.
    fn build(
        hyper: &Hyper,
        tensors: &[TensorSpec],
        num_threads: u32,
        rank: usize,
        world: usize,
    ) -> Result<impl FnOnce(Box<dyn Transport>, u64) -> ShardedCpu> {
        if hyper.state_dtype == DType::Q8 {
            return Err(Error::unsupported(
                "the sharded mode does not support 8-bit momentum (state_dtype LION_DTYPE_Q8) \
                 in this version: its slices are cut in the flattened tensors, and a q8 block \
                 of 256 elements (one scale) must lie in one tensor and on one rank; use the \
                 vote mode, or F32 or BF16 state",
            ));
        }
        let layout = Layout::new(tensors, rank, world)?;
        let grad = one_dtype(tensors, |t| t.grad, "grad_dtype")?;
        let param = one_dtype(tensors, |t| t.param, "param_dtype")?;
        let pieces = layout.pieces(tensors)?;
        let inner = CpuEngine::for_pieces(hyper, tensors, &pieces, num_threads)?;
        let bytes = |elements: u64, d: DType| {
            usize::try_from(elements)
                .ok()
                .and_then(|n| n.checked_mul(d.size()))
                .ok_or_else(|| Error::invalid("the flattened tensors cannot be addressed"))
        };
        let grads_out = ZeroedBuf::new(
            bytes(layout.padded(), grad)?,
            "the gradients laid end to end (the reduce-scatter's input)",
        )?;
        let grads_in = ZeroedBuf::new(
            bytes(layout.slice, grad)?,
            "this rank's slice of the gradient sums (the reduce-scatter's output)",
        )?;
        let params_out = ZeroedBuf::new(
            bytes(layout.slice, param)?,
            "this rank's slice of the parameters (the all-gather's input)",
        )?;
        let params_in = ZeroedBuf::new(
            bytes(layout.padded(), param)?,
            "every rank's parameters (the all-gather's output)",
        )?;
        let base = (grads_in.as_ptr() as usize)
            .wrapping_sub((layout.rank as u64 * layout.slice) as usize * grad.size());
        let mut slice_grads = try_vec(tensors.len(), "gradient pointers")?;
        slice_grads.extend(
            (layout.offsets.iter())
                .map(|&o| base.wrapping_add(o as usize * grad.size()) as *const c_void),
        );
        let gather_chunk = gather_chunk(&layout);
        let gather_mine = ZeroedBuf::new(
            bytes(gather_chunk, hyper.state_dtype)?,
            "this rank's part of a checkpoint's gather",
        )?;
        let gather_all = ZeroedBuf::new(
            bytes(gather_chunk * world as u64, hyper.state_dtype)?,
            "every rank's part of a checkpoint's gather",
        )?;
        let mut counts = try_vec(tensors.len(), "counts")?;
        counts.resize(tensors.len(), 0);
        let state = hyper.state_dtype;
        Ok(move |transport, setup| ShardedCpu {
            inner,
            transport,
            grad,
            param,
            state,
            grads_out,
            grads_in,
            slice_grads,
            params_out,
            params_in,
            counts,
            steps: 0,
            setup,
            layout,
            pieces,
            gather_mine,
            gather_all,
        })
    }

    /// Copies `count` elements of `size` bytes, over the engine's threads: a step's copies
    /// (gradients in, parameters out and back) are as large as the tensors, and one thread
    /// made them most of a step.
    ///
    /// # Safety
    /// Both ranges are valid and do not overlap.
    unsafe fn copy(&self, from: *const u8, to: *mut u8, count: u64, size: usize) {
        let (from, to) = (from as usize, to as usize);
        self.inner.for_each_block(count as usize * size, &|bytes| {
            // SAFETY: a part of the caller's ranges; the parts are disjoint.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (from + bytes.start) as *const u8,
                    (to + bytes.start) as *mut u8,
                    bytes.len(),
                )
            }
        });
    }
}

impl Engine for ShardedCpu {
    unsafe fn step(
        &mut self,
        hyper: &Hyper,
        tensors: &[TensorSpec],
        lr: f32,
        options: &StepOptions,
        buffers: &StepBuffers,
        _stream: *mut c_void,
    ) -> Result<()> {
        // Every decision is taken by all ranks together, or some would wait in a collective
        // that others left. First: does any rank refuse (its lr)? A rank whose found_inf is
        // set does not (`agreed_lr`): its skip, agreed on below, skips the step everywhere.
        let lr = super::agreed_lr(options, lr, hyper, tensors);
        // The first exchange also counts the ranks that ask for the check after the
        // reduce-scatter (its flag fields are otherwise unused here): every rank then makes
        // that exchange, whatever its own options, so that no rank's collectives pair with
        // another's of another kind and size.
        let asks = Agreement {
            found_inf: !options.found_inf.is_null() as u64,
            non_finite: options.check_finite as u64,
            ..Agreement::default()
        };
        let (lr, asked) = agree_on_step(&*self.transport, asks, lr, self.setup, self.steps)?;
        let (gs, ps) = (self.grad.size(), self.param.size());
        let slice = self.layout.slice;
        // The gradients laid end to end: the caller's own buffer where they already are.
        let send = match self.layout.flat_grads(buffers, gs) {
            Some(base) => base as *const u8,
            None => {
                let out = self.grads_out.as_ptr();
                for (t, spec) in tensors.iter().enumerate() {
                    let to = out.add(self.layout.offsets[t] as usize * gs);
                    self.copy(buffers.grad(t, 0), to, spec.numel, gs);
                }
                out as *const u8
            }
        };
        self.transport.reduce_scatter_sum(
            send as *const c_void,
            self.grads_in.as_ptr() as *mut c_void,
            slice as usize,
            comm_dtype(self.grad),
            std::ptr::null_mut(),
        )?;
        let sums = buffers.with_grads(&self.slice_grads);
        // The mean, and the caller's scale, in one multiplication.
        let scale = (options.grad_scale as f64 / self.layout.world_size as f64) as f32;
        // Then the skip and the check, on the sums, where any rank asked (each rank checks
        // its own slice): ranks' gradients that are finite alone (a GradScaler's) can
        // overflow once summed, and then the step is skipped everywhere; a found_inf given
        // on any rank makes that a skip, else check_finite on any rank a refusal.
        let (skip, check) = (asked.found_inf != 0, asked.non_finite != 0);
        if skip || check {
            let bad = self.inner.find_non_finite(tensors, &sums, scale);
            let all = Agreement {
                found_inf: super::host_skips(options) as u64,
                non_finite: bad.is_some() as u64,
                ..Agreement::default()
            }
            .reach(&*self.transport)?;
            if skip && (all.found_inf != 0 || all.non_finite != 0) {
                return Ok(());
            }
            if all.non_finite != 0 {
                return Err(Error::new(
                    LionStatus::LION_ERROR_NON_FINITE,
                    match bad {
                        Some((t, i)) => format!(
                            "grads[{t}][{i}], summed over the ranks, is NaN or Inf: the step \
                             was refused on every rank and nothing was written"
                        ),
                        None => "a gradient summed over the ranks is NaN or Inf on another \
                                 rank's slice: the step was refused on every rank and nothing \
                                 was written"
                            .to_string(),
                    },
                ));
            }
        }
        let next = self.steps + 1;
        let (transport, counts) = (&self.transport, &mut self.counts);
        self.inner
            .update(hyper, tensors, lr, scale, next, &sums, &mut |mine| {
                counts.copy_from_slice(mine);
                transport.all_reduce_sum(
                    counts.as_ptr().cast(),
                    mine.as_mut_ptr().cast(),
                    mine.len(),
                    CommDType::U64,
                    std::ptr::null_mut(),
                )
            })?;
        // This rank's updated slice, then everyone's, back into the caller's tensors.
        let (start, end) = self.layout.owned();
        let mine = self.params_out.as_ptr();
        for piece in &self.pieces {
            let at = self.layout.offsets[piece.tensor] + piece.first - start;
            let from = buffers.param(piece.tensor, piece.first);
            self.copy(from, mine.add(at as usize * ps), piece.len, ps);
        }
        // Every rank's slice: straight into the caller's parameters where they are one flat
        // buffer of the layout (this rank's own slice comes back with the bits the update
        // wrote), else into a buffer, copied from there.
        let flat_params = self.layout.flat_params(buffers, ps);
        let recv = flat_params.map_or(self.params_in.as_ptr(), |base| base as *mut u8);
        self.transport.all_gather(
            self.params_out.as_ptr() as *const c_void,
            recv as *mut c_void,
            slice as usize,
            comm_dtype(self.param),
            std::ptr::null_mut(),
        )?;
        if flat_params.is_none() {
            // The others' slices: this rank's own pieces are in the caller's tensors already
            // (the update wrote them there), and the all-gather gave the same bits back.
            let all = self.params_in.as_ptr() as *const u8;
            for (t, spec) in tensors.iter().enumerate() {
                let (first, last) = (self.layout.offsets[t], self.layout.offsets[t] + spec.numel);
                for (a, b) in [(first, last.min(start)), (first.max(end), last)] {
                    if a < b {
                        let to = buffers.param(t, a - first);
                        self.copy(all.add(a as usize * ps), to, b - a, ps);
                    }
                }
            }
        }
        self.steps = next;
        Ok(())
    }

    fn step_count(&self) -> Result<u64> {
        Ok(self.steps)
    }

    fn refuse_collectively(&mut self, _stream: *mut c_void) {
        refuse_step(&*self.transport);
    }

    fn collective_checkpoint(&self) -> bool {
        true
    }

    fn revive_after_fork(&mut self) -> Result<()> {
        self.inner.revive_after_fork()
    }

    /// Collective: every rank must call it (it gathers the slices, in rounds through the
    /// buffers made at creation), after agreeing that they share setup, step count and lr.
    fn read_state(&self, _: &[TensorSpec], lr: f32, mut out: Option<&mut [u8]>) -> Result<()> {
        agree_on_save(&*self.transport, self.setup, self.steps, lr)?;
        let size = self.state.size();
        let (slice, world) = (self.layout.slice as usize, self.layout.world_size);
        let chunk = gather_chunk(&self.layout) as usize;
        let own = self.inner.state_bytes(); // this rank's slice, less its padding
        let (mine, all) = (self.gather_mine.as_ptr(), self.gather_all.as_ptr());
        for first in (0..slice).step_by(chunk) {
            let n = chunk.min(slice - first);
            // SAFETY: `mine` holds `chunk` elements; the padding past `own` is sent as zeros.
            unsafe {
                let from = own.get(first * size..).unwrap_or(&[]);
                let take = from.len().min(n * size);
                std::ptr::copy_nonoverlapping(from.as_ptr(), mine, take);
                std::ptr::write_bytes(mine.add(take), 0, n * size - take);
                self.transport.all_gather(
                    mine as *const c_void,
                    all as *mut c_void,
                    n,
                    comm_dtype(self.state),
                    std::ptr::null_mut(),
                )?;
            }
            let Some(out) = out.as_deref_mut() else {
                continue;
            };
            // Rank r's elements first..first + n of its slice are the flattened tensors'
            // r * slice + first..: the checkpoint's bytes, where they fall inside it.
            for r in 0..world {
                let at = (r * slice + first) * size;
                let len = (n * size).min(out.len().saturating_sub(at));
                // SAFETY: `all` holds `world` blocks of `n` elements.
                let got = unsafe { std::slice::from_raw_parts(all.add(r * n * size), len) };
                let end = out.len();
                out[at.min(end)..][..len].copy_from_slice(got);
            }
        }
        Ok(())
    }

    fn restore(&mut self, _: &[TensorSpec], step: u64, state: &[u8]) -> Result<()> {
        let size = self.state.size();
        let (start, end) = self.layout.owned();
        self.inner
            .state_bytes_mut()
            .copy_from_slice(&state[start as usize * size..end as usize * size]);
        self.steps = step;
        Ok(())
    }
}
