//! Every instruction-set level computes the same bits. One test in this binary, because it
//! sets LION_CPU_ISA (and LION_CPU_CHUNK), which the library reads when an optimizer is
//! created.

mod common;

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

#[test]
fn every_isa_level_gives_the_same_bits() {
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
            for level in ["baseline", "avx2", "avx512"] {
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
        for level in ["baseline", "avx2", "avx512"] {
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
}
