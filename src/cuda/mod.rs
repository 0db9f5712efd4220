//! The CUDA engine: momentum in device memory, one fused launch per step for all tensors
//! (two with Cautious Lion: count, then update), enqueued on the caller's stream in the
//! device's primary context. Everything is allocated at creation, so a step never allocates,
//! never synchronizes, and can be captured in a CUDA graph.
//!
//! The caller's pointers travel in the kernel's by-value parameters (up to MAX_TENSORS per
//! launch; more tensors take more launches), or, once the same pointers have come twice in a
//! row, in a table in device memory that the launches name (`pointer_tables.rs`: a smaller
//! launch). The second by-value launch of a set fills its table, once; a table is never
//! changed after, so a captured graph still finds its pointers. Nothing is copied from the
//! host in a step.

mod args;
mod dist;
pub(crate) mod driver;
mod module;
#[cfg(test)]
mod on_host;
mod plan;
mod pointer_tables;
mod prelude;
mod sharded;
mod tuning;
mod vote;

pub(crate) use dist::new_distributed;

use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::sync::Arc;

use crate::config::{Hyper, StepOptions, TensorSpec};
use crate::engine::{Engine, Piece, StepBuffers};
use crate::status::{Error, Result};
use args::{
    HyperArgs, TableArgs, TensorsArgs, COUNTER_STEP, CUDA_THREADS_PER_BLOCK, MAX_SLOTS, N_COUNTERS,
};
use driver::{DeviceBuffer, PrimaryContext};
use module::Kernels;
use plan::{Plan, StateRegion};
use pointer_tables::{Carried, PointerTables};

struct Buffers {
    state: DeviceBuffer,
    tensors: DeviceBuffer,
    plan: Plan,
    agreeing: DeviceBuffer,
    step_counters: DeviceBuffer,
    /// The caller's pointers of the steps that launch with a table.
    tables: PointerTables,
}

pub(crate) struct CudaEngine {
    kernels: Arc<Kernels>,
    ordinal: i32,
    /// Elements per block's chunk (`plan::block_chunk_elements`), for `lion_step_tensors`.
    chunk_elems: u64,
    /// The optimizer's hyperparameters (for `finish_round`'s launch, which steps nothing).
    hyper: Hyper,
    /// Where each tensor's momentum lies in `state` (`plan::state_layout`).
    regions: Vec<StateRegion>,
    /// Freed in `drop`, with the context current and the device idle.
    buf: ManuallyDrop<Buffers>,
    context: PrimaryContext,
}

// Device pointers and handles: usable from any thread with the context pushed.
unsafe impl Send for CudaEngine {}
unsafe impl Sync for CudaEngine {}

/// A zeroed host buffer of the momentum's size, whose allocation failure is an error.
pub(crate) fn host_bytes(n: usize) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Error::out_of_memory(format!("no host memory for {n} bytes of momentum")))?;
    v.resize(n, 0);
    Ok(v)
}

/// The kernels' hyperparameters for a step with `grad_scale`.
pub(crate) fn hyper_args(hyper: &Hyper, grad_scale: f32) -> HyperArgs {
    HyperArgs {
        beta1: hyper.beta1,
        beta2: hyper.beta2,
        weight_decay: hyper.weight_decay,
        lr0: hyper.lr0,
        cautious_factor: hyper.cautious_factor,
        grad_scale,
        decay_mode: hyper.decay_mode.raw(),
        cautious_wd: hyper.cautious_weight_decay as u32,
        stochastic_rounding: hyper.stochastic_rounding as u32,
        state_dtype: hyper.state_dtype.raw(),
        seed: hyper.seed,
    }
}

/// Refuses buffers a kernel on device `ordinal` cannot use: `params[j]` and `grads[j]` are
/// tensor `indices[j]`'s (tensor `j`'s without `indices`). Only pointers that differ from the
/// last accepted ones (`accepted`, per tensor) are asked about: one driver call each.
pub(crate) fn check_device_pointers(
    context: &PrimaryContext,
    ordinal: i32,
    tensors: &[TensorSpec],
    indices: Option<&[u32]>,
    params: &[*mut c_void],
    grads: &[*const c_void],
    accepted: &[(usize, usize)],
) -> Result<()> {
    let _current = context.enter()?;
    for j in 0..params.len() {
        let i = indices.map_or(j, |ix| ix[j] as usize);
        let (p, g) = (params[j] as usize, grads[j] as usize);
        let (old_p, old_g) = accepted.get(i).copied().unwrap_or((0, 0));
        if tensors[i].numel == 0 {
            continue;
        }
        let name = |array: &str| match indices {
            None => format!("{array}[{j}]"),
            Some(_) => format!("{array}[{j}] (tensor {i})"),
        };
        if p != old_p {
            driver::check_accessible(p, ordinal, &name("params"))?;
        }
        if g != old_g {
            driver::check_accessible(g, ordinal, &name("grads"))?;
        }
    }
    Ok(())
}

