//! The distributed modes on the CPU, with W = 1..8 ranks in one process (threads, through the
//! open transport: tests/common/ranks.rs):
//! - sharded: bit-identical to one process stepping on the mean gradient (every dtype and
//!   option, odd sizes whose slices cut tensors), checkpoints equal to the single-process
//!   one and loadable on another number of ranks;
//! - vote: every rank's parameters identical and equal to an f32 reference of the majority
//!   vote; with the same gradients on every rank, equal to one process; both exchanges;
//! - refusals: bad distributed configs, modes that cannot be, a failing collective.

mod common;

use std::ffi::c_void;

use common::dist::*;
use common::ranks::{self, on_group, Group, RankContext};
use common::*;
use lion::*;

fn step_with_scale(
    opt: &Opt,
    params: &mut [Buf],
    grads: &mut [Buf],
    grad_scale: f32,
) -> LionStatus {
    let p: Vec<*mut c_void> = params.iter_mut().map(|b| b.ptr()).collect();
    let g: Vec<*const c_void> = grads.iter_mut().map(|b| b.ptr() as *const c_void).collect();
    let options = LionStepOptions {
        grad_scale,
        ..lion_step_options_default()
    };
    unsafe {
        lion_step_with_options(
            opt.raw,
            p.as_ptr(),
            g.as_ptr(),
            p.len(),
            std::ptr::null_mut(),
            &options,
        )
    }
}

/// The gradients end to end in one buffer (as DDP's buckets), and each tensor's address in it.
fn flattened(grads: &[Buf]) -> (Buf, Vec<*const c_void>) {
    let values: Vec<f64> = grads.iter().flat_map(Buf::to_f64).collect();
    let mut flat = Buf::from_f64(grads[0].dtype(), &values); // exact: the values are its dtype's
    let (base, size) = (flat.ptr() as *const u8, ranks::comm_size(grads[0].dtype()));
    let mut at = 0;
    let ptrs = grads
        .iter()
        .map(|g| {
            let p = base.wrapping_add(at * size) as *const c_void;
            at += g.bits().len();
            p
        })
        .collect();
    (flat, ptrs)
}

/// `flat` cut back into tensors of the lengths of `like`'s.
fn unflattened(flat: &Buf, like: &[Buf]) -> Vec<Buf> {
    let values = flat.to_f64();
    let mut at = 0;
    (like.iter())
        .map(|t| {
            let n = t.bits().len();
            at += n;
            Buf::from_f64(flat.dtype(), &values[at - n..at])
        })
        .collect()
}

/// How a rank's tensors reach a sharded step.
#[derive(Clone, Copy, PartialEq)]
enum Grads {
    /// One buffer per tensor (the step copies the gradients end to end, and the gathered
    /// parameters back).
    Apart,
    /// Parameters and gradients each one flat buffer of the layout: read and written in
    /// place when the slices tile them (`true`).
    Flat(bool),
}

/// Sharded on `world` ranks against one process on the mean gradient, for `steps` steps.
fn sharded_matches_one_process(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    world: usize,
    seed: u64,
    how: Grads,
) {
    let label = format!(
        "W={world} p={} g={} s={} sr={} decay={} cf={} cwd={}",
        dtype_name(tensors[0].param_dtype),
        dtype_name(tensors[0].grad_dtype),
        dtype_name(config.state_dtype),
        config.stochastic_rounding,
        config.decay_mode,
        config.cautious_factor,
        config.cautious_weight_decay
    );
    let steps = 3;
    let start = random_params(tensors, &mut Rng::new(seed));
    let single = Opt::new(
        LionConfig {
            num_threads: 1,
            ..config
        },
        tensors,
    )
    .unwrap();
    let mut reference: Vec<Buf> = start.clone();
    let scale = (1.0 / world as f64) as f32;
    let group = Group::new(world);
    let results = on_group(&group, |rank, ctx| {
        let opt = rank_opt(config, tensors, LION_DIST_SHARDED, LION_VOTE_AUTO, ctx)
            .unwrap_or_else(|e| panic!("{label}: {e:?}"));
        let mut params = start.clone();
        let (flat_params, p) = flattened(&params); // Grads::Flat's parameters, stepped in place
        let mut history = Vec::new();
        for step in 0..steps {
            let mut grads = grads_for(tensors, rank, step, seed);
            let status = match how {
                Grads::Apart => step_with_scale(&opt, &mut params, &mut grads, 1.0),
                Grads::Flat(in_place) => {
                    let (flat_grads, g) = flattened(&grads);
                    let p: Vec<*mut c_void> = p.iter().map(|&a| a as *mut c_void).collect();
                    let null = std::ptr::null_mut();
                    let status =
                        unsafe { lion_step(opt.raw, p.as_ptr(), g.as_ptr(), g.len(), null) };
                    let g_ = &ctx.group;
                    let read = g_.scatter_sends.lock().unwrap()[rank];
                    let written = g_.gather_recvs.lock().unwrap()[rank];
                    assert_eq!(read == g[0] as usize, in_place, "{label}: read in place");
                    assert_eq!(
                        written == p[0] as usize,
                        in_place,
                        "{label}: written in place"
                    );
                    drop(flat_grads);
                    params = unflattened(&flat_params, &params);
                    status
                }
            };
            assert_eq!(status, LionStatus::LION_OK, "{label}: {}", last_error());
            history.push(params.iter().map(Buf::bits).collect::<Vec<_>>());
        }
        (history, opt.save())
    });
    for step in 0..steps {
        let per_rank: Vec<Vec<Buf>> = (0..world)
            .map(|r| grads_for(tensors, r, step, seed))
            .collect();
        let mut sum = sum_over_ranks(&per_rank);
        assert_eq!(
            step_with_scale(&single, &mut reference, &mut sum, scale),
            LionStatus::LION_OK
        );
        let want: Vec<Vec<u32>> = reference.iter().map(Buf::bits).collect();
        for (rank, (history, _)) in results.iter().enumerate() {
            assert!(
                history[step] == want,
                "{label}: rank {rank} differs from one process at step {step}"
            );
        }
    }
    let blob = single.save();
    for (rank, (_, saved)) in results.iter().enumerate() {
        assert!(
            *saved == blob,
            "{label}: rank {rank}'s checkpoint differs from one process's"
        );
    }
}

#[test]
fn sharded_is_bit_identical_to_one_process_on_the_mean_gradient() {
    let mut seed = 1;
    // Every dtype combination and state dtype, with and without stochastic rounding.
    for (param, grad, config) in dtype_configs(LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        ..lion_config_default()
    }) {
        seed += 1;
        sharded_matches_one_process(
            config,
            &tensors_of(param, grad),
            1 + seed as usize % 8,
            seed,
            Grads::Apart,
        );
    }
    // Every option (Cautious Lion's counts are summed over the ranks), on 2..8 ranks.
    for (i, config) in option_configs(LionConfig {
        lr: 0.01,
        weight_decay: 0.15,
        ..lion_config_default()
    })
    .into_iter()
    .enumerate()
    {
        seed += 1;
        sharded_matches_one_process(
            config,
            &tensors_of(LION_DTYPE_BF16, LION_DTYPE_F32),
            2 + i % 7,
            seed,
            Grads::Apart,
        );
    }
}

