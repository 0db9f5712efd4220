//! The CUDA engine against the CPU engine (itself checked against the f64 reference): the
//! same bits for every dtype combination and option, checkpoints across devices, the step
//! options, CUDA graph capture and replay. The GPU tests are ignored unless asked for
//! (`--ignored`; the GPU bundle runs them), and fail where there is no GPU;
//! `unavailable_without_a_device` runs everywhere and checks the error without one.

mod common;
mod gpu;

use std::ffi::c_void;
use std::ptr::null_mut;

use common::*;
use cudarc::driver::sys;
use gpu::DevBuf;
use lion::*;

fn bytes_of(b: &Buf) -> Vec<u8> {
    match b {
        Buf::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Buf::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        Buf::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
    }
}

/// Asserts, after `what`, that the device's parameters are the CPU's bit for bit, and the
/// GPU optimizer's checkpoint (momentum, step count) the CPU's.
fn assert_gpu_is_cpu(what: &str, dev_params: &[DevBuf], params: &[Buf], gpu: &Opt, cpu: &Opt) {
    for (t, (d, want)) in dev_params.iter().zip(params).enumerate() {
        assert!(
            d.download() == bytes_of(want),
            "{what}, tensor {t}: parameters differ from the CPU's"
        );
    }
    assert!(
        gpu.save() == cpu.save(),
        "{what}: checkpoint (momentum, step count) differs from the CPU's"
    );
}

