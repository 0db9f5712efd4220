//! The CPU engine: momentum in host memory, work split into fixed chunks that the optimizer's
//! own thread pool runs. Chunk boundaries depend only on the tensor sizes, and no result
//! depends on which thread ran which chunk, so every thread count gives the same bits.

#[cfg(target_arch = "x86_64")]
mod avx512bf16;
pub(crate) mod elem;
#[cfg(target_arch = "x86_64")]
mod f16c;
pub(crate) mod isa;
pub(crate) mod kernel;
mod pool;
mod prefetch;
pub(crate) mod sharded;
pub(crate) mod vote;
pub(crate) mod vote_codes;

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::buffer::{try_vec, ZeroedBuf};
use crate::config::{self, DType, Hyper, StepOptions, TensorSpec};
use crate::engine::{Engine, Piece, StepBuffers};
use crate::numerics::q8;
use crate::numerics::rng::{Key, Stream};
use crate::numerics::update::{self, Coeffs};
use crate::status::{Error, LionStatus, Result};
use elem::Elem;
use isa::{CountFn, Isa, Q8CountFn, Q8UpdateFn, UpdateFn};
use kernel::RoundingKeys;
use pool::Pool;

/// Elements per unit of parallel work: large enough to amortise scheduling, small enough
/// to balance 100+ threads on a GPT-2-sized model. `LION_CPU_CHUNK` overrides it, for
/// tuning only (no result depends on it).
const CPU_CHUNK_ELEMENTS: u64 = 16 * 1024;
/// Below this many elements a step runs on the caller's thread: waking the pool costs more.
const PARALLEL_MIN: u64 = 4 * CPU_CHUNK_ELEMENTS;

fn cpu_chunk_elements() -> u64 {
    std::env::var("LION_CPU_CHUNK")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|c| (1024..=1 << 30).contains(c))
        .unwrap_or(CPU_CHUNK_ELEMENTS)
}

/// Where the momentum starts in its page on AMD CPUs: half a page past a boundary. Large
/// arrays from malloc start a few bytes past one (glibc: 16 or 64), as the momentum did: then
/// loads of the next p and g elements match the store to m just issued in address bits 11:0
/// (4K aliasing) and wait for it. On the Zen 4 VM of BENCHMARKS.md that held a one-thread
/// f32 step to 0.6-0.86x of a same-bytes loop (bf16: 0.5x). The Xeon there was not measured
/// with it, so elsewhere the allocator decides. `LION_CPU_STATE_OFFSET` (bytes, a multiple
/// of 64 below 4096, or `none`) overrides it, for tuning only: no result depends on it.
const STATE_PAGE_OFFSET: usize = 2048;

fn state_page_offset() -> Option<usize> {
    match std::env::var("LION_CPU_STATE_OFFSET").as_deref() {
        Ok("none") => None,
        Ok(v) if v.parse::<usize>().is_ok_and(|o| o % 64 == 0 && o < 4096) => v.parse().ok(),
        _ => isa::amd().then_some(STATE_PAGE_OFFSET),
    }
}

/// A unit of parallel work: `len` elements of a piece, from element `start` of its tensor.
struct CpuChunk {
    piece: usize,
    tensor: usize,
    start: u64,
    len: usize,
}

/// A piece's kernels: over momentum of one dtype, or 8-bit (codes and scales).
#[derive(Clone, Copy)]
enum Kernels {
    Dense {
        update: UpdateFn,
        count: CountFn,
    },
    Q8 {
        update: Q8UpdateFn,
        count: Q8CountFn,
    },
}

struct TensorKernels {
    kernels: Kernels,
    /// Bytes per element of the momentum at `state_offset` (a q8 tensor's codes: 1).
    elem: usize,
    /// Where the state buffer holds the momentum (q8: the codes) of the piece's element
    /// `first`, in bytes (that of the tensor's element `start` is at
    /// `state_offset + (start - first) * elem`).
    state_offset: usize,
    /// q8: where the piece's block scales start, in bytes (f32, aligned).
    scales_offset: usize,
    first: u64,
    len: u64,
}