#[test]
fn sharded_reads_and_writes_flat_buffers_in_place_where_the_slices_tile_them() {
    let config = LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        stochastic_rounding: true,
        ..lion_config_default()
    };
    for world in 1..=8u64 {
        // Tensors whose sizes sum to a multiple of 16 W: the slices (16-element multiples)
        // tile the flat buffers, which the reduce-scatter then reads and the all-gather writes
        // in place; one element more, and the last slice is padded: the step goes through its
        // own buffers.
        let tiled = 16 * world * 1500u64.div_ceil(16 * world);
        for (last, in_place) in [(tiled - 1037, true), (tiled - 1036, false)] {
            for (param, grad) in [
                (LION_DTYPE_F32, LION_DTYPE_F32),
                (LION_DTYPE_BF16, LION_DTYPE_BF16),
                (LION_DTYPE_F32, LION_DTYPE_BF16),
            ] {
                let tensors = scaled_tensors(&[37, 1000, last], param, grad);
                sharded_matches_one_process(
                    config,
                    &tensors,
                    world as usize,
                    world * 7 + last,
                    Grads::Flat(in_place),
                );
            }
        }
    }
}

#[test]
fn sharded_on_every_world_size_with_threads() {
    for world in 1..=8 {
        let config = LionConfig {
            lr: 0.01,
            weight_decay: 0.1,
            num_threads: 2,
            cautious_factor: 0.25,
            ..lion_config_default()
        };
        sharded_matches_one_process(
            config,
            &tensors_of(LION_DTYPE_F32, LION_DTYPE_F32),
            world,
            100 + world as u64,
            Grads::Apart,
        );
        // A model smaller than the ranks' slices: some ranks own nothing.
        let tiny = scaled_tensors(&[3, 1, 0, 2], LION_DTYPE_BF16, LION_DTYPE_BF16);
        sharded_matches_one_process(config, &tiny, world, 200 + world as u64, Grads::Apart);
    }
    // Tensors large enough that the copies run on both threads in several blocks, cut by the
    // slices at odd places.
    let large = scaled_tensors(
        &[300_001, 7, 200_003, 131_075],
        LION_DTYPE_F32,
        LION_DTYPE_F32,
    );
    for world in [2, 3] {
        let config = LionConfig {
            lr: 0.01,
            num_threads: 2,
            ..lion_config_default()
        };
        sharded_matches_one_process(config, &large, world, 300 + world as u64, Grads::Apart);
    }
}

#[test]
fn a_sharded_checkpoint_loads_on_another_number_of_ranks() {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        num_threads: 1,
        ..lion_config_default()
    };
    // One process trains 2 steps and saves; 3 ranks load it and take a step; so does the process.
    let single = Opt::new(config, &tensors).unwrap();
    let mut params = random_params(&tensors, &mut Rng::new(9));
    for step in 0..2 {
        let mut g = grads_for(&tensors, 0, step, 9);
        assert_eq!(single.step(&mut params, &mut g), LionStatus::LION_OK);
    }
    let blob = single.save();
    let world = 3;
    let group = Group::new(world);
    let start = params.clone();
    let after = on_group(&group, |_, ctx| {
        let opt = rank_opt(config, &tensors, LION_DIST_SHARDED, LION_VOTE_AUTO, ctx).unwrap();
        assert_eq!(opt.load(&blob), LionStatus::LION_OK, "{}", last_error());
        assert_eq!(opt.step_count(), 2);
        let mut p = start.clone();
        // Every rank's gradient is the same, so the mean is that gradient.
        let mut g = grads_for(&tensors, 0, 2, 9);
        assert_eq!(
            step_with_scale(&opt, &mut p, &mut g, 1.0),
            LionStatus::LION_OK
        );
        p.iter().map(Buf::bits).collect::<Vec<_>>()
    });
    // The mean of 3 equal f32 gradients: (g + g + g) * (1/3 in f32), as the ranks compute it.
    let per_rank: Vec<Vec<Buf>> = (0..world).map(|_| grads_for(&tensors, 0, 2, 9)).collect();
    let mut sum = sum_over_ranks(&per_rank);
    assert_eq!(
        step_with_scale(&single, &mut params, &mut sum, (1.0f64 / 3.0) as f32),
        LionStatus::LION_OK
    );
    let want: Vec<Vec<u32>> = params.iter().map(Buf::bits).collect();
    assert!(
        after.iter().all(|p| *p == want),
        "a checkpoint of one process, loaded on 3 ranks, stepped differently"
    );
}

/// What the re-entering collectives of the test below saw: the handle to call back into,
/// and each call's status and message.
struct Reentry {
    handle: std::sync::atomic::AtomicPtr<LionOptimizer>,
    seen: std::sync::Mutex<Vec<(&'static str, LionStatus, String)>>,
}

/// A collective of one rank (the output is the input) that first calls back into the
/// optimizer whose call made it: lion_step_count, and lion_destroy.
unsafe extern "C" fn reentering(
    context: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: LionCommDType,
    _stream: *mut c_void,
) -> i32 {
    let r = &*(context as *const Reentry);
    let opt = r.handle.load(std::sync::atomic::Ordering::SeqCst);
    if !opt.is_null() {
        let mut n = 0u64;
        let st = lion_step_count(opt, &mut n);
        r.seen
            .lock()
            .unwrap()
            .push(("lion_step_count", st, last_error()));
        lion_destroy(opt);
        r.seen
            .lock()
            .unwrap()
            .push(("lion_destroy", LionStatus::LION_OK, last_error()));
    }
    std::ptr::copy(
        send as *const u8,
        recv as *mut u8,
        count * ranks::comm_size(dtype),
    );
    0
}

/// A collective callback that calls back into the optimizer whose call made it (documented
/// as forbidden) is refused with a message instead of waiting forever for the lock the call
/// holds; lion_destroy from there frees nothing (the call still uses the optimizer) and says
/// so; the step itself completes.
#[test]
fn a_callback_calling_back_into_its_optimizer_is_refused_not_a_hang() {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        num_threads: 1,
        ..lion_config_default()
    };
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let reentry = Reentry {
            handle: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
            seen: std::sync::Mutex::new(Vec::new()),
        };
        let collectives = LionCollectives {
            struct_size: std::mem::size_of::<LionCollectives>() as u32,
            context: &reentry as *const Reentry as *mut c_void,
            all_reduce_sum: Some(reentering),
            reduce_scatter_sum: Some(reentering),
            all_gather: Some(reentering),
        };
        let dist = LionDistConfig {
            mode,
            rank: 0,
            world_size: 1,
            collectives: &collectives,
            ..lion_dist_config_default()
        };
        let opt = Opt::distributed(config, &tensors, &dist).unwrap();
        reentry
            .handle
            .store(opt.raw, std::sync::atomic::Ordering::SeqCst);
        let mut p = random_params(&tensors, &mut Rng::new(16));
        let mut g = grads_for(&tensors, 0, 0, 16);
        assert_eq!(
            opt.step(&mut p, &mut g),
            LionStatus::LION_OK,
            "mode {mode}: {}",
            last_error()
        );
        reentry
            .handle
            .store(std::ptr::null_mut(), std::sync::atomic::Ordering::SeqCst);
        let seen = reentry.seen.lock().unwrap();
        assert!(!seen.is_empty(), "mode {mode}: no collective was made");
        for (what, st, message) in seen.iter() {
            if *what == "lion_step_count" {
                assert_eq!(
                    *st,
                    LionStatus::LION_ERROR_INVALID_ARGUMENT,
                    "mode {mode}: {message}"
                );
            }
            assert!(
                message.contains("from inside a call on it"),
                "mode {mode}: {what}: {message}"
            );
        }
        assert_eq!(
            opt.step_count(),
            1,
            "mode {mode}: the handle still works after the step"
        );
    }
}

