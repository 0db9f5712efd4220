//! `lion_step_tensors` and `lion_round_finish` on the CPU: rounds that step every tensor once,
//! in random orders and groupings, give the bits of one `lion_step` (every dtype combination,
//! stochastic rounding on and off, every option, odd sizes, the pool and the caller's thread);
//! the step options per call; a round ended early; and every refusal, which writes nothing and
//! leaves the round as it was. (The CUDA engine's are in tests/cuda.rs.)

mod common;

use std::ffi::c_void;

use common::*;
use lion::*;

/// Calls `lion_step_tensors` on `indices` with their buffers.
fn step_some(
    opt: &Opt,
    indices: &[u32],
    params: &mut [Buf],
    grads: &mut [Buf],
    options: Option<&LionStepOptions>,
) -> LionStatus {
    // (NULL for an index out of range: the index is refused first.)
    let p: Vec<*mut c_void> = (indices.iter())
        .map(|&i| {
            params
                .get_mut(i as usize)
                .map_or(std::ptr::null_mut(), Buf::ptr)
        })
        .collect();
    let g: Vec<*const c_void> = (indices.iter())
        .map(|&i| {
            grads
                .get_mut(i as usize)
                .map_or(std::ptr::null(), |b| b.ptr() as *const _)
        })
        .collect();
    unsafe {
        lion_step_tensors(
            opt.raw,
            indices.as_ptr(),
            indices.len(),
            p.as_ptr(),
            g.as_ptr(),
            std::ptr::null_mut(),
            options.map_or(std::ptr::null(), |o| o as *const _),
        )
    }
}

/// A random order of `0..n`, cut into random groups (some of one tensor, one maybe of all).
fn random_round(n: usize, rng: &mut Rng) -> Vec<Vec<u32>> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.next_u64() as usize % (i + 1));
    }
    let mut groups = Vec::new();
    let mut rest = &order[..];
    while !rest.is_empty() {
        let take = 1 + rng.next_u64() as usize % rest.len();
        groups.push(rest[..take].to_vec());
        rest = &rest[take..];
    }
    groups
}

/// `rounds` steps of one optimizer with `lion_step` and of another with rounds of
/// `lion_step_tensors`, from the same data: the same parameter bits, checkpoint (momentum,
/// step count, lr) after every round, and no step counted before a round's last call.
fn rounds_match_whole_steps(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    rounds: usize,
    seed: u64,
) {
    let whole = Opt::new(config, tensors).unwrap();
    let some = Opt::new(config, tensors).unwrap();
    let mut rng = Rng::new(seed);
    let mut p_whole = random_params(tensors, &mut rng);
    let mut p_some = p_whole.clone();
    let label = format!("{config:?}");
    for round in 0..rounds {
        let mut grads = random_grads(tensors, 1.0, &mut rng);
        assert_eq!(
            whole.step(&mut p_whole, &mut grads),
            LionStatus::LION_OK,
            "{}",
            last_error()
        );
        let groups = random_round(tensors.len(), &mut rng);
        for (k, group) in groups.iter().enumerate() {
            assert_eq!(some.step_count(), round as u64, "{label}: mid-round count");
            let st = step_some(&some, group, &mut p_some, &mut grads, None);
            assert_eq!(
                st,
                LionStatus::LION_OK,
                "{label}: call {k}: {}",
                last_error()
            );
        }
        assert_eq!(some.step_count(), round as u64 + 1, "{label}");
        for (t, (a, b)) in p_whole.iter().zip(&p_some).enumerate() {
            assert!(
                a.bits() == b.bits(),
                "{label}: round {round} ({groups:?}), tensor {t}: parameters differ from lion_step's"
            );
        }
        assert!(
            whole.save() == some.save(),
            "{label}: round {round}: checkpoint differs from lion_step's"
        );
    }
}

fn odd_tensors(param: LionDType, grad: LionDType) -> Vec<LionTensorDesc> {
    // Sizes no vector width divides, one empty, one over a chunk (16 Ki), and one large
    // enough (with the others) for the pool.
    scaled_tensors(&[1, 7, 0, 1029, 16384 + 13, 70_001, 3], param, grad)
}