impl TensorKernels {
    /// The momentum (q8: codes) and scales of the tensor's element `start`.
    fn momentum(&self, state: usize, start: u64) -> (*mut u8, *mut u8) {
        let at = (start - self.first) as usize;
        (
            (state + self.state_offset + at * self.elem) as *mut u8,
            (state + self.scales_offset + at / q8::BLOCK * 4) as *mut u8,
        )
    }
}

/// Per-step values, rebuilt in place every step (no allocation).
struct StepScratch {
    coeffs: Vec<Coeffs>,
    keys: Vec<RoundingKeys>,
    /// Per chunk: Cautious Lion's count of elements whose signs agree.
    agreeing: Vec<AtomicU64>,
    /// The same per tensor (summed over ranks in sharded mode).
    agreeing_per_tensor: Vec<u64>,
}

pub(crate) struct CpuEngine {
    pool: Option<Pool>,
    kernels: Vec<TensorKernels>,
    chunks: Vec<CpuChunk>,
    /// Per piece, its first chunk; then the number of chunks (a piece's chunks are
    /// `chunk_start[i]..chunk_start[i + 1]`).
    chunk_start: Vec<usize>,
    /// A step of some tensors (`lion_step_tensors`): the indices of their chunks, and their
    /// elements (sized at creation; refilled by each call).
    listed: Vec<usize>,
    listed_elements: u64,
    total: u64,
    state_dtype: DType,
    /// Bytes of the state buffer in use (q8: with its alignment padding).
    state_len: usize,
    state: ZeroedBuf,
    scratch: StepScratch,
    /// Steps taken.
    steps: u64,
}

impl CpuEngine {
    pub(crate) fn new(
        hyper: &Hyper,
        tensors: &[TensorSpec],
        num_threads: u32,
    ) -> Result<CpuEngine> {
        CpuEngine::for_pieces(hyper, tensors, &Piece::whole(tensors)?, num_threads)
    }

