//! The CUDA engine: momentum in device memory, one fused launch per step for all tensors
//! (two with Cautious Lion: count, then update), enqueued on the caller's stream in the
//! device's primary context. Everything is allocated at creation, so a step never allocates,
//! never synchronizes, and can be captured in a CUDA graph.
//!
//! The caller's pointers travel in the kernel's by-value parameters (up to MAX_TENSORS per
//! launch; more tensors take more launches): nothing is uploaded per step, and a captured
//! graph holds its own copy of them.

mod args;
pub(crate) mod driver;
mod module;
mod prelude;

use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::sync::Arc;

use crate::config::{Hyper, StepOptions, TensorSpec};
use crate::engine::{Engine, StepBuffers};
use crate::status::{Error, Result};
use args::{
    BlockChunk, HyperArgs, StepArgs, TensorInfo, COUNTER_STEP, CUDA_THREADS_PER_BLOCK, ELEMS,
    MAX_TENSORS, N_COUNTERS,
};
use driver::{DeviceBuffer, PrimaryContext};
use module::Kernels;

/// Elements per CUDA block's chunk (a multiple of CUDA_THREADS_PER_BLOCK * ELEMS).
/// `LION_CUDA_CHUNK` overrides it, for tuning only.
const CUDA_CHUNK_ELEMENTS: u64 = 8 * 1024;

fn block_chunk_elements() -> u64 {
    std::env::var("LION_CUDA_CHUNK")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&c| {
            c >= ELEMS * CUDA_THREADS_PER_BLOCK as u64
                && c % (ELEMS * CUDA_THREADS_PER_BLOCK as u64) == 0
                && c <= u32::MAX as u64
        })
        .unwrap_or(CUDA_CHUNK_ELEMENTS)
}

/// The tensors and chunks of one launch.
struct Launch {
    first_tensor: usize,
    n_tensors: usize,
    first_chunk: usize,
    n_chunks: usize,
}

struct Buffers {
    state: DeviceBuffer,
    tensors: DeviceBuffer,
    chunks: DeviceBuffer,
    agreeing: DeviceBuffer,
    step_counters: DeviceBuffer,
}

pub(crate) struct CudaEngine {
    kernels: Arc<Kernels>,
    ordinal: i32,
    launches: Vec<Launch>,
    /// Element offsets of each tensor's momentum in `state` (padded to ELEMS).
    offsets: Vec<u64>,
    state_elem: usize,
    /// Freed in `drop`, with the context current and the device idle.
    buf: ManuallyDrop<Buffers>,
    context: PrimaryContext,
}

// Device pointers and handles: usable from any thread with the context pushed.
unsafe impl Send for CudaEngine {}
unsafe impl Sync for CudaEngine {}

/// A zeroed host buffer of the momentum's size, whose allocation failure is an error.
fn host_bytes(n: usize) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Error::out_of_memory(format!("no host memory for {n} bytes of momentum")))?;
    v.resize(n, 0);
    Ok(v)
}

fn as_bytes<T: Copy>(items: &[T]) -> &[u8] {
    // SAFETY: plain-old-data repr(C) structs without padding we rely on reading.
    unsafe { std::slice::from_raw_parts(items.as_ptr() as *const u8, std::mem::size_of_val(items)) }
}

