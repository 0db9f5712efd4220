//! The CUDA engine's distributed modes, W = 1..5 ranks on one GPU: each rank a thread with its
//! own CUDA optimizer, the collectives the in-process transport's (tests/common/ranks.rs,
//! which waits for the step's stream and moves the bytes through the host), so that every
//! kernel, the device-side agreement and the refusals run as they do over NCCL:
//! - sharded: bit-identical to one process stepping on the mean gradient (the CPU engine,
//!   itself bit-identical to the CUDA one), checkpoints equal to the single-process one;
//! - vote: every rank identical and equal to the f32 reference; with the same gradients
//!   everywhere, equal to one process; both exchanges; more tensors than one launch takes;
//! - a rank that refuses a step, found_inf on one rank, ranks created differently (refused at
//!   creation), ranks whose lr differs (skipped, reported);
//! - NCCL itself with one rank (a GPU machine has one GPU; two-GPU runs: tests/nccl.rs).
//!
//! GPU tests: ignored unless asked for (`--ignored`; the GPU bundle runs them).

mod common;
mod gpu;

use std::ffi::c_void;
use std::sync::atomic::Ordering;

use common::dist::*;
use common::ranks::{on_group, Group, RankContext};
use common::*;
use gpu::DevBuf;
use lion::*;

fn cuda(config: LionConfig) -> LionConfig {
    LionConfig {
        device: LION_DEVICE_CUDA,
        ..config
    }
}

fn options(grad_scale: f32, found_inf: *const f32) -> LionStepOptions {
    LionStepOptions {
        grad_scale,
        found_inf,
        ..lion_step_options_default()
    }
}

/// Steps a CUDA optimizer on device copies of `params` and `grads` (NULL where `null_grad`
/// names a tensor), then copies the parameters back.
fn dev_step_with(
    opt: &Opt,
    params: &mut [Buf],
    grads: &[Buf],
    options: &LionStepOptions,
    null_grad: Option<usize>,
) -> LionStatus {
    let dp: Vec<DevBuf> = params
        .iter()
        .map(|p| DevBuf::from_bytes(&le_bytes(p)))
        .collect();
    // The gradients in one buffer, each tensor at a multiple of 8 elements (the CUDA modes'
    // flattened layout, which sharded mode reduce-scatters in place), or one buffer each.
    let flat = FLAT_GRADIENTS.with(|f| f.get());
    let (dg, mut g): (Vec<DevBuf>, Vec<*const c_void>) = if flat {
        let mut bytes = Vec::new();
        let mut at = Vec::new();
        for b in grads {
            at.push(bytes.len());
            bytes.extend(le_bytes(b));
            let size = le_bytes(b).len() / b.to_f64().len().max(1);
            while bytes.len() % (8 * size) != 0 {
                bytes.push(0);
            }
        }
        let d = DevBuf::from_bytes(&bytes);
        let ptrs = at
            .iter()
            .map(|&a| (d.ptr as usize + a) as *const c_void)
            .collect();
        (vec![d], ptrs)
    } else {
        // Each gradient `offset` bytes into its buffer (GRADIENT_OFFSET: 4 takes the kernels'
        // paths for buffers that are not 16-byte aligned).
        let offset = GRADIENT_OFFSET.with(|o| o.get());
        let d: Vec<DevBuf> = grads
            .iter()
            .map(|g| DevBuf::from_bytes(&[vec![0u8; offset], le_bytes(g)].concat()))
            .collect();
        let ptrs = d
            .iter()
            .map(|d| (d.ptr as usize + offset) as *const c_void)
            .collect();
        (d, ptrs)
    };
    let p: Vec<*mut c_void> = dp.iter().map(DevBuf::as_ptr).collect();
    if let Some(t) = null_grad {
        g[t] = std::ptr::null();
    }
    let st = unsafe {
        lion_step_with_options(
            opt.raw,
            p.as_ptr(),
            g.as_ptr(),
            p.len(),
            std::ptr::null_mut(),
            options,
        )
    };
    gpu::sync();
    drop(dg);
    for (b, d) in params.iter_mut().zip(&dp) {
        *b = from_le_bytes(b.dtype(), &d.download());
    }
    st
}