    /// An engine for `pieces` of `tensors` only (their momentum, their updates); the
    /// coefficients, keys and element numbers stay those of the whole tensors.
    pub(crate) fn for_pieces(
        hyper: &Hyper,
        tensors: &[TensorSpec],
        pieces: &[Piece],
        num_threads: u32,
    ) -> Result<CpuEngine> {
        let isa = Isa::detect();
        let state_dtype = hyper.state_dtype;
        let mut kernels = try_vec(pieces.len(), "tensor table")?;
        let mut total = 0u64;
        let mut n_chunks = 0u64;
        let chunk = cpu_chunk_elements();
        // q8 tensors' chunks hold whole blocks.
        let q8_chunk = chunk.next_multiple_of(q8::BLOCK as u64);
        let too_large = || Error::invalid("the momentum of these tensors cannot be addressed");
        // Bytes of state so far; q8 regions start on a cache line (f32 and bf16 state stays
        // packed, as it always was).
        let mut bytes = 0u64;
        for piece in pieces {
            let t = &tensors[piece.tensor];
            let quantized = q8::quantized(state_dtype, t.numel);
            if state_dtype == DType::Q8 && piece.first != 0 {
                return Err(Error::unsupported(
                    "8-bit momentum needs whole tensors (blocks of 256 from each tensor's start)",
                ));
            }
            let align = |b: u64| {
                if state_dtype == DType::Q8 {
                    b.next_multiple_of(64)
                } else {
                    b
                }
            };
            let (kernel, elem) = if quantized {
                let k = Kernels::Q8 {
                    update: isa::q8_update_fn(isa, t.param, t.grad),
                    count: isa::q8_count_fn(isa, t.grad),
                };
                (k, 1)
            } else {
                // Small tensors under q8 keep f32 momentum.
                let s = q8::dense_state(state_dtype);
                let k = Kernels::Dense {
                    update: isa::update_fn(isa, t.param, t.grad, s),
                    count: isa::count_fn(isa, t.grad, s),
                };
                (k, s.size())
            };
            let state_offset = align(bytes);
            let end = piece
                .len
                .checked_mul(elem as u64)
                .and_then(|b| b.checked_add(state_offset))
                .ok_or_else(too_large)?;
            let scales_offset = align(end);
            bytes = if quantized {
                scales_offset + q8::blocks(piece.len) * 4
            } else {
                end
            };
            if bytes > isize::MAX as u64 {
                return Err(too_large());
            }
            kernels.push(TensorKernels {
                kernels: kernel,
                elem,
                state_offset: state_offset as usize,
                scales_offset: scales_offset as usize,
                first: piece.first,
                len: piece.len,
            });
            total = total
                .checked_add(piece.len)
                .ok_or_else(|| Error::invalid("the total number of elements overflows"))?;
            n_chunks += piece.len.div_ceil(if quantized { q8_chunk } else { chunk });
        }
        // The state first: if the model cannot fit, fail before building anything sized by it.
        let state = ZeroedBuf::at_page_offset(bytes as usize, state_page_offset(), "the momentum")?;
        let n_chunks =
            usize::try_from(n_chunks).map_err(|_| Error::invalid("too many elements"))?;
        let mut chunks = try_vec(n_chunks, "work chunks")?;
        let mut chunk_start = try_vec(pieces.len() + 1, "chunk table")?;
        let listed = try_vec(n_chunks, "chunk list")?;
        for (i, piece) in pieces.iter().enumerate() {
            chunk_start.push(chunks.len());
            let mut start = piece.first;
            let end = piece.first + piece.len;
            let chunk = match kernels[i].kernels {
                Kernels::Q8 { .. } => q8_chunk,
                Kernels::Dense { .. } => chunk,
            };
            while start < end {
                let len = chunk.min(end - start) as usize;
                chunks.push(CpuChunk {
                    piece: i,
                    tensor: piece.tensor,
                    start,
                    len,
                });
                start += len as u64;
            }
        }
        chunk_start.push(chunks.len());
        let mut agreeing = try_vec(n_chunks, "chunk counts")?;
        agreeing.extend((0..n_chunks).map(|_| AtomicU64::new(0)));
        let mut coeffs = try_vec(tensors.len(), "coefficients")?;
        coeffs.resize(tensors.len(), Coeffs::default());
        let no_keys = RoundingKeys {
            param: None,
            momentum: None,
        };
        let mut keys = try_vec(tensors.len(), "rounding keys")?;
        keys.resize(tensors.len(), no_keys);
        let mut agreeing_per_tensor = try_vec(tensors.len(), "agreement counts")?;
        agreeing_per_tensor.resize(tensors.len(), 0);
        let pool = match num_threads {
            1 => None,
            n => Some(Pool::new(n as usize)?),
        };
        Ok(CpuEngine {
            pool,
            kernels,
            chunks,
            chunk_start,
            listed,
            listed_elements: 0,
            total,
            state_dtype,
            state_len: bytes as usize,
            state,
            scratch: StepScratch {
                coeffs,
                keys,
                agreeing,
                agreeing_per_tensor,
            },
            steps: 0,
        })
    }

    /// Runs `work` for every chunk, on the pool when the step is large enough.
    fn for_each_chunk(&self, work: &(dyn Fn(usize, &CpuChunk) + Sync)) {
        match &self.pool {
            Some(pool) if self.total >= PARALLEL_MIN => pool.run(&|| {
                self.chunks
                    .par_iter()
                    .enumerate()
                    .for_each(|(i, c)| work(i, c));
            }),
            _ => self.chunks.iter().enumerate().for_each(|(i, c)| work(i, c)),
        }
    }

    /// Lists the chunks of the tensors `indices` (pieces are whole tensors: the engines that
    /// step some tensors are not sharded), for `for_each_listed`.
    fn list_chunks(&mut self, indices: &[u32]) {
        self.listed.clear();
        self.listed_elements = 0;
        for &t in indices {
            let (a, b) = (
                self.chunk_start[t as usize],
                self.chunk_start[t as usize + 1],
            );
            self.listed.extend(a..b);
            self.listed_elements += self.chunks[a..b].iter().map(|c| c.len as u64).sum::<u64>();
        }
    }

