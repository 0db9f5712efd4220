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
    /// The (found_inf, lr) option pointers that the engine last accepted: the same ones again
    /// (the usual case) are not asked about.
    options_accepted: (usize, usize),
    /// The round of `lion_step_tensors` (see `step_tensors`).
    round: Round,
}

/// The open round of `lion_step_tensors`: which tensors were stepped since the last whole
/// step. Sized at creation, so a call allocates nothing.
struct Round {
    stepped: Vec<bool>,
    n_stepped: usize,
    /// Per tensor, its place in the current call's arrays (`StepBuffers::some`).
    slot_of: Vec<u32>,
    /// Per tensor, the (param, grad) addresses that the engine last accepted in a call of
    /// some tensors (the CUDA engine asks the driver only about new ones). Kept apart from
    /// `checked`: buffers accepted in different calls were never checked against each other.
    accepted: Vec<(usize, usize)>,
}

impl Round {
    fn open(&self) -> bool {
        self.n_stepped > 0
    }
    fn close(&mut self) {
        self.stepped.fill(false);
        self.n_stepped = 0;
    }
}

#[derive(Clone, Copy)]
struct Range {
    start: usize,
    end: usize,
    /// The buffer's place in the call's arrays (its tensor's index in a whole step).
    slot: usize,
    tensor: usize,
    is_param: bool,
}

/// The step's tables of an optimizer, made before its engine (`Optimizer::tables`).
struct Tables {
    ranges: Vec<Range>,
    checked: Vec<(usize, usize)>,
    round: Round,
}

/// What a call that needs whole steps says while a round is open.
fn round_open(what: &str, n_stepped: usize, n: usize) -> Error {
    Error::round_open(format!(
        "{what} is refused: a round of lion_step_tensors is open ({n_stepped} of {n} tensors \
         stepped); step the others, or end it with lion_round_finish"
    ))
}

