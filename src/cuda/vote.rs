//! The vote mode (Distributed Lion, majority vote) on the CUDA engine, the twin of
//! `cpu/vote.rs`: every rank keeps the momentum of its own gradients; no gradient is sent. A
//! step, all on the caller's stream, nothing waited for:
//!
//! 1. the agreement (`dist.rs`): the momentum is only written in a step every rank takes;
//! 2. lion_vote: each rank's votes sign(c) and its next momentum; the votes go out 2 bits an
//!    element (the gather exchange) or one i8 each (the sums exchange);
//! 3. the exchange: an all-gather of every rank's 2-bit votes, or a reduce-scatter of the i8
//!    votes, their sums' signs packed 5 a byte (lion_signs) and all-gathered;
//! 4. lion_apply: every rank applies the sign of the vote sum (a tie gives 0) with weight
//!    decay and the same rounding keys, so the parameters stay bit-identical on every rank.
//!
//! Votes are numbered by flattened element with every tensor starting at a multiple of ELEMS
//! (`Layout::sliced`), so that one thread writes whole bytes; slices are whole 8-byte
//! words of results. The packings are the CPU engine's (`cpu::vote_codes`). A checkpoint
//! holds the rank's own momentum.
//!
//! Under 8-bit momentum the state is laid out as the single-process engine's
//! (`plan::state_layout`: each tensor's codes and scales, or a small tensor's f32), placed by
//! a tensor table of its own that lion_vote reads, with the votes' flattened offsets beside
//! it (`VoteArgs::flat`); lion_apply, which reads no momentum, keeps the flattened table.

use std::ffi::{c_void, CStr};
use std::mem::ManuallyDrop;

use super::args::{
    SignsArgs, StepArgs, VoteArgs, CUDA_THREADS_PER_BLOCK, ELEMS, MAX_TENSORS, SIGNS_PER_THREAD,
    VOTE_I8, VOTE_PACKED, VOTE_TRITS,
};
use super::dist::{pad, release, unpad, zeroed, Core};
use super::driver::{self, DeviceBuffer, PrimaryContext};
use super::plan::{self, Plan, StateRegion};
use crate::buffer::try_vec;
use crate::config::{DType, Hyper, StepOptions, TensorSpec};
use crate::dist::config::{DistConfig, Exchange};
use crate::dist::layout::{Layout, VOTE_SLICE_ALIGN};
use crate::dist::{setup_hash, CommDType};
use crate::engine::{Engine, Piece, StepBuffers};
use crate::status::{Error, Result};

// lion_signs's threads take whole words of a slice (its `n` is a multiple of theirs).
const _: () = assert!(VOTE_SLICE_ALIGN.is_multiple_of(SIGNS_PER_THREAD));

struct Parts {
    core: Core,
    /// This rank's momentum, every tensor at its flat offset (q8: where `q8` places it).
    state: DeviceBuffer,
    /// The tensor table, each tensor's state_offset its first flattened element.
    infos: DeviceBuffer,
    q8: Option<Q8Parts>,
    plan: Plan,
    /// Sums: this rank's i8 votes (every slice) and its slice's sums. Gather: unused.
    votes: DeviceBuffer,
    sums: DeviceBuffer,
    /// What this rank sends (its 2-bit votes, or its slice's results 5 a byte), and what
    /// every rank sent.
    packed_out: DeviceBuffer,
    packed_in: DeviceBuffer,
}

/// Under 8-bit momentum: where each tensor's momentum lies (as in a single-process engine), the
/// tensor table that says so to lion_vote, and the votes' flattened offsets (u64 per tensor).
struct Q8Parts {
    regions: Vec<StateRegion>,
    infos: DeviceBuffer,
    flat: DeviceBuffer,
}

pub(crate) struct VoteCuda {
    parts: ManuallyDrop<Parts>,
    layout: Layout,
    exchange: Exchange,
    /// Bytes each rank sends in the all-gather.
    per_rank: usize,
    context: PrimaryContext,
}

// Device pointers and handles: usable from any thread with the context pushed.
unsafe impl Send for VoteCuda {}

impl VoteCuda {
    pub fn new(
        hyper: &Hyper,
        tensors: &[TensorSpec],
        device_index: i32,
        dist: &DistConfig,
        nccl_library: Option<&CStr>,
        refusal: Option<Error>,
    ) -> Result<VoteCuda> {
        // This rank's own refusals are returned after creation's check
        // (`Core::agree_on_creation`).
        let checked = if let Some(refused) = refusal {
            Err(refused) // `tensors` may be empty
        } else if hyper.cautious_factor < 1.0 {
            Err(Error::unsupported(
                "the vote mode cannot be cautious: Cautious Lion compares the update with each \
                 rank's own gradient, and the ranks' parameters would drift apart (cautious \
                 weight decay is allowed)",
            ))
        } else {
            Layout::sliced(tensors, dist.rank, dist.world_size, ELEMS, VOTE_SLICE_ALIGN)
        };
        let refusal = checked.as_ref().err().cloned();
        let exchange = dist.exchange;
        let setup = setup_hash(format_args!(
            "cuda vote {:?} {exchange:?} {hyper:?} {tensors:?}",
            dist.world_size
        ));
        Core::create(
            hyper,
            device_index,
            dist,
            nccl_library,
            setup,
            refusal,
            || Self::buffers(hyper, tensors, exchange, checked?),
        )
    }