    /// `for_each_chunk` over the listed chunks only (`list_chunks`), or over every chunk;
    /// `work` gets the chunk's index among all of them.
    fn for_each_chunk_of(&self, listed: bool, work: &(dyn Fn(usize, &CpuChunk) + Sync)) {
        if !listed {
            return self.for_each_chunk(work);
        }
        let run = |&i: &usize| work(i, &self.chunks[i]);
        match &self.pool {
            Some(pool) if self.listed_elements >= PARALLEL_MIN => {
                pool.run(&|| self.listed.par_iter().for_each(run))
            }
            _ => self.listed.iter().for_each(run),
        }
    }

    /// Runs `work` over `0..n` in blocks (on the pool when `n` is large): for passes over
    /// flattened buffers (the vote mode's packing).
    fn for_each_block(&self, n: usize, work: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        const BLOCK: usize = 1 << 16;
        let run = |b: usize| work(b * BLOCK..((b + 1) * BLOCK).min(n));
        match &self.pool {
            Some(pool) if n as u64 >= PARALLEL_MIN => {
                pool.run(&|| (0..n.div_ceil(BLOCK)).into_par_iter().for_each(run))
            }
            _ => (0..n.div_ceil(BLOCK)).for_each(run),
        }
    }

    /// The update of one step. `buffers` were validated by the caller (non-NULL, aligned,
    /// disjoint). `sum_counts` turns this engine's Cautious Lion counts, per tensor, into
    /// the whole tensors' (sharded mode: a sum over ranks; else nothing to do).
    #[allow(clippy::too_many_arguments)] // one step's inputs
    pub(crate) fn update(
        &mut self,
        hyper: &Hyper,
        tensors: &[TensorSpec],
        lr: f32,
        grad_scale: f32,
        step_index: u64,
        buffers: &StepBuffers,
        sum_counts: &mut dyn FnMut(&mut [u64]) -> Result<()>,
    ) -> Result<()> {
        self.update_some(
            hyper, tensors, None, lr, grad_scale, step_index, buffers, sum_counts,
        )
    }