/// One `lion_step` of `gpu` on device buffers, on the legacy stream; asserts LION_OK.
fn step_on_device(gpu: &Opt, params: &[DevBuf], grads: &[DevBuf]) {
    let p: Vec<*mut c_void> = params.iter().map(|d| d.as_ptr()).collect();
    let g: Vec<*const c_void> = grads.iter().map(|d| d.as_ptr() as *const c_void).collect();
    let st = unsafe {
        lion_step(
            gpu.raw,
            p.as_ptr(),
            g.as_ptr(),
            p.len(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
}

/// An optimizer of `config` on the GPU (device 0).
fn gpu_opt(config: LionConfig, tensors: &[LionTensorDesc]) -> Opt {
    let config = LionConfig {
        device: LION_DEVICE_CUDA,
        ..config
    };
    Opt::new(config, tensors).unwrap_or_else(|e| panic!("{e:?}"))
}

#[test]
fn unavailable_without_a_device() {
    let config = |device_index| LionConfig {
        device: LION_DEVICE_CUDA,
        device_index,
        ..lion_config_default()
    };
    let t = [lion_tensor_desc(10, LION_DTYPE_F32)];
    match gpu::context() {
        None => {
            let err = Opt::new(config(0), &t)
                .err()
                .expect("CUDA without a device must fail");
            assert_eq!(
                err.0,
                LionStatus::LION_ERROR_DEVICE_UNAVAILABLE,
                "{}",
                err.1
            );
            assert!(err.1.contains("CUDA is unavailable"), "{}", err.1);
        }
        Some(_) => {
            let err = Opt::new(config(999), &t)
                .err()
                .expect("device 999 must not exist");
            assert_eq!(
                err.0,
                LionStatus::LION_ERROR_DEVICE_UNAVAILABLE,
                "{}",
                err.1
            );
            assert!(err.1.contains("out of range"), "{}", err.1);
        }
    }
}

/// Runs `steps` steps on the CPU and on the GPU from the same data; returns nothing, asserts
/// the same parameter bits and the same checkpoint (momentum, step count) after each step.
fn same_on_cpu_and_gpu(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    steps: usize,
    seed: u64,
    offset_bytes: usize,
) {
    let cpu = Opt::new(config, tensors).unwrap();
    let gpu = gpu_opt(config, tensors);
    let mut rng = Rng::new(seed);
    let mut params: Vec<Buf> = random_params(tensors, &mut rng);
    // Device copies, optionally starting `offset_bytes` into their allocation (unaligned path).
    let dev_params: Vec<DevBuf> = params
        .iter()
        .map(|p| DevBuf::new(bytes_of(p).len() + offset_bytes))
        .collect();
    for (d, p) in dev_params.iter().zip(&params) {
        let mut data = vec![0u8; offset_bytes];
        data.extend(bytes_of(p));
        d.upload(&data);
    }
    let label = format!("{config:?}");
    for step in 0..steps {
        let mut grads: Vec<Buf> = random_grads(tensors, 1.0, &mut rng);
        let dev_grads: Vec<DevBuf> = grads
            .iter()
            .map(|g| {
                let mut data = vec![0u8; offset_bytes];
                data.extend(bytes_of(g));
                DevBuf::from_bytes(&data)
            })
            .collect();
        assert_eq!(cpu.step(&mut params, &mut grads), LionStatus::LION_OK);
        let p: Vec<*mut c_void> = dev_params
            .iter()
            .map(|d| (d.ptr as usize + offset_bytes) as *mut c_void)
            .collect();
        let g: Vec<*const c_void> = dev_grads
            .iter()
            .map(|d| (d.ptr as usize + offset_bytes) as *const c_void)
            .collect();
        let st = unsafe {
            lion_step(
                gpu.raw,
                p.as_ptr(),
                g.as_ptr(),
                p.len(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
        gpu::sync();
        for (t, (d, want)) in dev_params.iter().zip(&params).enumerate() {
            let got = &d.download()[offset_bytes..];
            assert!(
                got == bytes_of(want).as_slice(),
                "{label}: step {step}, tensor {t}: parameters differ from the CPU's"
            );
        }
        assert!(
            gpu.save() == cpu.save(),
            "{label}: step {step}: checkpoint (momentum) differs from the CPU's"
        );
    }
}

fn odd_tensors(param: LionDType, grad: LionDType) -> Vec<LionTensorDesc> {
    scaled_tensors(&[1, 7, 0, 1029, 32768 + 13, 100_003], param, grad)
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn every_dtype_combination_matches_the_cpu_bit_for_bit() {
    require_gpu!();
    let base = LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        ..lion_config_default()
    };
    let mut seed = 1;
    for (param, grad, config) in dtype_configs(base) {
        seed += 1;
        same_on_cpu_and_gpu(config, &odd_tensors(param, grad), 2, seed, 0);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn every_option_matches_the_cpu_bit_for_bit() {
    require_gpu!();
    let base = LionConfig {
        lr: 0.01,
        weight_decay: 0.15,
        ..lion_config_default()
    };
    let mut seed = 100;
    for config in option_configs(base) {
        seed += 1;
        same_on_cpu_and_gpu(
            config,
            &odd_tensors(LION_DTYPE_BF16, LION_DTYPE_F32),
            3,
            seed,
            0,
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn unaligned_buffers_and_many_tensors_match_the_cpu() {
    require_gpu!();
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.0,
        ..lion_config_default()
    };
    // Offset by 4 bytes: no 16-byte vector loads for any tensor.
    same_on_cpu_and_gpu(
        config,
        &odd_tensors(LION_DTYPE_F32, LION_DTYPE_F32),
        2,
        7,
        4,
    );
    same_on_cpu_and_gpu(
        config,
        &odd_tensors(LION_DTYPE_BF16, LION_DTYPE_BF16),
        2,
        8,
        2,
    );
    // More tensors than one launch carries (240), with empty ones among them.
    let many: Vec<LionTensorDesc> = (0..517)
        .map(|i| lion_tensor_desc((i * 37 % 300) as u64, LION_DTYPE_F32))
        .collect();
    same_on_cpu_and_gpu(config, &many, 3, 9, 0);
    let empty = vec![lion_tensor_desc(0, LION_DTYPE_F32); 3];
    same_on_cpu_and_gpu(config, &empty, 2, 10, 0);
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn host_memory_is_refused_by_a_cuda_optimizer() {
    require_gpu!();
    let t = [lion_tensor_desc(100, LION_DTYPE_F32)];
    let gpu = gpu_opt(lion_config_default(), &t);
    let mut host = vec![Buf::from_f64(LION_DTYPE_F32, &[1.0; 100])];
    let mut grads = vec![Buf::from_f64(LION_DTYPE_F32, &[1.0; 100])];
    let st = gpu.step(&mut host, &mut grads);
    assert_eq!(st, LionStatus::LION_ERROR_INVALID_ARGUMENT);
    assert!(
        last_error().contains("not memory the CUDA driver knows"),
        "{}",
        last_error()
    );
    assert_eq!(host[0].to_f64(), vec![1.0; 100]);
    assert_eq!(gpu.step_count(), 0);
    // Device memory then steps.
    let dp = DevBuf::from_bytes(&bytes_of(&host[0]));
    let dg = DevBuf::from_bytes(&bytes_of(&grads[0]));
    let st = unsafe {
        lion_step(
            gpu.raw,
            [dp.as_ptr()].as_ptr(),
            [dg.as_ptr() as *const c_void].as_ptr(),
            1,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
    assert_eq!(gpu.step_count(), 1);
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn host_option_pointers_are_refused_by_a_cuda_optimizer() {
    // A kernel reading found_inf or lr from host memory would fault and poison the context.
    require_gpu!();
    let t = [lion_tensor_desc(100, LION_DTYPE_F32)];
    let gpu = gpu_opt(lion_config_default(), &t);
    let before = bytes_of(&Buf::from_f64(LION_DTYPE_F32, &[1.0; 100]));
    let dp = DevBuf::from_bytes(&before);
    let dg = DevBuf::from_bytes(&before);
    let (dpp, dgp) = ([dp.as_ptr()], [dg.as_ptr() as *const c_void]);
    let host_value = 0.0f32;
    let dev_flag = DevBuf::from_bytes(&0.0f32.to_le_bytes());
    let dev_lr = DevBuf::from_bytes(&0.003f32.to_le_bytes());
    let (found_inf, lr) = (dev_flag.ptr as *const f32, dev_lr.ptr as *const f32);
    // A whole step, and a round of one tensor (the only one): each with its status and message.
    let step_both = |options: &LionStepOptions| unsafe {
        let whole =
            lion_step_with_options(gpu.raw, dpp.as_ptr(), dgp.as_ptr(), 1, null_mut(), options);
        let whole_message = last_error();
        let some = lion_step_tensors(
            gpu.raw,
            [0u32].as_ptr(),
            1,
            dpp.as_ptr(),
            dgp.as_ptr(),
            null_mut(),
            options,
        );
        [(whole, whole_message), (some, last_error())]
    };
    for (name, options) in [
        (
            "options.found_inf",
            LionStepOptions {
                found_inf: &host_value,
                lr,
                ..lion_step_options_default()
            },
        ),
        (
            "options.lr",
            LionStepOptions {
                found_inf,
                lr: &host_value,
                ..lion_step_options_default()
            },
        ),
    ] {
        for (status, message) in step_both(&options) {
            assert_eq!(status, LionStatus::LION_ERROR_INVALID_ARGUMENT, "{name}");
            assert!(
                message.contains(name) && message.contains("not memory the CUDA driver knows"),
                "{message}"
            );
        }
        assert!(dp.download() == before, "{name}: params written");
        assert_eq!(gpu.step_count(), 0);
    }
    // Device memory then steps, in both calls.
    let options = LionStepOptions {
        found_inf,
        lr,
        ..lion_step_options_default()
    };
    for (status, message) in step_both(&options) {
        assert_eq!(status, LionStatus::LION_OK, "{message}");
    }
    assert_eq!(gpu.step_count(), 2);
    assert!(dp.download() != before);
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn cautious_weight_decay_spares_an_infinite_parameter_as_the_cpu() {
    // u*p is NaN for an infinite parameter where u is 0: not > 0, so not decayed (a decay
    // factor of 1 made it inf * 0 = NaN). Both kernels: plain-per-tensor and Cautious Lion's.
    require_gpu!();
    for cautious_factor in [1.0, 0.0] {
        let config = LionConfig {
            lr: 0.5,
            weight_decay: 1.0,
            decay_mode: LION_DECAY_DECOUPLED,
            cautious_weight_decay: true,
            cautious_factor,
            ..lion_config_default()
        };
        let t = [lion_tensor_desc(3, LION_DTYPE_F32)];
        let gpu = gpu_opt(config, &t);
        let p = Buf::from_f64(LION_DTYPE_F32, &[f64::INFINITY, 2.0, f64::NEG_INFINITY]);
        let dp = DevBuf::from_bytes(&bytes_of(&p));
        let dg = DevBuf::from_bytes(&[0u8; 12]);
        step_on_device(&gpu, std::slice::from_ref(&dp), std::slice::from_ref(&dg));
        assert!(
            dp.download() == bytes_of(&p),
            "cautious_factor {cautious_factor}"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn checkpoints_move_between_devices() {
    require_gpu!();
    let config = LionConfig {
        lr: 0.01,
        state_dtype: LION_DTYPE_BF16,
        ..lion_config_default()
    };
    let tensors = odd_tensors(LION_DTYPE_F32, LION_DTYPE_F32);
    let cpu = Opt::new(config, &tensors).unwrap();
    let mut rng = Rng::new(3);
    let mut params: Vec<Buf> = random_params(&tensors, &mut rng);
    for _ in 0..3 {
        let mut grads: Vec<Buf> = random_grads(&tensors, 1.0, &mut rng);
        assert_eq!(cpu.step(&mut params, &mut grads), LionStatus::LION_OK);
    }
    let blob = cpu.save();
    let gpu = gpu_opt(config, &tensors);
    assert_eq!(gpu.load(&blob), LionStatus::LION_OK, "{}", last_error());
    assert_eq!(gpu.step_count(), 3);
    assert!(
        gpu.save() == blob,
        "CPU -> GPU -> blob is not the same blob"
    );
    let back = Opt::new(config, &tensors).unwrap();
    assert_eq!(back.load(&gpu.save()), LionStatus::LION_OK);
    assert!(back.save() == blob);
    // A damaged blob leaves the GPU optimizer as it was.
    let mut bad = blob.clone();
    bad[100] ^= 1;
    assert_eq!(gpu.load(&bad), LionStatus::LION_ERROR_CORRUPT_STATE);
    assert!(gpu.save() == blob);
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn step_options_on_the_device() {
    require_gpu!();
    step_options_match_the_cpu(LION_DTYPE_F32, 5000);
}

/// grad_scale, found_inf and a device lr on one tensor of `n` elements, with state `state`,
/// against the CPU.
fn step_options_match_the_cpu(state_dtype: LionDType, n: usize) {
    let tensors = [lion_tensor_desc(n as u64, LION_DTYPE_F32)];
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        state_dtype,
        ..lion_config_default()
    };
    let cpu = Opt::new(config, &tensors).unwrap();
    let gpu = gpu_opt(config, &tensors);
    let mut rng = Rng::new(5);
    let mut p = vec![Buf::random(LION_DTYPE_F32, n, 1.0, &mut rng)];
    let dp = DevBuf::from_bytes(&bytes_of(&p[0]));
    let flag = DevBuf::from_bytes(&1.0f32.to_le_bytes());
    let no_flag = DevBuf::from_bytes(&0.0f32.to_le_bytes());
    let lr = DevBuf::from_bytes(&0.003f32.to_le_bytes());
    for (skip, scale, use_lr) in [
        (true, 1.0, false),
        (false, 0.5, false),
        (false, 2.0, true),
        (true, 1.0, true),
    ] {
        let mut g = vec![Buf::random(LION_DTYPE_F32, n, 1.0, &mut rng)];
        let dg = DevBuf::from_bytes(&bytes_of(&g[0]));
        let host_flag = if skip { 1.0f32 } else { 0.0 };
        let host_lr = 0.003f32;
        let cpu_opts = LionStepOptions {
            grad_scale: scale,
            found_inf: &host_flag,
            lr: if use_lr { &host_lr } else { std::ptr::null() },
            ..lion_step_options_default()
        };
        let gpu_opts = LionStepOptions {
            grad_scale: scale,
            found_inf: (if skip { flag.ptr } else { no_flag.ptr }) as *const f32,
            lr: if use_lr {
                lr.ptr as *const f32
            } else {
                std::ptr::null()
            },
            ..lion_step_options_default()
        };
        let hp = [p[0].ptr()];
        let hg = [g[0].ptr() as *const c_void];
        let dpp = [dp.as_ptr()];
        let dgp = [dg.as_ptr() as *const c_void];
        unsafe {
            assert_eq!(
                lion_step_with_options(
                    cpu.raw,
                    hp.as_ptr(),
                    hg.as_ptr(),
                    1,
                    std::ptr::null_mut(),
                    &cpu_opts
                ),
                LionStatus::LION_OK
            );
            assert_eq!(
                lion_step_with_options(
                    gpu.raw,
                    dpp.as_ptr(),
                    dgp.as_ptr(),
                    1,
                    std::ptr::null_mut(),
                    &gpu_opts
                ),
                LionStatus::LION_OK
            );
        }
        let _ = &mut g;
        assert!(
            dp.download() == bytes_of(&p[0]),
            "skip={skip} scale={scale} lr={use_lr}: params differ"
        );
        assert!(
            gpu.save() == cpu.save(),
            "skip={skip} scale={scale} lr={use_lr}: state differs"
        );
    }
    assert_eq!(gpu.step_count(), 2, "skipped steps must not count");
    let _ = &mut p;
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn a_captured_graph_replays_with_a_changing_lr() {
    require_gpu!();
    graph_replays_with_a_changing_lr(LION_DTYPE_F32);
}

/// A captured step (Cautious Lion, stochastic rounding, a device lr) replayed with the lr
/// changed between replays, against the CPU, with state `state_dtype`.
fn graph_replays_with_a_changing_lr(state_dtype: LionDType) {
    let n = 70_001usize;
    let tensors = [
        lion_tensor_desc(n as u64, LION_DTYPE_BF16),
        lion_tensor_desc(1000, LION_DTYPE_F32),
    ];
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.0,
        stochastic_rounding: true,
        state_dtype,
        ..lion_config_default()
    };
    let cpu = Opt::new(config, &tensors).unwrap();
    let gpu = gpu_opt(config, &tensors);
    let mut rng = Rng::new(77);
    let mut params: Vec<Buf> = random_params(&tensors, &mut rng);
    let mut grads: Vec<Buf> = random_grads(&tensors, 1.0, &mut rng);
    let dp: Vec<DevBuf> = params
        .iter()
        .map(|b| DevBuf::from_bytes(&bytes_of(b)))
        .collect();
    let dg: Vec<DevBuf> = grads
        .iter()
        .map(|b| DevBuf::from_bytes(&bytes_of(b)))
        .collect();
    let lr_dev = DevBuf::from_bytes(&0.01f32.to_le_bytes());
    let pp: Vec<*mut c_void> = dp.iter().map(|d| d.as_ptr()).collect();
    let gp: Vec<*const c_void> = dg.iter().map(|d| d.as_ptr() as *const c_void).collect();
    let opts = LionStepOptions {
        lr: lr_dev.ptr as *const f32,
        ..lion_step_options_default()
    };
    unsafe {
        let mut stream = std::ptr::null_mut();
        gpu::check(sys::cuStreamCreate(
            &mut stream,
            sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
        ));
        gpu::check(sys::cuStreamBeginCapture_v2(
            stream,
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        ));
        let st = lion_step_with_options(
            gpu.raw,
            pp.as_ptr(),
            gp.as_ptr(),
            2,
            stream as *mut c_void,
            &opts,
        );
        let mut graph = std::ptr::null_mut();
        gpu::check(sys::cuStreamEndCapture(stream, &mut graph));
        assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
        let mut exec = std::ptr::null_mut();
        gpu::check(sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0));
        // Nothing ran during capture.
        assert_eq!(gpu.step_count(), 0);
        for (i, lr) in [0.01f32, 0.005, 0.0025, 0.0].iter().enumerate() {
            lr_dev.upload(&lr.to_le_bytes());
            gpu::check(sys::cuGraphLaunch(exec, stream));
            gpu::check(sys::cuStreamSynchronize(stream));
            assert_eq!(lion_set_lr(cpu.raw, *lr), LionStatus::LION_OK);
            assert_eq!(cpu.step(&mut params, &mut grads), LionStatus::LION_OK);
            for (t, (d, want)) in dp.iter().zip(&params).enumerate() {
                assert!(
                    d.download() == bytes_of(want),
                    "replay {i}, tensor {t}: params differ from the CPU's"
                );
            }
            assert!(
                gpu.momentum() == cpu.momentum(),
                "replay {i}: momentum differs"
            );
            assert_eq!(gpu.step_count(), cpu.step_count(), "replay {i}");
        }
        assert_eq!(gpu.step_count(), 4);
        sys::cuGraphExecDestroy(exec);
        sys::cuGraphDestroy(graph);
        sys::cuStreamDestroy_v2(stream);
    }
}

/// `lion_step_tensors` on the GPU, in rounds of random orders and groupings, against
/// `lion_step` on the CPU: the same parameter bits and checkpoint after every round, and no
/// step counted before a round's last call.
fn rounds_on_gpu_match_whole_steps_on_cpu(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    rounds: usize,
    seed: u64,
) {
    let cpu = Opt::new(config, tensors).unwrap();
    let gpu = gpu_opt(config, tensors);
    let mut rng = Rng::new(seed);
    let mut params: Vec<Buf> = random_params(tensors, &mut rng);
    let dev_params: Vec<DevBuf> = params
        .iter()
        .map(|p| DevBuf::from_bytes(&bytes_of(p)))
        .collect();
    let label = format!("{config:?}");
    for round in 0..rounds {
        let mut grads: Vec<Buf> = random_grads(tensors, 1.0, &mut rng);
        let dev_grads: Vec<DevBuf> = grads
            .iter()
            .map(|g| DevBuf::from_bytes(&bytes_of(g)))
            .collect();
        assert_eq!(cpu.step(&mut params, &mut grads), LionStatus::LION_OK);
        // A random order cut into random groups.
        let n = tensors.len();
        let mut order: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.next_u64() as usize % (i + 1));
        }
        let mut rest = &order[..];
        while !rest.is_empty() {
            assert_eq!(gpu.step_count(), round as u64, "{label}: mid-round count");
            let take = 1 + rng.next_u64() as usize % rest.len();
            let group = &rest[..take];
            rest = &rest[take..];
            let p: Vec<*mut c_void> = group
                .iter()
                .map(|&i| dev_params[i as usize].as_ptr())
                .collect();
            let g: Vec<*const c_void> = group
                .iter()
                .map(|&i| dev_grads[i as usize].as_ptr() as *const c_void)
                .collect();
            let st = unsafe {
                lion_step_tensors(
                    gpu.raw,
                    group.as_ptr(),
                    group.len(),
                    p.as_ptr(),
                    g.as_ptr(),
                    std::ptr::null_mut(),
                    std::ptr::null(),
                )
            };
            assert_eq!(st, LionStatus::LION_OK, "{label}: {}", last_error());
        }
        gpu::sync();
        assert_eq!(gpu.step_count(), round as u64 + 1, "{label}");
        let what = format!("{label}: round {round} (against the CPU's lion_step)");
        assert_gpu_is_cpu(&what, &dev_params, &params, &gpu, &cpu);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn step_tensors_rounds_match_lion_step_for_every_dtype_and_option() {
    require_gpu!();
    let base = LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        ..lion_config_default()
    };
    let mut seed = 300;
    for (param, grad, config) in dtype_configs(base) {
        seed += 1;
        rounds_on_gpu_match_whole_steps_on_cpu(config, &odd_tensors(param, grad), 2, seed);
    }
    let base = LionConfig {
        lr: 0.01,
        weight_decay: 0.15,
        stochastic_rounding: true,
        state_dtype: LION_DTYPE_BF16,
        seed: 5,
        ..lion_config_default()
    };
    for config in option_configs(base) {
        seed += 1;
        let tensors = odd_tensors(LION_DTYPE_BF16, LION_DTYPE_F32);
        rounds_on_gpu_match_whole_steps_on_cpu(config, &tensors, 3, seed);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn step_tensors_with_many_tensors_and_only_empty_ones() {
    require_gpu!();
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.0,
        stochastic_rounding: true,
        ..lion_config_default()
    };
    // More tensors than one launch of lion_step_tensors carries (160), empty ones among them:
    // groups of up to all 517 take several launches.
    let many: Vec<LionTensorDesc> = (0..517)
        .map(|i| lion_tensor_desc((i * 37 % 300) as u64, LION_DTYPE_BF16))
        .collect();
    rounds_on_gpu_match_whole_steps_on_cpu(config, &many, 4, 400);
    let empty = vec![lion_tensor_desc(0, LION_DTYPE_F32); 3];
    rounds_on_gpu_match_whole_steps_on_cpu(config, &empty, 2, 401);
    // One large tensor: many blocks in one slot.
    let large = [
        lion_tensor_desc(1_000_003, LION_DTYPE_F16),
        lion_tensor_desc(5, LION_DTYPE_F32),
    ];
    rounds_on_gpu_match_whole_steps_on_cpu(config, &large, 2, 402);
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn step_tensors_options_skips_and_an_early_end_on_the_device() {
    require_gpu!();
    let tensors = odd_tensors(LION_DTYPE_BF16, LION_DTYPE_BF16);
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.5,
        stochastic_rounding: true,
        state_dtype: LION_DTYPE_BF16,
        ..lion_config_default()
    };
    let cpu = Opt::new(config, &tensors).unwrap();
    let gpu = gpu_opt(config, &tensors);
    let mut rng = Rng::new(500);
    let mut params: Vec<Buf> = random_params(&tensors, &mut rng);
    let dp: Vec<DevBuf> = params
        .iter()
        .map(|b| DevBuf::from_bytes(&bytes_of(b)))
        .collect();
    let flag = DevBuf::from_bytes(&1.0f32.to_le_bytes());
    let no_flag = DevBuf::from_bytes(&0.0f32.to_le_bytes());
    let lr = DevBuf::from_bytes(&0.003f32.to_le_bytes());
    let host_lr = 0.003f32;
    let (host_yes, host_no) = (1.0f32, 0.0f32);
    let call =
        |opt: &Opt, group: &[u32], p: &[*mut c_void], g: &[*const c_void], o: &LionStepOptions| {
            let st = unsafe {
                lion_step_tensors(
                    opt.raw,
                    group.as_ptr(),
                    group.len(),
                    p.as_ptr(),
                    g.as_ptr(),
                    std::ptr::null_mut(),
                    o,
                )
            };
            assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
        };
    // Rounds: grad_scale and a device lr on every call; a round whose calls are all skipped
    // (found_inf), which writes nothing and does not count; a round ended early.
    for (skip, early) in [(false, false), (true, false), (false, true), (false, false)] {
        let mut grads: Vec<Buf> = random_grads(&tensors, 1.0, &mut rng);
        let dg: Vec<DevBuf> = grads
            .iter()
            .map(|b| DevBuf::from_bytes(&bytes_of(b)))
            .collect();
        let cpu_opts = LionStepOptions {
            grad_scale: 0.5,
            lr: &host_lr,
            found_inf: if skip { &host_yes } else { &host_no },
            ..lion_step_options_default()
        };
        let gpu_opts = LionStepOptions {
            grad_scale: 0.5,
            lr: lr.ptr as *const f32,
            found_inf: (if skip { flag.ptr } else { no_flag.ptr }) as *const f32,
            ..lion_step_options_default()
        };
        let groups: Vec<Vec<u32>> = if early {
            vec![vec![5, 0], vec![3]]
        } else {
            vec![vec![4, 2], vec![0], vec![1, 5, 3]]
        };
        for group in &groups {
            let hp: Vec<*mut c_void> = group.iter().map(|&i| params[i as usize].ptr()).collect();
            let hg: Vec<*const c_void> = group
                .iter()
                .map(|&i| grads[i as usize].ptr() as *const c_void)
                .collect();
            let dpp: Vec<*mut c_void> = group.iter().map(|&i| dp[i as usize].as_ptr()).collect();
            let dgp: Vec<*const c_void> = group
                .iter()
                .map(|&i| dg[i as usize].as_ptr() as *const c_void)
                .collect();
            call(&cpu, group, &hp, &hg, &cpu_opts);
            call(&gpu, group, &dpp, &dgp, &gpu_opts);
        }
        if early {
            for opt in [&cpu, &gpu] {
                let st = unsafe { lion_round_finish(opt.raw, std::ptr::null_mut()) };
                assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
            }
        }
        for (t, (d, want)) in dp.iter().zip(&params).enumerate() {
            assert!(
                d.download() == bytes_of(want),
                "skip={skip} early={early}, tensor {t}: params differ"
            );
        }
        assert!(
            gpu.save() == cpu.save(),
            "skip={skip} early={early}: state differs"
        );
        assert_eq!(
            gpu.step_count(),
            cpu.step_count(),
            "skip={skip} early={early}"
        );
    }
    assert_eq!(gpu.step_count(), 3, "the skipped round must not count");
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn a_captured_round_of_step_tensors_replays() {
    require_gpu!();
    captured_round_replays(LION_DTYPE_F32);
}

/// A round of `lion_step_tensors` in two calls, captured and replayed, against the CPU's
/// `lion_step`, with state `state_dtype`.
fn captured_round_replays(state_dtype: LionDType) {
    let tensors = [
        lion_tensor_desc(70_001, LION_DTYPE_BF16),
        lion_tensor_desc(1000, LION_DTYPE_F32),
        lion_tensor_desc(3, LION_DTYPE_F16),
    ];
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.0,
        stochastic_rounding: true,
        state_dtype,
        ..lion_config_default()
    };
    let cpu = Opt::new(config, &tensors).unwrap();
    let gpu = gpu_opt(config, &tensors);
    let mut rng = Rng::new(600);
    let mut params: Vec<Buf> = random_params(&tensors, &mut rng);
    let mut grads: Vec<Buf> = random_grads(&tensors, 1.0, &mut rng);
    let dp: Vec<DevBuf> = params
        .iter()
        .map(|b| DevBuf::from_bytes(&bytes_of(b)))
        .collect();
    let dg: Vec<DevBuf> = grads
        .iter()
        .map(|b| DevBuf::from_bytes(&bytes_of(b)))
        .collect();
    unsafe {
        let mut stream = std::ptr::null_mut();
        gpu::check(sys::cuStreamCreate(
            &mut stream,
            sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
        ));
        gpu::check(sys::cuStreamBeginCapture_v2(
            stream,
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        ));
        // The round in two calls, as a backward pass would: the last tensor first.
        let mut statuses = Vec::new();
        for group in [[2u32].as_slice(), &[1, 0]] {
            let p: Vec<*mut c_void> = group.iter().map(|&i| dp[i as usize].as_ptr()).collect();
            let g: Vec<*const c_void> = group
                .iter()
                .map(|&i| dg[i as usize].as_ptr() as *const c_void)
                .collect();
            statuses.push(lion_step_tensors(
                gpu.raw,
                group.as_ptr(),
                group.len(),
                p.as_ptr(),
                g.as_ptr(),
                stream as *mut c_void,
                std::ptr::null(),
            ));
        }
        let mut graph = std::ptr::null_mut();
        gpu::check(sys::cuStreamEndCapture(stream, &mut graph));
        assert!(
            statuses.iter().all(|&s| s == LionStatus::LION_OK),
            "{}",
            last_error()
        );
        let mut exec = std::ptr::null_mut();
        gpu::check(sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0));
        assert_eq!(gpu.step_count(), 0, "nothing ran during capture");
        for replay in 0..3 {
            gpu::check(sys::cuGraphLaunch(exec, stream));
            gpu::check(sys::cuStreamSynchronize(stream));
            assert_eq!(cpu.step(&mut params, &mut grads), LionStatus::LION_OK);
            for (t, (d, want)) in dp.iter().zip(&params).enumerate() {
                assert!(
                    d.download() == bytes_of(want),
                    "replay {replay}, tensor {t}: params differ from the CPU's"
                );
            }
            assert!(gpu.save() == cpu.save(), "replay {replay}: state differs");
        }
        assert_eq!(gpu.step_count(), 3);
        sys::cuGraphExecDestroy(exec);
        sys::cuGraphDestroy(graph);
        sys::cuStreamDestroy_v2(stream);
    }
}

// ---- 8-bit momentum (LION_DTYPE_Q8) ----

/// Sizes for 8-bit momentum: small tensors that keep f32 momentum (1, 7, 4095), an empty one,
/// the smallest quantized tensor (4096), partial last blocks (4096 + 37, 16384 + 337,
/// 32768 + 13), a last CUDA chunk of 13 elements (65536 + 13: q8 state's chunks are 64 Ki
/// elements, src/cuda/plan.rs) and two chunks ending in a partial block (100_003).
fn q8_tensors(param: LionDType, grad: LionDType) -> Vec<LionTensorDesc> {
    scaled_tensors(
        &[
            1,
            7,
            0,
            4095,
            4096,
            4096 + 37,
            4096 + 130,
            16384 + 300 + 37,
            32768 + 13,
            65536 + 13,
            100_003,
        ],
        param,
        grad,
    )
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn q8_momentum_matches_the_cpu_for_every_dtype_combination() {
    require_gpu!();
    let base = LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        seed: 42,
        ..lion_config_default()
    };
    let mut seed = 700;
    for param in DTYPES {
        for grad in DTYPES {
            for stochastic_rounding in [false, true] {
                seed += 1;
                let config = q8(LionConfig {
                    stochastic_rounding,
                    ..base
                });
                same_on_cpu_and_gpu(config, &q8_tensors(param, grad), 3, seed, 0);
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn q8_momentum_matches_the_cpu_for_every_option() {
    require_gpu!();
    let base = q8(LionConfig {
        lr: 0.01,
        weight_decay: 0.15,
        stochastic_rounding: true,
        seed: 9,
        ..lion_config_default()
    });
    let mut seed = 800;
    for config in option_configs(base) {
        for (param, grad) in [
            (LION_DTYPE_BF16, LION_DTYPE_F32),
            (LION_DTYPE_F32, LION_DTYPE_BF16),
        ] {
            seed += 1;
            same_on_cpu_and_gpu(config, &q8_tensors(param, grad), 3, seed, 0);
        }
    }
    // Unaligned buffers: no 16-byte vector loads of parameters and gradients.
    let config = q8(LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.0,
        ..lion_config_default()
    });
    same_on_cpu_and_gpu(
        config,
        &q8_tensors(LION_DTYPE_F32, LION_DTYPE_F32),
        2,
        850,
        4,
    );
    same_on_cpu_and_gpu(
        config,
        &q8_tensors(LION_DTYPE_BF16, LION_DTYPE_F16),
        2,
        851,
        2,
    );
    // grad_scale, found_inf and a device lr, quantized and small.
    step_options_match_the_cpu(LION_DTYPE_Q8, 5000);
    step_options_match_the_cpu(LION_DTYPE_Q8, 4095);
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn q8_momentum_of_non_finite_and_tiny_values_matches_the_cpu() {
    require_gpu!();
    // Gradients with a NaN or an infinity poison their block (a NaN scale, codes 0), subnormal
    // and tiny ones make scales kept at 2^-112, and f32::MAX (momentum of it where beta2 is 0)
    // one kept below f32::MAX: the same bits.
    for beta2 in [0.99, 0.0] {
        q8_extremes_match_the_cpu(beta2);
    }
}

fn q8_extremes_match_the_cpu(beta2: f32) {
    let n = 4096 + 300;
    let tensors = [lion_tensor_desc(n as u64, LION_DTYPE_F32)];
    let config = q8(LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        beta2,
        ..lion_config_default()
    });
    let cpu = Opt::new(config, &tensors).unwrap();
    let gpu = gpu_opt(config, &tensors);
    let mut rng = Rng::new(900);
    let mut params = vec![Buf::random(LION_DTYPE_F32, n, 1.0, &mut rng)];
    let dp = DevBuf::from_bytes(&bytes_of(&params[0]));
    for step in 0..4 {
        let mut g: Vec<f64> = Buf::random(LION_DTYPE_F32, n, 1.0, &mut rng).to_f64();
        for (j, v) in g.iter_mut().enumerate() {
            match (j / 256, step) {
                (1, _) => *v *= 1e-42, // subnormal f32 after the conversion
                (4, _) => *v *= 1e-36, // normal, below the scale kept
                (5, _) if j % 31 == 0 => *v = v.signum() * f32::MAX as f64,
                (2, 1) if j % 97 == 0 => *v = f64::NAN,
                (3, 2) if j == 3 * 256 + 5 => *v = f64::INFINITY,
                (16, _) => *v = 0.0, // the tail block: all zero
                _ => {}
            }
        }
        let mut grads = vec![Buf::from_f64(LION_DTYPE_F32, &g)];
        let dg = DevBuf::from_bytes(&bytes_of(&grads[0]));
        assert_eq!(cpu.step(&mut params, &mut grads), LionStatus::LION_OK);
        let st = unsafe {
            lion_step(
                gpu.raw,
                [dp.as_ptr()].as_ptr(),
                [dg.as_ptr() as *const c_void].as_ptr(),
                1,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
        gpu::sync();
        assert!(
            dp.download() == bytes_of(&params[0]),
            "beta2 {beta2}, step {step}: params differ"
        );
        assert!(
            gpu.save() == cpu.save(),
            "beta2 {beta2}, step {step}: state differs"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn q8_checkpoints_move_between_devices_and_state_dtypes() {
    require_gpu!();
    let base = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        ..lion_config_default()
    };
    let tensors = q8_tensors(LION_DTYPE_F32, LION_DTYPE_BF16);
    let trained = |config: LionConfig| {
        let cpu = Opt::new(config, &tensors).unwrap();
        let mut rng = Rng::new(11);
        let mut params: Vec<Buf> = random_params(&tensors, &mut rng);
        for _ in 0..3 {
            let mut grads: Vec<Buf> = random_grads(&tensors, 1.0, &mut rng);
            assert_eq!(cpu.step(&mut params, &mut grads), LionStatus::LION_OK);
        }
        cpu
    };
    // q8 CPU -> GPU -> CPU: the same blob.
    let blob = trained(q8(base)).save();
    let gpu = gpu_opt(q8(base), &tensors);
    assert_eq!(gpu.load(&blob), LionStatus::LION_OK, "{}", last_error());
    assert_eq!(gpu.step_count(), 3);
    assert!(
        gpu.save() == blob,
        "CPU -> GPU -> blob is not the same blob"
    );
    let back = Opt::new(q8(base), &tensors).unwrap();
    assert_eq!(back.load(&gpu.save()), LionStatus::LION_OK);
    assert!(back.save() == blob);
    // A damaged blob leaves the GPU optimizer as it was.
    let mut bad = blob.clone();
    bad[100] ^= 1;
    assert_eq!(gpu.load(&bad), LionStatus::LION_ERROR_CORRUPT_STATE);
    assert!(gpu.save() == blob);
    // f32 and bf16 momentum into q8 on the GPU as on the CPU (the encoder), and q8 from the
    // GPU into f32 and bf16 as from the CPU (the decoder).
    for other in [LION_DTYPE_F32, LION_DTYPE_BF16] {
        let dense = LionConfig {
            state_dtype: other,
            ..base
        };
        let dense_blob = trained(dense).save();
        let cpu_q8 = Opt::new(q8(base), &tensors).unwrap();
        let gpu_q8 = gpu_opt(q8(base), &tensors);
        assert_eq!(cpu_q8.load(&dense_blob), LionStatus::LION_OK);
        assert_eq!(
            gpu_q8.load(&dense_blob),
            LionStatus::LION_OK,
            "{}",
            last_error()
        );
        assert!(
            gpu_q8.save() == cpu_q8.save(),
            "{}: into q8 differs",
            dtype_name(other)
        );
        let from_cpu = Opt::new(dense, &tensors).unwrap();
        let from_gpu = gpu_opt(dense, &tensors);
        assert_eq!(from_cpu.load(&cpu_q8.save()), LionStatus::LION_OK);
        assert_eq!(from_gpu.load(&gpu_q8.save()), LionStatus::LION_OK);
        assert!(
            from_gpu.save() == from_cpu.save(),
            "{}: out of q8 differs",
            dtype_name(other)
        );
    }
    // A loaded checkpoint steps on as on the CPU.
    let cpu = trained(q8(base));
    let gpu = gpu_opt(q8(base), &tensors);
    assert_eq!(gpu.load(&cpu.save()), LionStatus::LION_OK);
    let mut rng = Rng::new(12);
    let mut params: Vec<Buf> = random_params(&tensors, &mut rng);
    let dp: Vec<DevBuf> = params
        .iter()
        .map(|b| DevBuf::from_bytes(&bytes_of(b)))
        .collect();
    for step in 0..2 {
        let mut grads: Vec<Buf> = random_grads(&tensors, 1.0, &mut rng);
        let dg: Vec<DevBuf> = grads
            .iter()
            .map(|b| DevBuf::from_bytes(&bytes_of(b)))
            .collect();
        assert_eq!(cpu.step(&mut params, &mut grads), LionStatus::LION_OK);
        step_on_device(&gpu, &dp, &dg);
        gpu::sync();
        for (t, (d, want)) in dp.iter().zip(&params).enumerate() {
            assert!(
                d.download() == bytes_of(want),
                "after a load, step {step}, tensor {t}: params differ"
            );
        }
        assert!(
            gpu.save() == cpu.save(),
            "after a load, step {step}: state differs"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn q8_step_tensors_rounds_match_lion_step() {
    require_gpu!();
    let base = q8(LionConfig {
        lr: 0.02,
        weight_decay: 0.15,
        seed: 5,
        ..lion_config_default()
    });
    let mut seed = 1000;
    for param in DTYPES {
        for grad in DTYPES {
            seed += 1;
            let config = LionConfig {
                stochastic_rounding: seed % 2 == 0,
                ..base
            };
            rounds_on_gpu_match_whole_steps_on_cpu(config, &q8_tensors(param, grad), 2, seed);
        }
    }
    let base = LionConfig {
        stochastic_rounding: true,
        ..base
    };
    for config in option_configs(base) {
        seed += 1;
        let tensors = q8_tensors(LION_DTYPE_BF16, LION_DTYPE_F32);
        rounds_on_gpu_match_whole_steps_on_cpu(config, &tensors, 3, seed);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn q8_captured_graphs_replay() {
    require_gpu!();
    graph_replays_with_a_changing_lr(LION_DTYPE_Q8);
    captured_round_replays(LION_DTYPE_Q8);
}

/// The update kernels of momentum dtype `state`: (by value, with a table), as lion.cu names
/// them, for the fake driver's launch counts.
fn update_kernels(state: LionDType) -> (String, String) {
    let dtype = match state {
        LION_DTYPE_F32 => "f32",
        LION_DTYPE_BF16 => "bf16",
        _ => "q8",
    };
    (
        format!("lion_update_{dtype}"),
        format!("lion_update_table_{dtype}"),
    )
}

/// `sets` sets of device buffers, one for each tensor's gradient (contents unset).
fn gradient_buffer_sets(tensors: &[LionTensorDesc], sets: usize) -> Vec<Vec<DevBuf>> {
    let buffers = || {
        tensors
            .iter()
            .map(|t| DevBuf::new(t.numel as usize * dtype_size(t.grad_dtype)))
            .collect()
    };
    (0..sets).map(|_| buffers()).collect()
}

/// Launches of (`by_value`, `table`) so far, where the fake driver counts them.
fn launches(kernels: &(String, String)) -> Option<(u64, u64)> {
    Some((
        gpu::fake_launches(&kernels.0)?,
        gpu::fake_launches(&kernels.1)?,
    ))
}

/// Steps whose buffers repeat and change, against the CPU after every step: the pointer
/// tables of src/cuda/pointer_tables.rs. A set of addresses fills a table at its second step
/// in a row (a launch by value), launches with it from its third, and again whenever it comes
/// back; a new set once the tables are full (4), and a set that never comes twice in a row,
/// launch by value. Parameters move between two buffers too. Where the fake driver counts
/// launches (scripts/cuda_on_cpu.sh), each step's launch is the one this order asks for.
fn addresses_over_steps_match_the_cpu(
    config: LionConfig,
    tensors: &[LionTensorDesc],
    seed: u64,
    steps: usize,
) {
    // (parameter buffer, gradient buffer, whether the step launches with a table)
    const ORDER: [(usize, usize, bool); 20] = [
        (0, 0, false),
        (0, 0, false), // fills table 0
        (0, 0, true),
        (0, 1, false),
        (0, 1, false), // fills table 1
        (0, 0, true),  // table 0 again
        (0, 2, false),
        (0, 2, false), // fills table 2
        (0, 3, false),
        (0, 3, false), // fills table 3: the last
        (1, 3, false),
        (1, 3, false), // no room
        (1, 4, false),
        (1, 4, false),
        (1, 5, false),
        (0, 0, true), // table 0
        (0, 1, true), // table 1
        (0, 2, true), // table 2
        (0, 3, true), // table 3
        (0, 3, true),
    ];
    let cpu = Opt::new(config, tensors).unwrap();
    let gpu = gpu_opt(config, tensors);
    let kernels = update_kernels(config.state_dtype);
    let mut rng = Rng::new(seed);
    let mut params: Vec<Buf> = random_params(tensors, &mut rng);
    let param_sets: Vec<Vec<DevBuf>> = (0..2)
        .map(|_| {
            params
                .iter()
                .map(|p| DevBuf::from_bytes(&bytes_of(p)))
                .collect()
        })
        .collect();
    let grad_sets = gradient_buffer_sets(tensors, 6);
    let label = format!("{config:?}");
    let mut at = 0;
    for (step, &(ps, gs, with_table)) in ORDER[..steps].iter().enumerate() {
        if ps != at {
            // The parameters move to the other buffers (as a host might copy them).
            for (from, to) in param_sets[at].iter().zip(&param_sets[ps]) {
                to.upload(&from.download());
            }
            at = ps;
        }
        let mut grads: Vec<Buf> = random_grads(tensors, 1.0, &mut rng);
        for (d, g) in grad_sets[gs].iter().zip(&grads) {
            d.upload(&bytes_of(g));
        }
        assert_eq!(cpu.step(&mut params, &mut grads), LionStatus::LION_OK);
        let before = launches(&kernels);
        step_on_device(&gpu, &param_sets[ps], &grad_sets[gs]);
        if let (Some(before), Some(after)) = (before, launches(&kernels)) {
            let n = launches_per_step(tensors);
            let want = if with_table { (0, n) } else { (n, 0) };
            assert_eq!(
                (after.0 - before.0, after.1 - before.1),
                want,
                "{label}: step {step}: launches (by value, with a table)"
            );
        }
        gpu::sync();
        let what = format!("{label}: step {step}");
        assert_gpu_is_cpu(&what, &param_sets[ps], &params, &gpu, &cpu);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn repeated_and_changing_addresses_match_the_cpu() {
    require_gpu!();
    let base = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        ..lion_config_default()
    };
    let configs = [
        base,
        LionConfig {
            state_dtype: LION_DTYPE_BF16,
            cautious_factor: 0.0,
            stochastic_rounding: true,
            ..base
        },
        LionConfig {
            state_dtype: LION_DTYPE_Q8,
            cautious_factor: 0.0,
            ..base
        },
        LionConfig {
            state_dtype: LION_DTYPE_Q8,
            ..base
        },
    ];
    for (i, config) in configs.into_iter().enumerate() {
        let tensors = if config.stochastic_rounding {
            odd_tensors(LION_DTYPE_BF16, LION_DTYPE_F32)
        } else {
            q8_tensors(LION_DTYPE_F32, LION_DTYPE_BF16)
        };
        addresses_over_steps_match_the_cpu(config, &tensors, 300 + i as u64, 20);
    }
    // More tensors than one launch carries (240): each launch fills and reads its part of
    // the table.
    let many: Vec<LionTensorDesc> = (0..517)
        .map(|i| lion_tensor_desc((i * 37 % 300) as u64 + 1, LION_DTYPE_F32))
        .collect();
    addresses_over_steps_match_the_cpu(configs[0], &many, 310, 6);
}

/// A first step on a non-blocking stream right after creation reads what creation zeroed
/// (the momentum, the cautious counts, the step counters). Creation zeroes with memsets on the
/// legacy stream, which such a stream does not wait for, so creation must wait for them. The
/// fake driver holds those memsets until something orders them (tests/c/fake_cuda.c
/// `land_held`), so there a creation that does not wait makes this step read fresh memory's
/// garbage; a GPU loses that race only at times.
#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn a_first_step_on_a_non_blocking_stream_finds_the_zeroed_state() {
    require_gpu!();
    let base = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.0,
        ..lion_config_default()
    };
    for (i, state) in [LION_DTYPE_F32, LION_DTYPE_BF16, LION_DTYPE_Q8]
        .into_iter()
        .enumerate()
    {
        let config = LionConfig {
            state_dtype: state,
            ..base
        };
        let tensors = q8_tensors(LION_DTYPE_F32, LION_DTYPE_F32);
        let mut rng = Rng::new(60 + i as u64);
        let mut params = random_params(&tensors, &mut rng);
        let mut grads = random_grads(&tensors, 1.0, &mut rng);
        // Uploaded before creation: no synchronous copy comes between it and the step.
        let dp: Vec<DevBuf> = params
            .iter()
            .map(|p| DevBuf::from_bytes(&bytes_of(p)))
            .collect();
        let dg: Vec<DevBuf> = grads
            .iter()
            .map(|g| DevBuf::from_bytes(&bytes_of(g)))
            .collect();
        let gpu = gpu_opt(config, &tensors);
        let pp: Vec<*mut c_void> = dp.iter().map(|d| d.as_ptr()).collect();
        let gp: Vec<*const c_void> = dg.iter().map(|d| d.as_ptr() as *const c_void).collect();
        let st = gpu::step_on_a_non_blocking_stream(gpu.raw, &pp, &gp);
        assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
        let cpu = Opt::new(config, &tensors).unwrap();
        assert_eq!(cpu.step(&mut params, &mut grads), LionStatus::LION_OK);
        let what = format!("state dtype {}", dtype_name(state));
        assert_gpu_is_cpu(&what, &dp, &params, &gpu, &cpu);
    }
}

/// The launches of one whole step of `tensors` (MAX_TENSORS = 240 a launch).
fn launches_per_step(tensors: &[LionTensorDesc]) -> u64 {
    tensors.len().div_ceil(240).max(1) as u64
}

/// A graph that captured a step naming a table replays its own buffers after the tables
/// have filled with other addresses; and a capture whose second step would fill a table (the
/// same addresses twice) leaves the tables alone: its fill would happen only when the graph
/// runs. Then the same addresses fill a table outside the capture.
#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored)"]
fn a_graph_naming_a_table_replays_after_the_tables_change() {
    require_gpu!();
    let tensors = odd_tensors(LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        lr: 0.01,
        weight_decay: 0.1,
        cautious_factor: 0.0,
        ..lion_config_default()
    };
    let cpu = Opt::new(config, &tensors).unwrap();
    let gpu = gpu_opt(config, &tensors);
    let kernels = update_kernels(config.state_dtype);
    let mut rng = Rng::new(41);
    let mut params: Vec<Buf> = random_params(&tensors, &mut rng);
    let dp: Vec<DevBuf> = params
        .iter()
        .map(|p| DevBuf::from_bytes(&bytes_of(p)))
        .collect();
    let grad_sets = gradient_buffer_sets(&tensors, 6);
    let pp: Vec<*mut c_void> = dp.iter().map(|d| d.as_ptr()).collect();
    let gp = |set: usize| -> Vec<*const c_void> {
        grad_sets[set]
            .iter()
            .map(|d| d.as_ptr() as *const c_void)
            .collect()
    };
    // New gradients in `set`, stepped on the CPU: what the next GPU step of `set` must match.
    let mut next_grads = |params: &mut Vec<Buf>, set: usize, cpu_steps: usize| {
        let mut grads = random_grads(&tensors, 1.0, &mut rng);
        for (d, g) in grad_sets[set].iter().zip(&grads) {
            d.upload(&bytes_of(g));
        }
        for _ in 0..cpu_steps {
            assert_eq!(cpu.step(params, &mut grads), LionStatus::LION_OK);
        }
    };
    let check = |what: &str, params: &[Buf]| assert_gpu_is_cpu(what, &dp, params, &gpu, &cpu);
    let eager = |set: usize| {
        step_on_device(&gpu, &dp, &grad_sets[set]);
        gpu::sync();
    };
    unsafe {
        let mut stream = std::ptr::null_mut();
        gpu::check(sys::cuStreamCreate(
            &mut stream,
            sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
        ));
        let capture = |sets: &[usize]| {
            gpu::check(sys::cuStreamBeginCapture_v2(
                stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            ));
            for &set in sets {
                let g = gp(set);
                let st = lion_step(
                    gpu.raw,
                    pp.as_ptr(),
                    g.as_ptr(),
                    g.len(),
                    stream as *mut c_void,
                );
                assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
            }
            let mut graph = std::ptr::null_mut();
            gpu::check(sys::cuStreamEndCapture(stream, &mut graph));
            let mut exec = std::ptr::null_mut();
            gpu::check(sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0));
            sys::cuGraphDestroy(graph);
            exec
        };
        let replay = |exec| {
            gpu::check(sys::cuGraphLaunch(exec, stream));
            gpu::check(sys::cuStreamSynchronize(stream));
        };
        // Launches of each kind (by value, with a table) that `what` made, where counted.
        let launched = |what: &str, want: (u64, u64), run: &mut dyn FnMut()| {
            let before = launches(&kernels);
            run();
            if let (Some(before), Some(after)) = (before, launches(&kernels)) {
                let got = (after.0 - before.0, after.1 - before.1);
                assert_eq!(got, want, "{what}: launches (by value, with a table)");
            }
        };
        // Two steps of set 0: the second fills table 0; then a capture names it.
        for step in 0..2 {
            next_grads(&mut params, 0, 1);
            eager(0);
            check(&format!("eager step {step}"), &params);
        }
        let mut named = std::ptr::null_mut();
        launched("the capture of set 0", (0, 1), &mut || {
            named = capture(&[0])
        });
        // Set 5 twice in one capture, tables free: both launch by value and neither takes a
        // table, so the next step of set 5, outside a capture, fills one (by value) rather than
        // reading a table that only the graph would have filled.
        let mut twice = std::ptr::null_mut();
        launched("the capture of set 5 twice", (2, 0), &mut || {
            twice = capture(&[5, 5])
        });
        next_grads(&mut params, 5, 1);
        launched("set 5 after its capture", (1, 0), &mut || eager(5));
        check("set 5's step after its capture", &params);
        // Sets 1 to 4 twice each: the tables fill with their addresses (two of them fit).
        for set in 1..5 {
            for _ in 0..2 {
                next_grads(&mut params, set, 1);
                eager(set);
                check(&format!("eager step of set {set}"), &params);
            }
        }
        for round in 0..2 {
            next_grads(&mut params, 0, 1);
            replay(named);
            check(
                &format!("replay {round} of the graph naming table 0"),
                &params,
            );
        }
        next_grads(&mut params, 5, 2);
        replay(twice);
        check("the replay of set 5 twice", &params);
        sys::cuGraphExecDestroy(named);
        sys::cuGraphExecDestroy(twice);
        sys::cuStreamDestroy_v2(stream);
    }
}
