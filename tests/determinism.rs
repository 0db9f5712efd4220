//! Results do not depend on the thread count: every combination of options, with
//! stochastic rounding and Cautious Lion's per-tensor count, gives the same bits on 1..N
//! threads, and the same seed gives the same run twice.

mod common;

use common::*;
use lion::*;

fn tensors() -> Vec<LionTensorDesc> {
    // Large enough to run on the pool (several chunks per tensor), with ragged tails.
    [70_001u64, 3, 40_000, 16_384 * 3 + 5]
        .iter()
        .zip([
            LION_DTYPE_BF16,
            LION_DTYPE_F16,
            LION_DTYPE_F32,
            LION_DTYPE_BF16,
        ])
        .map(|(&n, d)| LionTensorDesc {
            grad_dtype: LION_DTYPE_F32,
            ..lion_tensor_desc(n, d)
        })
        .collect()
}

/// Runs 3 steps and returns the bits of every parameter and the checkpoint.
fn run(config: LionConfig) -> (Vec<Vec<u32>>, Vec<u8>) {
    let tensors = tensors();
    let opt = Opt::new(config, &tensors).unwrap();
    let mut rng = Rng::new(5);
    let mut params: Vec<Buf> = random_params(&tensors, &mut rng);
    for _ in 0..3 {
        let mut grads: Vec<Buf> = random_grads(&tensors, 1.0, &mut rng);
        assert_eq!(
            opt.step(&mut params, &mut grads),
            LionStatus::LION_OK,
            "{}",
            last_error()
        );
    }
    (params.iter().map(Buf::bits).collect(), opt.save())
}

#[test]
fn same_bits_for_every_thread_count() {
    for (cautious_factor, sr) in [(1.0, false), (0.0, true), (0.5, true)] {
        let config = |num_threads| LionConfig {
            lr: 0.01,
            weight_decay: 0.1,
            cautious_factor,
            cautious_weight_decay: true,
            state_dtype: LION_DTYPE_BF16,
            stochastic_rounding: sr,
            seed: 1234,
            num_threads,
            ..lion_config_default()
        };
        let (want_p, want_state) = run(config(1));
        for threads in [2, 3, 8, 0] {
            let (p, state) = run(config(threads));
            assert!(
                p == want_p,
                "params differ on {threads} threads (cf={cautious_factor}, sr={sr})"
            );
            assert!(state == want_state, "state differs on {threads} threads");
        }
    }
}

#[test]
fn the_seed_decides_stochastic_rounding() {
    let config = |seed| LionConfig {
        stochastic_rounding: true,
        state_dtype: LION_DTYPE_BF16,
        seed,
        ..lion_config_default()
    };
    assert!(run(config(9)) == run(config(9)));
    assert!(run(config(9)).0 != run(config(10)).0);
}

#[test]
fn stochastic_rounding_is_unbiased_where_nearest_stalls() {
    // A bf16 parameter of 1.0 with lr far below its half-ulp (2^-9): rounding to nearest
    // never moves it, stochastic rounding moves it by lr per step on average.
    let n = 20_000u64;
    let lr = 2e-4f32;
    let steps = 10;
    let mean_after = |sr: bool| {
        let config = LionConfig {
            lr,
            stochastic_rounding: sr,
            seed: 3,
            ..lion_config_default()
        };
        let t = [lion_tensor_desc(n, LION_DTYPE_BF16)];
        let opt = Opt::new(config, &t).unwrap();
        let mut p = vec![Buf::from_f64(LION_DTYPE_BF16, &vec![1.0; n as usize])];
        for _ in 0..steps {
            let mut g = vec![Buf::from_f64(LION_DTYPE_BF16, &vec![1.0; n as usize])];
            assert_eq!(opt.step(&mut p, &mut g), LionStatus::LION_OK);
        }
        p[0].to_f64().iter().sum::<f64>() / n as f64
    };
    assert_eq!(mean_after(false), 1.0);
    let want = 1.0 - (steps as f64) * lr as f64;
    let got = mean_after(true);
    assert!(
        (got - want).abs() < 0.05 * (1.0 - want),
        "mean {got}, want {want}"
    );
}

#[test]
fn q8_same_bits_for_every_thread_count() {
    // 8-bit momentum: a block of 256 (one scale) is always one thread's.
    for (cautious_factor, sr) in [(1.0, false), (0.0, true), (0.5, true)] {
        let config = |num_threads| LionConfig {
            lr: 0.01,
            weight_decay: 0.1,
            cautious_factor,
            cautious_weight_decay: true,
            state_dtype: LION_DTYPE_Q8,
            stochastic_rounding: sr,
            seed: 99,
            num_threads,
            ..lion_config_default()
        };
        let (want_p, want_state) = run(config(1));
        for threads in [2, 3, 8, 0] {
            let (p, state) = run(config(threads));
            assert!(
                p == want_p,
                "q8: params differ on {threads} threads (cf={cautious_factor}, sr={sr})"
            );
            assert!(
                state == want_state,
                "q8: state differs on {threads} threads"
            );
        }
    }
}