    /// The engine's device buffers and tables for `layout`, with the context current; the
    /// returned function completes it with the core and context.
    fn buffers(
        hyper: &Hyper,
        tensors: &[TensorSpec],
        exchange: Exchange,
        layout: Layout,
    ) -> Result<impl FnOnce(Core, PrimaryContext) -> VoteCuda> {
        let per_byte = crate::cpu::vote_codes::values_per_byte(exchange) as u64;
        let (per_rank, votes, sums) = match exchange {
            Exchange::Gather => (layout.total / per_byte, 0, 0),
            Exchange::Sums => (layout.slice / per_byte, layout.padded(), layout.slice),
        };
        let infos = plan::tensor_table(tensors, layout.offsets.iter().copied())?;
        let (state, q8) = if hyper.state_dtype == DType::Q8 {
            let (regions, bytes) = plan::state_layout(tensors, DType::Q8)?;
            let state = zeroed(bytes as u64, 1, "the momentum")?;
            let q8_infos = plan::tensor_table(tensors, regions.iter().map(|r| r.state_offset))?;
            let mut offsets = try_vec(8 * tensors.len(), "the votes' offsets")?;
            offsets.extend(layout.offsets.iter().flat_map(|o| o.to_le_bytes()));
            let flat = zeroed(offsets.len() as u64, 1, "the votes' offsets")?;
            flat.upload(0, &offsets)?;
            let q8 = Q8Parts {
                regions,
                infos: q8_infos,
                flat,
            };
            (state, Some(q8))
        } else {
            let state = zeroed(layout.total, hyper.state_dtype.size(), "the momentum")?;
            (state, None)
        };
        let plan = Plan::upload(
            &Piece::whole(tensors)?,
            tensors.len(),
            plan::block_chunk_elements(hyper.state_dtype, tensors),
        )?;
        let votes = zeroed(votes, 1, "the votes")?;
        let sums = zeroed(sums, 1, "the vote sums")?;
        let packed_out = zeroed(per_rank, 1, "the packed votes")?;
        let packed_in = zeroed(per_rank * layout.world_size as u64, 1, "the gathered votes")?;
        Ok(move |core, context| VoteCuda {
            parts: ManuallyDrop::new(Parts {
                state,
                infos,
                q8,
                plan,
                votes,
                sums,
                packed_out,
                packed_in,
                core,
            }),
            layout,
            exchange,
            per_rank: per_rank as usize,
            context,
        })
    }

    /// One step, or (`buffers` None) this rank's part in a step it refuses.
    unsafe fn run(
        &self,
        lr: f32,
        options: Option<&StepOptions>,
        buffers: Option<&StepBuffers>,
        stream: *mut c_void,
    ) -> Result<()> {
        let _current = self.context.enter()?;
        let p = &*self.parts;
        let core = &p.core;
        let (transport, kernels) = (core.transport(), &core.kernels);
        let cu_stream = stream as driver::CUstream;
        let options = options.filter(|_| buffers.is_some());
        core.agree(lr, options, stream)?;
        let gather = self.exchange == Exchange::Gather;
        let launches = &p.plan.launches;
        // lion_vote's tables under q8 (the momentum's offsets, the votes'), else the flat one.
        let (vote_infos, flat) = match &p.q8 {
            Some(q8) => (q8.infos.ptr, q8.flat.ptr),
            None => (p.infos.ptr, 0),
        };
        // `voting`: lion_vote's arguments, else lion_apply's.
        let args =
            |i: usize, voting: bool, votes: u64, ranks: u32, rank_bytes: u64, exchange: u32| {
                let l = &launches[i];
                let mut a = VoteArgs {
                    s: StepArgs {
                        h: super::hyper_args(&core.hyper, options.map_or(1.0, |o| o.grad_scale)),
                        lr,
                        first_tensor: l.first_tensor as u32,
                        n_tensors: l.n_tensors as u32,
                        last_launch: (i + 1 == launches.len()) as u32,
                        lr_ptr: options.map_or(std::ptr::null(), |o| o.lr),
                        found_inf: std::ptr::null(),
                        step_counters: core.step_counters.ptr,
                        agreeing: 0,
                        tensors: if voting { vote_infos } else { p.infos.ptr },
                        chunks: p.plan.chunks_of(l),
                        state: p.state.ptr,
                        agreement: core.agreement.ptr,
                        sums_bad: 0,
                        fill_table: 0,
                        params: [std::ptr::null_mut(); MAX_TENSORS],
                        grads: [std::ptr::null(); MAX_TENSORS],
                    },
                    votes,
                    rank_bytes,
                    ranks,
                    exchange,
                    flat: if voting { flat } else { 0 },
                };
                if let Some(b) = buffers {
                    for t in 0..l.n_tensors {
                        a.s.params[t] = b.param(l.first_tensor + t, 0) as *mut c_void;
                        a.s.grads[t] = b.grad(l.first_tensor + t, 0) as *const c_void;
                    }
                }
                a
            };
        let mine = if gather {
            p.packed_out.ptr
        } else {
            p.votes.ptr
        };
        for (i, l) in launches.iter().enumerate() {
            driver::launch(
                kernels.vote,
                l.n_chunks as u32,
                CUDA_THREADS_PER_BLOCK,
                cu_stream,
                &args(
                    i,
                    true,
                    mine,
                    0,
                    0,
                    if gather { VOTE_PACKED } else { VOTE_I8 },
                ),
                "launching lion_vote",
            )?;
        }
        if !gather {
            let slice = self.layout.slice;
            transport.reduce_scatter_sum(
                p.votes.ptr as *const c_void,
                p.sums.ptr as *mut c_void,
                slice as usize,
                CommDType::I8,
                stream,
            )?;
            let a = SignsArgs {
                sums: p.sums.ptr,
                packed: p.packed_out.ptr,
                n: slice,
            };
            let threads = (slice / SIGNS_PER_THREAD).max(1);
            let blocks = threads.div_ceil(CUDA_THREADS_PER_BLOCK as u64).min(4096);
            driver::launch(
                kernels.signs,
                blocks as u32,
                CUDA_THREADS_PER_BLOCK,
                cu_stream,
                &a,
                "launching lion_signs",
            )?;
        }
        transport.all_gather(
            p.packed_out.ptr as *const c_void,
            p.packed_in.ptr as *mut c_void,
            self.per_rank,
            CommDType::U8,
            stream,
        )?;
        let (ranks, rank_bytes, read) = match gather {
            true => (
                self.layout.world_size as u32,
                self.per_rank as u64,
                VOTE_PACKED,
            ),
            false => (0, 0, VOTE_TRITS),
        };
        for (i, l) in launches.iter().enumerate() {
            driver::launch(
                kernels.apply,
                l.n_chunks as u32,
                CUDA_THREADS_PER_BLOCK,
                cu_stream,
                &args(i, false, p.packed_in.ptr, ranks, rank_bytes, read),
                "launching lion_apply",
            )?;
        }
        Ok(())
    }
}