/// Refuses a step's option pointers (`found_inf`, `lr`) that a kernel on device `ordinal`
/// cannot read; NULL ones (unused) and those equal to the last accepted (`accepted`) are not
/// asked about.
pub(crate) fn check_option_device_pointers(
    context: &PrimaryContext,
    ordinal: i32,
    options: &StepOptions,
    accepted: (usize, usize),
) -> Result<()> {
    let _current = context.enter()?;
    for (name, p, old) in [
        ("options.found_inf", options.found_inf as usize, accepted.0),
        ("options.lr", options.lr as usize, accepted.1),
    ] {
        if p != 0 && p != old {
            driver::check_accessible(p, ordinal, name)?;
        }
    }
    Ok(())
}

/// The error of a CUDA step that asks for `check_finite`.
pub(crate) fn check_finite_unsupported() -> Error {
    Error::unsupported(
        "check_finite needs the host to read the gradients, which a CUDA step must not wait for: \
         pass found_inf (e.g. from GradScaler's unscale) instead",
    )
}

impl CudaEngine {
    pub(crate) fn new(
        hyper: &Hyper,
        tensors: &[TensorSpec],
        device_index: i32,
    ) -> Result<CudaEngine> {
        driver::probe()?;
        let dev = driver::device(device_index)?;
        let kernels = module::kernels(dev)?;
        let context = PrimaryContext::retain(dev)?;
        let _current = context.enter()?;
        if tensors.len() > u32::MAX as usize {
            return Err(Error::invalid("too many tensors for the CUDA engine"));
        }
        let (regions, state_bytes) = plan::state_layout(tensors, hyper.state_dtype)?;
        let state = DeviceBuffer::zeroed(state_bytes, "the momentum")?;
        let tensors_dev = plan::tensor_table(tensors, regions.iter().map(|r| r.state_offset))?;
        let chunk_elems = plan::block_chunk_elements(hyper.state_dtype, tensors);
        let plan = Plan::upload(&Piece::whole(tensors)?, tensors.len(), chunk_elems)?;
        let agreeing = DeviceBuffer::zeroed(8 * tensors.len(), "the cautious counters")?;
        let step_counters = DeviceBuffer::zeroed(8 * N_COUNTERS, "the step counters")?;
        let tables = PointerTables::new(tensors.len())?;
        // The zeroing above (cuMemsetD8) is queued on the legacy stream, which a first step
        // on a non-blocking stream would not wait for: done before any step can start.
        driver::synchronize()?;
        drop(_current);
        Ok(CudaEngine {
            kernels,
            ordinal: device_index,
            chunk_elems,
            hyper: *hyper,
            regions,
            buf: ManuallyDrop::new(Buffers {
                state,
                tensors: tensors_dev,
                plan,
                agreeing,
                step_counters,
                tables,
            }),
            context,
        })
    }

    /// Enqueues one step on `stream`. Buffers were validated by the caller.
    fn enqueue(
        &mut self,
        hyper: &Hyper,
        lr: f32,
        options: &StepOptions,
        buffers: &StepBuffers,
        stream: *mut c_void,
    ) -> Result<()> {
        let _current = self.context.enter()?;
        let h = hyper_args(hyper, options.grad_scale);
        let stream = stream as driver::CUstream;
        let carried = self.buf.tables.carry(buffers, stream);
        let b = &*self.buf;
        let launches = &b.plan.launches;
        for (i, l) in launches.iter().enumerate() {
            let args = TableArgs {
                h,
                lr,
                first_tensor: l.first_tensor as u32,
                n_tensors: l.n_tensors as u32,
                last_launch: (i + 1 == launches.len()) as u32,
                lr_ptr: options.lr,
                found_inf: options.found_inf,
                step_counters: b.step_counters.ptr,
                agreeing: b.agreeing.ptr,
                tensors: b.tensors.ptr,
                chunks: b.plan.chunks_of(l),
                state: b.state.ptr,
                agreement: 0,
                sums_bad: 0,
                pointers: match carried {
                    Carried::Table(table) => table,
                    Carried::ByValue { .. } => 0,
                },
            };
            let blocks = l.n_chunks as u32;
            // SAFETY: args matches lion.cu's TableArgs (and by_value's StepArgs); every pointer
            // is a live device buffer (a table holding the caller's checked buffers, or one to
            // fill with them), or the caller's (checked) buffers.
            unsafe {
                let state = hyper.state_dtype;
                match carried {
                    Carried::Table(_) => {
                        let count = (self.kernels.count_table, "launching lion_count_table");
                        let update = self.kernels.update_table_for(state);
                        launch_step(hyper, blocks, stream, &args, count, update)?;
                    }
                    Carried::ByValue { fill } => {
                        let pointers = |t| {
                            let t = l.first_tensor + t;
                            (buffers.param(t, 0) as _, buffers.grad(t, 0) as _)
                        };
                        let args = args.by_value(pointers, fill);
                        let count = (self.kernels.count, "launching lion_count");
                        let update = self.kernels.update_for(state);
                        launch_step(hyper, blocks, stream, &args, count, update)?;
                    }
                }
            }
        }
        self.buf.tables.filled();
        Ok(())
    }
}

