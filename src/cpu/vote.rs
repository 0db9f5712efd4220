//! The vote mode (Distributed Lion, Liu et al. 2024, majority vote) on the CPU. Every rank
//! keeps the momentum of its own gradients; no gradient is sent. A step:
//!
//! 1. each rank's vote, sign(c) of its own momentum and gradient (-1, 0 or 1), and its next
//!    momentum (`numerics::update::vote_element`: the operations of the single-process update);
//! 2. the exchange (`dist::config::Exchange`): either every rank's votes, 2 bits each,
//!    all-gathered and summed here, or int8 sums reduce-scattered, their signs packed 5 a
//!    byte and all-gathered (`vote_codes`);
//! 3. every rank applies the sign of the sum (a tie gives 0) with weight decay, to identical
//!    parameters with identical rounding draws: the parameters stay bit-identical on every rank.
//!
//! A rank whose c is exactly 0 abstains (an unused parameter, say, is not moved by a coin
//! toss).
//!
//! Step 1 is all a rank does with its momentum, so 8-bit momentum (`numerics::q8`) needs only
//! its own kernel there: each block decoded, its votes and next momentum computed, encoded.
//!
//! Cautious Lion compares the update with the gradient, which differs per rank: it is refused
//! (the parameters would drift apart). Cautious weight decay compares with the parameter, the
//! same everywhere, and is allowed. A checkpoint holds this rank's momentum.

use std::ffi::c_void;

use super::elem::{Elem, Nearest, Rounder, Stochastic};
use super::isa::{by_isa, Isa};
use super::vote_codes::{pack_bytes, pack_trits, unpack, unpack_trits, values_per_byte};
use super::{CpuChunk, CpuEngine};
use crate::buffer::{try_vec, ZeroedBuf};
use crate::config::{DType, Hyper, StepOptions, TensorSpec};
use crate::dist::config::Exchange;
use crate::dist::layout::{Layout, VOTE_SLICE_ALIGN};
use crate::dist::{
    agree_on_step, create_after_check, refuse_step, setup_hash, Agreement, CommDType, Transport,
};
use crate::engine::{Engine, StepBuffers};
use crate::numerics::q8;
use crate::numerics::rng::{Key, Stream};
use crate::numerics::update::{vote_element, voted_param, Coeffs};
use crate::status::{Error, LionStatus, Result};

/// One chunk's votes and momentum: `g`, `m` of `n` elements from element `first`.
type VoteFn = unsafe fn(*const u8, *mut u8, *mut i8, usize, &Coeffs, Option<Key>, u64);
/// The same with 8-bit momentum: `g`, the chunk's codes and scales (f32, aligned), `n`
/// elements from a block boundary (whole blocks but for the tensor's last).
type Q8VoteFn = unsafe fn(*const u8, *mut u8, *mut u8, *mut i8, usize, &Coeffs);

/// A tensor's kernel of step 1, by its momentum.
#[derive(Clone, Copy)]
enum Voter {
    Dense(VoteFn),
    Q8(Q8VoteFn),
}
/// One chunk's parameters after the vote; `at` is the chunk's first flattened element.
type ApplyFn = unsafe fn(*mut u8, usize, &Coeffs, Option<Key>, u64, &Ballot, u64);

#[inline(always)]
unsafe fn vote_chunk<G: Elem, S: Elem>(
    g: *const u8,
    m: *mut u8,
    votes: *mut i8,
    n: usize,
    k: &Coeffs,
    key: Option<Key>,
    first: u64,
) {
    #[inline(always)]
    fn run<G: Elem, S: Elem, R: Rounder>(
        g: &[G],
        m: &mut [S],
        v: &mut [i8],
        k: &Coeffs,
        r: R,
        first: u64,
    ) {
        for i in 0..g.len() {
            let (vote, next) = vote_element(k, g[i].to_f32(), m[i].to_f32());
            v[i] = vote;
            m[i] = r.round(next, first + i as u64);
        }
    }
    let g = std::slice::from_raw_parts(g as *const G, n);
    let m = std::slice::from_raw_parts_mut(m as *mut S, n);
    let v = std::slice::from_raw_parts_mut(votes, n);
    match key {
        Some(key) => run(g, m, v, k, Stochastic(key), first),
        None => run(g, m, v, k, Nearest, first),
    }
}