    /// `update` of the tensors `some` only (their chunks listed by `list_chunks`), or of
    /// every tensor (None). A tensor's coefficients, keys and chunks are the same either way,
    /// so stepping every tensor once, in any grouping, gives `update`'s bits.
    #[allow(clippy::too_many_arguments)] // one step's inputs
    fn update_some(
        &mut self,
        hyper: &Hyper,
        tensors: &[TensorSpec],
        some: Option<&[u32]>,
        lr: f32,
        grad_scale: f32,
        step_index: u64,
        buffers: &StepBuffers,
        sum_counts: &mut dyn FnMut(&mut [u64]) -> Result<()>,
    ) -> Result<()> {
        let each = |f: &mut dyn FnMut(usize)| match some {
            None => (0..tensors.len()).for_each(f),
            Some(indices) => indices.iter().for_each(|&i| f(i as usize)),
        };
        let listed = some.is_some();
        let cautious = hyper.cautious_factor < 1.0;
        each(&mut |i| self.scratch.coeffs[i] = Coeffs::new(hyper, lr, &tensors[i], 0, grad_scale));
        let state = self.state.as_ptr() as usize;
        if cautious {
            let coeffs = &self.scratch.coeffs;
            let agreeing = &self.scratch.agreeing;
            let kernels = &self.kernels;
            self.for_each_chunk_of(listed, &|i, c| {
                let k = &kernels[c.piece];
                let g = buffers.grad(c.tensor, c.start);
                let (m, scales) = k.momentum(state, c.start);
                let coeffs = &coeffs[c.tensor];
                // SAFETY: the chunk lies inside the tensor's buffers (checked lengths) and
                // its momentum (a q8 chunk starts on a block).
                let n = unsafe {
                    match k.kernels {
                        Kernels::Dense { count, .. } => count(g, m, c.len, coeffs),
                        Kernels::Q8 { count, .. } => count(g, m, scales, c.len, coeffs),
                    }
                };
                agreeing[i].store(n, Ordering::Relaxed);
            });
            let per_tensor = &mut self.scratch.agreeing_per_tensor;
            let agreeing = &self.scratch.agreeing;
            if listed {
                for &i in &self.listed {
                    per_tensor[self.chunks[i].tensor] = 0;
                }
                for &i in &self.listed {
                    per_tensor[self.chunks[i].tensor] += agreeing[i].load(Ordering::Relaxed);
                }
            } else {
                per_tensor.fill(0);
                for (c, n) in self.chunks.iter().zip(agreeing) {
                    per_tensor[c.tensor] += n.load(Ordering::Relaxed);
                }
                sum_counts(per_tensor)?;
            }
            let coeffs = &mut self.scratch.coeffs;
            each(&mut |i| {
                coeffs[i] = Coeffs::new(hyper, lr, &tensors[i], per_tensor[i], grad_scale)
            });
        }
        let keys = &mut self.scratch.keys;
        each(&mut |i| {
            let key = |stream| Key::new(hyper.seed, step_index, i as u64, stream);
            let sr = hyper.stochastic_rounding;
            keys[i] = RoundingKeys {
                param: (sr && tensors[i].param != crate::config::DType::F32)
                    .then(|| key(Stream::Param)),
                // q8 momentum always rounds to nearest (numerics::q8).
                momentum: (sr && hyper.state_dtype == crate::config::DType::BF16)
                    .then(|| key(Stream::Momentum)),
            };
        });
        let coeffs = &self.scratch.coeffs;
        let keys = &self.scratch.keys;
        let kernels = &self.kernels;
        self.for_each_chunk_of(listed, &|_, c| {
            let k = &kernels[c.piece];
            let p = buffers.param(c.tensor, c.start);
            let g = buffers.grad(c.tensor, c.start);
            let (m, scales) = k.momentum(state, c.start);
            let (coeffs, keys) = (&coeffs[c.tensor], keys[c.tensor]);
            // SAFETY: as above; chunks are disjoint (q8 chunks hold whole blocks), so no two
            // threads touch one element or one scale.
            unsafe {
                match k.kernels {
                    Kernels::Dense { update, .. } => update(p, g, m, c.len, coeffs, keys, c.start),
                    Kernels::Q8 { update, .. } => {
                        update(p, g, m, scales, c.len, coeffs, keys, c.start)
                    }
                }
            };
        });
        Ok(())
    }

    /// The first (tensor, element) whose gradient is NaN or Inf, if any: a read-only pass on
    /// the pool (the step option `check_finite`). The answer does not depend on the threads.
    fn find_non_finite(
        &self,
        tensors: &[TensorSpec],
        buffers: &StepBuffers,
        grad_scale: f32,
    ) -> Option<(usize, u64)> {
        self.find_non_finite_in(tensors, false, buffers, grad_scale)
    }

    /// `find_non_finite` in the listed chunks (`list_chunks`), or in all.
    fn find_non_finite_in(
        &self,
        tensors: &[TensorSpec],
        listed: bool,
        buffers: &StepBuffers,
        grad_scale: f32,
    ) -> Option<(usize, u64)> {
        // The gradient as the update uses it: scaled, in f32 (a finite f16 times a large
        // scale can overflow).
        fn first_bad<G: Elem>(g: *const u8, len: usize, scale: f32) -> Option<usize> {
            // SAFETY: the chunk lies inside the caller's (checked) gradient buffer.
            let g = unsafe { std::slice::from_raw_parts(g as *const G, len) };
            g.iter().position(|x| !(x.to_f32() * scale).is_finite())
        }
        let scan = |c: &CpuChunk| {
            let g = buffers.grad(c.tensor, c.start);
            match tensors[c.tensor].grad {
                DType::F32 => first_bad::<f32>(g, c.len, grad_scale),
                DType::F16 => first_bad::<half::f16>(g, c.len, grad_scale),
                DType::BF16 => first_bad::<half::bf16>(g, c.len, grad_scale),
                DType::Q8 => unreachable!("q8 is a state dtype only"),
            }
        };
        let first_chunk = AtomicUsize::new(usize::MAX);
        self.for_each_chunk_of(listed, &|i, c| {
            if i < first_chunk.load(Ordering::Relaxed) && scan(c).is_some() {
                first_chunk.fetch_min(i, Ordering::Relaxed);
            }
        });
        let i = first_chunk.into_inner();
        let c = self.chunks.get(i)?;
        scan(c).map(|at| (c.tensor, c.start + at as u64))
    }