/// A whole step's launch (`args`: a `TableArgs` or a `StepArgs`, and the cautious `count`
/// and the `update` kernels that take it): the count where Cautious Lion asks for it, then
/// the update.
///
/// # Safety
/// As `driver::launch`, for both kernels.
unsafe fn launch_step<A>(
    hyper: &Hyper,
    blocks: u32,
    stream: driver::CUstream,
    args: &A,
    count: (driver::CUfunction, &str),
    update: module::Update,
) -> Result<()> {
    if hyper.cautious_factor < 1.0 {
        driver::launch(
            count.0,
            blocks,
            CUDA_THREADS_PER_BLOCK,
            stream,
            args,
            count.1,
        )?;
    }
    update.launch(blocks, stream, args)
}

impl CudaEngine {
    /// Enqueues one call of a round of `lion_step_tensors` on `stream`: the non-empty tensors
    /// of `indices` in launches of up to MAX_SLOTS tensors (one launch, two with Cautious
    /// Lion, for up to MAX_SLOTS), each block on one chunk as a whole step cuts them. The
    /// launch that completes the round (`completes`: the call's last) advances the step count;
    /// with no tensor to step, a launch of one idle block still does that where needed.
    /// Nothing is uploaded, allocated or waited for: the slots travel by value.
    #[allow(clippy::too_many_arguments)] // one call's inputs
    fn enqueue_tensors(
        &self,
        hyper: &Hyper,
        tensors: &[TensorSpec],
        lr: f32,
        options: &StepOptions,
        indices: &[u32],
        buffers: &StepBuffers,
        completes: bool,
        stream: *mut c_void,
    ) -> Result<()> {
        let _current = self.context.enter()?;
        let cautious = hyper.cautious_factor < 1.0;
        let stream = stream as driver::CUstream;
        let b = &*self.buf;
        let mut args = TensorsArgs {
            h: hyper_args(hyper, options.grad_scale),
            lr,
            n_slots: 0,
            n_blocks: 0,
            chunk_elems: self.chunk_elems as u32,
            completes_round: 0,
            _pad: 0,
            lr_ptr: options.lr,
            found_inf: options.found_inf,
            step_counters: b.step_counters.ptr,
            agreeing: b.agreeing.ptr,
            tensors: b.tensors.ptr,
            state: b.state.ptr,
            params: [std::ptr::null_mut(); MAX_SLOTS],
            grads: [std::ptr::null(); MAX_SLOTS],
            slot_tensor: [0; MAX_SLOTS],
            slot_block: [0; MAX_SLOTS],
        };
        let mut rest = indices
            .iter()
            .map(|&t| t as usize)
            .filter(|&t| tensors[t].numel > 0)
            .peekable();
        loop {
            // One launch: as many slots as fit, and blocks that a grid can count.
            let (mut n_slots, mut n_blocks) = (0usize, 0u64);
            while let Some(&t) = rest.peek() {
                let blocks = tensors[t].numel.div_ceil(self.chunk_elems);
                if n_slots == MAX_SLOTS || (n_slots > 0 && n_blocks + blocks > i32::MAX as u64) {
                    break;
                }
                if blocks > i32::MAX as u64 {
                    return Err(Error::unsupported(format!(
                        "tensor {t} needs {blocks} CUDA blocks, more than one launch has"
                    )));
                }
                args.params[n_slots] = buffers.param(t, 0) as *mut c_void;
                args.grads[n_slots] = buffers.grad(t, 0) as *const c_void;
                args.slot_tensor[n_slots] = t as u32;
                args.slot_block[n_slots] = n_blocks as u32;
                n_slots += 1;
                n_blocks += blocks;
                rest.next();
            }
            let last = rest.peek().is_none();
            if n_slots == 0 && !completes {
                return Ok(()); // only empty tensors, and the round goes on
            }
            args.n_slots = n_slots as u32;
            args.n_blocks = n_blocks as u32;
            args.completes_round = (last && completes) as u32;
            // SAFETY: args matches lion.cu's TensorsArgs; every pointer is a live device buffer
            // or the caller's (checked) buffers.
            unsafe {
                if cautious && n_blocks > 0 {
                    driver::launch(
                        self.kernels.count_tensors,
                        n_blocks as u32,
                        CUDA_THREADS_PER_BLOCK,
                        stream,
                        &args,
                        "launching lion_count_tensors",
                    )?;
                }
                let update = self.kernels.update_tensors_for(hyper.state_dtype);
                update.launch((n_blocks as u32).max(1), stream, &args)?;
            }
            if last {
                return Ok(());
            }
        }
    }
}