thread_local! {
    /// Whether this thread's steps pass their gradients in one flat buffer (`dev_step_with`).
    static FLAT_GRADIENTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Bytes before each gradient in its own buffer (`dev_step_with`).
    static GRADIENT_OFFSET: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn dev_step(opt: &Opt, params: &mut [Buf], grads: &[Buf]) -> LionStatus {
    dev_step_with(opt, params, grads, &options(1.0, std::ptr::null()), None)
}

fn step_count(opt: &Opt) -> Result<u64, (LionStatus, String)> {
    let mut n = 0u64;
    match unsafe { lion_step_count(opt.raw, &mut n) } {
        LionStatus::LION_OK => Ok(n),
        st => Err((st, last_error())),
    }
}

/// Runs `body(rank, ctx)` on `world` threads, each with the GPU's context current.
fn on_gpu_ranks<T: Send>(
    group: &std::sync::Arc<Group>,
    body: impl Fn(usize, &RankContext) -> T + Sync,
) -> Vec<T> {
    let flat = FLAT_GRADIENTS.with(|f| f.get());
    let offset = GRADIENT_OFFSET.with(|o| o.get());
    on_group(group, |rank, ctx| {
        gpu::context().expect("the GPU's context");
        FLAT_GRADIENTS.with(|f| f.set(flat));
        GRADIENT_OFFSET.with(|o| o.set(offset));
        body(rank, ctx)
    })
}

/// Sharded CUDA on `world` ranks against one process on the mean gradient, `steps` steps.
fn sharded_matches_one_process(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    world: usize,
    seed: u64,
) {
    let label = format!(
        "W={world} {config:?} p={}",
        dtype_name(tensors[0].param_dtype)
    );
    let steps = 3;
    let start = random_params(tensors, &mut Rng::new(seed));
    let single = Opt::new(config, tensors).unwrap();
    let mut reference: Vec<Buf> = start.clone();
    let scale = (1.0 / world as f64) as f32;
    let group = Group::on_device(world);
    let results = on_gpu_ranks(&group, |rank, ctx| {
        let opt = rank_opt(
            cuda(config),
            tensors,
            LION_DIST_SHARDED,
            LION_VOTE_AUTO,
            ctx,
        )
        .unwrap_or_else(|e| panic!("{label}: {e:?}"));
        let mut params = start.clone();
        let mut history = Vec::new();
        for step in 0..steps {
            let grads = grads_for(tensors, rank, step, seed);
            let st = dev_step(&opt, &mut params, &grads);
            assert_eq!(st, LionStatus::LION_OK, "{label}: {}", last_error());
            history.push(params.iter().map(Buf::bits).collect::<Vec<_>>());
        }
        (history, opt.save(), step_count(&opt))
    });
    for step in 0..steps {
        let per_rank: Vec<Vec<Buf>> = (0..world)
            .map(|r| grads_for(tensors, r, step, seed))
            .collect();
        let mut sum = sum_over_ranks(&per_rank);
        let p: Vec<*mut c_void> = reference.iter_mut().map(|b| b.ptr()).collect();
        let g: Vec<*const c_void> = sum.iter_mut().map(|b| b.ptr() as *const c_void).collect();
        let o = options(scale, std::ptr::null());
        let st = unsafe {
            lion_step_with_options(
                single.raw,
                p.as_ptr(),
                g.as_ptr(),
                p.len(),
                std::ptr::null_mut(),
                &o,
            )
        };
        assert_eq!(st, LionStatus::LION_OK);
        let want: Vec<Vec<u32>> = reference.iter().map(Buf::bits).collect();
        for (rank, (history, _, _)) in results.iter().enumerate() {
            assert!(
                history[step] == want,
                "{label}: rank {rank} differs from one process at step {step}"
            );
        }
    }
    let blob = single.save();
    for (rank, (_, saved, count)) in results.iter().enumerate() {
        assert_eq!(*count, Ok(steps as u64), "{label}: rank {rank}");
        assert!(
            *saved == blob,
            "{label}: rank {rank}'s checkpoint differs from one process's"
        );
    }
}

/// Tensors of many sizes, more than one launch takes (MAX_TENSORS = 240).
fn many_tensors() -> Vec<LionTensorDesc> {
    let sizes: Vec<u64> = (0..300).map(|i| (i * 37 % 101) as u64).collect();
    scaled_tensors(&sizes, LION_DTYPE_F32, LION_DTYPE_F32)
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn sharded_is_bit_identical_to_one_process_on_the_mean_gradient() {
    require_gpu!();
    let mut seed = 1;
    for (param, grad, config) in dtype_configs(LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        ..lion_config_default()
    }) {
        seed += 1;
        let world = 1 + seed as usize % 4;
        sharded_matches_one_process(config, &tensors_of(param, grad), world, seed);
    }
    for (i, config) in option_configs(LionConfig {
        lr: 0.01,
        weight_decay: 0.15,
        ..lion_config_default()
    })
    .into_iter()
    .enumerate()
    {
        seed += 1;
        let tensors = tensors_of(LION_DTYPE_BF16, LION_DTYPE_F32);
        sharded_matches_one_process(config, &tensors, 2 + i % 4, seed);
    }
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.25,
        ..lion_config_default()
    };
    sharded_matches_one_process(config, &many_tensors(), 3, 99);
}

