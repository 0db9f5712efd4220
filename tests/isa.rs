//! Every instruction-set level computes the same bits. One test in this binary, because it
//! sets LION_CPU_ISA, which the library reads when an optimizer is created.

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
}