/// A checkpoint of one process, loaded on W ranks and saved by them (collective), is the same
/// bytes, with slices large enough that the save gathers them in several rounds (the last
/// one short) through its fixed buffers.
#[test]
fn a_sharded_save_gathers_large_slices_in_rounds_byte_for_byte() {
    let tensors = scaled_tensors(
        &[150_001, 7, 99_999, 65_536],
        LION_DTYPE_F32,
        LION_DTYPE_F32,
    );
    let config = LionConfig {
        lr: 0.01,
        num_threads: 1,
        ..lion_config_default()
    };
    let blob = stepped_checkpoint(config, &tensors, 12);
    for world in [2, 3] {
        let group = Group::new(world);
        let saved = on_group(&group, |_, ctx| {
            let opt = rank_opt(config, &tensors, LION_DIST_SHARDED, LION_VOTE_AUTO, ctx).unwrap();
            assert_eq!(opt.load(&blob), LionStatus::LION_OK, "{}", last_error());
            opt.save()
        });
        for (rank, got) in saved.iter().enumerate() {
            assert!(
                *got == blob,
                "W={world}: rank {rank}'s checkpoint differs from the one loaded"
            );
        }
    }
}

/// Ranks that differ when they save are refused everywhere (`assert_saves_refused_where_ranks_differ`).
#[test]
fn a_sharded_save_on_ranks_that_differ_is_refused_everywhere() {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        lr: 0.01,
        num_threads: 1,
        ..lion_config_default()
    };
    let blob = stepped_checkpoint(config, &tensors, 13);
    assert_saves_refused_where_ranks_differ(config, &tensors, &blob, &|world, body| {
        on_group(&Group::new(world), body)
    });
}

/// Two f32 ranks as threads, each with its optimizer in `mode` (lr 0.01, one thread), the
/// same parameters and its own gradients: `body(rank, optimizer, params, grads)`.
fn on_two_f32_ranks<T: Send>(
    mode: LionDistMode,
    body: impl Fn(usize, &Opt, &mut Vec<Buf>, &mut Vec<Buf>) -> T + Sync,
) -> Vec<T> {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        lr: 0.01,
        num_threads: 1,
        ..lion_config_default()
    };
    on_group(&Group::new(2), |rank, ctx| {
        let opt = rank_opt(config, &tensors, mode, LION_VOTE_AUTO, ctx).unwrap();
        let mut p = random_params(&tensors, &mut Rng::new(5));
        let mut g = grads_for(&tensors, rank, 0, 5);
        body(rank, &opt, &mut p, &mut g)
    })
}

#[test]
fn a_sharded_save_beside_a_step_is_refused_on_both_without_a_hang() {
    // Their first exchanges have the same shape: the save's gather met the step's
    // reduce-scatter, which summed the momentum into the gradients.
    let out = on_two_f32_ranks(LION_DIST_SHARDED, |rank, opt, p, g| {
        let before: Vec<Vec<f64>> = p.iter().map(|b| b.to_f64()).collect();
        let status = if rank == 0 {
            let mut size = 0usize;
            unsafe { lion_state_size(opt.raw, &mut size) };
            let mut blob = vec![0u8; size];
            let c = blob.as_mut_ptr() as *mut c_void;
            unsafe { lion_state_save(opt.raw, c, size, std::ptr::null_mut()) }
        } else {
            opt.step(p, g)
        };
        let unchanged = p.iter().map(|b| b.to_f64()).collect::<Vec<_>>() == before;
        (status, last_error(), unchanged, opt.step_count())
    });
    for (rank, (status, message, unchanged, count)) in out.iter().enumerate() {
        assert_eq!(
            *status,
            LionStatus::LION_ERROR_INVALID_ARGUMENT,
            "rank {rank}"
        );
        assert!(
            message.contains("some stepped where others saved")
                || message.contains("some saved where others stepped"),
            "{message}"
        );
        assert!(*unchanged && *count == 0, "rank {rank}");
    }
}

#[test]
fn vote_keeps_every_rank_identical_and_equal_to_the_reference() {
    // Then tensors large enough that the packing and the apply pass run on both threads in
    // several blocks: on 2 ranks, both exchanges' packed slices span 2 blocks of 2^16 bytes
    // (src/cpu/mod.rs), the sums' 5 results a byte too.
    let large = scaled_tensors(
        &[400_001, 7, 200_003, 131_075],
        LION_DTYPE_F32,
        LION_DTYPE_F32,
    );
    let cases = (1..=8)
        .map(|w| {
            (
                w,
                tensors_of(LION_DTYPE_F32, LION_DTYPE_F32),
                1 + (w % 2) as u32,
            )
        })
        .chain([(2, large.clone(), 2), (3, large, 2)]);
    for (world, tensors, threads) in cases {
        for exchange in [LION_VOTE_SUMS, LION_VOTE_GATHER] {
            let config = LionConfig {
                lr: 0.01,
                weight_decay: 0.1,
                num_threads: threads,
                ..lion_config_default()
            };
            let start = random_params(&tensors, &mut Rng::new(world as u64));
            let steps = 3;
            let seed = 50 + world as u64;
            let group = Group::new(world);
            let results = on_group(&group, |rank, ctx| {
                let opt = rank_opt(config, &tensors, LION_DIST_VOTE, exchange, ctx).unwrap();
                let mut p = start.clone();
                for step in 0..steps {
                    // Few distinct values, so that votes tie and c is sometimes exactly 0.
                    let mut g: Vec<Buf> = grads_for(&tensors, rank, step, seed)
                        .iter()
                        .map(|b| {
                            Buf::from_f64(
                                LION_DTYPE_F32,
                                &b.to_f64()
                                    .iter()
                                    .map(|x| (x * 2.0).round() / 2.0)
                                    .collect::<Vec<_>>(),
                            )
                        })
                        .collect();
                    assert_eq!(
                        opt.step(&mut p, &mut g),
                        LionStatus::LION_OK,
                        "{}",
                        last_error()
                    );
                }
                (p.iter().map(f32s).collect::<Vec<_>>(), opt.momentum())
            });
            let mut params: Vec<Vec<f32>> = start.iter().map(f32s).collect();
            let mut momenta: Vec<Vec<Vec<f32>>> = (0..world)
                .map(|_| {
                    tensors
                        .iter()
                        .map(|t| vec![0.0; t.numel as usize])
                        .collect()
                })
                .collect();
            for step in 0..steps {
                let grads: Vec<Vec<Vec<f32>>> = (0..world)
                    .map(|r| {
                        grads_for(&tensors, r, step, seed)
                            .iter()
                            .map(|b| {
                                b.to_f64()
                                    .iter()
                                    .map(|x| ((x * 2.0).round() / 2.0) as f32)
                                    .collect()
                            })
                            .collect()
                    })
                    .collect();
                vote_reference(
                    &config,
                    &tensors,
                    &mut params,
                    &mut momenta,
                    &grads,
                    config.lr,
                );
            }
            for (rank, (p, m)) in results.iter().enumerate() {
                let bits = |v: &Vec<Vec<f32>>| {
                    v.iter()
                        .map(|t| t.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                        .collect::<Vec<_>>()
                };
                assert!(
                    bits(p) == bits(&params),
                    "W={world} exchange={exchange}: rank {rank}'s parameters"
                );
                let want: Vec<Vec<f64>> = momenta[rank]
                    .iter()
                    .map(|t| t.iter().map(|&x| x as f64).collect())
                    .collect();
                assert!(
                    *m == want,
                    "W={world} exchange={exchange}: rank {rank}'s momentum"
                );
            }
        }
    }
}

/// What a vote step sends, per rank, in a ring (NCCL's algorithm on one host): the exchange
/// the issue priced, and at most 0.3x a bf16 all-reduce of the gradients for every W (the
/// flags' all-reduce, 96 bytes, aside: the model is sized so that no slice is padded).
#[test]
fn vote_sends_at_most_three_tenths_of_a_bf16_all_reduce() {
    // 67200 = 80 x 840: every W from 2 to 8 slices it into whole vote slices.
    let n = 67_200 * 2;
    let tensors = scaled_tensors(&[n - 4099, 4099], LION_DTYPE_F32, LION_DTYPE_F32);
    for world in 2..=8 {
        for exchange in [LION_VOTE_AUTO, LION_VOTE_SUMS, LION_VOTE_GATHER] {
            let group = Group::new(world);
            on_group(&group, |rank, ctx| {
                let config = lion_config_default();
                let opt = rank_opt(config, &tensors, LION_DIST_VOTE, exchange, ctx).unwrap();
                let mut p = random_params(&tensors, &mut Rng::new(1));
                let mut g = grads_for(&tensors, rank, 0, 7);
                assert_eq!(opt.step(&mut p, &mut g), LionStatus::LION_OK);
            });
            let calls = group.calls.lock().unwrap().clone();
            // Besides creation's checks (a small all-reduce, the ranks' order's all-gather
            // of one u64) and the step's flags (a small all-reduce): the votes.
            let flags = |c: &&ranks::Call| c.op == ranks::Op::AllReduce && c.count < 16;
            assert_eq!(calls.iter().filter(flags).count(), 2, "{calls:?}");
            let order = ranks::Call {
                op: ranks::Op::AllGather,
                count: 1,
                dtype: LION_COMM_U64,
            };
            assert_eq!(calls[1], order, "{calls:?}");
            let calls = [&calls[..1], &calls[2..]].concat();
            let moves: Vec<ranks::Call> = calls.iter().filter(|c| !flags(c)).copied().collect();
            let sent: f64 = moves.iter().map(|c| c.ring_bytes(world)).sum();
            let (w, n) = (world as f64, n as f64);
            let sums = exchange == LION_VOTE_SUMS || (exchange == LION_VOTE_AUTO && world >= 5);
            let want = match sums {
                true => 1.2 * (w - 1.0) / w * n,
                false => (w - 1.0) / 4.0 * n,
            };
            assert!(
                (sent - want).abs() < 1e-9 * want,
                "W={world} exchange={exchange}: {sent} bytes, not {want}: {moves:?}"
            );
            let bf16_all_reduce = 2.0 * (w - 1.0) / w * 2.0 * n;
            if exchange == LION_VOTE_AUTO {
                assert!(
                    sent <= 0.3 * bf16_all_reduce * (1.0 + 1e-12),
                    "W={world}: {} of a bf16 all-reduce",
                    sent / bf16_all_reduce
                );
            }
        }
    }
}

#[test]
fn vote_with_the_same_gradients_everywhere_is_one_process() {
    let base = LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        ..lion_config_default()
    };
    for (i, (param, grad, config)) in vote_configs(base).into_iter().enumerate() {
        let seed = 301 + i as u64;
        let exchange = [LION_VOTE_SUMS, LION_VOTE_GATHER][seed as usize % 2];
        let tensors = tensors_of(param, grad);
        vote_matches_one_process(config, &tensors, 1 + seed as usize % 6, exchange, seed);
    }
}