// MIRROR(q8): src/cuda/lion.cu q8_vote_chunk (the block step of q8_update_chunk, with
// vote_element in place of lion_element)
#[inline(always)]
unsafe fn q8_vote_chunk<G: Elem>(
    g: *const u8,
    codes: *mut u8,
    scales: *mut u8,
    votes: *mut i8,
    n: usize,
    k: &Coeffs,
) {
    let g = std::slice::from_raw_parts(g as *const G, n);
    let codes = std::slice::from_raw_parts_mut(codes as *mut i8, n);
    let scales = std::slice::from_raw_parts_mut(scales as *mut f32, n.div_ceil(q8::BLOCK));
    let votes = std::slice::from_raw_parts_mut(votes, n);
    let blocks = g
        .chunks(q8::BLOCK)
        .zip(codes.chunks_mut(q8::BLOCK))
        .zip(votes.chunks_mut(q8::BLOCK));
    // The new momentum of one block, between the votes and the encoder.
    let mut next = [0f32; q8::BLOCK];
    for (b, ((g, codes), votes)) in blocks.enumerate() {
        let unit = q8::unit(scales[b]);
        let len = g.len();
        // One length for every slice, so that the loop has no bounds checks and vectorizes.
        let (codes, votes, next) = (&mut codes[..len], &mut votes[..len], &mut next[..len]);
        let mut max = 0u32;
        for i in 0..len {
            let (vote, m) = vote_element(k, g[i].to_f32(), q8::decode(codes[i], unit));
            votes[i] = vote;
            next[i] = m;
            max = max.max(q8::abs_bits(m));
        }
        scales[b] = q8::encode_block_with_max(next, codes, max);
    }
}

#[inline(always)]
unsafe fn apply_chunk<P: Elem, const PLAIN: bool>(
    p: *mut u8,
    n: usize,
    k: &Coeffs,
    key: Option<Key>,
    first: u64,
    ballot: &Ballot,
    at: u64,
) {
    #[inline(always)]
    fn run<P: Elem, R: Rounder, const PLAIN: bool>(
        p: &mut [P],
        k: &Coeffs,
        r: R,
        first: u64,
        b: &Ballot,
        at: u64,
    ) {
        // The outcomes of a run of elements first, then their update in a loop of its own
        // (one that vectorizes): read element by element, the ballot took most of the step.
        let mut signs = [0f32; SIGNS];
        for (j, p) in p.chunks_mut(SIGNS).enumerate() {
            let done = (j * SIGNS) as u64;
            let signs = &mut signs[..p.len()];
            b.signs(at + done, signs);
            for (i, (p, &u)) in p.iter_mut().zip(signs.iter()).enumerate() {
                *p = r.round(
                    voted_param::<PLAIN>(k, p.to_f32(), u),
                    first + done + i as u64,
                );
            }
        }
    }
    let p = std::slice::from_raw_parts_mut(p as *mut P, n);
    match key {
        Some(key) => run::<P, _, PLAIN>(p, k, Stochastic(key), first, ballot, at),
        None => run::<P, _, PLAIN>(p, k, Nearest, first, ballot, at),
    }
}

