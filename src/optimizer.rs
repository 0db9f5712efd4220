//! The optimizer behind a `LionOptimizer*`: validated configuration, step count and lr, and
//! the engine that owns the momentum. Every check happens before anything is written.

use std::ffi::c_void;

use crate::config::{self, Config, Device, Hyper, StepOptions, TensorSpec};
use crate::cpu::sharded::ShardedCpu;
use crate::cpu::vote::VoteCpu;
use crate::cpu::CpuEngine;
use crate::dist::callbacks::Callbacks;
use crate::dist::config::{DistConfig, Join, Mode};
use crate::dist::Transport;
use crate::engine::{Engine, StepBuffers};
use crate::numerics::update;
use crate::status::{Error, Result};

pub struct Optimizer {
    pub(crate) hyper: Hyper,
    pub(crate) tensors: Vec<TensorSpec>,
    lr: f32,
    /// Owns the momentum and the step count.
    engine: Box<dyn Engine>,
    /// Address ranges of one step's buffers, sorted to find overlaps (kept to avoid allocating).
    ranges: Vec<Range>,
    /// The (param, grad) pointers that passed the checks last time: the same pointers again
    /// (the usual case) skip the sort.
    checked: Vec<(usize, usize)>,
}

#[derive(Clone, Copy)]
struct Range {
    start: usize,
    end: usize,
    tensor: usize,
    is_param: bool,
}

impl Optimizer {
    pub fn new(config: &Config, tensors: Vec<TensorSpec>) -> Result<Optimizer> {
        Optimizer::build(config, tensors, |tensors| {
            Ok(match config.device {
                Device::Cpu => {
                    Box::new(CpuEngine::new(&config.hyper, tensors, config.num_threads)?)
                }
                #[cfg(feature = "cuda")]
                Device::Cuda => Box::new(crate::cuda::CudaEngine::new(
                    &config.hyper,
                    tensors,
                    config.device_index,
                )?),
                #[cfg(not(feature = "cuda"))]
                Device::Cuda => return Err(Error::unsupported(
                    "this build of liblion has no CUDA engine (built without the `cuda` feature)",
                )),
            })
        })
    }

    /// An optimizer that is one rank of a distributed group (`lion_create_distributed`).
    pub fn new_distributed(
        config: &Config,
        tensors: Vec<TensorSpec>,
        dist: &DistConfig,
    ) -> Result<Optimizer> {
        Optimizer::build(config, tensors, |tensors| {
            if config.device == Device::Cuda {
                return Err(Error::unsupported(
                    "the distributed modes run on the CPU engine in this version (the CUDA \
                     engine's, over NCCL, are not built yet): use device = LION_DEVICE_CPU with \
                     the caller's collectives",
                ));
            }
            let transport: Box<dyn Transport> = match dist.join {
                // SAFETY: the table was read from the caller's struct (struct_size honoured).
                Join::Collectives(table) => unsafe {
                    Box::new(Callbacks::new(&table, dist.rank, dist.world_size)?)
                },
                Join::NcclComm(_) | Join::NcclUniqueId(_) => {
                    return Err(Error::unsupported(
                        "NCCL carries device memory: a CPU optimizer takes the caller's \
                         collectives (LionDistConfig.collectives)",
                    ))
                }
            };
            let h = &config.hyper;
            Ok(match dist.mode {
                Mode::Sharded => {
                    Box::new(ShardedCpu::new(h, tensors, config.num_threads, transport)?)
                }
                Mode::Vote => Box::new(VoteCpu::new(
                    h,
                    tensors,
                    config.num_threads,
                    transport,
                    dist.exchange,
                )?),
            })
        })
    }

    fn build(
        config: &Config,
        tensors: Vec<TensorSpec>,
        engine: impl FnOnce(&[TensorSpec]) -> Result<Box<dyn Engine>>,
    ) -> Result<Optimizer> {
        if tensors.is_empty() {
            return Err(Error::invalid("n_tensors must be at least 1"));
        }
        update::check_products(&config.hyper, config.hyper.lr0, &tensors)?;
        let engine = engine(&tensors)?;
        let mut ranges = Vec::new();
        let mut checked = Vec::new();
        ranges
            .try_reserve_exact(2 * tensors.len())
            .and_then(|_| checked.try_reserve_exact(tensors.len()))
            .map_err(|_| Error::out_of_memory("could not allocate the step's range table"))?;
        Ok(Optimizer {
            hyper: config.hyper,
            tensors,
            lr: config.hyper.lr0,
            engine,
            ranges,
            checked,
        })
    }

    /// In a child of fork(): the CPU pool is rebuilt (its threads were the parent's); a CUDA
    /// engine refuses every device call from then on (CUDA does not survive fork).
    pub fn revive_after_fork(&mut self) -> Result<()> {
        self.engine.revive_after_fork()
    }

    pub fn lr(&self) -> f32 {
        self.lr
    }

