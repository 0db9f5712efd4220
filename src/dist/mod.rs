//! Distributed optimizers: the transports that carry their collectives.
//!
//! A transport is either the caller's own collectives (`callbacks`, the open transport) or
//! NCCL (`nccl`, loaded at run time). The modes themselves (sharded, vote) live with the
//! engines; they see only the `Transport` trait.

pub mod nccl;

use std::ffi::c_void;

pub mod callbacks;
pub(crate) mod config;
pub mod layout;

use crate::abi_types::*;
use crate::status::{Error, Result};

/// Element type of a collective's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommDType {
    F32,
    F16,
    BF16,
    I8,
    U8,
    U64,
}

impl CommDType {
    pub fn raw(self) -> LionCommDType {
        match self {
            CommDType::F32 => LION_COMM_F32,
            CommDType::F16 => LION_COMM_F16,
            CommDType::BF16 => LION_COMM_BF16,
            CommDType::I8 => LION_COMM_I8,
            CommDType::U8 => LION_COMM_U8,
            CommDType::U64 => LION_COMM_U64,
        }
    }

    pub fn size(self) -> usize {
        match self {
            CommDType::F32 => 4,
            CommDType::F16 | CommDType::BF16 => 2,
            CommDType::I8 | CommDType::U8 => 1,
            CommDType::U64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CommDType::F32 => "f32",
            CommDType::F16 => "f16",
            CommDType::BF16 => "bf16",
            CommDType::I8 => "i8",
            CommDType::U8 => "u8",
            CommDType::U64 => "u64",
        }
    }
}

/// A collective, in NCCL's semantics: sums are element-wise, blocks are in rank order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    /// recv[i] = the sum over ranks of send[i], for i < count.
    AllReduceSum,
    /// `send` holds world_size blocks of `count`; this rank gets the sum of its block.
    ReduceScatterSum,
    /// `recv` gets world_size blocks of `count`, block r being rank r's `send`.
    AllGather,
}

impl Collective {
    /// Elements of `send` and of `recv` for `count`, on `world_size` ranks.
    pub fn lengths(self, count: usize, world_size: usize) -> (usize, usize) {
        match self {
            Collective::AllReduceSum => (count, count),
            Collective::ReduceScatterSum => (count * world_size, count),
            Collective::AllGather => (count, count * world_size),
        }
    }
}

/// What carries the collectives of a distributed mode. `stream` is the step's (NULL on the
/// CPU); buffers never overlap (no in-place calls).
pub trait Transport: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Runs one collective.
    ///
    /// # Safety
    /// `send` and `recv` hold `op.lengths(count, world_size)` elements of `dtype` in the
    /// step's memory.
    unsafe fn run(
        &self,
        op: Collective,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: CommDType,
        stream: *mut c_void,
    ) -> Result<()>;

    /// # Safety
    /// As `run`.
    unsafe fn all_reduce_sum(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: CommDType,
        stream: *mut c_void,
    ) -> Result<()> {
        self.run(Collective::AllReduceSum, send, recv, count, dtype, stream)
    }

    /// # Safety
    /// As `run`.
    unsafe fn reduce_scatter_sum(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: CommDType,
        stream: *mut c_void,
    ) -> Result<()> {
        self.run(
            Collective::ReduceScatterSum,
            send,
            recv,
            count,
            dtype,
            stream,
        )
    }

    /// # Safety
    /// As `run`.
    unsafe fn all_gather(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: CommDType,
        stream: *mut c_void,
    ) -> Result<()> {
        self.run(Collective::AllGather, send, recv, count, dtype, stream)
    }
}

// MIRROR(agreement): src/cuda/lion.cu lion_agree, dist_skip (the CUDA engine reaches the same
// decisions on the device: these five values in this order, and `fingerprint`'s hash)
/// Per-step flags that every rank must agree on, summed over ranks (a u64 all-reduce on the
/// host): a rank that refuses a step still takes part, so that the others refuse too instead of
/// waiting for it in the step's collectives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Agreement {
    /// This rank refuses the step (bad buffers, options or lr): every rank refuses it.
    pub refused: u64,
    /// found_inf is set on this rank: every rank skips the step.
    pub found_inf: u64,
    /// A gradient that this rank checked is NaN or Inf.
    pub non_finite: u64,
    /// What every rank must have alike (`fingerprint`), and its square: their sums over W
    /// ranks are W times this rank's only if every rank's is the same (barring a 2^-64 chance).
    pub fingerprint: u64,
    pub fingerprint_squared: u64,
}