impl CudaEngine {
    pub(crate) fn new(
        hyper: &Hyper,
        tensors: &[TensorSpec],
        device_index: i32,
    ) -> Result<CudaEngine> {
        if hyper.state_dtype == crate::config::DType::Q8 {
            // Until lion.cu has the twin of src/numerics/q8.rs (its MIRROR(q8) tag).
            return Err(Error::unsupported(
                "the CUDA engine does not support 8-bit momentum (state_dtype LION_DTYPE_Q8) \
                 yet: its kernels are not written; use the CPU engine, or F32 or BF16 state",
            ));
        }
        driver::probe()?;
        let dev = driver::device(device_index)?;
        let kernels = module::kernels(dev)?;
        let context = PrimaryContext::retain(dev)?;
        let _current = context.enter()?;
        if tensors.len() > u32::MAX as usize {
            return Err(Error::invalid("too many tensors for the CUDA engine"));
        }
        let state_elem = hyper.state_dtype.size();
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut infos = Vec::with_capacity(tensors.len());
        let mut total = 0u64;
        for t in tensors {
            offsets.push(total);
            infos.push(TensorInfo {
                numel: t.numel,
                state_offset: total,
                lr_scale: t.lr_scale,
                wd_scale: t.weight_decay_scale,
                param_dtype: t.param.raw(),
                grad_dtype: t.grad.raw(),
            });
            total = total
                .checked_add(t.numel.div_ceil(ELEMS) * ELEMS)
                .ok_or_else(|| Error::invalid("the total number of elements overflows"))?;
        }
        let state_bytes = usize::try_from(total)
            .ok()
            .and_then(|t| t.checked_mul(state_elem))
            .ok_or_else(|| {
                Error::invalid(format!("{total} elements of state cannot be addressed"))
            })?;
        let state = DeviceBuffer::zeroed(state_bytes, "the momentum")?;
        // Chunks, launch by launch: at most MAX_TENSORS tensors each.
        let chunk = block_chunk_elements();
        let mut chunks = Vec::new();
        let mut launches = Vec::new();
        for first in (0..tensors.len()).step_by(MAX_TENSORS) {
            let n = MAX_TENSORS.min(tensors.len() - first);
            let first_chunk = chunks.len();
            for (i, t) in tensors[first..first + n].iter().enumerate() {
                let mut start = 0;
                while start < t.numel {
                    let len = chunk.min(t.numel - start);
                    chunks.push(BlockChunk {
                        tensor: (first + i) as u32,
                        len: len as u32,
                        start,
                    });
                    start += len;
                }
            }
            if chunks.len() == first_chunk {
                // Only empty tensors: one idle block still advances the step count.
                chunks.push(BlockChunk {
                    tensor: first as u32,
                    len: 0,
                    start: 0,
                });
            }
            launches.push(Launch {
                first_tensor: first,
                n_tensors: n,
                first_chunk,
                n_chunks: chunks.len() - first_chunk,
            });
        }
        let tensors_dev =
            DeviceBuffer::zeroed(std::mem::size_of_val(infos.as_slice()), "the tensor table")?;
        tensors_dev.upload(0, as_bytes(&infos))?;
        let chunks_dev =
            DeviceBuffer::zeroed(std::mem::size_of_val(chunks.as_slice()), "the chunk table")?;
        chunks_dev.upload(0, as_bytes(&chunks))?;
        let agreeing = DeviceBuffer::zeroed(8 * tensors.len(), "the cautious counters")?;
        let step_counters = DeviceBuffer::zeroed(8 * N_COUNTERS, "the step counters")?;
        drop(_current);
        Ok(CudaEngine {
            kernels,
            ordinal: device_index,
            launches,
            offsets,
            state_elem,
            buf: ManuallyDrop::new(Buffers {
                state,
                tensors: tensors_dev,
                chunks: chunks_dev,
                agreeing,
                step_counters,
            }),
            context,
        })
    }