impl Engine for VoteCuda {
    unsafe fn step(
        &mut self,
        _: &Hyper,
        _: &[TensorSpec],
        lr: f32,
        options: &StepOptions,
        buffers: &StepBuffers,
        stream: *mut c_void,
    ) -> Result<()> {
        if options.check_finite {
            self.run(lr, None, None, stream)?;
            return Err(super::check_finite_unsupported());
        }
        self.run(lr, Some(options), Some(buffers), stream)
    }

    fn refuse_collectively(&mut self, stream: *mut c_void) {
        // SAFETY: no caller buffer is touched in a refused step.
        let _ = unsafe { self.run(0.0, None, None, stream) };
    }

    fn check_pointers(
        &self,
        tensors: &[TensorSpec],
        indices: Option<&[u32]>,
        params: &[*mut c_void],
        grads: &[*const c_void],
        accepted: &[(usize, usize)],
    ) -> Result<()> {
        let ordinal = self.parts.core.ordinal;
        super::check_device_pointers(
            &self.context,
            ordinal,
            tensors,
            indices,
            params,
            grads,
            accepted,
        )
    }

    fn check_option_pointers(&self, options: &StepOptions, accepted: (usize, usize)) -> Result<()> {
        let ordinal = self.parts.core.ordinal;
        super::check_option_device_pointers(&self.context, ordinal, options, accepted)
    }

    fn step_count(&self) -> Result<u64> {
        self.parts.core.step_count(&self.context)
    }

    fn report_disagreement(&self) -> Result<()> {
        self.parts.core.report_disagreement(&self.context)
    }

    fn read_state(&self, tensors: &[TensorSpec], _lr: f32, out: Option<&mut [u8]>) -> Result<()> {
        let Some(out) = out else { return Ok(()) };
        let p = &*self.parts;
        let size = p.core.hyper.state_dtype.size();
        let _current = self.context.enter()?;
        driver::synchronize()?;
        let mut padded = super::host_bytes(p.state.bytes)?;
        p.state.download(0, &mut padded)?;
        match &p.q8 {
            Some(q8) => plan::regions_out(&q8.regions, &padded, out),
            None => unpad(tensors, &self.layout.offsets, size, &padded, out),
        }
        Ok(())
    }

    fn restore(&mut self, tensors: &[TensorSpec], step: u64, state: &[u8]) -> Result<()> {
        let p = &*self.parts;
        let size = p.core.hyper.state_dtype.size();
        let mut padded = super::host_bytes(p.state.bytes)?;
        match &p.q8 {
            Some(q8) => plan::regions_in(&q8.regions, state, &mut padded),
            None => pad(tensors, &self.layout.offsets, size, state, &mut padded),
        }
        let _current = self.context.enter()?;
        driver::synchronize()?;
        p.state.upload(0, &padded)?;
        p.core.restore_count(step)
    }
}

impl Drop for VoteCuda {
    fn drop(&mut self) {
        release(&self.context, &mut self.parts);
    }
}