impl Agreement {
    /// The sums over ranks.
    pub fn reach(self, transport: &dyn Transport) -> Result<Agreement> {
        let send = [
            self.refused,
            self.found_inf,
            self.non_finite,
            self.fingerprint,
            self.fingerprint_squared,
        ];
        let mut sum = [0u64; 5];
        // SAFETY: five u64 each, on the host.
        unsafe {
            transport.all_reduce_sum(
                send.as_ptr().cast(),
                sum.as_mut_ptr().cast(),
                5,
                CommDType::U64,
                std::ptr::null_mut(),
            )?
        };
        Ok(Agreement {
            refused: sum[0],
            found_inf: sum[1],
            non_finite: sum[2],
            fingerprint: sum[3],
            fingerprint_squared: sum[4],
        })
    }

    /// This rank's flags with `fingerprint` (see `fingerprint`).
    pub fn with_fingerprint(self, fingerprint: u64) -> Agreement {
        Agreement {
            fingerprint,
            fingerprint_squared: fingerprint.wrapping_mul(fingerprint),
            ..self
        }
    }

    /// Whether the sums `all` say every rank's fingerprint equals this rank's.
    pub fn alike(&self, all: &Agreement, world_size: usize) -> bool {
        let w = world_size as u64;
        all.fingerprint == self.fingerprint.wrapping_mul(w)
            && all.fingerprint_squared == self.fingerprint_squared.wrapping_mul(w)
    }
}

/// What the ranks of one group must share, hashed: the config and tensors (`setup`, hashed
/// once at create), the step count and the lr. A rank created differently (another seed, say)
/// or restored alone would otherwise part from the others silently.
pub(crate) fn fingerprint(setup: u64, steps: u64, lr: f32) -> u64 {
    use crate::numerics::rng::mix64;
    mix64(setup ^ mix64(steps ^ mix64(lr.to_bits() as u64)))
}

/// A collective save's fingerprint: `fingerprint`'s, told apart from a step's, whose first
/// exchange has the same shape. A save on some ranks beside a step on others then differs, and
/// every rank refuses, instead of the save's gather meeting the step's reduce-scatter.
pub(crate) fn save_fingerprint(setup: u64, steps: u64, lr: f32) -> u64 {
    /// "save" in ASCII, mixed into the setup's hash.
    const SAVE_CALL: u64 = 0x7361_7665;
    fingerprint(crate::numerics::rng::mix64(setup ^ SAVE_CALL), steps, lr)
}

/// The hash of a group's setup, for `fingerprint`: XXH3-64 of the text "liblion VERSION
/// wire WIRE_FORMAT: " followed by `what` formatted. The text is streamed into the hash, never
/// built: a setup's text grows with its tensors (some 90 bytes each), and creation must not
/// abort for memory the caller's tensor count chose.
pub(crate) fn setup_hash(what: std::fmt::Arguments) -> u64 {
    use std::fmt::Write;
    /// A `fmt::Write` that feeds the hash (cannot fail).
    struct Hashing(xxhash_rust::xxh3::Xxh3);
    impl Write for Hashing {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.update(s.as_bytes());
            Ok(())
        }
    }
    let mut h = Hashing(xxhash_rust::xxh3::Xxh3::new());
    let _ = write!(
        h,
        "liblion {} wire {WIRE_FORMAT}: {what}",
        env!("CARGO_PKG_VERSION")
    );
    h.0.digest()
}

/// What travels between ranks, and in which collectives: bump it when a packing or the
/// sequence changes (2: the vote sums' results 5 a byte, `cpu::vote_codes`; 3: creation's
/// rank-order all-gather, the sharded step's late check asked in its first exchange, the
/// sharded save's agreement and rounds), so that ranks of liblion builds that would not
/// understand each other fail at creation instead (where the sequence changed before that
/// check, they may fail in it, with LION_ERROR_COMM or the transport's own error).
const WIRE_FORMAT: u32 = 3;

