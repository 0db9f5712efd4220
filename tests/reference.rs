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
}

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
        let lr = opt.lr() as f64;
        assert_eq!(
            opt.step(&mut params, &mut grads),
            LionStatus::LION_OK,
            "{label}: {}",
            last_error()
        );
        let after_m = opt.momentum();
        for (t, desc) in case.tensors.iter().enumerate() {
            let expected = reference(
                &cfg,
                lr,
                desc,
                &before_p[t],
                &grads[t].to_f64(),
                &before_m[t],
            );
            let got_p = params[t].to_f64();
            for (i, e) in expected.iter().enumerate() {
                assert!(
                    close(desc.param_dtype, got_p[i], e.p_lo, e.p_hi, e.p_mag),
                    "{label}, step {step}, tensor {t}, element {i}: param {} not in [{}, {}]",
                    got_p[i],
                    e.p_lo,
                    e.p_hi
                );
                assert!(
                    close(cfg.state_dtype, after_m[t][i], e.m, e.m, e.m_mag),
                    "{label}, step {step}, tensor {t}, element {i}: momentum {} != {}",
                    after_m[t][i],
                    e.m
                );
            }
        }
    }
    assert_eq!(opt.step_count(), case.steps as u64);
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
        };
        run(&case, 7);
    }
}
