//! What the distributed tests share (tests/distributed.rs on the CPU, tests/cuda_dist.rs on
//! a GPU): the tensors, each rank's gradients, the sums a reference steps on, the vote's f32
//! reference, and one rank's optimizer over the in-process transport (`ranks.rs`).
#![allow(dead_code)]

use std::sync::Arc;

use super::budget::{within_budget, Tally};
use super::ranks::{self, on_group, Group, RankContext};
use super::*;
use lion::*;

/// Sizes whose slices cut tensors at odd places for every W.
pub const SIZES: [u64; 7] = [1, 37, 1000, 5, 4099, 64, 2];

pub fn tensors_of(param: LionDType, grad: LionDType) -> Vec<LionTensorDesc> {
    scaled_tensors(&SIZES, param, grad)
}

/// One rank's optimizer (its context must outlive it).
pub fn rank_opt(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    mode: LionDistMode,
    exchange: LionVoteExchange,
    ctx: &RankContext,
) -> Result<Opt, (LionStatus, String)> {
    let collectives = ranks::collectives(ctx);
    Opt::distributed(
        config,
        tensors,
        &rank_dist(mode, exchange, ctx, &collectives),
    )
}

/// Rank 1 of three (a group from `group`) makes its optimizer under host-memory budgets from
/// nothing to enough (`budget::within_budget`, over the creation call alone: the test's own
/// allocations never fail), the others without one; `on_thread` runs first on every rank's
/// thread. Where rank 1 runs out, every rank fails (rank 1 with LION_ERROR_OUT_OF_MEMORY,
/// the others because another rank refused) and none waits; with enough, all three are made.
/// Both outcomes must be seen below `top_mib`. Returns rank 1's tally.
pub fn rank_creation_under_budgets(
    group: impl Fn(usize) -> Arc<Group>,
    config: LionConfig,
    tensors: &[LionTensorDesc],
    mode: LionDistMode,
    top_mib: usize,
    on_thread: impl Fn() + Sync,
) -> Tally {
    let mut rank1 = Tally::default();
    for kib in (0..top_mib << 10).step_by(256) {
        let results = on_group(&group(3), |rank, ctx| {
            on_thread();
            let collectives = ranks::collectives(ctx);
            let dist = rank_dist(mode, LION_VOTE_AUTO, ctx, &collectives);
            let mut raw = std::ptr::null_mut();
            let mut create = || unsafe {
                lion_create_distributed(&config, tensors.as_ptr(), tensors.len(), &dist, &mut raw)
            };
            let status = if rank == 1 {
                within_budget(kib << 10, create)
            } else {
                create()
            };
            let result = match status {
                LionStatus::LION_OK => Ok(()),
                st => Err((st, last_error())),
            };
            unsafe { lion_destroy(raw) };
            result
        });
        if results[1].is_ok() {
            assert!(results.iter().all(Result::is_ok), "{kib} KiB: {results:?}");
            rank1.add(LionStatus::LION_OK);
        } else {
            let what = format!("mode {mode:?}, rank 1 within {kib} KiB");
            let own = LionStatus::LION_ERROR_OUT_OF_MEMORY;
            assert_refused_beside(&results, 1, own, "", &what);
            rank1.add(own);
        }
    }
    rank1.assert_both(&format!("mode {mode:?}, rank 1's creation"));
    rank1
}

/// One rank's distributed config over `collectives` (made from `ctx`, and outliving it).
pub fn rank_dist(
    mode: LionDistMode,
    exchange: LionVoteExchange,
    ctx: &RankContext,
    collectives: &LionCollectives,
) -> LionDistConfig {
    LionDistConfig {
        mode,
        rank: ctx.rank as i32,
        world_size: ctx.group_size() as i32,
        collectives,
        vote_exchange: exchange,
        ..lion_dist_config_default()
    }
}

