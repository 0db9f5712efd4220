//! The sharded mode (ZeRO-1) on the CUDA engine, the twin of `cpu/sharded.rs`: each rank keeps
//! the momentum of its slice of the flattened tensors (`dist::layout`, every tensor starting
//! at a multiple of ELEMS). A step, all on the caller's stream, nothing waited for:
//!
//! 1. the agreement (`dist.rs`);
//! 2. the gradients copied end to end (lion_copy) and reduce-scattered: each rank gets the
//!    sum over ranks of its slice;
//! 3. with found_inf given, the sums checked (lion_check_sums); with Cautious Lion, this
//!    slice's counts (lion_count); both summed over ranks in one all-reduce;
//! 4. lion_update_f32 or _bf16 over the slice's pieces with `grad_scale / W`: the
//!    single-process kernel, coefficients, rounding keys and element numbers, so the result
//!    is bit-identical to one process stepping on the mean gradient;
//! 5. the updated slice copied out, all-gathered, and copied into every rank's tensors.
//!
//! Checkpoints are the single-process ones (saving gathers the momentum), as on the CPU.

use std::ffi::{c_void, CStr};
use std::mem::ManuallyDrop;

use super::args::{CheckArgs, CopyArgs, StepArgs, CUDA_THREADS_PER_BLOCK, ELEMS, MAX_TENSORS};
use super::dist::{release, unpad_window, zeroed, Core};
use super::driver::{self, DeviceBuffer, PrimaryContext};
use super::plan::{self, Launch, Plan};
use crate::buffer::{try_vec, ZeroedBuf};
use crate::config::{DType, Hyper, StepOptions, TensorSpec};
use crate::cpu::sharded::{comm_dtype, one_dtype};
use crate::dist::config::DistConfig;
use crate::dist::layout::Layout;
use crate::dist::{setup_hash, CommDType};
use crate::engine::{Engine, Piece, StepBuffers};
use crate::status::{Error, Result};

struct Parts {
    core: Core,
    /// The momentum of this rank's slice.
    state: DeviceBuffer,
    /// Tensor tables: `state_offset` the tensor's flat offset (`full`), or its offset from
    /// this rank's slice (`slice`, wrapping).
    infos_full: DeviceBuffer,
    infos_slice: DeviceBuffer,
    full: Plan,
    slice: Plan,
    /// The reduce-scatter's input (every tensor's gradient, padded, gaps zero) and output.
    grads_out: DeviceBuffer,
    grads_in: DeviceBuffer,
    /// The all-gather's input (this slice's parameters) and output.
    params_out: DeviceBuffer,
    params_in: DeviceBuffer,
    /// The second all-reduce, this rank's and the sums: [non-finite sums, counts per tensor].
    late_mine: DeviceBuffer,
    late_all: DeviceBuffer,
    /// A checkpoint's gather, in rounds of `gather_chunk` elements of each rank's slice: every
    /// rank's part, on the device and on the host, made at creation so that a save allocates
    /// nothing (a rank out of memory there would leave the others in the gather).
    gather_device: DeviceBuffer,
    gather_host: ZeroedBuf,
}

/// A round of a checkpoint's gather, in elements of each rank's slice (`Layout::gather_chunk`:
/// at most 2^20, 4 MiB of f32 momentum, and 2^22 for all ranks, on the device and the host;
/// rounds few enough that their waits do not count beside the copies).
fn gather_chunk(layout: &Layout) -> u64 {
    layout.gather_chunk(1 << 20, 1 << 22)
}

pub(crate) struct ShardedCuda {
    parts: ManuallyDrop<Parts>,
    layout: Layout,
    pieces: Vec<Piece>,
    grad: DType,
    param: DType,
    /// Per tensor, where `grads_in` would hold its element 0 (wrapping).
    slice_grads: Vec<u64>,
    /// u64 of the late all-reduce: 1, plus one per tensor with Cautious Lion (the buffers
    /// always hold 1 + one per tensor).
    late_len: usize,
    context: PrimaryContext,
}

// Device pointers and handles: usable from any thread with the context pushed.
unsafe impl Send for ShardedCuda {}

