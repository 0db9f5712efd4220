//! What the CUDA engine's distributed modes (`sharded.rs`, `vote.rs`) share: the transport,
//! joined on the engine's device, and the step's agreement, reached on the device.
//!
//! # The agreement, without the host
//!
//! A CUDA step must not wait for the device, so the host cannot learn what the other ranks
//! decided. Instead every rank enqueues the same collectives, always: a step starts with
//! lion_agree (this rank's flags: refused, found_inf, and a fingerprint of the setup, the
//! device's step count and the lr) and an all-reduce of them; every later kernel reads the
//! sums and writes nothing unless every rank agreed (`dist_skip` in lion.cu). A rank that
//! refuses a step (its buffers or options) returns the error, still enqueueing the
//! collectives with NULL buffers, and the other ranks' kernels skip it: their `lion_step`
//! returns LION_OK (they cannot know without waiting) but the step is not applied and not
//! counted. A step skipped because the ranks differ (a checkpoint loaded on some ranks only,
//! an lr set on one) is remembered on the device, and `lion_step_count`, which waits for the
//! device anyway, reports it. Ranks created differently (another seed, other tensors) never
//! get that far: creation checks every rank's setup, once, and waits (`agree_on_setup`).

use std::ffi::{c_void, CStr};
use std::ops::Range;

use super::args::{
    AgreeArgs, AGREE_DIFFERED, AGREE_FP, AGREE_FP2, AGREE_LEN, AGREE_RANKS, AGREE_REFUSED,
    AGREE_SEND, AGREE_SUM,
};
use super::driver::{self, DeviceBuffer, PrimaryContext};
use super::module::Kernels;
use crate::config::{Hyper, StepOptions, TensorSpec};
use crate::dist::callbacks::Callbacks;
use crate::dist::config::{DistConfig, Join, Mode};
use crate::dist::nccl::{Nccl, NcclComm};
use crate::dist::{Collective, CommDType, Transport};
use crate::engine::Engine;
use crate::status::{Error, LionStatus, Result};

/// A distributed CUDA engine for `dist` (`Optimizer::new_distributed`); `refusal` as there.
pub(crate) fn new_distributed(
    hyper: &Hyper,
    tensors: &[TensorSpec],
    device_index: i32,
    dist: &DistConfig,
    nccl_library: Option<&CStr>,
    refusal: Option<Error>,
) -> Result<Box<dyn Engine>> {
    // Refused, but only after taking part in creation's check (`Core::agree_on_creation`).
    // A refusal from before the engine (`refusal`) may come with no tensors: the engines
    // then only take part.
    let refusal = refusal.or_else(|| {
        let q8 = hyper.state_dtype == crate::config::DType::Q8;
        (q8 && dist.mode == Mode::Sharded).then(|| {
            Error::unsupported(
                "the sharded mode does not support 8-bit momentum (state_dtype LION_DTYPE_Q8) \
                 in this version: its slices are cut in the flattened tensors, across q8's \
                 blocks; use the vote mode, or F32 or BF16 state",
            )
        })
    });
    Ok(match dist.mode {
        Mode::Sharded => Box::new(super::sharded::ShardedCuda::new(
            hyper,
            tensors,
            device_index,
            dist,
            nccl_library,
            refusal,
        )?),
        Mode::Vote => Box::new(super::vote::VoteCuda::new(
            hyper,
            tensors,
            device_index,
            dist,
            nccl_library,
            refusal,
        )?),
    })
}

/// The transport `dist` names, joined with device `ordinal`'s context current (NCCL binds a
/// communicator it makes to the current device).
fn join(
    dist: &DistConfig,
    ordinal: i32,
    nccl_library: Option<&CStr>,
) -> Result<Box<dyn Transport>> {
    let (rank, world) = (dist.rank, dist.world_size);
    Ok(match dist.join {
        // SAFETY: the table was read from the caller's struct (struct_size honoured).
        Join::Collectives(table) => unsafe {
            Box::new(KeepsContext(Callbacks::new(&table, rank, world)?))
        },
        Join::NcclComm(comm) => {
            // SAFETY: the ABI's contract for `nccl_comm`.
            let comm = unsafe { NcclComm::borrow(Nccl::load(nccl_library)?, comm, rank, world)? };
            if comm.cuda_device() != ordinal {
                return Err(Error::invalid(format!(
                    "nccl_comm works on CUDA device {}, but the optimizer's device_index is \
                     {ordinal}",
                    comm.cuda_device()
                )));
            }
            Box::new(comm)
        }
        Join::NcclUniqueId(id) => Box::new(NcclComm::init(
            Nccl::load(nccl_library)?,
            &id,
            rank,
            world,
            ordinal,
        )?),
    })
}