    /// Enqueues one step on `stream`. Buffers were validated by the caller.
    fn enqueue(
        &self,
        hyper: &Hyper,
        lr: f32,
        options: &StepOptions,
        buffers: &StepBuffers,
        stream: *mut c_void,
    ) -> Result<()> {
        let _current = self.context.enter()?;
        let h = HyperArgs {
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            weight_decay: hyper.weight_decay,
            lr0: hyper.lr0,
            cautious_factor: hyper.cautious_factor,
            grad_scale: options.grad_scale,
            decay_mode: hyper.decay_mode.raw(),
            cautious_wd: hyper.cautious_weight_decay as u32,
            stochastic_rounding: hyper.stochastic_rounding as u32,
            state_dtype: hyper.state_dtype.raw(),
            seed: hyper.seed,
        };
        let cautious = hyper.cautious_factor < 1.0;
        let stream = stream as driver::CUstream;
        let b = &*self.buf;
        for (i, l) in self.launches.iter().enumerate() {
            let mut args = StepArgs {
                h,
                lr,
                first_tensor: l.first_tensor as u32,
                n_tensors: l.n_tensors as u32,
                last_launch: (i + 1 == self.launches.len()) as u32,
                lr_ptr: options.lr,
                found_inf: options.found_inf,
                step_counters: b.step_counters.ptr,
                agreeing: b.agreeing.ptr,
                tensors: b.tensors.ptr,
                chunks: b.chunks.ptr + (l.first_chunk * std::mem::size_of::<BlockChunk>()) as u64,
                state: b.state.ptr,
                params: [std::ptr::null_mut(); MAX_TENSORS],
                grads: [std::ptr::null(); MAX_TENSORS],
            };
            for t in 0..l.n_tensors {
                args.params[t] = buffers.param(l.first_tensor + t, 0) as *mut c_void;
                args.grads[t] = buffers.grad(l.first_tensor + t, 0) as *const c_void;
            }
            let blocks = l.n_chunks as u32;
            // SAFETY: args matches lion.cu's StepArgs; every pointer is a live device buffer
            // or the caller's (checked) buffers.
            unsafe {
                if cautious {
                    driver::launch(
                        self.kernels.count,
                        blocks,
                        CUDA_THREADS_PER_BLOCK,
                        stream,
                        &args,
                        "launching lion_count",
                    )?;
                }
                driver::launch(
                    self.kernels.update,
                    blocks,
                    CUDA_THREADS_PER_BLOCK,
                    stream,
                    &args,
                    "launching lion_update",
                )?;
            }
        }
        Ok(())
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
            return Err(Error::unsupported(
                "check_finite needs the host to read the gradients, which a CUDA step must not wait for: \
                 pass found_inf (e.g. from GradScaler's unscale) instead",
            ));
        }
        self.enqueue(hyper, lr, options, buffers, stream)
    }

    /// Refuses buffers a kernel on this device cannot use. Only pointers that differ from the
    /// last accepted ones (`accepted`, per tensor) are asked about: one driver call each.
    fn check_pointers(
        &self,
        tensors: &[TensorSpec],
        params: &[*mut c_void],
        grads: &[*const c_void],
        accepted: &[(usize, usize)],
    ) -> Result<()> {
        let _current = self.context.enter()?;
        for (i, t) in tensors.iter().enumerate() {
            let (p, g) = (params[i] as usize, grads[i] as usize);
            let (old_p, old_g) = accepted.get(i).copied().unwrap_or((0, 0));
            if t.numel == 0 {
                continue;
            }
            if p != old_p {
                driver::check_accessible(p, self.ordinal, &format!("params[{i}]"))?;
            }
            if g != old_g {
                driver::check_accessible(g, self.ordinal, &format!("grads[{i}]"))?;
            }
        }
        Ok(())
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

    /// The momentum, tensors in order and unpadded, as little-endian bytes. `out` is only
    /// written once the whole download has succeeded.
    fn read_state(&self, tensors: &[TensorSpec], out: &mut [u8]) -> Result<()> {
        let _current = self.context.enter()?;
        driver::synchronize()?;
        let mut padded = host_bytes(self.buf.state.bytes)?;
        self.buf.state.download(0, &mut padded)?;
        let mut at = 0;
        for (t, &offset) in tensors.iter().zip(&self.offsets) {
            let n = t.numel as usize * self.state_elem;
            let from = offset as usize * self.state_elem;
            out[at..at + n].copy_from_slice(&padded[from..from + n]);
            at += n;
        }
        Ok(())
    }

    /// Replaces momentum and step count (both verified by the caller), each in one copy.
    fn restore(&mut self, tensors: &[TensorSpec], step: u64, state: &[u8]) -> Result<()> {
        let mut padded = host_bytes(self.buf.state.bytes)?;
        let mut at = 0;
        for (t, &offset) in tensors.iter().zip(&self.offsets) {
            let n = t.numel as usize * self.state_elem;
            let to = offset as usize * self.state_elem;
            padded[to..to + n].copy_from_slice(&state[at..at + n]);
            at += n;
        }
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