    /// The (buffer range, checkpoint length) of each region of the momentum, pieces in
    /// order: f32 and bf16 state is one packed region; q8 has, per piece, its codes (or a
    /// small tensor's f32) and its scales, each starting on a cache line in the buffer and
    /// packed in the checkpoint (`numerics::q8::tensor_state_bytes`).
    fn regions(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        regions_of(self.state_dtype, self.state_len, &self.kernels)
    }

    /// The momentum of an f32 or bf16 state, packed (the sharded engine, which refuses q8
    /// state).
    fn state_bytes(&self) -> &[u8] {
        debug_assert_ne!(self.state_dtype, DType::Q8);
        &self.state.as_bytes()[..self.state_len]
    }

    fn state_bytes_mut(&mut self) -> &mut [u8] {
        debug_assert_ne!(self.state_dtype, DType::Q8);
        &mut self.state.as_bytes_mut()[..self.state_len]
    }

    /// The momentum, tensors in order, as a checkpoint holds it (little-endian).
    fn copy_state_out(&self, out: &mut [u8]) {
        let bytes = self.state.as_bytes();
        let mut at = 0;
        for r in self.regions() {
            out[at..at + r.len()].copy_from_slice(&bytes[r.clone()]);
            at += r.len();
        }
        debug_assert_eq!(at, out.len());
    }

    /// Allocates nothing (a load that passed its checks cannot fail for memory here).
    fn copy_state_in(&mut self, state: &[u8]) {
        let mut at = 0;
        let bytes = self.state.as_bytes_mut();
        for r in regions_of(self.state_dtype, self.state_len, &self.kernels) {
            bytes[r.clone()].copy_from_slice(&state[at..at + r.len()]);
            at += r.len();
        }
        debug_assert_eq!(at, state.len());
    }
}

/// `CpuEngine::regions`, from the fields it reads (borrowed apart from the state buffer).
fn regions_of(
    state_dtype: DType,
    state_len: usize,
    kernels: &[TensorKernels],
) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let packed = (state_dtype != DType::Q8).then_some(0..state_len);
    let q8 = (state_dtype == DType::Q8).then(|| {
        kernels.iter().flat_map(|k| {
            let len = k.len;
            let data = k.state_offset..k.state_offset + len as usize * k.elem;
            let scales = match k.kernels {
                Kernels::Q8 { .. } => {
                    k.scales_offset..k.scales_offset + q8::blocks(len) as usize * 4
                }
                Kernels::Dense { .. } => 0..0,
            };
            [data, scales]
        })
    });
    packed.into_iter().chain(q8.into_iter().flatten())
}

/// The step's lr: `options.lr`'s float (a host pointer on the CPU), checked like
/// `lion_set_lr`'s for the tensors it applies to (`only`: a `lion_step_tensors` call's; None:
/// every tensor), or the optimizer's.
///
/// # Safety
/// `options.lr` is NULL or points to a readable float.
unsafe fn host_lr(
    options: &StepOptions,
    lr: f32,
    hyper: &Hyper,
    tensors: &[TensorSpec],
    only: Option<&[u32]>,
) -> Result<f32> {
    if options.lr.is_null() {
        return Ok(lr);
    }
    let lr = *options.lr;
    config::check_lr(lr)
        .and_then(|_| match only {
            Some(indices) => update::check_products_of(hyper, lr, tensors, indices),
            None => update::check_products(hyper, lr, tensors),
        })
        .map_err(|e| Error::invalid(format!("options.lr: {}", e.message)))?;
    Ok(lr)
}

/// Whether `options.found_inf` (a host pointer on the CPU) is set: the step is skipped.
///
/// # Safety
/// `options.found_inf` is NULL or points to a readable float.
pub(crate) unsafe fn host_skips(options: &StepOptions) -> bool {
    !options.found_inf.is_null() && *options.found_inf != 0.0
}