#[test]
fn every_dtype_combination_matches_lion_step_bit_for_bit() {
    let base = LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        ..lion_config_default()
    };
    let mut seed = 1;
    for (param, grad, config) in dtype_configs(base) {
        seed += 1;
        rounds_match_whole_steps(config, &odd_tensors(param, grad), 3, seed);
    }
}

#[test]
fn every_option_matches_lion_step_bit_for_bit() {
    let base = LionConfig {
        lr: 0.01,
        weight_decay: 0.15,
        stochastic_rounding: true,
        state_dtype: LION_DTYPE_BF16,
        seed: 7,
        ..lion_config_default()
    };
    let mut seed = 100;
    for config in option_configs(base) {
        for num_threads in [1, 0] {
            seed += 1;
            let config = LionConfig {
                num_threads,
                ..config
            };
            let tensors = odd_tensors(LION_DTYPE_BF16, LION_DTYPE_F32);
            rounds_match_whole_steps(config, &tensors, 3, seed);
        }
    }
}

#[test]
fn many_tensors_and_one_tensor() {
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.0,
        stochastic_rounding: true,
        ..lion_config_default()
    };
    let many: Vec<LionTensorDesc> = (0..300)
        .map(|i| lion_tensor_desc((i * 37 % 300) as u64, LION_DTYPE_BF16))
        .collect();
    rounds_match_whole_steps(config, &many, 3, 9);
    rounds_match_whole_steps(config, &[lion_tensor_desc(5000, LION_DTYPE_F16)], 3, 10);
    rounds_match_whole_steps(config, &[lion_tensor_desc(0, LION_DTYPE_F32)], 2, 11);
}

#[test]
fn step_options_apply_to_their_call() {
    // grad_scale and lr per call, the same on every call: one lion_step_with_options.
    let tensors = odd_tensors(LION_DTYPE_F32, LION_DTYPE_BF16);
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        ..lion_config_default()
    };
    let whole = Opt::new(config, &tensors).unwrap();
    let some = Opt::new(config, &tensors).unwrap();
    let mut rng = Rng::new(21);
    let mut p_whole = random_params(&tensors, &mut rng);
    let mut p_some = p_whole.clone();
    let lr = 0.004f32;
    let no = 0.0f32;
    let options = LionStepOptions {
        grad_scale: 0.5,
        lr: &lr,
        found_inf: &no,
        ..lion_step_options_default()
    };
    for _ in 0..2 {
        let mut grads = random_grads(&tensors, 1.0, &mut rng);
        let p: Vec<*mut c_void> = p_whole.iter_mut().map(Buf::ptr).collect();
        let g: Vec<*const c_void> = grads.iter_mut().map(|b| b.ptr() as *const _).collect();
        let st = unsafe {
            lion_step_with_options(
                whole.raw,
                p.as_ptr(),
                g.as_ptr(),
                p.len(),
                std::ptr::null_mut(),
                &options,
            )
        };
        assert_eq!(st, LionStatus::LION_OK);
        for group in random_round(tensors.len(), &mut rng) {
            let st = step_some(&some, &group, &mut p_some, &mut grads, Some(&options));
            assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
        }
        assert!(p_whole
            .iter()
            .zip(&p_some)
            .all(|(a, b)| a.bits() == b.bits()));
        assert!(whole.save() == some.save());
    }
    // found_inf skips its call (nothing written), but its tensors count as stepped: the
    // round's last call, skipped, does not count the step.
    let before = some.save();
    let p_before = p_some.clone();
    let mut grads = random_grads(&tensors, 1.0, &mut rng);
    let yes = 1.0f32;
    let skip = LionStepOptions {
        found_inf: &yes,
        ..lion_step_options_default()
    };
    let all: Vec<u32> = (0..tensors.len() as u32).collect();
    assert_eq!(
        step_some(&some, &all[..3], &mut p_some, &mut grads, Some(&skip)),
        LionStatus::LION_OK
    );
    assert_eq!(
        step_some(&some, &all[3..], &mut p_some, &mut grads, Some(&skip)),
        LionStatus::LION_OK
    );
    assert!(p_some == p_before && some.save() == before);
    assert_eq!(some.step_count(), 2);
    // check_finite: a NaN refuses the call, nothing written, the round as it was.
    let mut bad = random_grads(&tensors, 1.0, &mut rng);
    if let Buf::BF16(v) = &mut bad[5] {
        v[123] = half::bf16::NAN;
    }
    let check = LionStepOptions {
        check_finite: true,
        ..lion_step_options_default()
    };
    let st = step_some(&some, &[4, 5], &mut p_some, &mut bad, Some(&check));
    assert_eq!(st, LionStatus::LION_ERROR_NON_FINITE);
    assert!(
        last_error().contains("grads[1][123] (tensor 5)"),
        "{}",
        last_error()
    );
    assert!(p_some == p_before && some.save() == before);
    // ... and the same tensors then step.
    let st = step_some(&some, &[4, 5], &mut p_some, &mut grads, Some(&check));
    assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
}