impl ShardedCuda {
    pub fn new(
        hyper: &Hyper,
        tensors: &[TensorSpec],
        device_index: i32,
        dist: &DistConfig,
        nccl_library: Option<&CStr>,
        refusal: Option<Error>,
    ) -> Result<ShardedCuda> {
        // This rank's own refusals are returned after creation's check
        // (`Core::agree_on_creation`).
        let checked = match refusal {
            Some(refused) => Err(refused), // `tensors` may be empty
            None => one_dtype(tensors, |t| t.grad, "grad_dtype").and_then(|grad| {
                let param = one_dtype(tensors, |t| t.param, "param_dtype")?;
                let layout = Layout::aligned(tensors, dist.rank, dist.world_size, ELEMS)?;
                Ok((grad, param, layout))
            }),
        };
        let refusal = checked.as_ref().err().cloned();
        let setup = setup_hash(format_args!(
            "cuda sharded {:?} {hyper:?} {tensors:?}",
            dist.world_size
        ));
        Core::create(
            hyper,
            device_index,
            dist,
            nccl_library,
            setup,
            refusal,
            || {
                let (grad, param, layout) = checked?;
                Self::buffers(hyper, tensors, grad, param, layout)
            },
        )
    }

    /// The engine's device buffers and tables for `layout`, with the context current; the
    /// returned function completes it with the core and context.
    fn buffers(
        hyper: &Hyper,
        tensors: &[TensorSpec],
        grad: DType,
        param: DType,
        layout: Layout,
    ) -> Result<impl FnOnce(Core, PrimaryContext) -> ShardedCuda> {
        let pieces = layout.pieces(tensors)?;
        let (start, _) = layout.owned();
        let s = hyper.state_dtype.size();
        let late_len = 1 + if hyper.cautious_factor < 1.0 {
            tensors.len()
        } else {
            0
        };
        let grads_in = zeroed(layout.slice, grad.size(), "the gradient sums")?;
        let mut slice_grads = try_vec(tensors.len(), "the slice's gradient addresses")?;
        slice_grads.extend(layout.offsets.iter().map(|&o| {
            (grads_in.ptr).wrapping_add(o.wrapping_sub(start).wrapping_mul(grad.size() as u64))
        }));
        let chunk = plan::block_chunk_elements(hyper.state_dtype, tensors);
        let state = zeroed(layout.slice, s, "the momentum")?;
        let infos_full = plan::tensor_table(tensors, layout.offsets.iter().copied())?;
        let infos_slice = plan::tensor_table(
            tensors,
            layout.offsets.iter().map(|&o| o.wrapping_sub(start)),
        )?;
        let full = Plan::upload(&Piece::whole(tensors)?, tensors.len(), chunk)?;
        let slice = Plan::upload(&pieces, tensors.len(), chunk)?;
        let grads_out = zeroed(
            layout.padded(),
            grad.size(),
            "the gradients laid end to end",
        )?;
        let params_out = zeroed(layout.slice, param.size(), "the slice's parameters")?;
        let params_in = zeroed(layout.padded(), param.size(), "the gathered parameters")?;
        // Room for every tensor's count even when only the flag is summed: lion_update_* reads
        // and resets the counts of its launch's tensors whether cautious or not.
        let late_mine = zeroed(1 + tensors.len() as u64, 8, "the cautious counts")?;
        let late_all = zeroed(1 + tensors.len() as u64, 8, "the cautious counts' sums")?;
        let gathered = gather_chunk(&layout) * layout.world_size as u64;
        let gather_device = zeroed(gathered, s, "a checkpoint's gather")?;
        let gather_host = ZeroedBuf::new(gather_device.bytes, "a checkpoint's gather (host)")?;
        Ok(move |core, context| ShardedCuda {
            parts: ManuallyDrop::new(Parts {
                state,
                infos_full,
                infos_slice,
                full,
                slice,
                grads_out,
                grads_in,
                params_out,
                params_in,
                late_mine,
                late_all,
                gather_device,
                gather_host,
                core,
            }),
            layout,
            pieces,
            grad,
            param,
            slice_grads,
            late_len,
            context,
        })
    }