/// The caller's collectives on the CUDA engine. One that switches this thread's current
/// context (to another device's, say) and does not switch back would send the rest of the
/// step's work to that context, or fail it with no context at all; the context it found is
/// made current again after each call (`driver::restore_current`, which says what it cannot
/// undo). NCCL's collectives leave the context alone.
struct KeepsContext(Callbacks);

impl Transport for KeepsContext {
    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn world_size(&self) -> usize {
        self.0.world_size()
    }

    unsafe fn run(
        &self,
        op: Collective,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: CommDType,
        stream: *mut c_void,
    ) -> Result<()> {
        let found = driver::current_context();
        // SAFETY: as the caller's (`Transport::run`).
        let ran = unsafe { self.0.run(op, send, recv, count, dtype, stream) };
        let restored = driver::restore_current(found);
        ran.and(restored) // the collective's own error first
    }
}

/// The device, the transport and the agreement of one rank.
pub(crate) struct Core {
    pub kernels: std::sync::Arc<Kernels>,
    pub ordinal: i32,
    pub hyper: Hyper,
    /// N_COUNTERS u64: the steps taken and the launch ticket (as the single-process engine's).
    pub step_counters: DeviceBuffer,
    /// AGREE_LEN u64 (see `args::AGREE_*`).
    pub agreement: DeviceBuffer,
    /// The hash of what every rank must share (`dist::fingerprint`).
    pub setup: u64,
    /// A communicator liblion made is destroyed with its device current (see `release`).
    pub transport: Box<dyn Transport>,
}

impl Core {
    /// A distributed engine made around creation's check: the device, its context and the
    /// transport (`join`), then `build` with the context current (skipped where this rank's
    /// config is refused: `refusal`), which makes the engine's buffers before the check, since
    /// a rank out of device memory after it would leave the others waiting at their first
    /// step; then the check, in which every rank takes part with what it failed at; then the
    /// engine, assembled with the core and the context.
    #[allow(clippy::too_many_arguments)]
    pub fn create<E, Assemble: FnOnce(Core, PrimaryContext) -> E>(
        hyper: &Hyper,
        device_index: i32,
        dist: &DistConfig,
        nccl_library: Option<&CStr>,
        setup: u64,
        refusal: Option<Error>,
        build: impl FnOnce() -> Result<Assemble>,
    ) -> Result<E> {
        let (core, context) = Core::join(hyper, device_index, dist, nccl_library, setup, &refusal)?;
        let _current = context.enter().map_err(|e| refusal.clone().unwrap_or(e))?;
        // Bound after the guard, so that an error below drops it (device memory, an owned
        // communicator) with the context still current and retained; `built` likewise.
        let core = core;
        // The buffers' zeroing (cuMemsetD8) is queued on the legacy stream, which a first
        // step on a non-blocking stream would not wait for: waited for here, as the
        // single-process engine does (creation's exchange waits too, but a world of one has
        // none). A failure is this rank's refusal, which the other ranks learn at the check.
        let built = match refusal {
            Some(refused) => Err(refused),
            None => build().and_then(|b| driver::synchronize().map(|()| b)),
        };
        core.agree_on_creation(built.as_ref().err().cloned())?;
        let assemble = built?; // Ok: agree_on_creation returned any refusal
        let engine = assemble(core, context);
        drop(_current);
        Ok(engine)
    }

    /// The device, its context and the transport; creation's check follows, once the engine
    /// has made its buffers (`agree_on_creation`). `refusal`: this rank's own config is
    /// refused (a mode's rule, or an argument refused before the engine), which it returns
    /// after taking part in the check; it is returned here in place of an error before the
    /// transport is joined (no device, say), since the check cannot be reached then.
    fn join(
        hyper: &Hyper,
        device_index: i32,
        dist: &DistConfig,
        nccl_library: Option<&CStr>,
        setup: u64,
        refusal: &Option<Error>,
    ) -> Result<(Core, PrimaryContext)> {
        let prefer_refusal = |e: Error| refusal.clone().unwrap_or(e);
        driver::probe().map_err(prefer_refusal)?;
        let dev = driver::device(device_index).map_err(prefer_refusal)?;
        let kernels = super::module::kernels(dev).map_err(prefer_refusal)?;
        let context = PrimaryContext::retain(dev).map_err(prefer_refusal)?;
        let _current = context.enter().map_err(prefer_refusal)?;
        let step_counters = DeviceBuffer::zeroed(8 * super::args::N_COUNTERS, "the step counters")
            .map_err(prefer_refusal)?;
        let agreement =
            DeviceBuffer::zeroed(8 * AGREE_LEN, "the step's agreement").map_err(prefer_refusal)?;
        agreement
            .upload(8 * AGREE_RANKS, &(dist.world_size as u64).to_le_bytes())
            .map_err(prefer_refusal)?;
        let transport = join(dist, device_index, nccl_library).map_err(prefer_refusal)?;
        let core = Core {
            kernels,
            ordinal: device_index,
            hyper: *hyper,
            step_counters,
            agreement,
            setup,
            transport,
        };
        drop(_current);
        Ok((core, context))
    }