impl Optimizer {
    pub fn new(config: &Config, tensors: Vec<TensorSpec>) -> Result<Optimizer> {
        Optimizer::build(config, tensors, None, |tensors, refusal| {
            if let Some(refused) = refusal {
                return Err(refused); // one process: no one else to tell
            }
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
    /// `refusal`: the caller's arguments were refused already (`config` then only says where
    /// the optimizer would have lived, and `tensors` may be empty); this rank still takes part
    /// in creation's check where it can, so that the other ranks fail with it instead of
    /// waiting, and returns the refusal.
    pub fn new_distributed(
        config: &Config,
        tensors: Vec<TensorSpec>,
        dist: &DistConfig,
        refusal: Option<Error>,
    ) -> Result<Optimizer> {
        Optimizer::build(config, tensors, refusal, |tensors, refusal| {
            if dist.world_size == 1 {
                if let Some(refused) = refusal {
                    return Err(refused); // no one else to tell
                }
            }
            if config.device == Device::Cuda {
                #[cfg(feature = "cuda")]
                {
                    // SAFETY: the caller's string (NULL or NUL-terminated). A rank that
                    // refuses takes part even with an empty one (then the loader's libnccl).
                    let nccl_library =
                        match unsafe { crate::ffi::dist::nccl_library_path(dist.nccl_library) } {
                            Ok(path) => path,
                            Err(_) if refusal.is_some() => None,
                            Err(e) => return Err(e),
                        };
                    return crate::cuda::new_distributed(
                        &config.hyper,
                        tensors,
                        config.device_index,
                        dist,
                        nccl_library,
                        refusal,
                    );
                }
                #[cfg(not(feature = "cuda"))]
                return Err(refusal.unwrap_or_else(|| {
                    Error::unsupported(
                        "this build of liblion has no CUDA engine (built without the `cuda` \
                         feature)",
                    )
                }));
            }
            let transport: Box<dyn Transport> = match dist.join {
                // SAFETY: the table was read from the caller's struct (struct_size honoured).
                Join::Collectives(table) => unsafe {
                    Box::new(
                        Callbacks::new(&table, dist.rank, dist.world_size)
                            .map_err(|e| refusal.clone().unwrap_or(e))?,
                    )
                },
                Join::NcclComm(_) | Join::NcclUniqueId(_) => {
                    return Err(refusal.unwrap_or_else(|| {
                        Error::unsupported(
                            "NCCL carries device memory: a CPU optimizer takes the caller's \
                             collectives (LionDistConfig.collectives)",
                        )
                    }))
                }
            };
            let h = &config.hyper;
            Ok(match dist.mode {
                Mode::Sharded => Box::new(ShardedCpu::new(
                    h,
                    tensors,
                    config.num_threads,
                    transport,
                    refusal,
                )?),
                Mode::Vote => Box::new(VoteCpu::new(
                    h,
                    tensors,
                    config.num_threads,
                    transport,
                    dist.exchange,
                    refusal,
                )?),
            })
        })
    }

    /// Checks `tensors` against `config` and makes the optimizer's tables, then its engine,
    /// which gets any refusal (the caller's `refusal` first, else these checks'): a
    /// distributed engine takes part in creation's check before it returns it.
    fn build(
        config: &Config,
        tensors: Vec<TensorSpec>,
        refusal: Option<Error>,
        engine: impl FnOnce(&[TensorSpec], Option<Error>) -> Result<Box<dyn Engine>>,
    ) -> Result<Optimizer> {
        let tables = match refusal {
            Some(refused) => Err(refused),
            None => Optimizer::tables(config, &tensors),
        };
        let engine = engine(&tensors, tables.as_ref().err().cloned())?;
        let Tables {
            ranges,
            checked,
            round,
        } = tables?; // Ok: the engine returned any refusal
        Ok(Optimizer {
            hyper: config.hyper,
            tensors,
            lr: config.hyper.lr0,
            engine,
            ranges,
            checked,
            options_accepted: (0, 0),
            round,
        })
    }

    /// What `build` checks, and the step's tables (reserved before the engine, so that a
    /// distributed rank that runs out of memory says so in creation's check).
    fn tables(config: &Config, tensors: &[TensorSpec]) -> Result<Tables> {
        if tensors.is_empty() {
            return Err(Error::invalid("n_tensors must be at least 1"));
        }
        update::check_products(&config.hyper, config.hyper.lr0, tensors)?;
        let n = tensors.len();
        let mut ranges = Vec::new();
        let mut checked = Vec::new();
        let mut round = Round {
            stepped: Vec::new(),
            n_stepped: 0,
            slot_of: Vec::new(),
            accepted: Vec::new(),
        };
        ranges
            .try_reserve_exact(2 * n)
            .and_then(|_| checked.try_reserve_exact(n))
            .and_then(|_| round.stepped.try_reserve_exact(n))
            .and_then(|_| round.slot_of.try_reserve_exact(n))
            .and_then(|_| round.accepted.try_reserve_exact(n))
            .map_err(|_| Error::out_of_memory("could not allocate the step's range table"))?;
        round.stepped.resize(n, false);
        round.slot_of.resize(n, 0);
        round.accepted.resize(n, (0, 0));
        Ok(Tables {
            ranges,
            checked,
            round,
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

    /// A refused lr leaves the current one in place; a round of `lion_step_tensors` keeps
    /// one lr, so it is refused while one is open.
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        self.refuse_open_round("lion_set_lr")?;
        config::check_lr(lr)?;
        update::check_products(&self.hyper, lr, &self.tensors)?;
        self.lr = lr;
        Ok(())
    }

    /// A step refused before it reached `step` (its arguments): see `Engine::refuse_collectively`.
    pub fn refuse_step(&mut self, stream: *mut c_void) {
        self.engine.refuse_collectively(stream);
    }

    /// `LION_ERROR_ROUND_OPEN` while a round of `lion_step_tensors` is open: `what` needs
    /// whole steps (a checkpoint saved now would hold some tensors' momentum of the next
    /// step under this step's count).
    pub fn refuse_open_round(&self, what: &str) -> Result<()> {
        if self.round.open() {
            return Err(round_open(what, self.round.n_stepped, self.tensors.len()));
        }
        Ok(())
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

    /// `lion_step_count`'s answer: the steps taken, after reporting (once) a distributed
    /// engine's skipped step whose ranks differed (`Engine::report_disagreement`).
    pub fn step_count_reported(&self) -> Result<u64> {
        self.engine.report_disagreement()?;
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
        let checked = if self.round.open() {
            Err(round_open(
                "a step of every tensor",
                self.round.n_stepped,
                self.tensors.len(),
            ))
        } else if params.len() != self.tensors.len() {
            Err(Error::invalid(format!(
                "n_tensors is {}, but the optimizer was created for {}",
                params.len(),
                self.tensors.len()
            )))
        } else {
            self.check_buffers(params, grads)
                .and_then(|()| self.check_options(options))
        };
        if let Err(e) = checked {
            self.engine.refuse_collectively(stream);
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

    /// One call of a round of `lion_step_tensors`: steps the tensors `indices[j]`, whose
    /// buffers are `params[j]` and `grads[j]`, with the step number, keys and lr of the step
    /// that the round makes. A tensor may be stepped once per round; the call that steps the
    /// round's last tensors completes it (the step count advances, as after `lion_step`).
    /// A refused call changes nothing, the round's record included.
    ///
    /// # Safety
    /// As `step`, for the listed tensors.
    pub unsafe fn step_tensors(
        &mut self,
        indices: &[u32],
        params: &[*mut c_void],
        grads: &[*const c_void],
        stream: *mut c_void,
        options: &StepOptions,
    ) -> Result<()> {
        if !self.engine.steps_some_tensors() {
            // No collective: every rank refuses alike, and none waits for another.
            return self.engine.step_tensors(
                &self.hyper,
                &self.tensors,
                self.lr,
                options,
                indices,
                &StepBuffers::new(params, grads, &self.tensors),
                false,
                stream,
            );
        }
        if indices.is_empty() {
            return Ok(());
        }
        let n = self.tensors.len();
        for (j, &t) in indices.iter().enumerate() {
            let t = t as usize;
            let refused = if t >= n {
                Some(Error::invalid(format!(
                    "indices[{j}] is {t}, but the optimizer has {n} tensors"
                )))
            } else if self.round.stepped[t] {
                let earlier = indices[..j].contains(&(t as u32));
                Some(Error::invalid(if earlier {
                    format!("indices[{j}]: tensor {t} is listed twice in this call")
                } else {
                    format!(
                        "indices[{j}]: tensor {t} was already stepped in this round (a round \
                         steps each tensor once; {} of {n} stepped so far)",
                        self.round.n_stepped
                    )
                }))
            } else {
                None
            };
            if let Some(e) = refused {
                // Undo this call's marks: the earlier calls' stay.
                for &u in &indices[..j] {
                    self.round.stepped[u as usize] = false;
                }
                return Err(e);
            }
            self.round.stepped[t] = true;
            self.round.slot_of[t] = j as u32;
        }
        let result = self.step_marked(indices, params, grads, stream, options);
        if result.is_err() {
            for &t in indices {
                self.round.stepped[t as usize] = false;
            }
            return result;
        }
        self.round.n_stepped += indices.len();
        if self.round.n_stepped == n {
            self.round.close();
        }
        Ok(())
    }

    /// `step_tensors` once its indices are checked and marked.
    unsafe fn step_marked(
        &mut self,
        indices: &[u32],
        params: &[*mut c_void],
        grads: &[*const c_void],
        stream: *mut c_void,
        options: &StepOptions,
    ) -> Result<()> {
        self.check_ranges(Some(indices), params, grads)?;
        self.engine.check_pointers(
            &self.tensors,
            Some(indices),
            params,
            grads,
            &self.round.accepted,
        )?;
        for (j, &t) in indices.iter().enumerate() {
            self.round.accepted[t as usize] = (params[j] as usize, grads[j] as usize);
        }
        self.check_options(options)?;
        let completes = self.round.n_stepped + indices.len() == self.tensors.len();
        let buffers = StepBuffers::some(params, grads, &self.tensors, &self.round.slot_of);
        self.engine.step_tensors(
            &self.hyper,
            &self.tensors,
            self.lr,
            options,
            indices,
            &buffers,
            completes,
            stream,
        )
    }

    /// Ends the open round of `lion_step_tensors`: the tensors it did not step keep their
    /// values and momentum, and the round counts as a step. Without an open round, nothing
    /// happens.
    pub fn finish_round(&mut self, stream: *mut c_void) -> Result<()> {
        if !self.engine.steps_some_tensors() {
            return self.engine.finish_round(stream);
        }
        if !self.round.open() {
            return Ok(());
        }
        self.engine.finish_round(stream)?;
        self.round.close();
        Ok(())
    }

    /// Refuses option pointers that the engine cannot read where the step runs (a host
    /// pointer for a CUDA step would fault its kernel, and poison the caller's context).
    fn check_options(&mut self, options: &StepOptions) -> Result<()> {
        let now = (options.found_inf as usize, options.lr as usize);
        if now != self.options_accepted {
            self.engine
                .check_option_pointers(options, self.options_accepted)?;
            self.options_accepted = now;
        }
        Ok(())
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
        self.check_ranges(None, params, grads)?;
        self.engine
            .check_pointers(&self.tensors, None, params, grads, &self.checked)?;
        self.checked.clear();
        self.checked.extend(
            params
                .iter()
                .zip(grads)
                .map(|(&p, &g)| (p as usize, g as usize)),
        );
        Ok(())
    }

    /// The checks of `check_buffers` on one call's buffers: `params[j]` and `grads[j]` are
    /// tensor `indices[j]`'s (tensor `j`'s without `indices`). Messages name the call's
    /// arrays, and the tensor where it differs.
    fn check_ranges(
        &mut self,
        indices: Option<&[u32]>,
        params: &[*mut c_void],
        grads: &[*const c_void],
    ) -> Result<()> {
        self.ranges.clear();
        for j in 0..params.len() {
            let i = indices.map_or(j, |ix| ix[j] as usize);
            let t = &self.tensors[i];
            if t.numel == 0 {
                continue;
            }
            for (is_param, ptr, dtype) in [
                (true, params[j] as usize, t.param),
                (false, grads[j] as usize, t.grad),
            ] {
                // Formatted only for a message: a call that passes allocates nothing.
                let name = || buffer_name(is_param, j, i);
                if ptr == 0 {
                    return Err(Error::null(&name()));
                }
                if ptr % dtype.size() != 0 {
                    return Err(Error::invalid(format!(
                        "{} is not aligned to its dtype ({}, {} bytes)",
                        name(),
                        dtype.name(),
                        dtype.size()
                    )));
                }
                let bytes = t.numel as usize * dtype.size();
                let end = ptr.checked_add(bytes).ok_or_else(|| {
                    Error::invalid(format!(
                        "{} plus its size wraps around the address space",
                        name()
                    ))
                })?;
                self.ranges.push(Range {
                    start: ptr,
                    end,
                    slot: j,
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
                let name = |x: Range| buffer_name(x.is_param, x.slot, x.tensor);
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

    /// The momentum as little-endian bytes of the state dtype, tensors in order; None: this
    /// rank takes part in a collective save (`collective_checkpoint`) without the bytes.
    pub fn read_state(&self, out: Option<&mut [u8]>) -> Result<()> {
        self.engine.read_state(&self.tensors, self.lr, out)
    }

    /// Restores a checkpoint's values (verified by the caller; `state` in the state dtype).
    /// An open round of `lion_step_tensors` is dropped: the checkpoint is a whole step.
    pub fn restore(&mut self, step: u64, lr: f32, state: &[u8]) -> Result<()> {
        self.engine.restore(&self.tensors, step, state)?;
        self.lr = lr;
        self.round.close();
        Ok(())
    }
}

/// `params[j]`, or `params[j] (tensor t)` in a call of some tensors.
fn buffer_name(is_param: bool, slot: usize, tensor: usize) -> String {
    let array = if is_param { "params" } else { "grads" };
    if slot == tensor {
        format!("{array}[{slot}]")
    } else {
        format!("{array}[{slot}] (tensor {tensor})")
    }
}