/// Vote on `world` ranks that all see rank 0's gradients: one process's two steps, bit for
/// bit (parameters and checkpoints).
fn vote_matches_one_process(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    world: usize,
    exchange: LionVoteExchange,
    seed: u64,
) {
    let start = random_params(tensors, &mut Rng::new(seed));
    let single = Opt::new(
        LionConfig {
            num_threads: 1,
            ..config
        },
        tensors,
    )
    .unwrap();
    let results = on_group(&Group::new(world), |_, ctx| {
        let opt = rank_opt(config, tensors, LION_DIST_VOTE, exchange, ctx).unwrap();
        let mut p = start.clone();
        for step in 0..2 {
            let mut g = grads_for(tensors, 0, step, seed);
            let st = opt.step(&mut p, &mut g);
            assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
        }
        (p.iter().map(Buf::bits).collect::<Vec<_>>(), opt.save())
    });
    let dtypes = (tensors[0].param_dtype, tensors[0].grad_dtype);
    assert_every_rank_is_one_process(
        &results,
        &one_process_on_rank0_grads(&single, &start, 2, seed),
        &format!("W={world} {dtypes:?} {config:?}"),
    );
}

/// Sizes for 8-bit momentum in vote mode: small tensors that keep f32 momentum (1, 37, 4095),
/// the smallest quantized one, partial last blocks, several CPU chunks (16 Ki), and more
/// elements in all than a step takes before it runs on the pool (65,536).
const Q8_VOTE_SIZES: [u64; 7] = [1, 4095, 4096, 5013, 40_003, 37, 30_011];