/// A distributed step's lr for its first exchange: `host_lr`, except on a rank whose
/// `found_inf` is set. That rank skips the step (and the agreement skips it on every rank), so
/// a refused `options.lr` does not refuse it, as a skip wins over that check in one process:
/// it takes part with the optimizer's lr (`lr`), which every rank's fingerprint holds alike.
///
/// # Safety
/// `options.lr` and `options.found_inf` are NULL or point to readable floats.
unsafe fn agreed_lr(
    options: &StepOptions,
    lr: f32,
    hyper: &Hyper,
    tensors: &[TensorSpec],
) -> Result<f32> {
    match host_lr(options, lr, hyper, tensors, None) {
        Err(_) if host_skips(options) => Ok(lr),
        checked => checked,
    }
}

impl Engine for CpuEngine {
    unsafe fn step(
        &mut self,
        hyper: &Hyper,
        tensors: &[TensorSpec],
        lr: f32,
        options: &StepOptions,
        buffers: &StepBuffers,
        stream: *mut c_void,
    ) -> Result<()> {
        let _ = stream;
        // MIRROR(step-options): src/cuda/lion.cu skipped, current_lr, update_block's step count
        // (a skipped step writes nothing and does not count; options.lr replaces lr)
        // Host pointers: the skip and the lr are read now.
        if host_skips(options) {
            return Ok(());
        }
        if options.check_finite {
            if let Some((t, i)) = self.find_non_finite(tensors, buffers, options.grad_scale) {
                return Err(Error::new(
                    LionStatus::LION_ERROR_NON_FINITE,
                    format!("grads[{t}][{i}] is NaN or Inf (after grad_scale): the step was refused and nothing was written"),
                ));
            }
        }
        let lr = host_lr(options, lr, hyper, tensors, None)?;
        let next = self.steps + 1;
        self.update(
            hyper,
            tensors,
            lr,
            options.grad_scale,
            next,
            buffers,
            &mut |_| Ok(()),
        )?;
        self.steps = next;
        Ok(())
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
        let _ = stream;
        // MIRROR(step-options): src/cuda/lion.cu skipped, current_lr, update_block's step
        // count (as in `step`; the round's last call counts it)
        if host_skips(options) {
            return Ok(());
        }
        self.list_chunks(indices);
        if options.check_finite {
            if let Some((t, i)) =
                self.find_non_finite_in(tensors, true, buffers, options.grad_scale)
            {
                let j = indices.iter().position(|&x| x as usize == t).unwrap_or(t);
                return Err(Error::new(
                    LionStatus::LION_ERROR_NON_FINITE,
                    format!("grads[{j}][{i}] (tensor {t}) is NaN or Inf (after grad_scale): the call was refused and nothing was written"),
                ));
            }
        }
        let lr = host_lr(options, lr, hyper, tensors, Some(indices))?;
        // Every call of a round steps with the number of the step that the round makes.
        let next = self.steps + 1;
        self.update_some(
            hyper,
            tensors,
            Some(indices),
            lr,
            options.grad_scale,
            next,
            buffers,
            &mut |_| Ok(()),
        )?;
        if completes {
            self.steps = next;
        }
        Ok(())
    }

    fn finish_round(&mut self, _: *mut c_void) -> Result<()> {
        self.steps += 1;
        Ok(())
    }

    fn step_count(&self) -> Result<u64> {
        Ok(self.steps)
    }

    /// In a child of fork(): a new pool in place of the parent's (see `pool`).
    fn revive_after_fork(&mut self) -> Result<()> {
        match &mut self.pool {
            Some(pool) => pool.revive_after_fork(),
            None => Ok(()),
        }
    }

    fn read_state(&self, _: &[TensorSpec], _lr: f32, out: Option<&mut [u8]>) -> Result<()> {
        let Some(out) = out else { return Ok(()) };
        self.copy_state_out(out);
        Ok(())
    }

    fn restore(&mut self, _: &[TensorSpec], step: u64, state: &[u8]) -> Result<()> {
        self.copy_state_in(state);
        self.steps = step;
        Ok(())
    }
}