/// A checkpoint of one process, loaded on 2 and 3 CUDA ranks and saved by them (collective),
/// is the same bytes, with slices larger than a round of the save's gather (2^20 elements),
/// the last round short; and ranks that differ when they save (a checkpoint loaded on one
/// only, an lr set on one) all refuse it, writing nothing.
#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn sharded_saves_gather_in_rounds_and_refuse_ranks_that_differ() {
    require_gpu!();
    let tensors = scaled_tensors(&[1_500_001, 7, 999_999], LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        lr: 0.01,
        ..lion_config_default()
    };
    // A checkpoint with momentum everywhere, from the CPU engine (the same bytes as CUDA's).
    let blob = stepped_checkpoint(config, &tensors, 15);
    for world in [2, 3] {
        let group = Group::on_device(world);
        let saved = on_gpu_ranks(&group, |rank, ctx| {
            let opt = rank_opt(
                cuda(config),
                &tensors,
                LION_DIST_SHARDED,
                LION_VOTE_AUTO,
                ctx,
            )
            .unwrap();
            assert_eq!(opt.load(&blob), LionStatus::LION_OK, "{}", last_error());
            // On 3 ranks the last one takes part without a buffer (NULL: refused, as meant).
            if rank == 2 {
                let null = std::ptr::null_mut();
                let st = unsafe { lion_state_save(opt.raw, null, 0, std::ptr::null_mut()) };
                assert_eq!(st, LionStatus::LION_ERROR_NULL_POINTER, "{}", last_error());
                return blob.clone();
            }
            opt.save()
        });
        for (rank, got) in saved.iter().enumerate() {
            assert!(
                *got == blob,
                "W={world}: rank {rank}'s checkpoint differs from the one loaded"
            );
        }
    }
    assert_saves_refused_where_ranks_differ(cuda(config), &tensors, &blob, &|world, body| {
        on_gpu_ranks(&Group::on_device(world), body)
    });
}

/// Ranks whose `rank` is not their place in the caller's collectives (two swapped) are refused
/// on every rank at creation, in both modes: the CUDA twin of the check (device memory).
#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn ranks_numbered_otherwise_than_their_collectives_are_refused() {
    require_gpu!();
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    assert_misnumbered_ranks_refused(
        cuda(lion_config_default()),
        &tensors,
        &[&[1, 0]],
        &|world, body| on_gpu_ranks(&Group::on_device(world), body),
    );
}

/// Gradients in one flat buffer of the CUDA layout (every tensor a multiple of 8 elements, the
/// slices covering the buffer exactly): sharded mode reduce-scatters the caller's buffer
/// itself; the same bits as one process.
#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn sharded_reads_a_flat_gradient_buffer_in_place() {
    require_gpu!();
    // Multiples of 8 (no gaps between tensors) summing to 5248, a multiple of 16 W for W <= 4.
    let sizes = [8u64, 40, 1000, 64, 4104, 32];
    for (i, world) in [1usize, 2, 4].into_iter().enumerate() {
        for grad in [LION_DTYPE_F32, LION_DTYPE_BF16] {
            let tensors = scaled_tensors(&sizes, LION_DTYPE_F32, grad);
            let config = LionConfig {
                lr: 0.01,
                weight_decay: 0.1,
                cautious_factor: if i == 1 { 0.5 } else { 1.0 },
                ..lion_config_default()
            };
            FLAT_GRADIENTS.with(|f| f.set(true));
            sharded_matches_one_process(config, &tensors, world, 700 + i as u64);
        }
    }
}

/// Rounded gradients, so that votes tie and c is sometimes exactly 0.
fn coarse_grads(tensors: &[LionTensorDesc], rank: usize, step: usize, seed: u64) -> Vec<Buf> {
    grads_for(tensors, rank, step, seed)
        .iter()
        .map(|b| {
            let v: Vec<f64> = b.to_f64().iter().map(|x| (x * 2.0).round() / 2.0).collect();
            Buf::from_f64(LION_DTYPE_F32, &v)
        })
        .collect()
}

