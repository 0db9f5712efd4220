//! The caller's floating-point environment changes nothing: a thread with flush-to-zero and
//! denormals-are-zero (`torch.set_flush_denormal(True)`) or another rounding mode gets the
//! same bits as one with the standard environment, for every thread count, and has its own
//! environment back after each call; the caller's collectives run in the caller's
//! environment. (x86-64: MXCSR; the library does the same with aarch64's FPCR.)
#![cfg(target_arch = "x86_64")]

mod common;

use std::arch::asm;
use std::cell::Cell;
use std::ffi::c_void;

use common::*;
use lion::*;

const STANDARD: u32 = 0x1F80;
/// FTZ and DAZ, as `torch.set_flush_denormal(True)` sets them.
const FLUSH: u32 = STANDARD | 0x8040;
/// Round toward +infinity (`fesetround(FE_UPWARD)`).
const UPWARD: u32 = STANDARD | 0x4000;
/// Round toward zero, with the precision flag already raised (a caller's sticky flag).
const TRUNCATE_FLAGGED: u32 = STANDARD | 0x6000 | 0x20;

fn mxcsr() -> u32 {
    let mut value = 0u32;
    unsafe { asm!("stmxcsr [{}]", in(reg) &mut value, options(nostack, preserves_flags)) };
    value
}

fn set_mxcsr(value: u32) {
    unsafe { asm!("ldmxcsr [{}]", in(reg) &value, options(nostack, readonly, preserves_flags)) };
}

/// `f` with this thread's MXCSR at `value`, whose controls must be there again after it, and
/// the status flags it had still raised (a call may raise others, as any arithmetic does).
fn under<T>(value: u32, f: impl FnOnce() -> T) -> T {
    let before = mxcsr();
    set_mxcsr(value);
    let out = f();
    let after = mxcsr();
    set_mxcsr(before);
    assert_eq!(
        after & 0xFFC0,
        value & 0xFFC0,
        "the caller's MXCSR controls were not restored"
    );
    assert_eq!(
        after & value & 0x3F,
        value & 0x3F,
        "the caller's MXCSR flags were cleared"
    );
    out
}

/// Parameters and momentum after three steps (with a checkpoint saved and loaded in between,
/// whose q8 form quantizes) under MXCSR `env`: gradients mixing subnormals (which FTZ and DAZ
/// flush) with ordinary values, on a tensor large enough for the pool and one small enough for
/// the calling thread.
fn run(config: LionConfig, param: LionDType, env: u32) -> (Vec<Vec<u32>>, Vec<u8>) {
    let tensors = [
        lion_tensor_desc(70_001, param),
        lion_tensor_desc(999, param),
    ];
    let mut rng = Rng::new(7);
    let mut params = random_params(&tensors, &mut rng);
    let grads: Vec<Vec<Buf>> = (0..3)
        .map(|step| {
            tensors
                .iter()
                .map(|t| {
                    let values: Vec<f64> = (0..t.numel as usize)
                        .map(|i| {
                            let x = rng.uniform();
                            if (i + step) % 3 == 0 {
                                x * 1e-40 // a subnormal f32
                            } else {
                                x * 1e-3
                            }
                        })
                        .collect();
                    Buf::from_f64(t.grad_dtype, &values)
                })
                .collect()
        })
        .collect();
    let opt = Opt::new(config, &tensors).unwrap();
    under(env, || {
        for (step, mut g) in grads.into_iter().enumerate() {
            assert_eq!(
                opt.step(&mut params, &mut g),
                LionStatus::LION_OK,
                "{}",
                last_error()
            );
            if step == 1 {
                let blob = opt.save();
                assert_eq!(opt.load(&blob), LionStatus::LION_OK, "{}", last_error());
            }
        }
    });
    (params.iter().map(Buf::bits).collect(), opt.save())
}

#[test]
fn the_callers_environment_changes_no_bit_and_is_restored() {
    let configs = [
        (LION_DTYPE_F32, lion_config_default()),
        (
            LION_DTYPE_BF16,
            LionConfig {
                stochastic_rounding: true,
                state_dtype: LION_DTYPE_BF16,
                ..lion_config_default()
            },
        ),
        (LION_DTYPE_F16, q8(lion_config_default())),
        (
            LION_DTYPE_F32,
            LionConfig {
                cautious_factor: 0.25,
                decay_mode: LION_DECAY_CORRECTED,
                ..q8(lion_config_default())
            },
        ),
    ];
    for (param, base) in configs {
        for num_threads in [1, 2] {
            let config = LionConfig {
                num_threads,
                weight_decay: 0.1,
                ..base
            };
            let want = run(config, param, STANDARD);
            for env in [FLUSH, UPWARD, TRUNCATE_FLAGGED] {
                let got = run(config, param, env);
                let what = format!(
                    "{} params, state {}, {num_threads} threads, MXCSR {env:#x}",
                    dtype_name(param),
                    dtype_name(config.state_dtype)
                );
                assert!(got.0 == want.0, "{what}: the parameters differ");
                assert!(got.1 == want.1, "{what}: the checkpoints differ");
            }
        }
    }
}

// The MXCSR controls this thread's collectives ran under (or'ed: one value if all agree).
thread_local!(static SEEN: Cell<Option<u32>> = const { Cell::new(None) });

/// The test group's collectives (the same functions for every rank), which the recording
/// ones below call.
static INNER: std::sync::OnceLock<[LionCollectiveFn; 3]> = std::sync::OnceLock::new();

unsafe extern "C" fn record_then<const OP: usize>(
    context: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: LionCommDType,
    stream: *mut c_void,
) -> i32 {
    // The control bits (the low six are flags, raised by the arithmetic in between).
    let controls = mxcsr() & 0xFFC0;
    // A mismatch is kept rather than asserted here: a panic cannot leave a C function.
    SEEN.with(|s| s.set(Some(s.get().map_or(controls, |seen| seen | controls))));
    INNER.get().unwrap()[OP].unwrap()(context, send, recv, count, dtype, stream)
}

#[test]
fn the_callers_collectives_run_in_the_callers_environment() {
    let group = common::ranks::Group::new(2);
    let seen = common::ranks::on_group(&group, |rank, ctx| {
        let table = common::ranks::collectives(ctx);
        INNER.get_or_init(|| {
            [
                table.all_reduce_sum,
                table.reduce_scatter_sum,
                table.all_gather,
            ]
        });
        let recording = LionCollectives {
            all_reduce_sum: Some(record_then::<0>),
            reduce_scatter_sum: Some(record_then::<1>),
            all_gather: Some(record_then::<2>),
            ..table
        };
        let tensors = [lion_tensor_desc(1001, LION_DTYPE_F32)];
        let mut p = random_params(&tensors, &mut Rng::new(1));
        let mut g = random_grads(&tensors, 1.0, &mut Rng::new(2 + rank as u64));
        under(FLUSH, || {
            let dist = LionDistConfig {
                mode: LION_DIST_SHARDED,
                rank: rank as i32,
                world_size: 2,
                collectives: &recording,
                ..lion_dist_config_default()
            };
            let opt = Opt::distributed(lion_config_default(), &tensors, &dist).unwrap();
            assert_eq!(
                opt.step(&mut p, &mut g),
                LionStatus::LION_OK,
                "{}",
                last_error()
            );
        });
        SEEN.with(|s| s.get())
    });
    for (rank, seen) in seen.into_iter().enumerate() {
        assert_eq!(
            seen,
            Some(FLUSH & 0xFFC0),
            "rank {rank}: the collectives ran under another MXCSR"
        );
    }
}
