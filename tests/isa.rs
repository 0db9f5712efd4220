//! Every instruction-set level computes the same bits. One test in this binary, because it
//! sets LION_CPU_ISA (and LION_CPU_CHUNK), which the library reads when an optimizer is
//! created.

mod common;

use common::dist::{grads_for, rank_opt, tensors_of};
use common::ranks::{on_group, Group};
use common::*;
use lion::*;

fn run(tensors: &[LionTensorDesc], config: LionConfig) -> Vec<Vec<u32>> {
    let opt = Opt::new(config, tensors).unwrap();
    let mut rng = Rng::new(11);
    let mut params: Vec<Buf> = random_params(tensors, &mut rng);
    for _ in 0..2 {
        let mut grads: Vec<Buf> = random_grads(tensors, 1.0, &mut rng);
        assert_eq!(opt.step(&mut params, &mut grads), LionStatus::LION_OK);
    }
    let mut out: Vec<Vec<u32>> = params.iter().map(Buf::bits).collect();
    out.push(opt.save().iter().map(|&b| b as u32).collect());
    out
}

/// The levels below the best that this CPU has (LION_CPU_ISA asks for at most a level, and a
/// level the CPU lacks would quietly run the best one, comparing it with itself). The same
/// features as `Isa::best_available`.
fn levels() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
        let mut levels = vec!["baseline"];
        if avx2 {
            levels.push("avx2");
        }
        if avx512 {
            levels.push("avx512");
        }
        // The best level is compared with each of these: at least two must differ.
        assert!(
            avx2,
            "this CPU has no AVX2: nothing above baseline to compare"
        );
        levels
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("ignored off x86-64")
}

#[test]
#[cfg_attr(
    not(target_arch = "x86_64"),
    ignore = "compares x86-64 instruction sets"
)]
fn every_isa_level_gives_the_same_bits() {
    let levels = levels();
    eprintln!("levels compared with the best: {levels:?}");
    let mut tensors = Vec::new();
    for p in DTYPES {
        for g in DTYPES {
            tensors.push(LionTensorDesc {
                grad_dtype: g,
                ..lion_tensor_desc(1000 + tensors.len() as u64, p)
            });
        }
    }
    for state in STATE_DTYPES {
        for (cf, sr, cwd) in [(1.0, false, false), (1.0, false, true), (0.3, true, true)] {
            let config = LionConfig {
                lr: 0.01,
                weight_decay: 0.2,
                cautious_factor: cf,
                cautious_weight_decay: cwd,
                state_dtype: state,
                stochastic_rounding: sr,
                seed: 77,
                ..lion_config_default()
            };
            std::env::remove_var("LION_CPU_ISA");
            let best = run(&tensors, config);
            for &level in &levels {
                std::env::set_var("LION_CPU_ISA", level);
                assert!(
                    run(&tensors, config) == best,
                    "{level} differs (state {state}, sr {sr})"
                );
            }
            std::env::remove_var("LION_CPU_ISA");
        }
    }
    // 8-bit momentum: tensors from 4096 elements (odd tails), every pair, on the pool; the same
    // bits at every level and for chunk sizes that are no multiple of a q8 block (its chunks
    // are rounded up to whole blocks).
    let q8_tensors: Vec<LionTensorDesc> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| LionTensorDesc {
            numel: 8000 + 37 * i as u64,
            ..*t
        })
        .collect();
    for (cf, sr) in [(1.0, false), (0.3, true)] {
        let config = LionConfig {
            lr: 0.01,
            weight_decay: 0.2,
            cautious_factor: cf,
            cautious_weight_decay: true,
            state_dtype: LION_DTYPE_Q8,
            stochastic_rounding: sr,
            seed: 78,
            num_threads: 2,
            ..lion_config_default()
        };
        let best = run(&q8_tensors, config);
        for &level in &levels {
            std::env::set_var("LION_CPU_ISA", level);
            assert!(
                run(&q8_tensors, config) == best,
                "q8: {level} differs (sr {sr})"
            );
        }
        std::env::remove_var("LION_CPU_ISA");
        for chunk in ["1024", "1280", "3000"] {
            std::env::set_var("LION_CPU_CHUNK", chunk);
            assert!(
                run(&q8_tensors, config) == best,
                "q8: LION_CPU_CHUNK={chunk} differs (sr {sr})"
            );
        }
        std::env::remove_var("LION_CPU_CHUNK");
    }
    // The vote mode's kernels (dispatched on their own), on two in-process ranks, both
    // exchanges, every parameter dtype, stochastic rounding and cautious weight decay.
    for (p, exchange) in [
        (LION_DTYPE_F32, LION_VOTE_GATHER),
        (LION_DTYPE_BF16, LION_VOTE_SUMS),
        (LION_DTYPE_F16, LION_VOTE_GATHER),
    ] {
        let config = LionConfig {
            lr: 0.01,
            weight_decay: 0.2,
            cautious_weight_decay: true,
            stochastic_rounding: p != LION_DTYPE_F32,
            seed: 79,
            num_threads: 1,
            ..lion_config_default()
        };
        let tensors = tensors_of(p, LION_DTYPE_F32);
        let vote = || {
            on_group(&Group::new(2), |rank, ctx| {
                let opt = rank_opt(config, &tensors, LION_DIST_VOTE, exchange, ctx).unwrap();
                let mut params = random_params(&tensors, &mut Rng::new(12));
                for step in 0..2 {
                    let mut grads = grads_for(&tensors, rank, step, 13);
                    assert_eq!(opt.step(&mut params, &mut grads), LionStatus::LION_OK);
                }
                params.iter().map(Buf::bits).collect::<Vec<_>>()
            })
        };
        std::env::remove_var("LION_CPU_ISA");
        let best = vote();
        for &level in &levels {
            std::env::set_var("LION_CPU_ISA", level);
            assert!(vote() == best, "vote: {level} differs (p {p})");
        }
        std::env::remove_var("LION_CPU_ISA");
    }
}
