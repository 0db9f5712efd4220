//! Every dtype combination and option of the update, on odd sizes and tails, against the f64
//! reference of ABI.md: each step starts from the values the library stored (read back
//! through a checkpoint), so rounding is checked step by step rather than accumulated.

mod common;

use common::*;
use lion::*;

struct Case {
    config: LionConfig,
    tensors: Vec<LionTensorDesc>,
    steps: usize,
    grad_scale: f64,
    /// Step options from the second step on: (grad_scale, lr override); the third step also
    /// passes a found_inf of 1 first (a skipped step).
    options: Option<(f32, f32)>,
}

/// 8-bit momentum's sizes: small tensors (f32 momentum) on both sides of 4096, a partial
/// last block, one past a chunk (16384) with a partial block.
const Q8_SIZES: [u64; 7] = [1, 7, 0, 4095, 4096, 4096 + 37, 16384 + 300 + 37];

/// Sizes that cross every boundary: one element, less than a SIMD vector, block (512) and
/// chunk (16384) tails, and an empty tensor.
const SIZES: [u64; 6] = [1, 7, 0, 513, 1029, 16384 + 37];

fn tensors_for(param: LionDType, grad: LionDType) -> Vec<LionTensorDesc> {
    scaled_tensors(&SIZES, param, grad)
}

fn run(case: &Case, seed: u64) {
    let cfg = case.config;
    let label = format!(
        "p={} g={} s={} decay={} cf={} cwd={} sr={} threads={}",
        dtype_name(case.tensors[0].param_dtype),
        dtype_name(case.tensors[0].grad_dtype),
        dtype_name(cfg.state_dtype),
        cfg.decay_mode,
        cfg.cautious_factor,
        cfg.cautious_weight_decay,
        cfg.stochastic_rounding,
        cfg.num_threads
    );
    let opt = Opt::new(cfg, &case.tensors).unwrap_or_else(|e| panic!("{label}: {e:?}"));
    let mut rng = Rng::new(seed);
    let mut params: Vec<Buf> = random_params(&case.tensors, &mut rng);
    for step in 0..case.steps {
        if step == 2 {
            assert_eq!(
                unsafe { lion_set_lr(opt.raw, cfg.lr * 0.5) },
                LionStatus::LION_OK
            );
        }
        let mut grads: Vec<Buf> = random_grads(&case.tensors, case.grad_scale, &mut rng);
        let before_p: Vec<Vec<f64>> = params.iter().map(Buf::to_f64).collect();
        let before_m = opt.momentum();
        let mut lr = opt.lr() as f64;
        let mut g_scale = 1.0;
        match case.options.filter(|_| step > 0) {
            None => assert_eq!(
                opt.step(&mut params, &mut grads),
                LionStatus::LION_OK,
                "{label}: {}",
                last_error()
            ),
            Some((grad_scale, step_lr)) => {
                if step == 2 {
                    // A skipped step writes nothing.
                    let before = opt.save();
                    let one = 1.0f32;
                    assert_eq!(
                        step_with_options(&opt, &mut params, &mut grads, grad_scale, &one, None),
                        LionStatus::LION_OK
                    );
                    assert!(opt.save() == before, "{label}: a skipped step wrote");
                    let now: Vec<Vec<f64>> = params.iter().map(Buf::to_f64).collect();
                    assert!(now == before_p, "{label}: a skipped step wrote");
                }
                let zero = 0.0f32;
                assert_eq!(
                    step_with_options(
                        &opt,
                        &mut params,
                        &mut grads,
                        grad_scale,
                        &zero,
                        Some(step_lr)
                    ),
                    LionStatus::LION_OK,
                    "{label}: {}",
                    last_error()
                );
                lr = step_lr as f64;
                g_scale = grad_scale as f64;
            }
        }
        let after_m = opt.momentum();
        for (t, desc) in case.tensors.iter().enumerate() {
            // The scaled gradient, as the update sees it (f32 times grad_scale: exact for the
            // powers of two used here).
            let g: Vec<f64> = grads[t].to_f64().iter().map(|g| g * g_scale).collect();
            let expected = reference(&cfg, lr, desc, &before_p[t], &g, &before_m[t]);
            let got_p = params[t].to_f64();
            for (i, e) in expected.iter().enumerate() {
                assert!(
                    close(desc.param_dtype, got_p[i], e.p_lo, e.p_hi, e.p_mag),
                    "{label}, step {step}, tensor {t}, element {i}: param {} not in [{}, {}]",
                    got_p[i],
                    e.p_lo,
                    e.p_hi
                );
                if cfg.state_dtype == LION_DTYPE_Q8 {
                    continue; // by block, below
                }
                assert!(
                    close(cfg.state_dtype, after_m[t][i], e.m, e.m, e.m_mag),
                    "{label}, step {step}, tensor {t}, element {i}: momentum {} != {}",
                    after_m[t][i],
                    e.m
                );
            }
            if cfg.state_dtype == LION_DTYPE_Q8 {
                let at = format!("{label}, step {step}, tensor {t}");
                check_q8(desc.numel, &after_m[t], &expected, &at);
            }
        }
    }
    assert_eq!(opt.step_count(), case.steps as u64);
}