    /// lion_copy over `plan`'s launches, between the tensors `ptrs` gives and `flat`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn copy(
        &self,
        plan: &Plan,
        ptrs: &dyn Fn(usize) -> *mut c_void,
        flat: &DeviceBuffer,
        flat_base: u64,
        elem: DType,
        to_flat: bool,
        gated: bool,
        stream: *mut c_void,
    ) -> Result<()> {
        let p = &*self.parts;
        for l in &plan.launches {
            let mut a = CopyArgs {
                flat: flat.ptr,
                flat_base,
                agreement: if gated { p.core.agreement.ptr } else { 0 },
                sums_bad: if gated { p.late_all.ptr } else { 0 },
                tensors: p.infos_full.ptr,
                chunks: plan.chunks_of(l),
                first_tensor: l.first_tensor as u32,
                elem_size: elem.size() as u32,
                to_flat: to_flat as u32,
                unused: 0,
                ptrs: [std::ptr::null_mut(); MAX_TENSORS],
            };
            for t in 0..l.n_tensors {
                a.ptrs[t] = ptrs(l.first_tensor + t);
            }
            driver::launch(
                p.core.kernels.copy,
                l.n_chunks as u32,
                CUDA_THREADS_PER_BLOCK,
                stream as driver::CUstream,
                &a,
                "launching lion_copy",
            )?;
        }
        Ok(())
    }

    /// The gradient sums' scale: the mean and the caller's `grad_scale` in one factor,
    /// rounded once (as the CPU engine's sharded mode).
    fn mean_scale(&self, options: &StepOptions) -> f32 {
        (options.grad_scale as f64 / self.layout.world_size as f64) as f32
    }

    /// The update's (or count's) arguments for launch `l` of the slice.
    fn step_args(
        &self,
        l: &Launch,
        last: bool,
        lr: f32,
        options: Option<&StepOptions>,
        buffers: Option<&StepBuffers>,
        counting: bool,
    ) -> StepArgs {
        let p = &*self.parts;
        let scale = options.map_or(1.0, |o| self.mean_scale(o));
        let (agreeing, sums_bad) = match counting {
            true => (p.late_mine.ptr + 8, 0),
            false => (p.late_all.ptr + 8, p.late_all.ptr),
        };
        let mut a = StepArgs {
            h: super::hyper_args(&p.core.hyper, scale),
            lr,
            first_tensor: l.first_tensor as u32,
            n_tensors: l.n_tensors as u32,
            last_launch: last as u32,
            lr_ptr: options.map_or(std::ptr::null(), |o| o.lr),
            found_inf: std::ptr::null(),
            step_counters: p.core.step_counters.ptr,
            agreeing,
            tensors: p.infos_slice.ptr,
            chunks: p.slice.chunks_of(l),
            state: p.state.ptr,
            agreement: p.core.agreement.ptr,
            sums_bad,
            fill_table: 0,
            params: [std::ptr::null_mut(); MAX_TENSORS],
            grads: [std::ptr::null(); MAX_TENSORS],
        };
        for t in 0..l.n_tensors {
            let i = l.first_tensor + t;
            if let Some(b) = buffers {
                a.params[t] = b.param(i, 0) as *mut c_void;
            }
            a.grads[t] = self.slice_grads[i] as *const c_void;
        }
        a
    }

    /// One step, or (`buffers` None) this rank's part in a step it refuses: the same
    /// collectives, with every kernel that would touch the caller's memory skipped.
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
        let (start, _) = self.layout.owned();
        let options = options.filter(|_| buffers.is_some());
        core.agree(lr, options, stream)?;
        // The reduce-scatter's input: the caller's own gradient buffer where it already is
        // the flattened layout (one flat buffer, as DDP's buckets or llm.c's), else a copy.
        let mut send = p.grads_out.ptr;
        if let Some(b) = buffers {
            match self.layout.flat_grads(b, self.grad.size()) {
                Some(base) => send = base as u64,
                None => {
                    let grads = |t| b.grad(t, 0) as *mut c_void;
                    self.copy(
                        &p.full,
                        &grads,
                        &p.grads_out,
                        0,
                        self.grad,
                        true,
                        false,
                        stream,
                    )?;
                }
            }
        }
        transport.reduce_scatter_sum(
            send as *const c_void,
            p.grads_in.ptr as *mut c_void,
            self.layout.slice as usize,
            comm_dtype(self.grad),
            stream,
        )?;
        if let Some(o) = options.filter(|o| !o.found_inf.is_null()) {
            let a = CheckArgs {
                sums: p.grads_in.ptr,
                bad: p.late_mine.ptr,
                n: self.layout.slice,
                scale: self.mean_scale(o),
                grad_dtype: self.grad.raw(),
            };
            let blocks = self
                .layout
                .slice
                .div_ceil(CUDA_THREADS_PER_BLOCK as u64)
                .min(1024);
            driver::launch(
                kernels.check_sums,
                blocks as u32,
                CUDA_THREADS_PER_BLOCK,
                cu_stream,
                &a,
                "launching lion_check_sums",
            )?;
        }
        let launches = &p.slice.launches;
        if self.late_len > 1 {
            for l in launches {
                let a = self.step_args(l, false, lr, options, buffers, true);
                driver::launch(
                    kernels.count,
                    l.n_chunks as u32,
                    CUDA_THREADS_PER_BLOCK,
                    cu_stream,
                    &a,
                    "launching lion_count",
                )?;
            }
        }
        transport.all_reduce_sum(
            p.late_mine.ptr as *const c_void,
            p.late_all.ptr as *mut c_void,
            self.late_len,
            CommDType::U64,
            stream,
        )?;
        driver::zero_async(p.late_mine.ptr, 8 * self.late_len, cu_stream)?;
        for (i, l) in launches.iter().enumerate() {
            let a = self.step_args(l, i + 1 == launches.len(), lr, options, buffers, false);
            let update = kernels.update_for(p.core.hyper.state_dtype);
            update.launch(l.n_chunks as u32, cu_stream, &a)?;
        }
        let params = |t| buffers.map_or(std::ptr::null_mut(), |b| b.param(t, 0) as *mut c_void);
        self.copy(
            &p.slice,
            &params,
            &p.params_out,
            start,
            self.param,
            true,
            true,
            stream,
        )?;
        transport.all_gather(
            p.params_out.ptr as *const c_void,
            p.params_in.ptr as *mut c_void,
            self.layout.slice as usize,
            comm_dtype(self.param),
            stream,
        )?;
        self.copy(
            &p.full,
            &params,
            &p.params_in,
            0,
            self.param,
            false,
            true,
            stream,
        )
    }
}