    /// Creation's check (`agree_on_setup`), with the context current, after everything this
    /// rank could fail at: `refusal`, this rank's own failure (its config, or its buffers),
    /// is returned after taking part, so that the other ranks fail too instead of waiting for
    /// it at creation or at their first step.
    fn agree_on_creation(&self, refusal: Option<Error>) -> Result<()> {
        let agreed = self.agree_on_setup(refusal.is_some());
        match refusal {
            Some(refused) => Err(refused),
            None => agreed,
        }
    }

    /// Creation's one blocking exchange: an all-reduce of the setup's hash on the NULL stream,
    /// waited for. Ranks created differently (tensors, dtypes, options, vote exchange, world
    /// size) would otherwise enqueue collectives of different sizes at their first step, which
    /// NCCL waits on forever; here every rank sees the difference and fails alike. The
    /// context is current. A world of one has no one to differ from. `refused`: this rank
    /// refuses its own config (its caller returns why); the others then fail too.
    ///
    /// MIRROR(creation-check): src/dist/mod.rs agree_on_creation (the host's twin)
    /// One blocking all-reduce of the flag block (`AGREE_SEND`, five u64) on the NULL stream,
    /// waited for, with the context current: the sums over ranks.
    fn exchange_now(
        &self,
        send: &[u64; AGREE_SUM - AGREE_SEND],
    ) -> Result<[u64; AGREE_SUM - AGREE_SEND]> {
        let bytes: Vec<u8> = send.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.agreement.upload(8 * AGREE_SEND, &bytes)?;
        // SAFETY: both ranges lie in the agreement buffer (AGREE_LEN u64).
        unsafe {
            self.transport().all_reduce_sum(
                (self.agreement.ptr + 8 * AGREE_SEND as u64) as *const c_void,
                (self.agreement.ptr + 8 * AGREE_SUM as u64) as *mut c_void,
                AGREE_SUM - AGREE_SEND,
                CommDType::U64,
                std::ptr::null_mut(),
            )?;
        }
        driver::synchronize()?;
        let mut sums = [0u8; 8 * (AGREE_SUM - AGREE_SEND)];
        self.agreement.download(8 * AGREE_SUM, &mut sums)?;
        Ok(std::array::from_fn(|i| {
            u64::from_le_bytes(sums[8 * i..][..8].try_into().unwrap())
        }))
    }

    /// A collective save's first exchange (sharded), with the context current and the device
    /// idle: every rank's fingerprint of the setup, its step count and `lr`; ranks that differ
    /// all refuse the save.
    ///
    /// MIRROR(save-check): src/dist/mod.rs agree_on_save (the host's twin)
    pub fn agree_on_save(&self, lr: f32) -> Result<()> {
        let mut bytes = [0u8; 8];
        self.step_counters
            .download(8 * super::args::COUNTER_STEP, &mut bytes)?;
        let fp = crate::dist::save_fingerprint(self.setup, u64::from_le_bytes(bytes), lr);
        let mut send = [0u64; AGREE_SUM - AGREE_SEND];
        send[AGREE_FP] = fp;
        send[AGREE_FP2] = fp.wrapping_mul(fp);
        let sums = self.exchange_now(&send)?;
        let w = self.transport.world_size() as u64;
        if sums[AGREE_FP] != fp.wrapping_mul(w)
            || sums[AGREE_FP2] != send[AGREE_FP2].wrapping_mul(w)
        {
            return Err(crate::dist::ranks_differ_at_save());
        }
        Ok(())
    }