/// A vote rank's optimizer on the GPU (over `ctx`'s group), stepped `steps` times from
/// `start` on `grads(step)`, and its parameters after.
fn stepped_vote_rank(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    exchange: LionVoteExchange,
    ctx: &RankContext,
    start: &[Buf],
    steps: usize,
    grads: impl Fn(usize) -> Vec<Buf>,
) -> (Opt, Vec<Buf>) {
    let opt = rank_opt(cuda(config), tensors, LION_DIST_VOTE, exchange, ctx)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let mut p = start.to_vec();
    for step in 0..steps {
        let st = dev_step(&opt, &mut p, &grads(step));
        assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
    }
    (opt, p)
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn vote_keeps_every_rank_identical_and_equal_to_the_reference() {
    require_gpu!();
    for world in 1..=5 {
        for exchange in [LION_VOTE_SUMS, LION_VOTE_GATHER] {
            let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
            let config = LionConfig {
                lr: 0.01,
                weight_decay: 0.1,
                ..lion_config_default()
            };
            let start = random_params(&tensors, &mut Rng::new(world as u64));
            let (steps, seed) = (3, 50 + world as u64);
            let group = Group::on_device(world);
            let results = on_gpu_ranks(&group, |rank, ctx| {
                let (opt, p) =
                    stepped_vote_rank(config, &tensors, exchange, ctx, &start, steps, |step| {
                        coarse_grads(&tensors, rank, step, seed)
                    });
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
                        coarse_grads(&tensors, r, step, seed)
                            .iter()
                            .map(f32s)
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
                let label = format!("W={world} exchange={exchange}: rank {rank}");
                assert!(
                    (p.iter().flatten().map(|x| x.to_bits()))
                        .eq(params.iter().flatten().map(|x| x.to_bits())),
                    "{label}'s parameters"
                );
                let want: Vec<Vec<f64>> = (momenta[rank].iter())
                    .map(|t| t.iter().map(|&x| x as f64).collect())
                    .collect();
                assert!(*m == want, "{label}'s momentum");
            }
        }
    }
}

/// Vote on `world` ranks that all see rank 0's gradients: one process's step.
fn vote_matches_one_process(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    world: usize,
    exchange: LionVoteExchange,
    seed: u64,
) {
    let start = random_params(tensors, &mut Rng::new(seed));
    let single = Opt::new(config, tensors).unwrap();
    let group = Group::on_device(world);
    let results = on_gpu_ranks(&group, |_, ctx| {
        let (opt, p) = stepped_vote_rank(config, tensors, exchange, ctx, &start, 2, |step| {
            grads_for(tensors, 0, step, seed)
        });
        (p.iter().map(Buf::bits).collect::<Vec<_>>(), opt.save())
    });
    assert_every_rank_is_one_process(
        &results,
        &one_process_on_rank0_grads(&single, &start, 2, seed),
        &format!("W={world} exchange={exchange} {config:?}"),
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn vote_with_the_same_gradients_everywhere_is_one_process() {
    require_gpu!();
    let base = LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        ..lion_config_default()
    };
    for (i, (param, grad, config)) in vote_configs(base).into_iter().enumerate() {
        let exchange = [LION_VOTE_SUMS, LION_VOTE_GATHER][i % 2];
        let tensors = tensors_of(param, grad);
        vote_matches_one_process(config, &tensors, 1 + i % 4, exchange, 300 + i as u64);
    }
    let config = LionConfig {
        lr: 0.01,
        ..lion_config_default()
    };
    for exchange in [LION_VOTE_SUMS, LION_VOTE_GATHER] {
        vote_matches_one_process(config, &many_tensors(), 3, exchange, 400);
    }
}

// ---- 8-bit momentum in vote mode ----

/// Small tensors that keep f32 momentum (1, 37, 4095), the smallest quantized one, partial
/// last blocks (a lane's runs past the end write no votes), several of q8's 64 Ki chunks.
fn q8_vote_tensors(param: LionDType, grad: LionDType, chunks: bool) -> Vec<LionTensorDesc> {
    let sizes: &[u64] = if chunks {
        &[7, 65536 + 13, 100_003, 4096]
    } else {
        &[1, 4095, 4096, 5013, 37]
    };
    scaled_tensors(sizes, param, grad)
}

/// With the same gradients everywhere, q8 vote mode on the GPU is one process on the CPU, bit
/// for bit: every dtype pair, stochastic rounding and the vote's options, both exchanges.
#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn vote_with_q8_momentum_and_the_same_gradients_everywhere_is_one_process() {
    require_gpu!();
    let base = q8(LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        ..lion_config_default()
    });
    for (i, (param, grad, config)) in q8_vote_configs(base).into_iter().enumerate() {
        let exchange = [LION_VOTE_SUMS, LION_VOTE_GATHER][i % 2];
        let tensors = q8_vote_tensors(param, grad, false);
        vote_matches_one_process(config, &tensors, 1 + i % 4, exchange, 500 + i as u64);
    }
    for exchange in [LION_VOTE_SUMS, LION_VOTE_GATHER] {
        let tensors = q8_vote_tensors(LION_DTYPE_F32, LION_DTYPE_F32, true);
        vote_matches_one_process(base, &tensors, 3, exchange, 540);
    }
    // Gradients 4 bytes into their buffers (not 16-byte aligned: the runs' scalar loads).
    for (i, grad) in [LION_DTYPE_F32, LION_DTYPE_BF16].into_iter().enumerate() {
        GRADIENT_OFFSET.with(|o| o.set(4));
        let tensors = q8_vote_tensors(LION_DTYPE_F32, grad, false);
        vote_matches_one_process(base, &tensors, 2, LION_VOTE_SUMS, 550 + i as u64);
        GRADIENT_OFFSET.with(|o| o.set(0));
    }
    // More tensors than one launch takes (MAX_TENSORS), quantized ones among them.
    // The q8 sizes first and last: quantized tensors in both launches.
    let q8_sizes = q8_vote_tensors(LION_DTYPE_F32, LION_DTYPE_F32, false);
    let tensors: Vec<LionTensorDesc> = [q8_sizes.clone(), many_tensors(), q8_sizes].concat();
    vote_matches_one_process(base, &tensors, 2, LION_VOTE_GATHER, 560);
}

/// A rank's q8 momentum evolves from its own gradients alone: each rank's checkpoint is one
/// process's (the CPU engine's) on them, and the parameters, the same on every rank, follow
/// the votes of the ranks' decoded momenta (`vote_reference`, in f32).
#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn vote_with_q8_momentum_votes_on_each_ranks_decoded_momentum() {
    require_gpu!();
    for (world, exchange, chunks) in [
        (2, LION_VOTE_SUMS, false),
        (3, LION_VOTE_GATHER, true),
        (5, LION_VOTE_SUMS, false),
    ] {
        let tensors = q8_vote_tensors(LION_DTYPE_F32, LION_DTYPE_F32, chunks);
        let config = q8(LionConfig {
            lr: 0.01,
            weight_decay: 0.1,
            ..lion_config_default()
        });
        let start = random_params(&tensors, &mut Rng::new(world as u64));
        let (steps, seed) = (3, 90 + world as u64);
        let group = Group::on_device(world);
        let results = on_gpu_ranks(&group, |rank, ctx| {
            let (opt, p) =
                stepped_vote_rank(config, &tensors, exchange, ctx, &start, steps, |step| {
                    grads_for(&tensors, rank, step, seed)
                });
            // The checkpoint loads into a new optimizer of the group, which steps on alike.
            let saved = opt.save();
            let again = rank_opt(cuda(config), &tensors, LION_DIST_VOTE, exchange, ctx)
                .unwrap_or_else(|e| panic!("{e:?}"));
            assert_eq!(again.load(&saved), LionStatus::LION_OK, "{}", last_error());
            assert!(again.save() == saved, "rank {rank}: the loaded checkpoint");
            let (mut p1, mut p2) = (p.clone(), p.clone());
            let g = grads_for(&tensors, rank, steps, seed);
            assert_eq!(dev_step(&opt, &mut p1, &g), LionStatus::LION_OK);
            assert_eq!(dev_step(&again, &mut p2, &g), LionStatus::LION_OK);
            assert!(
                p1 == p2 && opt.save() == again.save(),
                "rank {rank}: after loading"
            );
            (p.iter().map(f32s).collect::<Vec<_>>(), saved)
        });
        let (params, singles) = q8_vote_reference(&config, &tensors, &start, world, steps, seed);
        for (rank, (p, saved)) in results.iter().enumerate() {
            let label = format!("W={world} exchange={exchange}: rank {rank}");
            assert!(
                (p.iter().flatten().map(|x| x.to_bits()))
                    .eq(params.iter().flatten().map(|x| x.to_bits())),
                "{label}'s parameters"
            );
            assert!(*saved == singles[rank].save(), "{label}'s q8 momentum");
        }
    }
}

