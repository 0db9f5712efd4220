//! Checkpoints: a saved state restores the run exactly; a truncated, modified, other-version
//! or other-layout blob is refused with CORRUPT_STATE and leaves the optimizer as it was.

mod common;

use common::*;
use lion::*;
use xxhash_rust::xxh3::xxh3_128;

fn tensors(dtype: LionDType) -> Vec<LionTensorDesc> {
    vec![
        lion_tensor_desc(1001, dtype),
        lion_tensor_desc(0, dtype),
        lion_tensor_desc(77, dtype),
    ]
}

fn trained(config: LionConfig, steps: usize) -> (Opt, Vec<Buf>, Rng) {
    let t = tensors(LION_DTYPE_F32);
    let opt = Opt::new(config, &t).unwrap();
    let mut rng = Rng::new(21);
    let mut params: Vec<Buf> = random_params(&t, &mut rng);
    for _ in 0..steps {
        let mut grads: Vec<Buf> = random_grads(&t, 1.0, &mut rng);
        assert_eq!(opt.step(&mut params, &mut grads), LionStatus::LION_OK);
    }
    (opt, params, rng)
}

fn config() -> LionConfig {
    LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.0,
        ..lion_config_default()
    }
}

#[test]
fn a_loaded_state_continues_the_run_bit_for_bit() {
    let (a, mut params, mut rng) = trained(config(), 3);
    assert_eq!(unsafe { lion_set_lr(a.raw, 0.005) }, LionStatus::LION_OK);
    let blob = a.save();
    let b = Opt::new(config(), &a.tensors).unwrap();
    assert_eq!(b.load(&blob), LionStatus::LION_OK, "{}", last_error());
    assert_eq!(b.step_count(), 3);
    assert_eq!(b.lr(), 0.005);
    assert_eq!(b.save(), blob);
    let mut params_b = params.clone();
    let mut grads: Vec<Buf> = random_grads(&a.tensors, 1.0, &mut rng);
    assert_eq!(a.step(&mut params, &mut grads), LionStatus::LION_OK);
    assert_eq!(b.step(&mut params_b, &mut grads), LionStatus::LION_OK);
    assert_eq!(params, params_b);
    assert_eq!(a.save(), b.save());
}

#[test]
fn bf16_state_halves_the_blob_and_converts_both_ways() {
    let (f32_opt, _, _) = trained(config(), 2);
    let bf16_config = LionConfig {
        state_dtype: LION_DTYPE_BF16,
        ..config()
    };
    let bf16_opt = Opt::new(bf16_config, &f32_opt.tensors).unwrap();
    let (big, small) = (f32_opt.save().len(), bf16_opt.save().len());
    let momentum_elems = 1001 + 77;
    assert_eq!(big - small, momentum_elems * 2);
    assert!((small as f64) < 0.6 * big as f64);
    // f32 -> bf16 rounds to nearest; bf16 -> f32 is exact.
    assert_eq!(
        bf16_opt.load(&f32_opt.save()),
        LionStatus::LION_OK,
        "{}",
        last_error()
    );
    let (m32, m16) = (f32_opt.momentum(), bf16_opt.momentum());
    for (a, b) in m32.iter().flatten().zip(m16.iter().flatten()) {
        // From the f32: half's from_f64 drops the f64's low 32 bits before it rounds, so an
        // f32 just above a midpoint would round down.
        assert_eq!(*b, half::bf16::from_f32(*a as f32).to_f64(), "{a:e}");
    }
    assert_eq!(f32_opt.load(&bf16_opt.save()), LionStatus::LION_OK);
    assert_eq!(f32_opt.momentum(), m16);
}

/// Checks that loading `blob` fails, with a message containing `says`, and changes nothing.
fn assert_refused(opt: &Opt, blob: &[u8], why: &str, says: &str) {
    let before = opt.save();
    let (lr, steps) = (opt.lr(), opt.step_count());
    assert_eq!(
        opt.load(blob),
        LionStatus::LION_ERROR_CORRUPT_STATE,
        "{why}"
    );
    let message = last_error();
    assert!(
        !message.is_empty() && message.contains(says),
        "{why}: message {message:?}"
    );
    assert_eq!(opt.save(), before, "{why}: state changed");
    assert_eq!((opt.lr(), opt.step_count()), (lr, steps), "{why}");
}