impl Engine for CudaEngine {
    unsafe fn step(
        &mut self,
        hyper: &Hyper,
        _: &[TensorSpec],
        lr: f32,
        options: &StepOptions,
        buffers: &StepBuffers,
        stream: *mut c_void,
    ) -> Result<()> {
        if options.check_finite {
            return Err(check_finite_unsupported());
        }
        self.enqueue(hyper, lr, options, buffers, stream)
    }

    fn steps_some_tensors(&self) -> bool {
        true
    }

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
        if options.check_finite {
            return Err(check_finite_unsupported());
        }
        self.enqueue_tensors(
            hyper, tensors, lr, options, indices, buffers, completes, stream,
        )
    }

    /// One idle block that advances the step count, on `stream`.
    fn finish_round(&mut self, stream: *mut c_void) -> Result<()> {
        let no_options = StepOptions::default();
        // SAFETY: no tensor is listed, so no caller buffer is read.
        unsafe {
            let buffers = StepBuffers::new(&[], &[], &[]);
            self.enqueue_tensors(
                &self.hyper,
                &[],
                0.0, // read by no block: none has a chunk
                &no_options,
                &[],
                &buffers,
                true,
                stream,
            )
        }
    }

    fn check_pointers(
        &self,
        tensors: &[TensorSpec],
        indices: Option<&[u32]>,
        params: &[*mut c_void],
        grads: &[*const c_void],
        accepted: &[(usize, usize)],
    ) -> Result<()> {
        check_device_pointers(
            &self.context,
            self.ordinal,
            tensors,
            indices,
            params,
            grads,
            accepted,
        )
    }

    fn check_option_pointers(&self, options: &StepOptions, accepted: (usize, usize)) -> Result<()> {
        check_option_device_pointers(&self.context, self.ordinal, options, accepted)
    }

    /// Steps taken, from the device (waits for the device first).
    fn step_count(&self) -> Result<u64> {
        let _current = self.context.enter()?;
        driver::synchronize()?;
        let mut bytes = [0u8; 8];
        self.buf
            .step_counters
            .download(8 * COUNTER_STEP, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// The momentum, tensors in order and unpadded, as little-endian bytes in the checkpoint's
    /// layout (a q8 tensor's codes then its scales). `out` is only written once the whole
    /// download has succeeded.
    fn read_state(&self, _: &[TensorSpec], _lr: f32, out: Option<&mut [u8]>) -> Result<()> {
        let Some(out) = out else { return Ok(()) };
        let _current = self.context.enter()?;
        driver::synchronize()?;
        let mut padded = host_bytes(self.buf.state.bytes)?;
        self.buf.state.download(0, &mut padded)?;
        plan::regions_out(&self.regions, &padded, out);
        Ok(())
    }

    /// Replaces momentum and step count (both verified by the caller), each in one copy.
    fn restore(&mut self, _: &[TensorSpec], step: u64, state: &[u8]) -> Result<()> {
        let mut padded = host_bytes(self.buf.state.bytes)?;
        plan::regions_in(&self.regions, state, &mut padded);
        let _current = self.context.enter()?;
        driver::synchronize()?;
        self.buf.state.upload(0, &padded)?;
        // The step count, and a ticket of 0 (no launch is running: the device is idle).
        let mut step_counters = [0u8; 8 * N_COUNTERS];
        step_counters[8 * COUNTER_STEP..][..8].copy_from_slice(&step.to_le_bytes());
        self.buf.step_counters.upload(0, &step_counters)
    }
}

impl Drop for CudaEngine {
    fn drop(&mut self) {
        if self.context.belongs_to_parent() {
            return; // a child of fork(): the device memory is the parent's, left alone
        }
        // Freeing memory that a queued step still uses would be a use-after-free on the
        // device: wait for the device, then free with the context current.
        let current = self.context.enter();
        let _ = driver::synchronize();
        // SAFETY: dropped once, here; nothing uses the buffers afterwards.
        unsafe { ManuallyDrop::drop(&mut self.buf) };
        drop(current);
    }
}