pub fn le_bytes(b: &Buf) -> Vec<u8> {
    match b {
        Buf::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Buf::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Buf::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

pub fn from_le_bytes(dtype: LionDType, bytes: &[u8]) -> Buf {
    match dtype {
        LION_DTYPE_F32 => Buf::F32(
            bytes
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        LION_DTYPE_F16 => Buf::F16(
            bytes
                .chunks(2)
                .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        _ => Buf::BF16(
            bytes
                .chunks(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
    }
}

/// The element-wise sum over ranks, in rank order, each partial rounded to the dtype: what
/// the test transport's reduce-scatter computes.
pub fn sum_over_ranks(per_rank: &[Vec<Buf>]) -> Vec<Buf> {
    (0..per_rank[0].len())
        .map(|t| {
            let dtype = per_rank[0][t].dtype();
            let size = ranks::comm_size(dtype);
            let mut acc = le_bytes(&per_rank[0][t]);
            let mut out = vec![0u8; size];
            for r in &per_rank[1..] {
                for (a, b) in acc.chunks_mut(size).zip(le_bytes(&r[t]).chunks(size)) {
                    ranks::add(dtype, a, b, &mut out);
                    a.copy_from_slice(&out);
                }
            }
            from_le_bytes(dtype, &acc)
        })
        .collect()
}

pub fn grads_for(tensors: &[LionTensorDesc], rank: usize, step: usize, seed: u64) -> Vec<Buf> {
    random_grads(
        tensors,
        1.0,
        &mut Rng::new(seed * 1000 + step as u64 * 10 + rank as u64),
    )
}

/// The configs the vote mode is checked against one process with: every dtype pair, state
/// dtype and rounding (`dtype_configs`), then the options the mode takes (every decay mode,
/// cautious weight decay; no Cautious Lion) with bf16 parameters and f32 gradients.
/// What every rank of a vote in which all ranks see rank 0's gradients must end with (the
/// `vote_matches_one_process` tests of tests/distributed.rs and tests/cuda_dist.rs): one
/// process's (`single`'s) parameters, as bits, and its checkpoint, after `steps` steps from
/// `start` on `grads_for(.., 0, step, seed)`.
pub fn one_process_on_rank0_grads(
    single: &Opt,
    start: &[Buf],
    steps: usize,
    seed: u64,
) -> (Vec<Vec<u32>>, Vec<u8>) {
    let mut params = start.to_vec();
    for step in 0..steps {
        let mut g = grads_for(&single.tensors, 0, step, seed);
        assert_eq!(single.step(&mut params, &mut g), LionStatus::LION_OK);
    }
    (params.iter().map(Buf::bits).collect(), single.save())
}

/// Asserts that every rank's (parameter bits, checkpoint) is `want`'s, one process's
/// (`one_process_on_rank0_grads`); `label` names the case.
pub fn assert_every_rank_is_one_process(
    results: &[(Vec<Vec<u32>>, Vec<u8>)],
    want: &(Vec<Vec<u32>>, Vec<u8>),
    label: &str,
) {
    for (rank, (params, saved)) in results.iter().enumerate() {
        assert!(
            *params == want.0,
            "{label}: rank {rank}'s parameters differ from one process"
        );
        assert!(
            *saved == want.1,
            "{label}: rank {rank}'s checkpoint differs from one process's"
        );
    }
}

pub fn vote_configs(base: LionConfig) -> Vec<(LionDType, LionDType, LionConfig)> {
    let mut configs = dtype_configs(base);
    for c in option_configs(base)
        .into_iter()
        .filter(|c| c.cautious_factor == 1.0)
    {
        configs.push((LION_DTYPE_BF16, LION_DTYPE_F32, c));
    }
    configs
}

/// `vote_configs` with 8-bit momentum: each of its f32-state configs under q8 (`base`'s own
/// state dtype does not matter).
pub fn q8_vote_configs(base: LionConfig) -> Vec<(LionDType, LionDType, LionConfig)> {
    let base = LionConfig {
        state_dtype: LION_DTYPE_F32,
        ..base
    };
    vote_configs(base)
        .into_iter()
        .filter(|(_, _, c)| c.state_dtype == LION_DTYPE_F32)
        .map(|(p, g, c)| (p, g, q8(c)))
        .collect()
}

/// The majority vote in f32, as the ranks compute it (f32 p, g, m; standard decay): the
/// spec's operations one by one.
// MIRROR(update): src/numerics/update.rs vote_element, voted_param (the same f32 operations)
pub fn vote_reference(
    config: &LionConfig,
    tensors: &[LionTensorDesc],
    params: &mut [Vec<f32>],
    momenta: &mut [Vec<Vec<f32>>],
    grads: &[Vec<Vec<f32>>],
    lr: f32,
) {
    let b1 = config.beta1;
    let omb1 = (1.0 - config.beta1 as f64) as f32;
    let b2 = config.beta2;
    let omb2 = (1.0 - config.beta2 as f64) as f32;
    for (t, desc) in tensors.iter().enumerate() {
        let lr_t = lr as f64 * desc.lr_scale as f64;
        let keep =
            (1.0 - lr_t * config.weight_decay as f64 * desc.weight_decay_scale as f64) as f32;
        let step = lr_t as f32;
        for i in 0..desc.numel as usize {
            let mut sum = 0i32;
            for (r, m) in momenta.iter_mut().enumerate() {
                let g = grads[r][t][i] * 1.0f32;
                let c = b1 * m[t][i] + omb1 * g;
                sum += if c > 0.0 {
                    1
                } else if c < 0.0 {
                    -1
                } else {
                    0
                };
                m[t][i] = b2 * m[t][i] + omb2 * g;
            }
            let u = sum.signum() as f32;
            params[t][i] = params[t][i] * keep - step * u;
        }
    }
}

/// The vote under 8-bit momentum, `steps` steps of `world` ranks from `start` with
/// `grads_for(tensors, rank, step, seed)`: a rank's momentum evolves from its own gradients
/// alone, so it is one process's (the CPU engine's) on them, decoded as the library decodes
/// it; the parameters follow the f32 votes of those momenta (`vote_reference`). Returns the
/// parameters and each rank's single-process optimizer (whose checkpoint is the rank's).
pub fn q8_vote_reference(
    config: &LionConfig,
    tensors: &[LionTensorDesc],
    start: &[Buf],
    world: usize,
    steps: usize,
    seed: u64,
) -> (Vec<Vec<f32>>, Vec<Opt>) {
    let single = LionConfig {
        device: LION_DEVICE_CPU,
        num_threads: 1,
        ..*config
    };
    let singles: Vec<Opt> = (0..world)
        .map(|_| Opt::new(single, tensors).unwrap())
        .collect();
    let mut their_params: Vec<Vec<Buf>> = (0..world).map(|_| start.to_vec()).collect();
    let mut params: Vec<Vec<f32>> = start.iter().map(f32s).collect();
    for step in 0..steps {
        let grads: Vec<Vec<Buf>> = (0..world)
            .map(|r| grads_for(tensors, r, step, seed))
            .collect();
        let mut momenta: Vec<Vec<Vec<f32>>> = singles
            .iter()
            .map(|s| {
                let m = s.momentum();
                m.iter()
                    .map(|t| t.iter().map(|&x| x as f32).collect())
                    .collect()
            })
            .collect();
        let g32: Vec<Vec<Vec<f32>>> = grads.iter().map(|g| g.iter().map(f32s).collect()).collect();
        vote_reference(config, tensors, &mut params, &mut momenta, &g32, config.lr);
        for (r, s) in singles.iter().enumerate() {
            let mut g = grads[r].clone();
            assert_eq!(s.step(&mut their_params[r], &mut g), LionStatus::LION_OK);
        }
    }
    (params, singles)
}

pub fn f32s(b: &Buf) -> Vec<f32> {
    match b {
        Buf::F32(v) => v.clone(),
        _ => panic!("f32 only"),
    }
}

/// The results of a creation that rank `odd` refused: it fails with its own error (`status`,
/// a message holding `says`), and every other rank because another rank refused (none is left
/// waiting). `what` labels the failures.
pub fn assert_refused_beside(
    results: &[Result<(), (LionStatus, String)>],
    odd: usize,
    status: LionStatus,
    says: &str,
    what: &str,
) {
    for (rank, r) in results.iter().enumerate() {
        let (code, message) = r
            .clone()
            .expect_err(&format!("{what}: rank {rank} must fail"));
        if rank == odd {
            assert_eq!(code, status, "{what}: {message}");
            assert!(message.contains(says), "{what}: {message}");
        } else {
            assert_eq!(
                code,
                LionStatus::LION_ERROR_INVALID_ARGUMENT,
                "{what}: rank {rank}: {message}"
            );
            assert!(
                message.contains("another rank refused"),
                "{what}: rank {rank}: {message}"
            );
        }
    }
}

/// The checkpoint of one process of `tensors` after one step (momentum everywhere): what the
/// sharded save tests load on their ranks and expect back.
pub fn stepped_checkpoint(config: LionConfig, tensors: &[LionTensorDesc], seed: u64) -> Vec<u8> {
    let single = Opt::new(config, tensors).unwrap();
    let mut params = random_params(tensors, &mut Rng::new(seed));
    let mut g = grads_for(tensors, 0, 0, seed);
    assert_eq!(single.step(&mut params, &mut g), LionStatus::LION_OK);
    single.save()
}

/// `lion_state_save` into a buffer of `len` bytes of 0xA5: its status, message, and whether
/// the buffer was left untouched.
pub fn save_over_a_sentinel(opt: &Opt, len: usize) -> (LionStatus, String, bool) {
    let mut buf = vec![0xA5u8; len];
    let st = unsafe {
        lion_state_save(
            opt.raw,
            buf.as_mut_ptr() as *mut c_void,
            len,
            std::ptr::null_mut(),
        )
    };
    (st, last_error(), buf.iter().all(|&b| b == 0xA5))
}

/// A rank's refusal, as the refusal tests below gather it: the status, the message, and
/// whether nothing was made or written (no handle, an untouched buffer).
pub type Refusal = (LionStatus, String, bool);

/// Runs a body on every rank of a fresh group of `world` ranks and returns their results in
/// rank order: `on_group` over `Group::new` on the CPU, the GPU tests' runner on a GPU.
pub type Ranks<'a> =
    &'a dyn Fn(usize, &(dyn Fn(usize, &RankContext) -> Refusal + Sync)) -> Vec<Refusal>;

/// Ranks that differ when they save (a checkpoint `blob` loaded on rank 1 only, an lr set on
/// rank 1 only) would each write its own header around a momentum gathered from all: every
/// rank of a sharded group refuses the save, and nothing is written.
pub fn assert_saves_refused_where_ranks_differ(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    blob: &[u8],
    ranks: Ranks,
) {
    for odd in ["loaded", "lr"] {
        let out = ranks(2, &|rank, ctx| {
            let opt = rank_opt(config, tensors, LION_DIST_SHARDED, LION_VOTE_AUTO, ctx).unwrap();
            if rank == 1 {
                match odd {
                    "loaded" => assert_eq!(opt.load(blob), LionStatus::LION_OK),
                    _ => assert_eq!(unsafe { lion_set_lr(opt.raw, 0.5) }, LionStatus::LION_OK),
                }
            }
            save_over_a_sentinel(&opt, blob.len())
        });
        for (rank, (st, message, untouched)) in out.into_iter().enumerate() {
            assert_eq!(
                st,
                LionStatus::LION_ERROR_INVALID_ARGUMENT,
                "{odd}: rank {rank}: {message}"
            );
            assert!(
                message.contains("refused the checkpoint"),
                "{odd}: {message}"
            );
            assert!(untouched, "{odd}: rank {rank}'s refused save wrote");
        }
    }
}

/// Ranks whose `rank` is not their place in the caller's collectives (each of `numberings`
/// gives every place's number) would each update a slice that the others' all-gather puts
/// elsewhere: creation refuses them on every rank, in both modes, and makes no handle.
pub fn assert_misnumbered_ranks_refused(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    numberings: &[&[i32]],
    ranks: Ranks,
) {
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        for numbers in numberings {
            let world = numbers.len();
            let results = ranks(world, &|place, ctx| {
                let collectives = ranks::collectives(ctx);
                let dist = LionDistConfig {
                    mode,
                    rank: numbers[place],
                    world_size: world as i32,
                    collectives: &collectives,
                    ..lion_dist_config_default()
                };
                let mut raw = std::ptr::null_mut();
                let st = unsafe {
                    lion_create_distributed(
                        &config,
                        tensors.as_ptr(),
                        tensors.len(),
                        &dist,
                        &mut raw,
                    )
                };
                let message = last_error();
                unsafe { lion_destroy(raw) };
                (st, message, raw.is_null())
            });
            for (place, (st, message, null)) in results.into_iter().enumerate() {
                let what = format!("mode {mode}, ranks {numbers:?}, place {place}");
                assert_eq!(
                    st,
                    LionStatus::LION_ERROR_INVALID_ARGUMENT,
                    "{what}: {message}"
                );
                assert!(
                    message.contains("not numbered in the collectives' order"),
                    "{what}: {message}"
                );
                assert!(null, "{what}: a refused creation gave a handle");
            }
        }
    }
}