/// A rank's 8-bit momentum evolves from its own gradients alone, so it is one process's on
/// those gradients (whole checkpoints compared); the parameters, the same on every rank,
/// follow the votes of the ranks' decoded momenta (`vote_reference`, in f32).
#[test]
fn vote_with_q8_momentum_votes_on_each_ranks_decoded_momentum() {
    for (world, exchange, threads) in [
        (2, LION_VOTE_SUMS, 1),
        (3, LION_VOTE_GATHER, 2),
        (5, LION_VOTE_SUMS, 2),
    ] {
        let tensors = scaled_tensors(&Q8_VOTE_SIZES, LION_DTYPE_F32, LION_DTYPE_F32);
        let config = LionConfig {
            lr: 0.01,
            weight_decay: 0.1,
            state_dtype: LION_DTYPE_Q8,
            num_threads: threads,
            ..lion_config_default()
        };
        let start = random_params(&tensors, &mut Rng::new(world as u64));
        let (steps, seed) = (3, 90 + world as u64);
        let results = on_group(&Group::new(world), |rank, ctx| {
            let opt = rank_opt(config, &tensors, LION_DIST_VOTE, exchange, ctx).unwrap();
            let mut p = start.clone();
            for step in 0..steps {
                let mut g = grads_for(&tensors, rank, step, seed);
                let st = opt.step(&mut p, &mut g);
                assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
            }
            // Each rank's checkpoint loads into a new optimizer of the group, which steps on
            // as the first does.
            let saved = opt.save();
            let again = rank_opt(config, &tensors, LION_DIST_VOTE, exchange, ctx).unwrap();
            assert_eq!(again.load(&saved), LionStatus::LION_OK, "{}", last_error());
            assert!(again.save() == saved, "rank {rank}: the loaded checkpoint");
            let (mut p1, mut p2) = (p.clone(), p.clone());
            let g = grads_for(&tensors, rank, steps, seed);
            assert_eq!(opt.step(&mut p1, &mut g.clone()), LionStatus::LION_OK);
            assert_eq!(again.step(&mut p2, &mut g.clone()), LionStatus::LION_OK);
            assert!(
                p1 == p2 && opt.save() == again.save(),
                "rank {rank}: after loading"
            );
            (p.iter().map(f32s).collect::<Vec<_>>(), saved)
        });
        let (params, singles) = q8_vote_reference(&config, &tensors, &start, world, steps, seed);
        let bits = |v: &Vec<Vec<f32>>| {
            v.iter()
                .map(|t| t.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        for (rank, (p, saved)) in results.iter().enumerate() {
            assert!(
                bits(p) == bits(&params),
                "W={world} exchange={exchange}: rank {rank}'s parameters"
            );
            assert!(
                *saved == singles[rank].save(),
                "W={world} exchange={exchange}: rank {rank}'s q8 momentum"
            );
        }
    }
}

/// With the same gradients on every rank, a vote is each rank's own sign: every dtype pair
/// and option the vote mode takes, with 8-bit momentum, equal to one process bit for bit.
#[test]
fn vote_with_q8_momentum_and_the_same_gradients_everywhere_is_one_process() {
    let base = LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        ..lion_config_default()
    };
    for (i, (param, grad, config)) in q8_vote_configs(base).into_iter().enumerate() {
        let config = LionConfig {
            num_threads: 1 + (i % 2) as u32,
            ..config
        };
        let exchange = [LION_VOTE_SUMS, LION_VOTE_GATHER][i % 2];
        let tensors = scaled_tensors(&Q8_VOTE_SIZES, param, grad);
        vote_matches_one_process(config, &tensors, 1 + i % 5, exchange, 400 + i as u64);
    }
}

fn create_refused(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    dist: LionDistConfig,
    status: LionStatus,
    says: &str,
) {
    let mut raw = std::ptr::null_mut();
    let st = unsafe {
        lion_create_distributed(&config, tensors.as_ptr(), tensors.len(), &dist, &mut raw)
    };
    assert_eq!(st, status, "{says}: {}", last_error());
    assert!(raw.is_null(), "{says}: a handle was written");
    assert!(
        last_error().contains(says),
        "{:?} should say {says:?}",
        last_error()
    );
}

#[test]
fn bad_distributed_configs_are_refused() {
    let group = Group::new(2);
    let ctx = RankContext { group, rank: 0 };
    let coll = ranks::collectives(&ctx);
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        num_threads: 1,
        ..lion_config_default()
    };
    let dist = LionDistConfig {
        world_size: 2,
        collectives: &coll,
        ..lion_dist_config_default()
    };
    let id = [0u8; 128];
    use LionStatus::*;
    let cases: Vec<(
        LionConfig,
        Vec<LionTensorDesc>,
        LionDistConfig,
        LionStatus,
        &str,
    )> = vec![
        (
            config,
            tensors.clone(),
            LionDistConfig { rank: 2, ..dist },
            LION_ERROR_INVALID_ARGUMENT,
            "rank",
        ),
        (
            config,
            tensors.clone(),
            LionDistConfig { rank: -1, ..dist },
            LION_ERROR_INVALID_ARGUMENT,
            "rank",
        ),
        (
            config,
            tensors.clone(),
            LionDistConfig {
                world_size: 0,
                ..dist
            },
            LION_ERROR_INVALID_ARGUMENT,
            "world_size",
        ),
        (
            config,
            tensors.clone(),
            LionDistConfig { mode: 7, ..dist },
            LION_ERROR_INVALID_ARGUMENT,
            "LionDistMode 7",
        ),
        (
            config,
            tensors.clone(),
            LionDistConfig {
                collectives: std::ptr::null(),
                ..dist
            },
            LION_ERROR_INVALID_ARGUMENT,
            "exactly one transport",
        ),
        (
            config,
            tensors.clone(),
            LionDistConfig {
                nccl_unique_id: id.as_ptr(),
                ..dist
            },
            LION_ERROR_INVALID_ARGUMENT,
            "exactly one transport",
        ),
        (
            config,
            tensors.clone(),
            LionDistConfig {
                vote_exchange: 9,
                ..dist
            },
            LION_ERROR_INVALID_ARGUMENT,
            "LionVoteExchange 9",
        ),
        (
            config,
            tensors.clone(),
            LionDistConfig {
                struct_size: 8,
                ..dist
            },
            LION_ERROR_INVALID_ARGUMENT,
            "struct_size",
        ),
        (
            config,
            tensors.clone(),
            LionDistConfig {
                collectives: std::ptr::null(),
                nccl_unique_id: id.as_ptr(),
                ..dist
            },
            LION_ERROR_UNSUPPORTED,
            "NCCL carries device memory",
        ),
        (
            config,
            tensors.clone(),
            LionDistConfig {
                mode: LION_DIST_VOTE,
                world_size: 200,
                vote_exchange: LION_VOTE_SUMS,
                ..dist
            },
            LION_ERROR_INVALID_ARGUMENT,
            "127",
        ),
    ];
    for (config, tensors, dist, status, says) in cases {
        create_refused(config, &tensors, dist, status, says);
    }
    // A mode's own refusals come after creation's check, in which every rank takes part: both
    // ranks create (each with its own collectives), and both refuse.
    let mode_cases: Vec<(
        LionConfig,
        Vec<LionTensorDesc>,
        LionDistConfig,
        LionStatus,
        &str,
    )> = vec![
        (
            LionConfig {
                state_dtype: LION_DTYPE_Q8,
                ..config
            },
            tensors.clone(),
            dist,
            LION_ERROR_UNSUPPORTED,
            "sharded mode does not support 8-bit momentum",
        ),
        (
            LionConfig {
                cautious_factor: 0.5,
                ..config
            },
            tensors.clone(),
            LionDistConfig {
                mode: LION_DIST_VOTE,
                ..dist
            },
            LION_ERROR_UNSUPPORTED,
            "cautious",
        ),
        (
            config,
            {
                let mut t = tensors.clone();
                t[3].param_dtype = LION_DTYPE_BF16;
                t
            },
            dist,
            LION_ERROR_UNSUPPORTED,
            "tensors[3] is bf16",
        ),
    ];
    for (config, tensors, dist, status, says) in mode_cases {
        let mode = dist.mode; // the config holds pointers: each rank makes its own
        let group = Group::new(2);
        on_group(&group, |rank, ctx| {
            let coll = ranks::collectives(ctx);
            let dist = LionDistConfig {
                mode,
                rank: rank as i32,
                world_size: 2,
                collectives: &coll,
                ..lion_dist_config_default()
            };
            create_refused(config, &tensors, dist, status, says);
        });
    }
    let no_fn = LionCollectives {
        all_gather: None,
        ..coll
    };
    create_refused(
        config,
        &tensors,
        LionDistConfig {
            collectives: &no_fn,
            ..dist
        },
        LION_ERROR_NULL_POINTER,
        "all_gather",
    );
    let mut raw = std::ptr::null_mut();
    let st = unsafe {
        lion_create_distributed(
            &config,
            tensors.as_ptr(),
            tensors.len(),
            std::ptr::null(),
            &mut raw,
        )
    };
    assert_eq!(st, LION_ERROR_NULL_POINTER);
}