/// Creation's check, with more than one rank: every rank all-reduces the hash of its setup
/// and whether it refuses its own config (`refusal`, returned here after taking part), so
/// that ranks created differently, or beside a rank that refuses, all fail instead of
/// enqueueing collectives of different sizes or waiting for a rank that left.
///
/// MIRROR(creation-check): src/cuda/dist.rs Core::agree_on_setup (the same exchange and
/// decisions, through device memory)
pub(crate) fn agree_on_creation(
    transport: &dyn Transport,
    setup: u64,
    refusal: Option<Error>,
) -> Result<()> {
    let world = transport.world_size();
    if world == 1 {
        return refusal.map_or(Ok(()), Err);
    }
    // The rank order's buffer, made before the exchange: a rank without it refuses there.
    let (mut order, refusal) = match refusal {
        Some(refused) => (Vec::new(), Some(refused)),
        None => match crate::buffer::try_vec(world, "the ranks' order") {
            Ok(order) => (order, None),
            Err(e) => (Vec::new(), Some(e)),
        },
    };
    let mine = Agreement {
        refused: refusal.is_some() as u64,
        ..Agreement::default()
    }
    .with_fingerprint(setup);
    let all = mine.reach(transport);
    if let Some(refused) = refusal {
        return Err(refused);
    }
    let all = all?;
    if all.refused != 0 {
        return Err(refused_at_creation_elsewhere());
    }
    if !mine.alike(&all, world) {
        return Err(created_differently());
    }
    // Every rank agreed: each now gathers every rank's number, in the transport's order.
    order.resize(world, 0);
    let rank = transport.rank() as u64;
    // SAFETY: one u64 sent, `world` received, on the host.
    unsafe {
        transport.all_gather(
            (&rank as *const u64).cast(),
            order.as_mut_ptr().cast(),
            1,
            CommDType::U64,
            std::ptr::null_mut(),
        )?
    };
    check_rank_order(&order)
}

/// Creation's last check, on every rank's number gathered in the transport's order (the same
/// on every rank, so every rank decides alike): each rank's `rank` must be its place there.
/// Ranks numbered otherwise (two swapped, one twice) would each update a slice that another
/// rank's gather puts elsewhere, and the parameters would part silently. (NCCL communicators
/// are checked when joined: `nccl.rs`; the check still runs, at the cost of one all-gather.)
pub(crate) fn check_rank_order(order: &[u64]) -> Result<()> {
    match order
        .iter()
        .enumerate()
        .find(|&(at, &rank)| rank != at as u64)
    {
        None => Ok(()),
        Some((at, rank)) => Err(Error::invalid(format!(
            "the ranks are not numbered in the collectives' order: the rank at place {at} of \
             their all-gather says it is rank {rank} (LionDistConfig.rank must be the rank the \
             caller's collectives give it); every rank refused the optimizer"
        ))),
    }
}

/// A distributed engine made around creation's check: `build(rank, world)` (skipped where
/// this rank's arguments were refused already: `refusal`) makes everything this rank could
/// fail at, buffers included, before the check, since a rank failing after it would leave the
/// others waiting at their first step; every rank then takes part with what it failed at, and
/// the engine is assembled with the transport and the setup's hash.
pub(crate) fn create_after_check<E, Assemble: FnOnce(Box<dyn Transport>, u64) -> E>(
    transport: Box<dyn Transport>,
    setup: u64,
    refusal: Option<Error>,
    build: impl FnOnce(usize, usize) -> Result<Assemble>,
) -> Result<E> {
    let built = match refusal {
        Some(refused) => Err(refused),
        None => build(transport.rank(), transport.world_size()),
    };
    agree_on_creation(&*transport, setup, built.as_ref().err().cloned())?;
    let assemble = built?; // Ok: agree_on_creation returned any refusal
    Ok(assemble(transport, setup))
}

/// The error of a creation that another rank refused (its arguments, config or memory).
pub(crate) fn refused_at_creation_elsewhere() -> Error {
    Error::invalid(
        "another rank refused the optimizer (its arguments, its config or its memory: its own \
         error says why): every rank refused the optimizer",
    )
}

/// The error of a creation on ranks whose setups differ.
pub(crate) fn created_differently() -> Error {
    Error::invalid(
        "the ranks were created differently (config, tensors, dtypes, Cautious Lion, vote \
         exchange or world size): every rank must create its optimizer alike; every rank \
         refused the optimizer",
    )
}