/// A call's `options.lr` is checked against that call's tensors only: an lr whose decay factor
/// is outside [0, 1] for a tensor the call does not step refused it (the message named the
/// other tensor), though the lr applies to this call's tensors alone.
#[test]
fn a_calls_lr_is_checked_against_its_own_tensors() {
    let mut tensors = vec![lion_tensor_desc(37, LION_DTYPE_F32); 2];
    tensors[0].weight_decay_scale = 0.0; // no decay: any finite lr
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 1.0,
        ..lion_config_default()
    };
    let opt = Opt::new(config, &tensors).unwrap();
    let mut rng = Rng::new(5);
    let mut params = random_params(&tensors, &mut rng);
    let mut grads = random_grads(&tensors, 1.0, &mut rng);
    let lr = 2.0f32; // tensor 1's decay factor 2
    let options = LionStepOptions {
        lr: &lr,
        ..lion_step_options_default()
    };
    let before = (params.clone(), opt.save());
    let st = step_some(&opt, &[1], &mut params, &mut grads, Some(&options));
    assert_eq!(st, LionStatus::LION_ERROR_INVALID_ARGUMENT);
    assert!(
        last_error().contains("options.lr: tensors[1]"),
        "{}",
        last_error()
    );
    assert!(
        params == before.0 && opt.save() == before.1,
        "a refusal writes nothing"
    );
    let st = step_some(&opt, &[0], &mut params, &mut grads, Some(&options));
    assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
    // Tensor 0 moved by the call's lr, 2 per element (sign steps, no decay).
    let (Buf::F32(now), Buf::F32(was)) = (&params[0], &before.0[0]) else {
        unreachable!()
    };
    let moved: Vec<f32> = now.iter().zip(was).map(|(a, b)| a - b).collect();
    let by_lr = |d: &f32| *d == 0.0 || (d.abs() - 2.0).abs() < 1e-5; // 0: a zero gradient
    assert!(moved.iter().all(by_lr), "{moved:?}");
    // The round goes on with the optimizer's lr for tensor 1.
    let st = step_some(&opt, &[1], &mut params, &mut grads, None);
    assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
    assert_eq!(opt.step_count(), 1);
}

#[test]
fn a_round_ended_early_leaves_the_other_tensors_alone() {
    let tensors = odd_tensors(LION_DTYPE_BF16, LION_DTYPE_BF16);
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.5,
        state_dtype: LION_DTYPE_BF16,
        stochastic_rounding: true,
        ..lion_config_default()
    };
    let whole = Opt::new(config, &tensors).unwrap();
    let some = Opt::new(config, &tensors).unwrap();
    let mut rng = Rng::new(31);
    let mut p_whole = random_params(&tensors, &mut rng);
    let mut p_some = p_whole.clone();
    let p0 = p_whole.clone();
    let mut grads = random_grads(&tensors, 1.0, &mut rng);
    assert_eq!(whole.step(&mut p_whole, &mut grads), LionStatus::LION_OK);
    // Nothing open: finishing does nothing.
    assert_eq!(
        unsafe { lion_round_finish(some.raw, std::ptr::null_mut()) },
        LionStatus::LION_OK
    );
    assert_eq!(some.step_count(), 0);
    let stepped = [5u32, 0, 3];
    assert_eq!(
        step_some(&some, &stepped, &mut p_some, &mut grads, None),
        LionStatus::LION_OK
    );
    assert_eq!(
        unsafe { lion_round_finish(some.raw, std::ptr::null_mut()) },
        LionStatus::LION_OK,
        "{}",
        last_error()
    );
    assert_eq!(some.step_count(), 1);
    let (m_whole, m_some) = (whole.momentum(), some.momentum());
    for t in 0..tensors.len() {
        if stepped.contains(&(t as u32)) {
            assert!(p_some[t].bits() == p_whole[t].bits(), "tensor {t}");
            assert!(m_some[t] == m_whole[t], "tensor {t}");
        } else {
            assert!(p_some[t] == p0[t], "tensor {t} was not stepped");
            assert!(m_some[t].iter().all(|&m| m == 0.0), "tensor {t}'s momentum");
        }
    }
    // The next round is the next step: a whole step's keys again.
    let mut grads = random_grads(&tensors, 1.0, &mut rng);
    let mut p_whole = p_some.clone();
    let other = Opt::new(config, &tensors).unwrap();
    assert_eq!(other.load(&some.save()), LionStatus::LION_OK);
    assert_eq!(other.step(&mut p_whole, &mut grads), LionStatus::LION_OK);
    for group in random_round(tensors.len(), &mut rng) {
        assert_eq!(
            step_some(&some, &group, &mut p_some, &mut grads, None),
            LionStatus::LION_OK
        );
    }
    assert!(p_some
        .iter()
        .zip(&p_whole)
        .all(|(a, b)| a.bits() == b.bits()));
    assert!(some.save() == other.save());
}