#[test]
fn a_failing_collective_is_a_comm_error_naming_it() {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        num_threads: 1,
        ..lion_config_default()
    };
    // At creation (its check is a collective): every rank fails.
    let group = Group::new(2);
    *group.fail_with.lock().unwrap() = Some(42);
    let made = on_group(&group, |_, ctx| {
        rank_opt(config, &tensors, LION_DIST_SHARDED, LION_VOTE_AUTO, ctx).map(|_| ())
    });
    for r in made {
        let (st, message) = r.expect_err("creation over a failing collective");
        assert_eq!(st, LionStatus::LION_ERROR_COMM, "{message}");
        assert!(message.contains("returned 42"), "{message}");
    }
    // At a step: the collectives fail from then on.
    let group = Group::new(2);
    let made = std::sync::Barrier::new(2);
    let out = on_group(&group, |rank, ctx| {
        let opt = rank_opt(config, &tensors, LION_DIST_SHARDED, LION_VOTE_AUTO, ctx).unwrap();
        if made.wait().is_leader() {
            *group.fail_with.lock().unwrap() = Some(42);
        }
        made.wait();
        let mut p = random_params(&tensors, &mut Rng::new(1));
        let mut g = grads_for(&tensors, rank, 0, 1);
        let before: Vec<Vec<u32>> = p.iter().map(Buf::bits).collect();
        let st = opt.step(&mut p, &mut g);
        (
            st,
            last_error(),
            before == p.iter().map(Buf::bits).collect::<Vec<_>>(),
            opt.step_count(),
        )
    });
    for (st, message, unchanged, count) in &out {
        assert_eq!(*st, LionStatus::LION_ERROR_COMM, "{message}");
        assert!(message.contains("returned 42"), "{message}");
        assert!(*unchanged && *count == 0, "a failed step wrote or counted");
    }
}

fn step_opts(
    opt: &Opt,
    params: &mut [Buf],
    grads: &mut [Buf],
    options: &LionStepOptions,
) -> LionStatus {
    let p: Vec<*mut c_void> = params.iter_mut().map(|b| b.ptr()).collect();
    let g: Vec<*const c_void> = grads.iter_mut().map(|b| b.ptr() as *const c_void).collect();
    unsafe {
        lion_step_with_options(
            opt.raw,
            p.as_ptr(),
            g.as_ptr(),
            p.len(),
            std::ptr::null_mut(),
            options,
        )
    }
}

#[test]
fn gradients_that_overflow_only_once_summed_skip_the_step_everywhere() {
    // A GradScaler's gradients: finite on each rank (40000 in f16), infinite once summed.
    let tensors = [lion_tensor_desc(64, LION_DTYPE_F16)];
    let config = LionConfig {
        lr: 0.01,
        num_threads: 1,
        ..lion_config_default()
    };
    let group = Group::new(2);
    let out = on_group(&group, |_, ctx| {
        let opt = rank_opt(config, &tensors, LION_DIST_SHARDED, LION_VOTE_AUTO, ctx).unwrap();
        let mut p = vec![Buf::from_f64(LION_DTYPE_F16, &[0.5; 64])];
        let mut g = vec![Buf::from_f64(LION_DTYPE_F16, &[40000.0; 64])];
        let zero = 0.0f32;
        let options = LionStepOptions {
            found_inf: &zero,
            ..lion_step_options_default()
        };
        let st = step_opts(&opt, &mut p, &mut g, &options);
        (st, p[0].bits(), opt.step_count())
    });
    for (st, bits, count) in out {
        assert_eq!(st, LionStatus::LION_OK);
        assert_eq!(
            bits,
            Buf::from_f64(LION_DTYPE_F16, &[0.5; 64]).bits(),
            "a skipped step wrote"
        );
        assert_eq!(count, 0, "a skipped step counted");
    }
}

#[test]
fn found_inf_on_one_rank_skips_every_rank() {
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
        let config = LionConfig {
            lr: 0.01,
            num_threads: 1,
            ..lion_config_default()
        };
        let group = Group::new(3);
        let out = on_group(&group, |rank, ctx| {
            let opt = rank_opt(config, &tensors, mode, LION_VOTE_AUTO, ctx).unwrap();
            let mut p = random_params(&tensors, &mut Rng::new(4));
            let before: Vec<Vec<u32>> = p.iter().map(Buf::bits).collect();
            let mut g = grads_for(&tensors, rank, 0, 4);
            let flag = if rank == 2 { 1.0f32 } else { 0.0 };
            let options = LionStepOptions {
                found_inf: &flag,
                ..lion_step_options_default()
            };
            let st = step_opts(&opt, &mut p, &mut g, &options);
            (
                st,
                before == p.iter().map(Buf::bits).collect::<Vec<_>>(),
                opt.step_count(),
            )
        });
        assert!(
            out.iter()
                .all(|&(st, same, count)| st == LionStatus::LION_OK && same && count == 0),
            "mode {mode}"
        );
    }
}

/// found_inf and check_finite given on some ranks only (a trainer whose rank 0 alone keeps
/// the scaler's flag): every rank makes the same collectives (the in-process group refuses
/// any that differ), and the step is what it would be with the option on every rank. A
/// clear flag on one rank steps as no options; a set one skips everywhere; a gradient sum
/// that is not finite, in any rank's slice, skips the step where some rank gave found_inf
/// and is refused (LION_ERROR_NON_FINITE) where some rank asked check_finite.
#[test]
fn found_inf_or_check_finite_on_some_ranks_only_is_the_step_of_every_rank() {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        lr: 0.01,
        num_threads: 1,
        ..lion_config_default()
    };
    // (found_inf on rank 1, check_finite on rank 2, a NaN in rank 0's first gradient,
    // what every rank returns, whether the step was taken)
    type Case = (Option<&'static f32>, bool, bool, LionStatus, bool);
    static CLEAR: f32 = 0.0;
    static SET: f32 = 1.0;
    let cases: [Case; 5] = [
        (Some(&CLEAR), false, false, LionStatus::LION_OK, true),
        (Some(&SET), false, false, LionStatus::LION_OK, false),
        (Some(&CLEAR), false, true, LionStatus::LION_OK, false),
        (None, true, true, LionStatus::LION_ERROR_NON_FINITE, false),
        (None, true, false, LionStatus::LION_OK, true),
    ];
    let reference = |rank: usize| {
        let group = Group::new(3);
        on_group(&group, |r, ctx| {
            let opt = rank_opt(config, &tensors, LION_DIST_SHARDED, LION_VOTE_AUTO, ctx).unwrap();
            let mut p = random_params(&tensors, &mut Rng::new(6));
            let mut g = grads_for(&tensors, r, 0, 6);
            assert_eq!(opt.step(&mut p, &mut g), LionStatus::LION_OK);
            p.iter().map(Buf::bits).collect::<Vec<_>>()
        })[rank]
            .clone()
    };
    let stepped = reference(0);
    for (found_inf, check, nan, want, taken) in cases {
        let group = Group::new(3);
        let out = on_group(&group, |rank, ctx| {
            let opt = rank_opt(config, &tensors, LION_DIST_SHARDED, LION_VOTE_AUTO, ctx).unwrap();
            let mut p = random_params(&tensors, &mut Rng::new(6));
            let before: Vec<Vec<u32>> = p.iter().map(Buf::bits).collect();
            let mut g = grads_for(&tensors, rank, 0, 6);
            if nan && rank == 0 {
                let mut values = g[0].to_f64();
                values[0] = f64::NAN;
                g[0] = Buf::from_f64(LION_DTYPE_F32, &values);
            }
            let options = LionStepOptions {
                found_inf: match (rank, found_inf) {
                    (1, Some(flag)) => flag,
                    _ => std::ptr::null(),
                },
                check_finite: rank == 2 && check,
                ..lion_step_options_default()
            };
            let st = step_opts(&opt, &mut p, &mut g, &options);
            let after: Vec<Vec<u32>> = p.iter().map(Buf::bits).collect();
            (st, last_error(), after == before, after, opt.step_count())
        });
        let case = (found_inf.copied(), check, nan);
        for (rank, (st, message, unchanged, after, count)) in out.iter().enumerate() {
            assert_eq!(*st, want, "{case:?}: rank {rank}: {message}");
            if taken {
                assert_eq!(
                    *after, stepped,
                    "{case:?}: rank {rank} is not the step without options"
                );
                assert_eq!(*count, 1, "{case:?}");
            } else {
                assert!(
                    *unchanged && *count == 0,
                    "{case:?}: rank {rank} wrote or counted"
                );
            }
        }
    }
}