#[test]
fn damaged_blobs_are_refused_and_nothing_changes() {
    let (opt, _, _) = trained(config(), 2);
    let good = opt.save();
    let (target, _, _) = trained(config(), 1);

    for len in [0, 1, 8, 50, 103, good.len() / 2, good.len() - 1] {
        assert_refused(&target, &good[..len], &format!("truncated to {len}"), "");
    }
    let mut longer = good.clone();
    longer.push(0);
    assert_refused(
        &target,
        &longer,
        "one byte too many",
        &format!("is {} bytes", good.len()),
    );
    // Every single-bit flip, sampled across header, layout, momentum and checksum.
    for at in (0..good.len()).step_by(37).chain([9, 90, good.len() - 1]) {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        assert_refused(&target, &bad, &format!("bit flipped at {at}"), "");
    }
    let mut other_version = good.clone();
    other_version[8] = 2;
    assert_refused(&target, &other_version, "format version 2", "version");
}

/// `blob` with its u32 or u64 field at `at` set to `value`, and its checksum made right again.
fn with_field(blob: &[u8], at: usize, value: &[u8]) -> Vec<u8> {
    let mut b = blob.to_vec();
    b[at..at + value.len()].copy_from_slice(value);
    let body = b.len() - 16;
    let sum = xxh3_128(&b[..body]).to_le_bytes();
    b[body..].copy_from_slice(&sum);
    b
}

/// The step count's offset in the header (docs/checkpoint-format.md).
const STEP_AT: usize = 64;

#[test]
fn step_counts_from_2_pow_63_are_neither_loaded_nor_saved() {
    let (opt, mut params, mut rng) = trained(config(), 1);
    let blob = opt.save();
    for count in [1u64 << 63, (1 << 63) + 1, u64::MAX - 1, u64::MAX] {
        let bad = with_field(&blob, STEP_AT, &count.to_le_bytes());
        assert_refused(&opt, &bad, &format!("step count {count}"), "2^63");
    }
    // The last count a blob may hold loads, and steps on without wrapping.
    let last = with_field(&blob, STEP_AT, &((1u64 << 63) - 1).to_le_bytes());
    assert_eq!(opt.load(&last), LionStatus::LION_OK, "{}", last_error());
    assert_eq!(opt.step_count(), (1 << 63) - 1);
    let mut grads: Vec<Buf> = random_grads(&opt.tensors, 1.0, &mut rng);
    assert_eq!(opt.step(&mut params, &mut grads), LionStatus::LION_OK);
    assert_eq!(opt.step_count(), 1 << 63);
    // Now no checkpoint can hold the count: a save is refused and writes nothing.
    let mut size = 0usize;
    assert_eq!(
        unsafe { lion_state_size(opt.raw, &mut size) },
        LionStatus::LION_OK
    );
    let mut buf = vec![0xAAu8; size + 8];
    let mut written = 12345usize;
    let st = unsafe { lion_state_save(opt.raw, buf.as_mut_ptr().cast(), buf.len(), &mut written) };
    assert_eq!(st, LionStatus::LION_ERROR_INVALID_ARGUMENT);
    let message = last_error();
    assert!(message.contains("2^63"), "{message}");
    assert!(buf.iter().all(|&b| b == 0xAA), "a refused save wrote");
    assert_eq!(written, 12345, "a refused save wrote out_written");
    // The file save too: no file, no temporary file.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ckpt-step-limit");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = std::ffi::CString::new(dir.join("x.ckpt").to_str().unwrap()).unwrap();
    let st = unsafe { lion_state_save_file(opt.raw, path.as_ptr()) };
    assert_eq!(
        st,
        LionStatus::LION_ERROR_INVALID_ARGUMENT,
        "{}",
        last_error()
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "a file was written"
    );
    // The run goes on (the count does not wrap), and a checkpoint from before still loads.
    assert_eq!(opt.step(&mut params, &mut grads), LionStatus::LION_OK);
    assert_eq!(opt.step_count(), (1 << 63) + 1);
    assert_eq!(opt.load(&blob), LionStatus::LION_OK);
    assert_eq!(opt.step_count(), 1);
}

#[test]
fn a_q8_param_or_grad_dtype_in_the_tensor_table_is_refused() {
    let (opt, _, _) = trained(config(), 1);
    let blob = opt.save();
    // Row i of the table is at 88 + 24 i: numel u64, param dtype u32, grad dtype u32.
    let q8 = LION_DTYPE_Q8.to_le_bytes();
    let bad = with_field(&blob, 88 + 8, &q8);
    assert_refused(
        &opt,
        &bad,
        "row 0's param_dtype q8",
        "tensor 0's param_dtype",
    );
    let bad = with_field(&blob, 88 + 2 * 24 + 12, &q8);
    assert_refused(&opt, &bad, "row 2's grad_dtype q8", "tensor 2's grad_dtype");
    // Other dtypes than the optimizer's are a record, and load.
    let bf16 = with_field(&blob, 88 + 8, &LION_DTYPE_BF16.to_le_bytes());
    assert_eq!(opt.load(&bf16), LionStatus::LION_OK, "{}", last_error());
}