#[test]
fn refusals_write_nothing_and_keep_the_round() {
    let tensors = odd_tensors(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        lr: 0.01,
        ..lion_config_default()
    };
    let opt = Opt::new(config, &tensors).unwrap();
    let mut rng = Rng::new(41);
    let mut params = random_params(&tensors, &mut rng);
    let mut grads = random_grads(&tensors, 1.0, &mut rng);
    let p0 = params.clone();
    let refused = |st: LionStatus, want: LionStatus, says: &str| {
        assert_eq!(st, want, "{}", last_error());
        assert!(last_error().contains(says), "{:?}: {}", says, last_error());
    };
    // Before any round: an index out of range, one listed twice.
    refused(
        step_some(&opt, &[1, 7], &mut params, &mut grads, None),
        LionStatus::LION_ERROR_INVALID_ARGUMENT,
        "indices[1] is 7",
    );
    refused(
        step_some(&opt, &[1, 4, 1], &mut params, &mut grads, None),
        LionStatus::LION_ERROR_INVALID_ARGUMENT,
        "indices[2]: tensor 1 is listed twice",
    );
    assert!(params == p0);
    let blob0 = opt.save();
    // NULL arrays and buffers, overlapping buffers within a call.
    let st = unsafe {
        lion_step_tensors(
            opt.raw,
            std::ptr::null(),
            1,
            [params[0].ptr()].as_ptr(),
            [grads[0].ptr() as *const c_void].as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null(),
        )
    };
    refused(st, LionStatus::LION_ERROR_NULL_POINTER, "indices");
    let st = unsafe {
        lion_step_tensors(
            opt.raw,
            [3u32, 4].as_ptr(),
            2,
            [params[3].ptr(), std::ptr::null_mut()].as_ptr(),
            [
                grads[3].ptr() as *const c_void,
                grads[4].ptr() as *const c_void,
            ]
            .as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null(),
        )
    };
    refused(
        st,
        LionStatus::LION_ERROR_NULL_POINTER,
        "params[1] (tensor 4)",
    );
    let st = unsafe {
        lion_step_tensors(
            opt.raw,
            [3u32, 4].as_ptr(),
            2,
            [params[4].ptr(), params[4].ptr()].as_ptr(),
            [
                grads[3].ptr() as *const c_void,
                grads[4].ptr() as *const c_void,
            ]
            .as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null(),
        )
    };
    refused(st, LionStatus::LION_ERROR_INVALID_ARGUMENT, "overlaps");
    // Zero tensors: nothing, not even a round.
    let st = unsafe {
        lion_step_tensors(
            opt.raw,
            std::ptr::null(),
            0,
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null_mut(),
            std::ptr::null(),
        )
    };
    assert_eq!(st, LionStatus::LION_OK);
    assert!(params == p0 && opt.save() == blob0);
    // A round opens: what needs whole steps is refused, the round goes on.
    assert_eq!(
        step_some(&opt, &[2, 5], &mut params, &mut grads, None),
        LionStatus::LION_OK
    );
    let mid = params.clone();
    refused(
        step_some(&opt, &[0, 5], &mut params, &mut grads, None),
        LionStatus::LION_ERROR_INVALID_ARGUMENT,
        "indices[1]: tensor 5 was already stepped in this round",
    );
    refused(
        opt.step(&mut params, &mut grads),
        LionStatus::LION_ERROR_ROUND_OPEN,
        "2 of 7 tensors stepped",
    );
    refused(
        unsafe { lion_set_lr(opt.raw, 0.5) },
        LionStatus::LION_ERROR_ROUND_OPEN,
        "lion_set_lr",
    );
    assert_eq!(opt.lr(), 0.01);
    let mut size = 0;
    assert_eq!(
        unsafe { lion_state_size(opt.raw, &mut size) },
        LionStatus::LION_OK
    );
    let mut buf = vec![0xa5u8; size];
    let st = unsafe {
        lion_state_save(
            opt.raw,
            buf.as_mut_ptr() as *mut c_void,
            size,
            std::ptr::null_mut(),
        )
    };
    refused(st, LionStatus::LION_ERROR_ROUND_OPEN, "lion_state_save");
    assert!(buf.iter().all(|&b| b == 0xa5));
    let dir = std::env::temp_dir().join(format!("lion-step-tensors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = std::ffi::CString::new(dir.join("ckpt").to_str().unwrap()).unwrap();
    refused(
        unsafe { lion_state_save_file(opt.raw, path.as_ptr()) },
        LionStatus::LION_ERROR_ROUND_OPEN,
        "lion_state_save_file",
    );
    assert!(std::fs::read_dir(&dir).unwrap().next().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(params == mid);
    assert_eq!(opt.step_count(), 0);
    // The round completes with the other tensors; then all of that works again.
    assert_eq!(
        step_some(&opt, &[0, 1, 6, 3, 4], &mut params, &mut grads, None),
        LionStatus::LION_OK,
        "{}",
        last_error()
    );
    assert_eq!(opt.step_count(), 1);
    assert_eq!(unsafe { lion_set_lr(opt.raw, 0.02) }, LionStatus::LION_OK);
    assert_eq!(opt.step(&mut params, &mut grads), LionStatus::LION_OK);
    let blob = opt.save();
    // Loading drops an open round: the checkpoint is a whole step.
    assert_eq!(
        step_some(&opt, &[6], &mut params, &mut grads, None),
        LionStatus::LION_OK
    );
    assert_eq!(opt.load(&blob), LionStatus::LION_OK, "{}", last_error());
    assert!(opt.save() == blob);
    assert_eq!(
        step_some(&opt, &[6], &mut params, &mut grads, None),
        LionStatus::LION_OK
    );
    refused(
        unsafe { lion_round_finish(std::ptr::null_mut(), std::ptr::null_mut()) },
        LionStatus::LION_ERROR_NULL_POINTER,
        "opt",
    );
}

#[test]
fn distributed_optimizers_refuse_subsets() {
    use common::ranks;
    let tensors = [lion_tensor_desc(100, LION_DTYPE_F32)];
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let group = ranks::Group::new(1);
        let ctx = ranks::RankContext { group, rank: 0 };
        let collectives = ranks::collectives(&ctx);
        let dist = LionDistConfig {
            mode,
            rank: 0,
            world_size: 1,
            collectives: &collectives,
            ..lion_dist_config_default()
        };
        let opt = Opt::distributed(lion_config_default(), &tensors, &dist).unwrap();
        let mut params = vec![Buf::from_f64(LION_DTYPE_F32, &[1.0; 100])];
        let mut grads = vec![Buf::from_f64(LION_DTYPE_F32, &[1.0; 100])];
        let st = step_some(&opt, &[0], &mut params, &mut grads, None);
        assert_eq!(st, LionStatus::LION_ERROR_UNSUPPORTED);
        assert!(
            last_error().contains("lion_step_tensors"),
            "{}",
            last_error()
        );
        let st = unsafe { lion_round_finish(opt.raw, std::ptr::null_mut()) };
        assert_eq!(st, LionStatus::LION_ERROR_UNSUPPORTED);
        assert!(params[0].to_f64() == vec![1.0; 100]);
        // The optimizer still steps, collectively.
        assert_eq!(opt.step(&mut params, &mut grads), LionStatus::LION_OK);
        assert_eq!(opt.step_count(), 1);
    }
}