impl Engine for ShardedCuda {
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
            // Every rank refuses it (the options are the same on every rank).
            self.run(lr, None, None, stream)?;
            return Err(super::check_finite_unsupported());
        }
        self.run(lr, Some(options), Some(buffers), stream)
    }

    fn refuse_collectively(&mut self, stream: *mut c_void) {
        // SAFETY: no caller buffer is touched in a refused step.
        let _ = unsafe { self.run(0.0, None, None, stream) };
    }

    fn collective_checkpoint(&self) -> bool {
        true
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

    /// Collective: every rank must call it (it gathers the slices, on the default stream, in
    /// rounds through the buffers made at creation), after agreeing that they share setup,
    /// step count and lr.
    fn read_state(
        &self,
        tensors: &[TensorSpec],
        lr: f32,
        mut out: Option<&mut [u8]>,
    ) -> Result<()> {
        let p = &*self.parts;
        let s = p.core.hyper.state_dtype;
        let size = s.size();
        let _current = self.context.enter()?;
        driver::synchronize()?;
        p.core.agree_on_save(lr)?;
        let (slice, world) = (self.layout.slice as usize, self.layout.world_size);
        let chunk = gather_chunk(&self.layout) as usize;
        for first in (0..slice).step_by(chunk) {
            let n = chunk.min(slice - first);
            // SAFETY: `n` elements of this rank's slice, into `world` blocks of `n`: inside
            // the momentum and the gather's buffer.
            unsafe {
                p.core.transport().all_gather(
                    (p.state.ptr + (first * size) as u64) as *const c_void,
                    p.gather_device.ptr as *mut c_void,
                    n,
                    comm_dtype(s),
                    std::ptr::null_mut(),
                )?
            };
            driver::synchronize()?;
            let Some(out) = out.as_deref_mut() else {
                continue;
            };
            // SAFETY: the host buffer holds `world` blocks of `chunk` elements; no one else
            // uses it (the optimizer's lock is held).
            let host =
                unsafe { std::slice::from_raw_parts_mut(p.gather_host.as_ptr(), world * n * size) };
            p.gather_device.download(0, host)?;
            for (r, block) in host.chunks_exact(n * size).enumerate() {
                let at = (r * slice + first) * size; // rank r's elements in the flat layout
                unpad_window(tensors, &self.layout.offsets, size, at, block, out);
            }
        }
        Ok(())
    }

    fn restore(&mut self, tensors: &[TensorSpec], step: u64, state: &[u8]) -> Result<()> {
        let p = &*self.parts;
        let size = p.core.hyper.state_dtype.size();
        let (start, _) = self.layout.owned();
        let mut slice = super::host_bytes(p.state.bytes)?;
        // Where each tensor starts in `state` (unpadded).
        let mut unpadded = try_vec(tensors.len(), "the tensors' offsets")?;
        let mut at = 0usize;
        for t in tensors {
            unpadded.push(at);
            at += t.numel as usize * size;
        }
        for piece in &self.pieces {
            let n = piece.len as usize * size;
            let from = unpadded[piece.tensor] + piece.first as usize * size;
            let to = (self.layout.offsets[piece.tensor] + piece.first - start) as usize * size;
            slice[to..to + n].copy_from_slice(&state[from..from + n]);
        }
        let _current = self.context.enter()?;
        driver::synchronize()?;
        p.state.upload(0, &slice)?;
        p.core.restore_count(step)
    }
}

impl Drop for ShardedCuda {
    fn drop(&mut self) {
        release(&self.context, &mut self.parts);
    }
}