#[test]
fn a_blob_for_other_tensors_is_refused() {
    let (opt, _, _) = trained(config(), 1);
    let blob = opt.save();
    let fewer = Opt::new(config(), &opt.tensors[..2]).unwrap();
    assert_refused(&fewer, &blob, "fewer tensors", "3 tensors");
    let mut resized = opt.tensors.clone();
    resized[2].numel += 1;
    let resized = Opt::new(config(), &resized).unwrap();
    assert_refused(&resized, &blob, "other sizes", "tensor 2");
}

#[test]
fn save_into_a_small_buffer_writes_nothing() {
    let (opt, _, _) = trained(config(), 1);
    let size = opt.save().len();
    let mut buf = vec![0xAAu8; size - 1];
    let mut written = 12345usize;
    let st = unsafe { lion_state_save(opt.raw, buf.as_mut_ptr().cast(), buf.len(), &mut written) };
    assert_eq!(st, LionStatus::LION_ERROR_INVALID_ARGUMENT);
    assert!(buf.iter().all(|&b| b == 0xAA));
    assert_eq!(written, 12345);
    // A larger buffer is fine, and only the blob's bytes are written.
    let mut buf = vec![0xAAu8; size + 10];
    let st = unsafe { lion_state_save(opt.raw, buf.as_mut_ptr().cast(), buf.len(), &mut written) };
    assert_eq!(st, LionStatus::LION_OK);
    assert_eq!(written, size);
    assert!(buf[size..].iter().all(|&b| b == 0xAA));
    // out_written may be NULL.
    let st = unsafe {
        lion_state_save(
            opt.raw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(st, LionStatus::LION_OK);
}

/// Sizes for 8-bit momentum: quantized (5000, 4096, 70_001: partial blocks, several chunks)
/// and small ones that keep f32 (77), and an empty tensor.
const Q8_SIZES: [u64; 5] = [5000, 0, 77, 4096, 70_001];

fn q8_config() -> LionConfig {
    LionConfig {
        state_dtype: LION_DTYPE_Q8,
        ..config()
    }
}

fn trained_on(config: LionConfig, sizes: &[u64], steps: usize) -> (Opt, Vec<Buf>, Rng) {
    let t: Vec<LionTensorDesc> = sizes
        .iter()
        .map(|&n| lion_tensor_desc(n, LION_DTYPE_F32))
        .collect();
    let opt = Opt::new(config, &t).unwrap();
    let mut rng = Rng::new(33);
    let mut params: Vec<Buf> = random_params(&t, &mut rng);
    for _ in 0..steps {
        let mut grads: Vec<Buf> = random_grads(&t, 1.0, &mut rng);
        assert_eq!(opt.step(&mut params, &mut grads), LionStatus::LION_OK);
    }
    (opt, params, rng)
}

#[test]
fn q8_state_is_compact_and_continues_the_run_bit_for_bit() {
    let (a, mut params, mut rng) = trained_on(q8_config(), &Q8_SIZES, 3);
    let blob = a.save();
    let momentum: usize = Q8_SIZES
        .iter()
        .map(|&n| state_bytes(LION_DTYPE_Q8, n))
        .sum();
    assert_eq!(blob.len(), 88 + 24 * Q8_SIZES.len() + momentum + 16);
    // About 1.016 bytes per element of the quantized tensors (codes and a scale per 256).
    let quantized: u64 = [5000u64, 4096, 70_001].iter().sum();
    let per_element = (momentum - 77 * 4) as f64 / quantized as f64;
    assert!((1.0..1.02).contains(&per_element), "{per_element}");
    // Loaded into a fresh optimizer, it saves the same bytes and steps the same bits.
    let b = Opt::new(q8_config(), &a.tensors).unwrap();
    assert_eq!(b.load(&blob), LionStatus::LION_OK, "{}", last_error());
    assert!(b.save() == blob);
    let mut params_b = params.clone();
    for _ in 0..2 {
        let mut grads: Vec<Buf> = random_grads(&a.tensors, 1.0, &mut rng);
        let mut grads_b = grads.clone();
        assert_eq!(a.step(&mut params, &mut grads), LionStatus::LION_OK);
        assert_eq!(b.step(&mut params_b, &mut grads_b), LionStatus::LION_OK);
    }
    assert!(params == params_b);
    assert!(a.save() == b.save());
    // A damaged q8 blob is refused.
    let mut bad = blob.clone();
    bad[88 + 24 * Q8_SIZES.len() + 3] ^= 1;
    assert_refused(&b, &bad, "a flipped code", "checksum");
    assert_refused(&b, &blob[..blob.len() - 1], "a truncated q8 blob", "bytes");
    // Codes and scales that no step writes, under a checksum made right again: refused, and
    // the optimizer keeps its momentum.
    let first_quantized = Q8_SIZES.iter().position(|&n| n >= 4096).unwrap();
    let at: usize = 88
        + 24 * Q8_SIZES.len()
        + Q8_SIZES[..first_quantized]
            .iter()
            .map(|&n| state_bytes(LION_DTYPE_Q8, n))
            .sum::<usize>();
    let n = Q8_SIZES[first_quantized] as usize;
    let before = b.save();
    assert_refused(
        &b,
        &with_field(&blob, at + 17, &[0x80]),
        "a code of -128",
        "-128",
    );
    for (bits, what) in [
        (0xbf80_0000u32, "a negative scale"),
        (0x8000_0000, "a scale of -0"),
        (0x7f80_0000, "an infinite scale"),
        (0x7fc0_0001, "a NaN scale of other bits"),
    ] {
        assert_refused(
            &b,
            &with_field(&blob, at + n + 4, &bits.to_le_bytes()),
            what,
            "scale",
        );
    }
    // The NaN scale of a block whose momentum was not finite is one a step writes.
    assert_eq!(
        b.load(&with_field(
            &blob,
            at + n + 4,
            &0x7fc0_0000u32.to_le_bytes()
        )),
        LionStatus::LION_OK,
        "{}",
        last_error()
    );
    assert_eq!(b.load(&before), LionStatus::LION_OK);
}

/// The f64 reference of the q8 encoder over one tensor's momentum `m` (f32 values), per
/// block of 256 (`q8_close`).
fn assert_quantized(m: &[f64], got: &[f64], what: &str) {
    for (b, (m, got)) in m.chunks(Q8_BLOCK).zip(got.chunks(Q8_BLOCK)).enumerate() {
        let scale = q8_scale(m);
        for (j, (&x, &q)) in m.iter().zip(got).enumerate() {
            let slack = 4.0 * f32::EPSILON as f64 * scale;
            assert!(
                q8_close(x, q, scale, slack),
                "{what}, element {}: {x} became {q} (block scale {scale})",
                b * Q8_BLOCK + j
            );
        }
    }
}

#[test]
fn q8_converts_to_and_from_f32_and_bf16() {
    let (f32_opt, _, _) = trained_on(config(), &Q8_SIZES, 3);
    let tensors = f32_opt.tensors.clone();
    let bf16_opt = Opt::new(
        LionConfig {
            state_dtype: LION_DTYPE_BF16,
            ..config()
        },
        &tensors,
    )
    .unwrap();
    let q8_opt = Opt::new(q8_config(), &tensors).unwrap();
    let m32 = f32_opt.momentum();
    // f32 -> q8: the encoder (small tensors copy their f32).
    assert_eq!(
        q8_opt.load(&f32_opt.save()),
        LionStatus::LION_OK,
        "{}",
        last_error()
    );
    let mq = q8_opt.momentum();
    for (t, &n) in Q8_SIZES.iter().enumerate() {
        if n >= Q8_MIN_NUMEL {
            assert_quantized(&m32[t], &mq[t], &format!("f32 -> q8, tensor {t}"));
        } else {
            assert_eq!(m32[t], mq[t], "a small tensor keeps f32");
        }
    }
    // q8 -> f32: exactly the decoded values; q8 -> bf16: those rounded to nearest.
    assert_eq!(f32_opt.load(&q8_opt.save()), LionStatus::LION_OK);
    assert_eq!(f32_opt.momentum(), mq);
    assert_eq!(bf16_opt.load(&q8_opt.save()), LionStatus::LION_OK);
    for (a, b) in mq
        .iter()
        .flatten()
        .zip(bf16_opt.momentum().iter().flatten())
    {
        // From the f32: half's from_f64 drops the f64's low 32 bits before it rounds, so an
        // f32 just above a midpoint would round down.
        assert_eq!(*b, half::bf16::from_f32(*a as f32).to_f64(), "{a:e}");
    }
    // bf16 -> q8: the encoder on the bf16 values.
    let m16 = bf16_opt.momentum();
    assert_eq!(q8_opt.load(&bf16_opt.save()), LionStatus::LION_OK);
    let mq = q8_opt.momentum();
    for (t, &n) in Q8_SIZES.iter().enumerate() {
        if n >= Q8_MIN_NUMEL {
            assert_quantized(&m16[t], &mq[t], &format!("bf16 -> q8, tensor {t}"));
        } else {
            assert_eq!(m16[t], mq[t]);
        }
    }
    // q8 -> q8 is a copy.
    let blob = q8_opt.save();
    let other = Opt::new(q8_config(), &tensors).unwrap();
    assert_eq!(other.load(&blob), LionStatus::LION_OK);
    assert!(other.save() == blob);
}