/// The vote kernels compiled for one instruction set (runtime dispatch, as `isa.rs` does for
/// the update): compiled for the baseline alone, they ran at a third of the update's speed.
macro_rules! vote_kernels {
    ($name:ident $(, $features:literal)?) => {
        mod $name {
            use super::*;

            $(#[target_feature(enable = $features)])?
            pub(super) unsafe fn vote<G: Elem, S: Elem>(
                g: *const u8,
                m: *mut u8,
                votes: *mut i8,
                n: usize,
                k: &Coeffs,
                key: Option<Key>,
                first: u64,
            ) {
                vote_chunk::<G, S>(g, m, votes, n, k, key, first)
            }

            $(#[target_feature(enable = $features)])?
            pub(super) unsafe fn q8_vote<G: Elem>(
                g: *const u8,
                codes: *mut u8,
                scales: *mut u8,
                votes: *mut i8,
                n: usize,
                k: &Coeffs,
            ) {
                q8_vote_chunk::<G>(g, codes, scales, votes, n, k)
            }

            $(#[target_feature(enable = $features)])?
            pub(super) unsafe fn pack(from: *const i8, to: *mut u8, first: usize, end: usize, n: usize) {
                pack_bytes(from, to, first..end, n)
            }

            $(#[target_feature(enable = $features)])?
            pub(super) unsafe fn trits(from: *const i8, to: *mut u8, first: usize, end: usize, _: usize) {
                pack_trits(from, to, first..end)
            }

            $(#[target_feature(enable = $features)])?
            pub(super) unsafe fn apply<P: Elem, const PLAIN: bool>(
                p: *mut u8,
                n: usize,
                k: &Coeffs,
                key: Option<Key>,
                first: u64,
                ballot: &Ballot,
                at: u64,
            ) {
                apply_chunk::<P, PLAIN>(p, n, k, key, first, ballot, at)
            }
        }
    };
}

vote_kernels!(baseline);
#[cfg(target_arch = "x86_64")]
vote_kernels!(avx2, "avx2,fma,f16c");
#[cfg(target_arch = "x86_64")]
vote_kernels!(avx512, "avx512f,avx512bw,avx512vl,avx2,fma,f16c");

/// One thread's share of `VoteCpu::pack`: bytes `first..end` of `n` votes or sums.
type PackFn = unsafe fn(*const i8, *mut u8, usize, usize, usize);

/// The kernel of step 1 for a tensor of `numel` elements: 8-bit momentum where
/// `numerics::q8::quantized` says, else momentum of `state` (f32 for a small tensor under q8).
fn voter(g: DType, state: DType, numel: u64, isa: Isa) -> Voter {
    use half::{bf16, f16};
    if q8::quantized(state, numel) {
        return Voter::Q8(match g {
            DType::F32 => by_isa!(isa, q8_vote::<f32>),
            DType::F16 => by_isa!(isa, q8_vote::<f16>),
            DType::BF16 => by_isa!(isa, q8_vote::<bf16>),
            DType::Q8 => unreachable!("q8 is a state dtype only"),
        });
    }
    Voter::Dense(vote_fn(g, q8::dense_state(state), isa))
}

fn vote_fn(g: DType, s: DType, isa: Isa) -> VoteFn {
    use half::{bf16, f16};
    match (g, s) {
        (DType::F32, DType::F32) => by_isa!(isa, vote::<f32, f32>),
        (DType::F32, _) => by_isa!(isa, vote::<f32, bf16>),
        (DType::F16, DType::F32) => by_isa!(isa, vote::<f16, f32>),
        (DType::F16, _) => by_isa!(isa, vote::<f16, bf16>),
        (DType::BF16, DType::F32) => by_isa!(isa, vote::<bf16, f32>),
        (DType::BF16, _) => by_isa!(isa, vote::<bf16, bf16>),
        (DType::Q8, _) => unreachable!("q8 is a state dtype only"),
    }
}

fn apply_fn(p: DType, plain: bool, isa: Isa) -> ApplyFn {
    use half::{bf16, f16};
    match (p, plain) {
        (DType::F32, true) => by_isa!(isa, apply::<f32, true>),
        (DType::F32, false) => by_isa!(isa, apply::<f32, false>),
        (DType::F16, true) => by_isa!(isa, apply::<f16, true>),
        (DType::F16, false) => by_isa!(isa, apply::<f16, false>),
        (DType::BF16, true) => by_isa!(isa, apply::<bf16, true>),
        (DType::BF16, false) => by_isa!(isa, apply::<bf16, false>),
        (DType::Q8, _) => unreachable!("q8 is a state dtype only"),
    }
}

/// Where the votes' outcome is read, per flattened element.
pub(crate) enum Ballot {
    /// Every rank's 2-bit votes, `bytes` each, rank after rank: summed here.
    AllVotes {
        packed: *const u8,
        bytes: usize,
        ranks: usize,
    },
    /// The sign of the sum, already decided, 5 a byte.
    Result { packed: *const u8 },
}

/// Elements whose outcomes `apply_chunk` reads at once.
const SIGNS: usize = 256;

impl Ballot {
    /// The sign of the vote sum (-1, 0 or 1) of the flattened elements from `e`, one per
    /// entry of `out` (at most SIGNS).
    #[inline(always)]
    fn signs(&self, e: u64, out: &mut [f32]) {
        match *self {
            Ballot::AllVotes {
                packed,
                bytes,
                ranks,
            } => {
                let mut sums = [0i32; SIGNS];
                let sums = &mut sums[..out.len()];
                for r in 0..ranks {
                    let votes = packed.wrapping_add(r * bytes);
                    for (i, sum) in sums.iter_mut().enumerate() {
                        *sum += unpack(votes, e + i as u64);
                    }
                }
                for (o, sum) in out.iter_mut().zip(sums.iter()) {
                    *o = sum.signum() as f32;
                }
            }
            // SAFETY: the gathered results cover every flattened element.
            Ballot::Result { packed } => unsafe { unpack_trits(packed, e, out) },
        }
    }
}

// The pointers point into the engine's buffers, only read during the apply pass.
unsafe impl Sync for Ballot {}

pub(crate) struct VoteCpu {
    inner: CpuEngine,
    transport: Box<dyn Transport>,
    exchange: Exchange,
    layout: Layout,
    votes_of: Vec<Voter>,
    apply_of: Vec<ApplyFn>,
    pack_fn: PackFn,
    /// This rank's votes, one i8 per flattened element (padded to every slice for the sums).
    votes: ZeroedBuf,
    /// Sums: this rank's slice of the summed votes.
    sums: ZeroedBuf,
    /// What this rank sends: its votes, 2 bits each (gather), or its slice's results, 5 a
    /// byte (sums).
    packed_out: ZeroedBuf,
    /// What every rank sent, rank after rank.
    packed_in: ZeroedBuf,
    /// Bytes each rank sends.
    per_rank: usize,
    coeffs: Vec<Coeffs>,
    keys: Vec<(Option<Key>, Option<Key>)>,
    steps: u64,
    /// The hash of what every rank must share (`dist::fingerprint`).
    setup: u64,
}

// The raw pointers point into this engine's own buffers.
unsafe impl Send for VoteCpu {}

impl VoteCpu {
    /// `refusal`: this rank's arguments were refused before the engine (`Optimizer::build`);
    /// it still takes part in creation's check, so that the other ranks fail with it.
    pub fn new(
        hyper: &Hyper,
        tensors: &[TensorSpec],
        num_threads: u32,
        transport: Box<dyn Transport>,
        exchange: Exchange,
        refusal: Option<Error>,
    ) -> Result<VoteCpu> {
        let world = transport.world_size();
        let setup = setup_hash(format_args!(
            "vote {world:?} {exchange:?} {hyper:?} {tensors:?}"
        ));
        create_after_check(transport, setup, refusal, |rank, world| {
            Self::build(hyper, tensors, num_threads, rank, world, exchange)
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
        exchange: Exchange,
    ) -> Result<impl FnOnce(Box<dyn Transport>, u64) -> VoteCpu> {
        if hyper.cautious_factor < 1.0 {
            return Err(Error::unsupported(
                "the vote mode cannot be cautious: Cautious Lion compares the update with each \
                 rank's own gradient, and the ranks' parameters would drift apart (cautious \
                 weight decay is allowed)",
            ));
        }
        let layout = Layout::sliced(tensors, rank, world, 1, VOTE_SLICE_ALIGN)?;
        let inner = CpuEngine::new(hyper, tensors, num_threads)?;
        let buf = |bytes: u64, what: &str| {
            usize::try_from(bytes)
                .map_err(|_| Error::invalid("the flattened tensors cannot be addressed"))
                .and_then(|bytes| ZeroedBuf::new(bytes, what))
        };
        let per_byte = values_per_byte(exchange) as u64;
        let (per_rank, votes, sums) = match exchange {
            Exchange::Gather => (layout.total.div_ceil(per_byte), layout.total, 0),
            Exchange::Sums => (layout.slice / per_byte, layout.padded(), layout.slice),
        };
        let plain = !hyper.cautious_weight_decay;
        let n = tensors.len();
        let mut votes_of = try_vec(n, "vote kernels")?;
        let isa = Isa::detect();
        votes_of.extend(
            tensors
                .iter()
                .map(|t| voter(t.grad, hyper.state_dtype, t.numel, isa)),
        );
        let mut apply_of = try_vec(n, "apply kernels")?;
        apply_of.extend(tensors.iter().map(|t| apply_fn(t.param, plain, isa)));
        let mut coeffs = try_vec(n, "coefficients")?;
        coeffs.resize(n, Coeffs::default());
        let mut keys = try_vec(n, "rounding keys")?;
        keys.resize(n, (None, None));
        let votes = buf(votes, "this rank's votes (a byte per element)")?;
        let sums = buf(sums, "this rank's slice of the vote sums")?;
        let packed_out = buf(per_rank, "this rank's packed votes (the exchange's input)")?;
        let packed_in = buf(
            per_rank * layout.world_size as u64,
            "every rank's packed votes (the exchange's output)",
        )?;
        let pack_fn: PackFn = match exchange {
            Exchange::Gather => by_isa!(isa, pack),
            Exchange::Sums => by_isa!(isa, trits),
        };
        Ok(move |transport, setup| VoteCpu {
            votes_of,
            apply_of,
            pack_fn,
            votes,
            sums,
            packed_out,
            per_rank: per_rank as usize,
            packed_in,
            coeffs,
            keys,
            steps: 0,
            setup,
            inner,
            transport,
            exchange,
            layout,
        })
    }

    /// Packs `n` i8 values from `from` at `to`: votes (-1, 0, 1) into 2-bit codes (gather),
    /// sums into the trits of their signs (sums; `n` a multiple of 5).
    fn pack(&self, from: *const i8, to: *mut u8, n: usize) {
        let (from, to, pack) = (from as usize, to as usize, self.pack_fn);
        let per_byte = values_per_byte(self.exchange);
        self.inner.for_each_block(n.div_ceil(per_byte), &|bytes| {
            // SAFETY: the bytes of this block, inside the packed buffer of n / per_byte
            // rounded up; their values inside the buffer of n; the CPU has the kernel's
            // instructions.
            unsafe { pack(from as *const i8, to as *mut u8, bytes.start, bytes.end, n) }
        });
    }

    /// The exchange: afterwards `ballot()` gives every element's outcome.
    fn exchange(&mut self) -> Result<()> {
        let null = std::ptr::null_mut();
        let per_rank = self.per_rank;
        let votes = self.votes.as_ptr() as *const i8;
        match self.exchange {
            Exchange::Gather => {
                self.pack(votes, self.packed_out.as_ptr(), self.layout.total as usize);
            }
            Exchange::Sums => {
                let slice = self.layout.slice as usize;
                // SAFETY: the buffers hold W slices of i8, and one slice.
                unsafe {
                    self.transport.reduce_scatter_sum(
                        votes.cast(),
                        self.sums.as_ptr() as *mut c_void,
                        slice,
                        CommDType::I8,
                        null,
                    )?
                };
                self.pack(
                    self.sums.as_ptr() as *const i8,
                    self.packed_out.as_ptr(),
                    slice,
                );
            }
        }
        // SAFETY: per_rank bytes out, W times that in.
        unsafe {
            self.transport.all_gather(
                self.packed_out.as_ptr() as *const c_void,
                self.packed_in.as_ptr() as *mut c_void,
                per_rank,
                CommDType::U8,
                null,
            )
        }
    }

    fn ballot(&self) -> Ballot {
        let packed = self.packed_in.as_ptr() as *const u8;
        match self.exchange {
            Exchange::Gather => Ballot::AllVotes {
                packed,
                bytes: self.per_rank,
                ranks: self.layout.world_size,
            },
            Exchange::Sums => Ballot::Result { packed },
        }
    }
}

impl Engine for VoteCpu {
    unsafe fn step(
        &mut self,
        hyper: &Hyper,
        tensors: &[TensorSpec],
        lr: f32,
        options: &StepOptions,
        buffers: &StepBuffers,
        _stream: *mut c_void,
    ) -> Result<()> {
        // Every decision is taken by all ranks together, in one exchange of flags, or their
        // parameters would part (or some would wait in a collective that others left). A rank
        // whose found_inf is set skips, whatever its options.lr (`agreed_lr`).
        let lr = super::agreed_lr(options, lr, hyper, tensors);
        let bad = match options.check_finite {
            true => self
                .inner
                .find_non_finite(tensors, buffers, options.grad_scale),
            false => None,
        };
        let mine = Agreement {
            found_inf: super::host_skips(options) as u64,
            non_finite: bad.is_some() as u64,
            ..Agreement::default()
        };
        let (lr, all) = agree_on_step(&*self.transport, mine, lr, self.setup, self.steps)?;
        if all.found_inf != 0 {
            return Ok(());
        }
        if all.non_finite != 0 {
            return Err(Error::new(
                LionStatus::LION_ERROR_NON_FINITE,
                match bad {
                    Some((t, i)) => format!(
                        "grads[{t}][{i}] is NaN or Inf (after grad_scale): the step was \
                         refused on every rank and nothing was written"
                    ),
                    None => "another rank's gradient is NaN or Inf: the step was refused \
                             on every rank and nothing was written"
                        .to_string(),
                },
            ));
        }
        let next = self.steps + 1;
        let sr = hyper.stochastic_rounding;
        for (i, t) in tensors.iter().enumerate() {
            self.coeffs[i] = Coeffs::new(hyper, lr, t, 0, options.grad_scale);
            let key = |stream| Key::new(hyper.seed, next, i as u64, stream);
            self.keys[i] = (
                (sr && t.param != DType::F32).then(|| key(Stream::Param)),
                // q8 momentum always rounds to nearest (numerics::q8), and so does f32.
                (sr && hyper.state_dtype == DType::BF16).then(|| key(Stream::Momentum)),
            );
        }
        let (coeffs, keys, offsets) = (&self.coeffs, &self.keys, &self.layout.offsets);
        let (votes, votes_of) = (self.votes.as_ptr() as usize, &self.votes_of);
        let (state, kernels) = (self.inner.state.as_ptr() as usize, &self.inner.kernels);
        self.inner.for_each_chunk(&|_, c: &CpuChunk| {
            let at = offsets[c.tensor] + c.start;
            let (m, scales) = kernels[c.piece].momentum(state, c.start);
            let v = (votes + at as usize) as *mut i8;
            let (t, g) = (c.tensor, buffers.grad(c.tensor, c.start));
            // SAFETY: the chunk lies inside its tensor's buffers and this engine's (a q8
            // tensor's chunks start on a block).
            unsafe {
                match votes_of[t] {
                    Voter::Dense(vote) => vote(g, m, v, c.len, &coeffs[t], keys[t].1, c.start),
                    Voter::Q8(vote) => vote(g, m, scales, v, c.len, &coeffs[t]),
                }
            }
        });
        self.exchange()?;
        let ballot = self.ballot();
        let (coeffs, keys, offsets) = (&self.coeffs, &self.keys, &self.layout.offsets);
        let apply_of = &self.apply_of;
        self.inner.for_each_chunk(&|_, c: &CpuChunk| {
            let (t, p) = (c.tensor, buffers.param(c.tensor, c.start));
            let at = offsets[t] + c.start;
            // SAFETY: as above; chunks are disjoint.
            unsafe { (apply_of[t])(p, c.len, &coeffs[t], keys[t].0, c.start, &ballot, at) };
        });
        self.steps = next;
        Ok(())
    }

    fn step_count(&self) -> Result<u64> {
        Ok(self.steps)
    }

    fn refuse_collectively(&mut self, _stream: *mut c_void) {
        refuse_step(&*self.transport);
    }

    fn revive_after_fork(&mut self) -> Result<()> {
        self.inner.revive_after_fork()
    }

    fn read_state(&self, _: &[TensorSpec], _lr: f32, out: Option<&mut [u8]>) -> Result<()> {
        let Some(out) = out else { return Ok(()) };
        self.inner.copy_state_out(out);
        Ok(())
    }

    fn restore(&mut self, _: &[TensorSpec], step: u64, state: &[u8]) -> Result<()> {
        self.inner.copy_state_in(state);
        self.steps = step;
        Ok(())
    }
}