/// `lion_step_with_options` with `grad_scale`, `*found_inf` and an optional lr.
fn step_with_options(
    opt: &Opt,
    params: &mut [Buf],
    grads: &mut [Buf],
    grad_scale: f32,
    found_inf: &f32,
    lr: Option<f32>,
) -> LionStatus {
    let p: Vec<*mut std::ffi::c_void> = params.iter_mut().map(|b| b.ptr()).collect();
    let g: Vec<*const std::ffi::c_void> = grads.iter_mut().map(|b| b.ptr() as *const _).collect();
    let lr_value = lr.unwrap_or(0.0);
    let options = LionStepOptions {
        grad_scale,
        found_inf,
        lr: if lr.is_some() {
            &lr_value
        } else {
            std::ptr::null()
        },
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

/// The f64 reference of the q8 encoder, per block of 256 (`q8_close`): the block's scale is
/// its largest new momentum, kept within [2^-112, the f32 below f32::MAX] (0 for zeros),
/// each element the nearest code value, signs kept. Tensors under
/// 4096 elements keep f32 momentum.
// MIRROR(q8): src/numerics/q8.rs encode_block (exact there, in f32; here in f64 with
// tolerances)
fn check_q8(numel: u64, got: &[f64], expected: &[Expected], at: &str) {
    if numel < Q8_MIN_NUMEL {
        for (i, e) in expected.iter().enumerate() {
            assert!(
                close(LION_DTYPE_F32, got[i], e.m, e.m, e.m_mag),
                "{at}, element {i} (f32 momentum): {} != {}",
                got[i],
                e.m
            );
        }
        return;
    }
    let eps = f32::EPSILON as f64;
    for (b, (got, expected)) in got
        .chunks(Q8_BLOCK)
        .zip(expected.chunks(Q8_BLOCK))
        .enumerate()
    {
        let scale = q8_scale(&expected.iter().map(|e| e.m).collect::<Vec<_>>());
        for (j, (&x, e)) in got.iter().zip(expected).enumerate() {
            let slack = 8.0 * eps * (e.m_mag + scale) + 1e-38;
            assert!(
                q8_close(e.m, x, scale, slack),
                "{at}, element {}: momentum {x}, reference {} (block scale {scale})",
                b * Q8_BLOCK + j,
                e.m
            );
        }
    }
}

fn base_config() -> LionConfig {
    LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        ..lion_config_default()
    }
}

#[test]
fn every_dtype_combination_matches_the_reference() {
    let mut seed = 1;
    for (param, grad, config) in dtype_configs(base_config()) {
        let case = Case {
            config,
            tensors: tensors_for(param, grad),
            steps: 3,
            grad_scale: 1.0,
            options: None,
        };
        seed += 1;
        run(&case, seed);
    }
}

#[test]
fn every_option_matches_the_reference() {
    let mut seed = 100;
    for options in option_configs(base_config()) {
        for (param, state) in [
            (LION_DTYPE_F32, LION_DTYPE_F32),
            (LION_DTYPE_BF16, LION_DTYPE_BF16),
        ] {
            let case = Case {
                config: LionConfig {
                    state_dtype: state,
                    ..options
                },
                tensors: tensors_for(param, LION_DTYPE_F32),
                steps: 4,
                grad_scale: 1e-3,
                options: None,
            };
            seed += 1;
            run(&case, seed);
        }
    }
}

#[test]
fn betas_at_their_bounds_and_zero_lr() {
    for (beta1, beta2, lr) in [(0.0, 0.0, 0.01), (1.0, 1.0, 0.01), (0.9, 0.99, 0.0)] {
        let config = LionConfig {
            beta1,
            beta2,
            lr,
            weight_decay: 0.1,
            ..lion_config_default()
        };
        let case = Case {
            config,
            tensors: tensors_for(LION_DTYPE_F32, LION_DTYPE_F32),
            steps: 3,
            grad_scale: 1.0,
            options: None,
        };
        run(&case, 7);
    }
}

#[test]
fn q8_every_dtype_combination_matches_the_reference() {
    let mut seed = 500;
    for param in DTYPES {
        for grad in DTYPES {
            for stochastic_rounding in [false, true] {
                let case = Case {
                    config: LionConfig {
                        state_dtype: LION_DTYPE_Q8,
                        stochastic_rounding,
                        seed: 42,
                        ..base_config()
                    },
                    tensors: scaled_tensors(&Q8_SIZES, param, grad),
                    steps: 4,
                    grad_scale: 1.0,
                    options: None,
                };
                seed += 1;
                run(&case, seed);
            }
        }
    }
}

#[test]
fn q8_every_option_matches_the_reference() {
    let mut seed = 600;
    for options in option_configs(base_config()) {
        for param in [LION_DTYPE_F32, LION_DTYPE_BF16] {
            let case = Case {
                config: LionConfig {
                    state_dtype: LION_DTYPE_Q8,
                    stochastic_rounding: param == LION_DTYPE_BF16,
                    ..options
                },
                tensors: scaled_tensors(&Q8_SIZES, param, LION_DTYPE_F32),
                steps: 4,
                grad_scale: 1e-3,
                options: None,
            };
            seed += 1;
            run(&case, seed);
        }
    }
}

#[test]
fn q8_step_options_match_the_reference() {
    // grad_scale, an lr read from the options, and a found_inf that skips a step.
    for (param, grad) in [
        (LION_DTYPE_F32, LION_DTYPE_F32),
        (LION_DTYPE_BF16, LION_DTYPE_F16),
    ] {
        let case = Case {
            config: LionConfig {
                state_dtype: LION_DTYPE_Q8,
                cautious_factor: 0.25,
                ..base_config()
            },
            tensors: scaled_tensors(&Q8_SIZES, param, grad),
            steps: 4,
            grad_scale: 8.0,
            options: Some((0.125, 0.004)),
        };
        run(&case, 700);
    }
}

/// q8 momentum at the ends of f32's range moves the parameters as f32 momentum does: a block
/// whose momentum decays toward 0 (zero gradients, beta2 0.99) keeps every sign (its scale
/// was its largest |m|, and under 4.7e-35 the codes collapsed and under 1.1e-41 decoded to
/// 0: the parameters stopped where f32 momentum still moves them), and momentum of f32::MAX
/// decodes finite (its top code decoded to an infinity, and the block turned NaN).
#[test]
fn q8_momentum_at_the_ends_of_f32_moves_the_parameters_as_f32_momentum_does() {
    let n = 4096;
    let tensors = [lion_tensor_desc(n as u64, LION_DTYPE_F32)];
    for (beta2, first, steps) in [(0.99f32, 1e-30f64, 3000), (0.0, f32::MAX as f64, 4)] {
        let config = |state_dtype| LionConfig {
            lr: 1.0 / 1024.0,
            beta2,
            state_dtype,
            num_threads: 1,
            ..lion_config_default()
        };
        let f32_state = Opt::new(config(LION_DTYPE_F32), &tensors).unwrap();
        let q8_state = Opt::new(config(LION_DTYPE_Q8), &tensors).unwrap();
        let mut p = [
            vec![Buf::from_f64(LION_DTYPE_F32, &vec![1.0; n])],
            vec![Buf::from_f64(LION_DTYPE_F32, &vec![1.0; n])],
        ];
        for step in 0..steps {
            // Signs alternating by element; the first gradient sets the momentum's size.
            let g: Vec<f64> = (0..n)
                .map(|i| match step {
                    0 => {
                        if i % 2 == 0 {
                            first
                        } else {
                            -first
                        }
                    }
                    _ if beta2 == 0.0 => 1.0,
                    _ => 0.0,
                })
                .collect();
            for (opt, p) in [&f32_state, &q8_state].into_iter().zip(p.iter_mut()) {
                let mut grads = vec![Buf::from_f64(LION_DTYPE_F32, &g)];
                assert_eq!(opt.step(p, &mut grads), LionStatus::LION_OK);
            }
            let (a, b) = (p[0][0].to_f64(), p[1][0].to_f64());
            assert!(
                b.iter().all(|v| v.is_finite()),
                "beta2 {beta2}, step {step}: q8 parameters not finite"
            );
            assert!(
                a == b,
                "beta2 {beta2}, step {step}: q8 momentum moved the parameters otherwise than f32's"
            );
        }
    }
}

/// Cautious weight decay decays only where u*p > 0 (ABI.md's mask): where the product is NaN
/// (an infinite parameter, u = 0) it spares the parameter as where it is 0. The code's
/// `u * p <= 0` decayed it, and a decay factor of 1 made inf * 0 = NaN.
#[test]
fn cautious_weight_decay_spares_where_u_times_p_is_not_positive() {
    let tensors = [lion_tensor_desc(3, LION_DTYPE_F32)];
    // A decay factor of exactly 1: decoupled, lr the initial lr, weight decay 1.
    let config = LionConfig {
        lr: 0.5,
        weight_decay: 1.0,
        decay_mode: LION_DECAY_DECOUPLED,
        cautious_weight_decay: true,
        num_threads: 1,
        ..lion_config_default()
    };
    let opt = Opt::new(config, &tensors).unwrap();
    let mut p = vec![Buf::from_f64(
        LION_DTYPE_F32,
        &[f64::INFINITY, 2.0, f64::NEG_INFINITY],
    )];
    let mut g = vec![Buf::from_f64(LION_DTYPE_F32, &[0.0; 3])];
    assert_eq!(opt.step(&mut p, &mut g), LionStatus::LION_OK);
    assert_eq!(p[0].to_f64(), vec![f64::INFINITY, 2.0, f64::NEG_INFINITY]);
}