/// A step that rank 1 refuses (a NULL gradient) is skipped on rank 0 too: rank 0's call
/// returns LION_OK (it cannot know without waiting), nothing is written, nothing counted; the
/// next step goes on as if the refused one had never been.
#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn a_step_refused_on_one_rank_is_skipped_everywhere_without_a_hang() {
    require_gpu!();
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
        let config = LionConfig {
            lr: 0.01,
            ..lion_config_default()
        };
        let start = random_params(&tensors, &mut Rng::new(7));
        let group = Group::on_device(2);
        let results = on_gpu_ranks(&group, |rank, ctx| {
            let opt = rank_opt(cuda(config), &tensors, mode, LION_VOTE_AUTO, ctx).unwrap();
            let mut p = start.clone();
            let g = grads_for(&tensors, rank, 0, 7);
            let none = options(1.0, std::ptr::null());
            let refused = dev_step_with(&opt, &mut p, &g, &none, (rank == 1).then_some(2));
            let after_refused = p.iter().map(Buf::bits).collect::<Vec<_>>();
            let count = step_count(&opt);
            let st = dev_step(&opt, &mut p, &g);
            (
                refused,
                after_refused,
                count,
                st,
                p.iter().map(Buf::bits).collect::<Vec<_>>(),
            )
        });
        let label = format!("mode {mode}");
        let untouched: Vec<Vec<u32>> = start.iter().map(Buf::bits).collect();
        assert_eq!(results[0].0, LionStatus::LION_OK, "{label}");
        assert_eq!(results[1].0, LionStatus::LION_ERROR_NULL_POINTER, "{label}");
        for (rank, (_, after, count, st, last)) in results.iter().enumerate() {
            assert!(*after == untouched, "{label}: rank {rank} was written");
            assert_eq!(
                *count,
                Ok(0),
                "{label}: rank {rank} counted the refused step"
            );
            assert_eq!(*st, LionStatus::LION_OK, "{label}: rank {rank}'s next step");
            assert!(*last == results[0].4, "{label}: the ranks parted");
            assert!(
                *last != untouched,
                "{label}: rank {rank}'s next step did nothing"
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn found_inf_on_one_rank_skips_every_rank() {
    require_gpu!();
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
        let config = cuda(LionConfig {
            lr: 0.01,
            ..lion_config_default()
        });
        let start = random_params(&tensors, &mut Rng::new(8));
        let group = Group::on_device(3);
        let results = on_gpu_ranks(&group, |rank, ctx| {
            let opt = rank_opt(config, &tensors, mode, LION_VOTE_AUTO, ctx).unwrap();
            let flag = DevBuf::from_bytes(&(if rank == 2 { 1.0f32 } else { 0.0 }).to_le_bytes());
            let mut p = start.clone();
            let g = grads_for(&tensors, rank, 0, 8);
            let o = options(1.0, flag.as_ptr() as *const f32);
            let st = dev_step_with(&opt, &mut p, &g, &o, None);
            (
                st,
                p.iter().map(Buf::bits).collect::<Vec<_>>(),
                step_count(&opt),
            )
        });
        let untouched: Vec<Vec<u32>> = start.iter().map(Buf::bits).collect();
        for (rank, (st, p, count)) in results.iter().enumerate() {
            assert_eq!(*st, LionStatus::LION_OK, "mode {mode}: rank {rank}");
            assert!(*p == untouched, "mode {mode}: rank {rank} was written");
            assert_eq!(*count, Ok(0), "mode {mode}: rank {rank}");
        }
    }
}

/// In sharded mode, gradients finite on every rank whose sum overflows skip the step when
/// found_inf is given (as a GradScaler's would).
#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn gradients_that_overflow_only_once_summed_skip_the_step_everywhere() {
    require_gpu!();
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F16);
    let config = cuda(LionConfig {
        lr: 0.01,
        ..lion_config_default()
    });
    let start = random_params(&tensors, &mut Rng::new(9));
    let group = Group::on_device(2);
    let results = on_gpu_ranks(&group, |rank, ctx| {
        let opt = rank_opt(config, &tensors, LION_DIST_SHARDED, LION_VOTE_AUTO, ctx).unwrap();
        let zero = DevBuf::from_bytes(&0.0f32.to_le_bytes());
        let mut g = grads_for(&tensors, rank, 0, 9);
        if let Buf::F16(v) = &mut g[4] {
            v[4000] = half::f16::from_f32(60000.0); // f16's largest is 65504: twice overflows
        }
        let mut p = start.clone();
        let o = options(1.0, zero.as_ptr() as *const f32);
        let st = dev_step_with(&opt, &mut p, &g, &o, None);
        (
            st,
            p.iter().map(Buf::bits).collect::<Vec<_>>(),
            step_count(&opt),
        )
    });
    let untouched: Vec<Vec<u32>> = start.iter().map(Buf::bits).collect();
    for (rank, (st, p, count)) in results.iter().enumerate() {
        assert_eq!(*st, LionStatus::LION_OK, "rank {rank}");
        assert!(*p == untouched, "rank {rank} was written");
        assert_eq!(*count, Ok(0), "rank {rank}");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn ranks_created_differently_fail_alike() {
    require_gpu!();
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let tensors = tensors_of(LION_DTYPE_BF16, LION_DTYPE_F32);
        let group = Group::on_device(3);
        // Rank 2 has another seed; then rank 1 another tensor list (a hang at the first step
        // without creation's check: its collectives would have another size).
        for odd in [2usize, 1] {
            let results = on_gpu_ranks(&group, |rank, ctx| {
                let config = cuda(LionConfig {
                    lr: 0.01,
                    seed: if odd == 2 && rank == 2 { 7 } else { 1 },
                    stochastic_rounding: true,
                    ..lion_config_default()
                });
                let mine = if odd == 1 && rank == 1 {
                    &tensors[..tensors.len() - 1]
                } else {
                    &tensors[..]
                };
                rank_opt(config, mine, mode, LION_VOTE_AUTO, ctx).map(|_| ())
            });
            for (rank, r) in results.iter().enumerate() {
                let (code, message) = r.clone().expect_err("every rank must refuse");
                assert_eq!(code, LionStatus::LION_ERROR_INVALID_ARGUMENT, "rank {rank}");
                assert!(message.contains("created differently"), "{message}");
            }
        }
    }
    // Vote mode with Cautious Lion on rank 1 only: rank 1 refuses its own config after taking
    // part in the check, and rank 0 fails too instead of waiting for it.
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let group = Group::on_device(2);
    let results = on_gpu_ranks(&group, |rank, ctx| {
        let config = cuda(LionConfig {
            cautious_factor: if rank == 1 { 0.5 } else { 1.0 },
            ..lion_config_default()
        });
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
    // A value lion_create itself refuses (a negative lr) on rank 1, in both modes: rank 1
    // still joins and takes part, with no tensors read, and rank 0 fails with it.
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let results = on_gpu_ranks(&group, |rank, ctx| {
            let config = cuda(LionConfig {
                lr: if rank == 1 { -1.0 } else { 0.01 },
                ..lion_config_default()
            });
            rank_opt(config, &tensors, mode, LION_VOTE_AUTO, ctx).map(|_| ())
        });
        assert_eq!(results.len(), 2);
        assert_refused_beside(
            &results,
            1,
            LionStatus::LION_ERROR_INVALID_ARGUMENT,
            "lr",
            "a negative lr on rank 1",
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn ranks_whose_lr_differs_skip_and_say_so() {
    require_gpu!();
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let tensors = tensors_of(LION_DTYPE_BF16, LION_DTYPE_F32);
        let start = random_params(&tensors, &mut Rng::new(10));
        let group = Group::on_device(2);
        let results = on_gpu_ranks(&group, |rank, ctx| {
            let config = cuda(LionConfig {
                lr: 0.01,
                stochastic_rounding: true,
                ..lion_config_default()
            });
            let opt = rank_opt(config, &tensors, mode, LION_VOTE_AUTO, ctx).unwrap();
            if rank == 1 {
                assert_eq!(unsafe { lion_set_lr(opt.raw, 0.02) }, LionStatus::LION_OK);
            }
            let mut p = start.clone();
            let st = dev_step(&opt, &mut p, &grads_for(&tensors, rank, 0, 10));
            (
                st,
                p.iter().map(Buf::bits).collect::<Vec<_>>(),
                step_count(&opt),
            )
        });
        let untouched: Vec<Vec<u32>> = start.iter().map(Buf::bits).collect();
        for (rank, (st, p, count)) in results.iter().enumerate() {
            assert_eq!(*st, LionStatus::LION_OK, "mode {mode}: rank {rank}");
            assert!(*p == untouched, "mode {mode}: rank {rank} was written");
            let (code, message) = count.clone().expect_err("the difference must be reported");
            assert_eq!(code, LionStatus::LION_ERROR_INVALID_ARGUMENT);
            assert!(message.contains("the ranks differ"), "{message}");
        }
    }
}

/// A first step on a non-blocking stream right after creation finds what creation zeroed
/// (tests/cuda.rs `a_first_step_on_a_non_blocking_stream_finds_the_zeroed_state`, in the
/// distributed modes): NCCL with one rank, whose creation has no exchange that would wait for
/// the zeroing by the way, and whose collectives run on the step's stream (the test's own
/// collectives copy through the host, which waits). The buffers are uploaded before creation,
/// so no synchronous copy comes between creation and the step.
#[test]
#[ignore = "needs NCCL and an NVIDIA GPU (run with --ignored)"]
fn a_first_step_on_a_non_blocking_stream_finds_the_zeroed_state() {
    require_gpu!();
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let base = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        ..lion_config_default()
    };
    let cautious = LionConfig {
        cautious_factor: 0.5,
        ..base
    };
    let start = random_params(&tensors, &mut Rng::new(70));
    let grads = grads_for(&tensors, 0, 0, 70);
    for (mode, config) in [
        (LION_DIST_SHARDED, base),
        (LION_DIST_SHARDED, cautious),
        (LION_DIST_VOTE, base),
    ] {
        let upload = |b: &Buf| DevBuf::from_bytes(&le_bytes(b));
        let dp: Vec<DevBuf> = start.iter().map(upload).collect();
        let dg: Vec<DevBuf> = grads.iter().map(upload).collect();
        let opt = nccl_one_rank(config, &tensors, mode);
        let p: Vec<*mut c_void> = dp.iter().map(DevBuf::as_ptr).collect();
        let g: Vec<*const c_void> = dg.iter().map(|d| d.as_ptr() as *const c_void).collect();
        let st = gpu::step_on_a_non_blocking_stream(opt.raw, &p, &g);
        let what = format!("mode {mode}, cautious factor {}", config.cautious_factor);
        assert_eq!(st, LionStatus::LION_OK, "{what}: {}", last_error());
        let single = Opt::new(config, &tensors).unwrap();
        let (mut reference, mut g) = (start.clone(), grads.clone());
        assert_eq!(single.step(&mut reference, &mut g), LionStatus::LION_OK);
        let got = (dp.iter().zip(&start)).map(|(d, b)| from_le_bytes(b.dtype(), &d.download()));
        assert!(
            got.map(|b| b.bits()).eq(reference.iter().map(Buf::bits)),
            "{what}: parameters"
        );
        assert!(opt.save() == single.save(), "{what}: checkpoints differ");
    }
}

/// A caller's collective that leaves another context current (here none: the caller's bug,
/// such as switching devices inside it and not back) derails neither the step's later work
/// nor the thread: the engine makes the context the collective found current again.
#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn a_collective_that_leaves_no_context_current_derails_nothing() {
    require_gpu!();
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        ..lion_config_default()
    };
    let start = random_params(&tensors, &mut Rng::new(80));
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let run = |drop_context: bool| {
            let group = Group::on_device(2);
            group.drop_context.store(drop_context, Ordering::Relaxed);
            on_gpu_ranks(&group, |rank, ctx| {
                let opt = rank_opt(cuda(config), &tensors, mode, LION_VOTE_AUTO, ctx)
                    .unwrap_or_else(|e| panic!("mode {mode}: {e:?}"));
                let mut p = start.clone();
                for step in 0..2 {
                    let st = dev_step(&opt, &mut p, &grads_for(&tensors, rank, step, 80));
                    assert_eq!(st, LionStatus::LION_OK, "mode {mode}: {}", last_error());
                    assert!(
                        gpu::is_current(),
                        "mode {mode}: the step left another context current"
                    );
                }
                p.iter().map(Buf::bits).collect::<Vec<_>>()
            })
        };
        assert!(run(true) == run(false), "mode {mode}");
    }
}