    /// A refused lr leaves the current one in place.
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        config::check_lr(lr)?;
        update::check_products(&self.hyper, lr, &self.tensors)?;
        self.lr = lr;
        Ok(())
    }

    /// A step refused before it reached `step` (its arguments): see `Engine::refuse_collectively`.
    pub fn refuse_step(&mut self) {
        self.engine.refuse_collectively();
    }

    /// Whether saving is collective (see `Engine::collective_checkpoint`).
    pub fn collective_checkpoint(&self) -> bool {
        self.engine.collective_checkpoint()
    }

    /// Steps taken (a step skipped for `found_inf` does not count). An engine whose count
    /// lives on a device (CUDA) waits for the device.
    pub fn step_count(&self) -> Result<u64> {
        self.engine.step_count()
    }

    /// # Safety
    /// `params` and `grads` hold `tensors.len()` pointers to the caller's buffers of each
    /// tensor's `numel` elements (the ABI contract), and the options' pointers are valid in
    /// the step's memory; everything checkable is checked here.
    pub unsafe fn step(
        &mut self,
        params: &[*mut c_void],
        grads: &[*const c_void],
        stream: *mut c_void,
        options: &StepOptions,
    ) -> Result<()> {
        let checked = if params.len() != self.tensors.len() {
            Err(Error::invalid(format!(
                "n_tensors is {}, but the optimizer was created for {}",
                params.len(),
                self.tensors.len()
            )))
        } else {
            self.check_buffers(params, grads)
        };
        if let Err(e) = checked {
            self.engine.refuse_collectively();
            return Err(e);
        }
        let buffers = StepBuffers::new(params, grads, &self.tensors);
        self.engine.step(
            &self.hyper,
            &self.tensors,
            self.lr,
            options,
            &buffers,
            stream,
        )
    }

    /// Refuses NULL or misaligned buffers, and parameters that overlap any other buffer
    /// (they would be written by two threads at once, or read after being written).
    fn check_buffers(&mut self, params: &[*mut c_void], grads: &[*const c_void]) -> Result<()> {
        let same = self.checked.len() == params.len()
            && self
                .checked
                .iter()
                .zip(params.iter().zip(grads))
                .all(|(&(p, g), (&pi, &gi))| p == pi as usize && g == gi as usize);
        if same {
            return Ok(());
        }
        self.ranges.clear();
        for (i, t) in self.tensors.iter().enumerate() {
            if t.numel == 0 {
                continue;
            }
            for (is_param, ptr, dtype) in [
                (true, params[i] as usize, t.param),
                (false, grads[i] as usize, t.grad),
            ] {
                let name = if is_param { "params" } else { "grads" };
                if ptr == 0 {
                    return Err(Error::null(&format!("{name}[{i}]")));
                }
                if ptr % dtype.size() != 0 {
                    return Err(Error::invalid(format!(
                        "{name}[{i}] is not aligned to its dtype ({}, {} bytes)",
                        dtype.name(),
                        dtype.size()
                    )));
                }
                let bytes = t.numel as usize * dtype.size();
                let end = ptr.checked_add(bytes).ok_or_else(|| {
                    Error::invalid(format!(
                        "{name}[{i}] plus its size wraps around the address space"
                    ))
                })?;
                self.ranges.push(Range {
                    start: ptr,
                    end,
                    tensor: i,
                    is_param,
                });
            }
        }
        self.ranges.sort_unstable_by_key(|r| r.start);
        // Any overlap pairs a range with an earlier-starting one whose end lies past its start.
        let mut last_param: Option<Range> = None;
        let mut last_grad: Option<Range> = None;
        for &r in &self.ranges {
            let clash = match (last_param, last_grad) {
                (Some(p), _) if r.start < p.end => Some(p),
                (_, Some(g)) if r.is_param && r.start < g.end => Some(g),
                _ => None,
            };
            if let Some(o) = clash {
                let name = |x: Range| {
                    format!(
                        "{}[{}]",
                        if x.is_param { "params" } else { "grads" },
                        x.tensor
                    )
                };
                return Err(Error::invalid(format!(
                    "{} overlaps {}: parameters must not share memory with any other buffer",
                    name(r),
                    name(o)
                )));
            }
            let slot = if r.is_param {
                &mut last_param
            } else {
                &mut last_grad
            };
            if slot.is_none_or(|s| r.end > s.end) {
                *slot = Some(r);
            }
        }
        self.engine
            .check_pointers(&self.tensors, params, grads, &self.checked)?;
        self.checked.clear();
        self.checked.extend(
            params
                .iter()
                .zip(grads)
                .map(|(&p, &g)| (p as usize, g as usize)),
        );
        Ok(())
    }

    /// Bytes of momentum in a checkpoint (unpadded, in the state dtype).
    pub fn state_len(&self) -> usize {
        crate::numerics::q8::state_bytes(
            self.hyper.state_dtype,
            self.tensors.iter().map(|t| t.numel),
        )
        .expect("state already allocated") as usize
    }

    /// The momentum as little-endian bytes of the state dtype, tensors in order.
    pub fn read_state(&self, out: &mut [u8]) -> Result<()> {
        self.engine.read_state(&self.tensors, out)
    }

    /// Restores a checkpoint's values (verified by the caller; `state` in the state dtype).
    pub fn restore(&mut self, step: u64, lr: f32, state: &[u8]) -> Result<()> {
        self.engine.restore(&self.tensors, step, state)?;
        self.lr = lr;
        Ok(())
    }
}