    fn agree_on_setup(&self, refused: bool) -> Result<()> {
        let world = self.transport.world_size();
        if world == 1 {
            return Ok(());
        }
        // The rank order's buffers (the host's, and the device's: every rank's number, then
        // this rank's), made before the exchange: a rank without them refuses there.
        let order = match refused {
            true => Ok(None),
            false => crate::buffer::try_vec(world, "the ranks' order").and_then(|host| {
                let device = DeviceBuffer::zeroed(8 * (world + 1), "the ranks' order")?;
                Ok(Some((host, device)))
            }),
        };
        let mut send = [0u64; AGREE_SUM - AGREE_SEND];
        send[AGREE_REFUSED] = !matches!(order, Ok(Some(_))) as u64;
        send[AGREE_FP] = self.setup;
        send[AGREE_FP2] = self.setup.wrapping_mul(self.setup);
        let sums = self.exchange_now(&send)?;
        let sum = |i: usize| sums[i];
        // This rank's own refusal (its caller returns why) or its failure to make the buffers.
        let Some((mut host, device)) = order? else {
            return Ok(());
        };
        if sum(AGREE_REFUSED) != 0 {
            return Err(crate::dist::refused_at_creation_elsewhere());
        }
        let w = world as u64;
        if sum(AGREE_FP) != self.setup.wrapping_mul(w)
            || sum(AGREE_FP2) != send[AGREE_FP2].wrapping_mul(w)
        {
            return Err(crate::dist::created_differently());
        }
        // Every rank agreed: each gathers every rank's number, in the transport's order.
        device.upload(8 * world, &(self.transport.rank() as u64).to_le_bytes())?;
        // SAFETY: one u64 sent from the buffer's end, `world` received at its start.
        unsafe {
            self.transport().all_gather(
                (device.ptr + 8 * world as u64) as *const c_void,
                device.ptr as *mut c_void,
                1,
                CommDType::U64,
                std::ptr::null_mut(),
            )?;
        }
        driver::synchronize()?;
        host.resize(world, 0); // within the room made above
                               // SAFETY: the u64s' own bytes, `world` of them; any bit pattern is a u64.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host.as_mut_ptr().cast(), 8 * world) };
        device.download(0, bytes)?;
        host.iter_mut().for_each(|v| *v = u64::from_le(*v));
        crate::dist::check_rank_order(&host)
    }

    pub fn transport(&self) -> &dyn Transport {
        &*self.transport
    }

    /// The step's first exchange: lion_agree with this rank's flags (`options` None: this
    /// rank refuses the step), then the all-reduce of the flags.
    pub fn agree(&self, lr: f32, options: Option<&StepOptions>, stream: *mut c_void) -> Result<()> {
        let a = AgreeArgs {
            agreement: self.agreement.ptr,
            step_counters: self.step_counters.ptr,
            found_inf: options.map_or(std::ptr::null(), |o| o.found_inf),
            lr_ptr: options.map_or(std::ptr::null(), |o| o.lr),
            setup: self.setup,
            lr: if options.is_some() { lr } else { 0.0 },
            refused: options.is_none() as u32,
        };
        // SAFETY: AgreeArgs matches lion.cu's; its pointers are this engine's buffers or the
        // caller's (checked) options.
        unsafe {
            driver::launch(
                self.kernels.agree,
                1,
                1,
                stream as driver::CUstream,
                &a,
                "launching lion_agree",
            )?;
            self.transport().all_reduce_sum(
                (self.agreement.ptr + 8 * AGREE_SEND as u64) as *const c_void,
                (self.agreement.ptr + 8 * AGREE_SUM as u64) as *mut c_void,
                AGREE_SUM - AGREE_SEND,
                CommDType::U64,
                stream,
            )
        }
    }