fn nccl_library() -> Option<std::ffi::CString> {
    std::env::var_os("LION_NCCL_LIBRARY")
        .map(|p| std::ffi::CString::new(p.into_encoded_bytes()).unwrap())
}

/// A CUDA optimizer of `mode` over NCCL, one rank (the communicator liblion makes from a
/// unique id).
fn nccl_one_rank(config: LionConfig, tensors: &[LionTensorDesc], mode: LionDistMode) -> Opt {
    let library = nccl_library();
    let lib_ptr = library.as_ref().map_or(std::ptr::null(), |l| l.as_ptr());
    let mut id = [0u8; LION_NCCL_UNIQUE_ID_BYTES];
    let st = unsafe { lion_nccl_unique_id(lib_ptr, id.as_mut_ptr(), id.len()) };
    assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
    let dist = LionDistConfig {
        mode,
        rank: 0,
        world_size: 1,
        nccl_unique_id: id.as_ptr(),
        nccl_library: lib_ptr,
        ..lion_dist_config_default()
    };
    Opt::distributed(cuda(config), tensors, &dist)
        .unwrap_or_else(|(st, message)| panic!("mode {mode}: {st:?}: {message}"))
}

/// NCCL itself, one rank (this machine's one GPU): both modes equal one process.
#[test]
#[ignore = "needs NCCL and an NVIDIA GPU (run with --ignored)"]
fn nccl_with_one_rank_is_one_process() {
    require_gpu!();
    let library = nccl_library();
    let lib_ptr = library.as_ref().map_or(std::ptr::null(), |l| l.as_ptr());
    let mut id = [0u8; LION_NCCL_UNIQUE_ID_BYTES];
    let st = unsafe { lion_nccl_unique_id(lib_ptr, id.as_mut_ptr(), id.len()) };
    assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let tensors = tensors_of(LION_DTYPE_BF16, LION_DTYPE_BF16);
        let config = LionConfig {
            lr: 0.01,
            weight_decay: 0.1,
            stochastic_rounding: true,
            ..lion_config_default()
        };
        let opt = nccl_one_rank(config, &tensors, mode);
        let single = Opt::new(config, &tensors).unwrap();
        let start = random_params(&tensors, &mut Rng::new(11));
        let (mut p, mut reference) = (start.clone(), start);
        for step in 0..3 {
            let mut g = grads_for(&tensors, 0, step, 11);
            assert_eq!(
                dev_step(&opt, &mut p, &g),
                LionStatus::LION_OK,
                "{}",
                last_error()
            );
            assert_eq!(single.step(&mut reference, &mut g), LionStatus::LION_OK);
        }
        let want: Vec<Vec<u32>> = reference.iter().map(Buf::bits).collect();
        assert!(p.iter().map(Buf::bits).eq(want), "mode {mode}");
        assert!(
            opt.save() == single.save(),
            "mode {mode}: checkpoints differ"
        );
    }
}