/// The error of a step on ranks that do not share their setup.
pub(crate) fn ranks_differ() -> Error {
    Error::invalid(
        "the ranks differ in their config, tensors, step count or lr (every rank must create \
         its optimizer alike, seed included, and load the same checkpoint), or some saved where \
         others stepped: every rank refused the step, and nothing was written",
    )
}

/// A step's first exchange, the same in every distributed engine: this rank's flags (`mine`,
/// `refused` set from `lr`) with the fingerprint of `setup`, `steps` and the lr. Refuses the
/// step on every rank if any rank refused it or differs; else the lr and the flags' sums.
pub(crate) fn agree_on_step(
    transport: &dyn Transport,
    mine: Agreement,
    lr: Result<f32>,
    setup: u64,
    steps: u64,
) -> Result<(f32, Agreement)> {
    let mine = Agreement {
        refused: lr.is_err() as u64,
        ..mine
    }
    .with_fingerprint(fingerprint(setup, steps, *lr.as_ref().unwrap_or(&0.0)));
    let all = mine.reach(transport)?;
    if all.refused != 0 {
        return Err(lr.err().unwrap_or_else(refused_elsewhere));
    }
    if !mine.alike(&all, transport.world_size()) {
        return Err(ranks_differ());
    }
    Ok((lr?, all))
}

/// A collective save's first exchange (sharded): the ranks' fingerprints of `setup`, `steps`
/// and `lr` (`save_fingerprint`). Ranks that differ (a checkpoint loaded on some, an lr set on
/// one, a step called on some) would each write a header of their own around a momentum
/// gathered from all: every rank refuses.
///
/// MIRROR(save-check): src/cuda/dist.rs Core::agree_on_save (through device memory)
pub(crate) fn agree_on_save(
    transport: &dyn Transport,
    setup: u64,
    steps: u64,
    lr: f32,
) -> Result<()> {
    let mine = Agreement::default().with_fingerprint(save_fingerprint(setup, steps, lr));
    let all = mine.reach(transport)?;
    match mine.alike(&all, transport.world_size()) {
        true => Ok(()),
        false => Err(ranks_differ_at_save()),
    }
}

/// The error of a collective save on ranks that do not share their setup, step count or lr.
pub(crate) fn ranks_differ_at_save() -> Error {
    Error::invalid(
        "the ranks differ in their config, tensors, step count or lr (a checkpoint loaded on \
         some ranks only, an lr set on one), or some stepped where others saved: every rank \
         refused the checkpoint, and nothing was written",
    )
}

/// Takes part in a step's first exchange as a rank that refuses it (see
/// `Engine::refuse_collectively`): the others refuse it too.
pub(crate) fn refuse_step(transport: &dyn Transport) {
    let refused = Agreement {
        refused: 1,
        ..Agreement::default()
    };
    let _ = refused.reach(transport);
}

/// The error of a step that another rank refused.
pub(crate) fn refused_elsewhere() -> Error {
    Error::invalid(
        "another rank refused this step (its own message says why): every rank refused it, \
         and nothing was written",
    )
}

/// A failed collective: LION_ERROR_COMM naming the call.
pub fn comm_error(message: impl Into<String>) -> Error {
    Error::new(crate::status::LionStatus::LION_ERROR_COMM, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streaming the text into the hash gives the one-shot digest of the same text, so the
    /// value (and a group of ranks' agreement across builds) is what building it gave.
    #[test]
    fn setup_hash_streams_the_one_shot_digest() {
        let (world, name, sizes) = (4usize, "vote", [1u64, 4099, 37]);
        let text = format!(
            "liblion {} wire {WIRE_FORMAT}: {name} {world:?} {sizes:?}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(
            setup_hash(format_args!("{name} {world:?} {sizes:?}")),
            xxhash_rust::xxh3::xxh3_64(text.as_bytes())
        );
        // Longer than the hasher's internal buffer (256 bytes), in many pieces.
        let many = [12_345u64; 200];
        let text = format!(
            "liblion {} wire {WIRE_FORMAT}: {many:?}",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.len() > 1024);
        assert_eq!(
            setup_hash(format_args!("{many:?}")),
            xxhash_rust::xxh3::xxh3_64(text.as_bytes())
        );
    }
}
