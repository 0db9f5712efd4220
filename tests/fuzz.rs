//! Property-based fuzzing (proptest: cargo-fuzz needs a nightly toolchain, which this project
//! does not use) of the two entry points that take untrusted bytes: `lion_state_load` and
//! `lion_create`. No input may panic (LION_ERROR_PANIC), crash, or be accepted when corrupt;
//! a refused load changes nothing. A short run is part of the test suite; a longer one:
//!
//!   PROPTEST_CASES=200000 cargo test --release --test fuzz

mod common;

use common::*;
use lion::*;
use proptest::prelude::*;
use xxhash_rust::xxh3::xxh3_128;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

fn tensors() -> Vec<LionTensorDesc> {
    vec![
        lion_tensor_desc(37, LION_DTYPE_F32),
        lion_tensor_desc(0, LION_DTYPE_BF16),
        lion_tensor_desc(300, LION_DTYPE_F16),
    ]
}

fn optimizer(state_dtype: LionDType) -> Opt {
    let opt = Opt::new(
        LionConfig {
            state_dtype,
            lr: 0.01,
            ..lion_config_default()
        },
        &tensors(),
    )
    .unwrap();
    let mut rng = common::Rng::new(4);
    let mut p = random_params(&opt.tensors, &mut rng);
    let mut g = random_grads(&opt.tensors, 1.0, &mut rng);
    assert_eq!(opt.step(&mut p, &mut g), LionStatus::LION_OK);
    opt
}

/// Re-seals a blob with a valid checksum, so that mutations reach the parser behind it.
fn reseal(blob: &mut [u8]) {
    let n = blob.len();
    if n >= 16 {
        let sum = xxh3_128(&blob[..n - 16]).to_le_bytes();
        blob[n - 16..].copy_from_slice(&sum);
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Truncate(usize),
    Extend(Vec<u8>),
    Splice { at: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..32)
        )
            .prop_map(|(at, bytes)| Mutation::Splice { at, bytes }),
    ]
}

fn apply(blob: &[u8], m: &Mutation) -> Vec<u8> {
    let mut b = blob.to_vec();
    match m {
        Mutation::Flip { at, bit } => b[at % blob.len()] ^= 1 << bit,
        Mutation::Set { at, byte } => b[at % blob.len()] = *byte,
        Mutation::Truncate(n) => b.truncate(n % blob.len()),
        Mutation::Extend(extra) => b.extend(extra),
        Mutation::Splice { at, bytes } => {
            let at = at % blob.len();
            let end = (at + bytes.len()).min(b.len());
            b[at..end].copy_from_slice(&bytes[..end - at]);
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_blobs_are_refused_and_change_nothing(ms in proptest::collection::vec(mutation(), 1..4), sealed in any::<bool>(), bf16 in any::<bool>()) {
        let source = optimizer(if bf16 { LION_DTYPE_BF16 } else { LION_DTYPE_F32 });
        let target = optimizer(LION_DTYPE_F32);
        let good = source.save();
        let mut blob = good.clone();
        for m in &ms {
            if blob.is_empty() { break; }
            blob = apply(&blob, m);
        }
        if sealed { reseal(&mut blob); }
        let before = target.save();
        let st = target.load(&blob);
        prop_assert_ne!(st, LionStatus::LION_ERROR_PANIC, "{}", last_error());
        if st == LionStatus::LION_OK {
            // Accepted: only a blob whose checksum holds (unchanged, or re-sealed) may load.
            prop_assert!(blob == good || sealed);
        } else {
            prop_assert_eq!(st, LionStatus::LION_ERROR_CORRUPT_STATE, "{}", last_error());
            prop_assert!(target.save() == before, "a refused load changed the optimizer");
        }
    }

    #[test]
    fn random_bytes_are_never_a_checkpoint(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let target = optimizer(LION_DTYPE_F32);
        prop_assert_eq!(target.load(&bytes), LionStatus::LION_ERROR_CORRUPT_STATE);
    }

    #[test]
    fn any_config_and_tensors_are_answered_cleanly(
        raw in proptest::collection::vec(any::<u8>(), 64),
        size in prop_oneof![Just(64u32), 0u32..200, Just(u32::MAX)],
        tail_zero in any::<bool>(),
        descs in proptest::collection::vec((prop_oneof![0u64..5000, any::<u64>()], 0u32..4, 0u32..4, any::<f32>(), any::<f32>()), 1..5),
        good_floats in any::<bool>(),
    ) {
        // Config: random bytes, with sizes around version 1, and random or zero tails.
        let mut bytes = vec![0u8; 4096 + 64];
        bytes[..64].copy_from_slice(&raw);
        bytes[..4].copy_from_slice(&size.to_le_bytes());
        if !tail_zero { bytes[64 + (size as usize % 32)] = 1; }
        if good_floats {
            // Plausible values in the float fields, so that more inputs get past validation.
            let d = lion_config_default();
            for (off, v) in [(4, d.lr), (8, d.beta1), (12, d.beta2), (16, 0.1f32), (24, 1.0)] {
                bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
            }
            for off in [20usize, 28, 32, 36, 40, 44, 56] { bytes[off..off + 4].fill(0); }
        }
        let tensors: Vec<LionTensorDesc> = descs.iter().map(|&(numel, p, g, lr_scale, wd_scale)| LionTensorDesc {
            numel, param_dtype: p, grad_dtype: g,
            lr_scale: if good_floats { lr_scale.abs().min(10.0) } else { lr_scale },
            weight_decay_scale: if good_floats { wd_scale.abs().min(10.0) } else { wd_scale },
        }).collect();
        let mut out = std::ptr::null_mut();
        let st = unsafe { lion_create(bytes.as_ptr() as *const LionConfig, tensors.as_ptr(), tensors.len(), &mut out) };
        prop_assert_ne!(st, LionStatus::LION_ERROR_PANIC, "{}", last_error());
        if st == LionStatus::LION_OK {
            prop_assert!(!out.is_null());
            unsafe { lion_destroy(out) };
        } else {
            prop_assert!(out.is_null());
            prop_assert!(!last_error().is_empty());
        }
    }
}