/// A rank whose found_inf is set skips the step whatever its options.lr, as one process does
/// (a skip wins over the lr's check): it does not refuse the step for an lr that is negative
/// or NaN, and every rank skips it (LION_OK, nothing written, not counted), whether the others
/// pass the same options or a clear flag and a good lr. The next step is taken everywhere.
#[test]
fn found_inf_wins_over_a_bad_lr_on_every_rank() {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        lr: 0.01,
        num_threads: 1,
        ..lion_config_default()
    };
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        for world in [1, 2] {
            for bad_lr in [-1.0f32, f32::NAN] {
                for alike in [false, true] {
                    let what = format!("mode {mode}, W={world}, lr {bad_lr}, alike {alike}");
                    let group = Group::new(world);
                    let out = on_group(&group, |rank, ctx| {
                        let opt = rank_opt(config, &tensors, mode, LION_VOTE_AUTO, ctx).unwrap();
                        let mut p = random_params(&tensors, &mut Rng::new(8));
                        let before: Vec<Vec<u32>> = p.iter().map(Buf::bits).collect();
                        let mut g = grads_for(&tensors, rank, 0, 8);
                        // Rank 0 (and every rank, `alike`): the flag and the bad lr; the
                        // others: a clear flag and the optimizer's own lr.
                        let skips = rank == 0 || alike;
                        let flag = if skips { 1.0f32 } else { 0.0 };
                        let lr = if skips { bad_lr } else { config.lr };
                        let options = LionStepOptions {
                            found_inf: &flag,
                            lr: &lr,
                            ..lion_step_options_default()
                        };
                        let st = step_opts(&opt, &mut p, &mut g, &options);
                        let message = last_error();
                        let unchanged = before == p.iter().map(Buf::bits).collect::<Vec<_>>();
                        let count = opt.step_count();
                        let next = opt.step(&mut p, &mut g);
                        (st, message, unchanged, count, next, opt.step_count())
                    });
                    for (st, message, unchanged, count, next, after) in out {
                        assert_eq!(st, LionStatus::LION_OK, "{what}: {message}");
                        assert!(unchanged, "{what}: a skipped step wrote");
                        assert_eq!(count, 0, "{what}: a skipped step counted");
                        assert_eq!((next, after), (LionStatus::LION_OK, 1), "{what}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_step_or_save_refused_on_one_rank_is_refused_everywhere_without_a_hang() {
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let out = on_two_f32_ranks(mode, |rank, opt, p, g| {
            // Rank 1 passes one tensor too few; rank 0 a bad lr on the next step.
            let mut pp: Vec<*mut c_void> = p.iter_mut().map(|b| b.ptr()).collect();
            let gg: Vec<*const c_void> = g.iter_mut().map(|b| b.ptr() as *const c_void).collect();
            let n = if rank == 1 { pp.len() - 1 } else { pp.len() };
            let first = unsafe {
                lion_step(
                    opt.raw,
                    pp.as_mut_ptr(),
                    gg.as_ptr(),
                    n,
                    std::ptr::null_mut(),
                )
            };
            let first_msg = last_error();
            let bad_lr = -1.0f32;
            let lr = if rank == 0 { &bad_lr } else { std::ptr::null() };
            let options = LionStepOptions {
                lr,
                ..lion_step_options_default()
            };
            let second = step_opts(opt, p, g, &options);
            // A save with no buffer on rank 1: rank 0 still gets its checkpoint (sharded: the
            // gather needs rank 1 to take part).
            let mut size = 0usize;
            unsafe { lion_state_size(opt.raw, &mut size) };
            let mut blob = vec![0u8; size];
            let buf = if rank == 1 {
                std::ptr::null_mut()
            } else {
                blob.as_mut_ptr() as *mut c_void
            };
            let save = unsafe { lion_state_save(opt.raw, buf, size, std::ptr::null_mut()) };
            (first, first_msg, second, save, opt.step_count())
        });
        let (first0, msg0, second0, save0, count0) = &out[0];
        let (first1, _, second1, save1, count1) = &out[1];
        assert_eq!(
            *first1,
            LionStatus::LION_ERROR_INVALID_ARGUMENT,
            "mode {mode}"
        );
        assert_eq!(
            *first0,
            LionStatus::LION_ERROR_INVALID_ARGUMENT,
            "mode {mode}"
        );
        assert!(msg0.contains("another rank refused"), "{msg0}");
        assert_eq!(*second0, LionStatus::LION_ERROR_INVALID_ARGUMENT);
        assert_eq!(*second1, LionStatus::LION_ERROR_INVALID_ARGUMENT);
        assert_eq!(
            (*save0, *save1),
            (LionStatus::LION_OK, LionStatus::LION_ERROR_NULL_POINTER)
        );
        assert_eq!((*count0, *count1), (0, 0));
    }
}

/// A step count that reached 2^63 (a checkpoint's last count, 2^63-1, loaded, and a step) is
/// never saved: every rank's save is refused and writes nothing; a sharded save, collective,
/// still takes part, so that no rank waits: a rank whose count is lower (it loaded another
/// checkpoint) has its save refused too, as ranks that differ (vote mode: its own save
/// goes through).
#[test]
fn a_step_count_of_2_pow_63_is_not_saved_and_no_rank_waits() {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        lr: 0.01,
        num_threads: 1,
        ..lion_config_default()
    };
    // The blob of one process: it loads on any number of ranks, in either mode.
    let blob = Opt::new(config, &tensors).unwrap().save();
    let mut last = blob.clone();
    last[64..72].copy_from_slice(&((1u64 << 63) - 1).to_le_bytes());
    let body = last.len() - 16;
    let sum = xxhash_rust::xxh3::xxh3_128(&last[..body]).to_le_bytes();
    last[body..].copy_from_slice(&sum);
    let save = |opt: &Opt| {
        let mut buf = vec![0xAAu8; blob.len()];
        let mut written = 12345usize;
        let st =
            unsafe { lion_state_save(opt.raw, buf.as_mut_ptr().cast(), buf.len(), &mut written) };
        (st, last_error(), buf, written)
    };
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let group = Group::new(2);
        let out = on_group(&group, |rank, ctx| {
            let opt = rank_opt(config, &tensors, mode, LION_VOTE_AUTO, ctx).unwrap();
            assert_eq!(opt.load(&last), LionStatus::LION_OK, "{}", last_error());
            let mut p = random_params(&tensors, &mut Rng::new(9));
            let mut g = grads_for(&tensors, rank, 0, 9);
            assert_eq!(opt.step(&mut p, &mut g), LionStatus::LION_OK);
            assert_eq!(opt.step_count(), 1 << 63);
            let refused = save(&opt);
            // Rank 1 goes back to the start: its save goes through, rank 0's is refused.
            if rank == 1 {
                assert_eq!(opt.load(&blob), LionStatus::LION_OK);
            }
            (refused, save(&opt))
        });
        for (rank, (refused, after)) in out.into_iter().enumerate() {
            for (st, message, buf, written) in
                std::iter::once(refused).chain((rank == 0).then_some(after.clone()))
            {
                assert_eq!(
                    st,
                    LionStatus::LION_ERROR_INVALID_ARGUMENT,
                    "mode {mode}, rank {rank}: {message}"
                );
                assert!(message.contains("2^63"), "{message}");
                assert!(
                    buf.iter().all(|&b| b == 0xAA),
                    "mode {mode}: a refused save wrote"
                );
                assert_eq!(written, 12345, "mode {mode}");
            }
            if rank == 1 && mode == LION_DIST_SHARDED {
                let (st, message, buf, _) = after;
                assert_eq!(st, LionStatus::LION_ERROR_INVALID_ARGUMENT, "{message}");
                assert!(message.contains("refused the checkpoint"), "{message}");
                assert!(buf.iter().all(|&b| b == 0xAA), "a refused save wrote");
            } else if rank == 1 {
                let (st, message, buf, written) = after;
                assert_eq!(st, LionStatus::LION_OK, "mode {mode}: {message}");
                assert_eq!(written, blob.len());
                assert_eq!(&buf[64..72], &0u64.to_le_bytes(), "mode {mode}");
            }
        }
    }
}

#[test]
fn ranks_whose_lr_differs_are_refused_not_parted() {
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let tensors = tensors_of(LION_DTYPE_BF16, LION_DTYPE_BF16);
        let group = Group::new(3);
        let out = on_group(&group, |rank, ctx| {
            // Created alike (ranks created differently are refused at creation: the test
            // below), then an lr set on one rank only.
            let config = LionConfig {
                lr: 0.01,
                num_threads: 1,
                stochastic_rounding: true,
                ..lion_config_default()
            };
            let opt = rank_opt(config, &tensors, mode, LION_VOTE_AUTO, ctx).unwrap();
            if rank == 2 {
                assert_eq!(unsafe { lion_set_lr(opt.raw, 0.02) }, LionStatus::LION_OK);
            }
            let mut p = random_params(&tensors, &mut Rng::new(6));
            let before: Vec<Vec<u32>> = p.iter().map(Buf::bits).collect();
            let mut g = grads_for(&tensors, rank, 0, 6);
            let st = opt.step(&mut p, &mut g);
            (
                st,
                last_error(),
                before == p.iter().map(Buf::bits).collect::<Vec<_>>(),
            )
        });
        for (st, message, unchanged) in out {
            assert_eq!(
                st,
                LionStatus::LION_ERROR_INVALID_ARGUMENT,
                "mode {mode}: {message}"
            );
            assert!(message.contains("ranks differ"), "{message}");
            assert!(unchanged);
        }
    }
}