    /// Steps taken, from the device (waits for it).
    pub fn step_count(&self, context: &PrimaryContext) -> Result<u64> {
        let _current = context.enter()?;
        driver::synchronize()?;
        let mut bytes = [0u8; 8];
        self.step_counters
            .download(8 * super::args::COUNTER_STEP, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// An error, once, if a step was skipped because the ranks differ (waits for the device;
    /// the flag is cleared as it is reported).
    pub fn report_disagreement(&self, context: &PrimaryContext) -> Result<()> {
        let _current = context.enter()?;
        driver::synchronize()?;
        let mut bytes = [0u8; 8];
        self.agreement.download(8 * AGREE_DIFFERED, &mut bytes)?;
        if u64::from_le_bytes(bytes) == 0 {
            return Ok(());
        }
        self.agreement
            .upload(8 * AGREE_DIFFERED, &0u64.to_le_bytes())?;
        Err(Error::new(
            LionStatus::LION_ERROR_INVALID_ARGUMENT,
            "a step was skipped on every rank because the ranks differ in their config, \
             tensors, step count or lr (every rank must create its optimizer alike, seed \
             included, and load the same checkpoint); reported once",
        ))
    }

    /// After a restore (the device idle): the step count, and no memory of a difference.
    pub fn restore_count(&self, step: u64) -> Result<()> {
        let mut counters = [0u8; 8 * super::args::N_COUNTERS];
        counters[8 * super::args::COUNTER_STEP..][..8].copy_from_slice(&step.to_le_bytes());
        self.step_counters.upload(0, &counters)?;
        self.agreement
            .upload(8 * AGREE_DIFFERED, &0u64.to_le_bytes())
    }
}

/// Frees an engine's device memory and transport (`parts`): after waiting for the device, with
/// its context current. In a child of fork() nothing is freed (it is the parent's).
pub(crate) fn release<T>(context: &PrimaryContext, parts: &mut std::mem::ManuallyDrop<T>) {
    if context.belongs_to_parent() {
        return;
    }
    let current = context.enter();
    let _ = driver::synchronize();
    // SAFETY: called once, from the owner's Drop; nothing uses `parts` afterwards.
    unsafe { std::mem::ManuallyDrop::drop(parts) };
    drop(current);
}

/// A zeroed device buffer of `elements` of `size` bytes (the flattened tensors' buffers).
pub(crate) fn zeroed(elements: u64, size: usize, what: &str) -> Result<DeviceBuffer> {
    let bytes = usize::try_from(elements)
        .ok()
        .and_then(|n| n.checked_mul(size))
        .ok_or_else(|| Error::invalid("the flattened tensors cannot be addressed"))?;
    DeviceBuffer::zeroed(bytes, what)
}

/// Where each tensor's momentum lies, in bytes: in a checkpoint (tensors in order, unpadded)
/// and in a flattened layout (each tensor at `offsets`, elements of `size` bytes).
fn regions<'a>(
    tensors: &'a [TensorSpec],
    offsets: &'a [u64],
    size: usize,
) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + 'a {
    tensors
        .iter()
        .zip(offsets)
        .scan(0, move |at, (t, &offset)| {
            let n = t.numel as usize * size;
            let packed = *at..*at + n;
            *at += n;
            let flat = offset as usize * size;
            Some((packed, flat..flat + n))
        })
}

/// The momentum of a flattened layout (each tensor at `offsets`, elements of `size` bytes) as
/// a checkpoint holds it: tensors in order, unpadded, into `out`.
pub(crate) fn unpad(
    tensors: &[TensorSpec],
    offsets: &[u64],
    size: usize,
    flat: &[u8],
    out: &mut [u8],
) {
    unpad_window(tensors, offsets, size, 0, flat, out)
}

/// `unpad` of a window of the flattened layout: `flat` holds its bytes from `flat_at` on;
/// what of each tensor lies in it goes to its place in `out`.
pub(crate) fn unpad_window(
    tensors: &[TensorSpec],
    offsets: &[u64],
    size: usize,
    flat_at: usize,
    flat: &[u8],
    out: &mut [u8],
) {
    let window = flat_at..flat_at + flat.len();
    for (packed, at) in regions(tensors, offsets, size) {
        let (a, b) = (at.start.max(window.start), at.end.min(window.end));
        if a < b {
            let to = packed.start + (a - at.start);
            out[to..to + (b - a)].copy_from_slice(&flat[a - flat_at..b - flat_at]);
        }
    }
}

/// `unpad`'s inverse: a checkpoint's momentum into the flattened layout `flat`.
pub(crate) fn pad(
    tensors: &[TensorSpec],
    offsets: &[u64],
    size: usize,
    state: &[u8],
    flat: &mut [u8],
) {
    for (packed, at) in regions(tensors, offsets, size) {
        flat[at].copy_from_slice(&state[packed]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DType;

    /// `pad` puts each tensor's bytes at its offset and leaves the gaps; `unpad` takes them
    /// back in order.
    #[test]
    fn pad_and_unpad_are_inverse_and_keep_the_gaps() {
        let spec = |numel| TensorSpec {
            numel,
            param: DType::F32,
            grad: DType::F32,
            lr_scale: 1.0,
            weight_decay_scale: 1.0,
        };
        let tensors = [spec(3), spec(0), spec(5)];
        let offsets = [0u64, 8, 8];
        let size = 2;
        let state: Vec<u8> = (1..=16).collect();
        let mut flat = vec![0u8; 26];
        pad(&tensors, &offsets, size, &state, &mut flat);
        let mut want = vec![0u8; 26];
        want[..6].copy_from_slice(&state[..6]);
        want[16..26].copy_from_slice(&state[6..]);
        assert_eq!(flat, want);
        let mut back = vec![0u8; 16];
        unpad(&tensors, &offsets, size, &flat, &mut back);
        assert_eq!(back, state);
    }
}