/// Creation's check (W > 1): ranks created differently all fail, and so do the ranks beside
/// one whose config its mode refuses, instead of waiting at their first step for it.
#[test]
fn ranks_created_differently_or_beside_a_refusal_fail_alike() {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        for odd in ["seed", "tensors"] {
            let group = Group::new(3);
            let results = on_group(&group, |rank, ctx| {
                let config = LionConfig {
                    num_threads: 1,
                    seed: if odd == "seed" && rank == 2 { 7 } else { 1 },
                    ..lion_config_default()
                };
                let mine = if odd == "tensors" && rank == 1 {
                    &tensors[..tensors.len() - 1]
                } else {
                    &tensors[..]
                };
                rank_opt(config, mine, mode, LION_VOTE_AUTO, ctx).map(|_| ())
            });
            for (rank, r) in results.into_iter().enumerate() {
                let (code, message) = r.expect_err("every rank must refuse");
                assert_eq!(
                    code,
                    LionStatus::LION_ERROR_INVALID_ARGUMENT,
                    "{odd}: rank {rank}"
                );
                assert!(message.contains("created differently"), "{message}");
            }
        }
    }
    // Vote mode with Cautious Lion on rank 1 only.
    let group = Group::new(2);
    let results = on_group(&group, |rank, ctx| {
        let config = LionConfig {
            num_threads: 1,
            cautious_factor: if rank == 1 { 0.5 } else { 1.0 },
            ..lion_config_default()
        };
        rank_opt(config, &tensors, LION_DIST_VOTE, LION_VOTE_AUTO, ctx).map(|_| ())
    });
    assert_eq!(results.len(), 2);
    assert_refused_beside(
        &results,
        1,
        LionStatus::LION_ERROR_UNSUPPORTED,
        "cautious",
        "vote, cautious on rank 1",
    );
}

/// Ranks whose `rank` is not their place in the caller's collectives (two swapped, one given
/// twice) are refused at creation on every rank (`assert_misnumbered_ranks_refused`).
#[test]
fn ranks_numbered_otherwise_than_their_collectives_are_refused() {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        num_threads: 1,
        ..lion_config_default()
    };
    assert_misnumbered_ranks_refused(
        config,
        &tensors,
        &[&[1, 0, 2], &[0, 1, 0]],
        &|world, body| on_group(&Group::new(world), body),
    );
}

/// A rank whose arguments `lion_create` itself would refuse (a config value, a tensor
/// description, a product of hyperparameters, no tensors, a NULL `out`) still takes part in
/// creation's check: it returns its own error, and the other ranks fail ("another rank
/// refused") instead of waiting in creation for it.
#[test]
fn a_rank_whose_arguments_are_refused_takes_part_in_creation() {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        num_threads: 1,
        ..lion_config_default()
    };
    let mut bad_dtype = tensors.clone();
    bad_dtype[2].grad_dtype = 9;
    type Case<'a> = (
        &'a str,
        LionConfig,
        &'a [LionTensorDesc],
        bool,
        LionStatus,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "a negative lr",
            LionConfig { lr: -1.0, ..config },
            &tensors,
            false,
            LionStatus::LION_ERROR_INVALID_ARGUMENT,
            "lr",
        ),
        (
            "a tensor's dtype",
            config,
            &bad_dtype,
            false,
            LionStatus::LION_ERROR_INVALID_ARGUMENT,
            "tensors[2]",
        ),
        (
            "a decay factor outside [0, 1]",
            LionConfig {
                lr: 0.5,
                weight_decay: 4.0,
                ..config
            },
            &tensors,
            false,
            LionStatus::LION_ERROR_INVALID_ARGUMENT,
            "decay factor",
        ),
        (
            "no tensors",
            config,
            &tensors[..0],
            false,
            LionStatus::LION_ERROR_INVALID_ARGUMENT,
            "n_tensors",
        ),
        (
            "out NULL",
            config,
            &tensors,
            true,
            LionStatus::LION_ERROR_NULL_POINTER,
            "out",
        ),
    ];
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        for &(what, bad, bad_tensors, null_out, status, says) in &cases {
            let group = Group::new(3);
            let results = on_group(&group, |rank, ctx| {
                if rank != 1 {
                    return rank_opt(config, &tensors, mode, LION_VOTE_AUTO, ctx).map(|_| ());
                }
                let collectives = ranks::collectives(ctx);
                let dist = LionDistConfig {
                    mode,
                    rank: 1,
                    world_size: 3,
                    collectives: &collectives,
                    ..lion_dist_config_default()
                };
                let mut raw: *mut LionOptimizer = std::ptr::null_mut();
                let out = if null_out {
                    std::ptr::null_mut()
                } else {
                    &mut raw as *mut _
                };
                let st = unsafe {
                    lion_create_distributed(
                        &bad,
                        bad_tensors.as_ptr(),
                        bad_tensors.len(),
                        &dist,
                        out,
                    )
                };
                assert!(raw.is_null(), "{what}: a handle was written");
                match st {
                    LionStatus::LION_OK => Ok(()),
                    st => Err((st, last_error())),
                }
            });
            assert_refused_beside(&results, 1, status, says, what);
        }
    }
}
