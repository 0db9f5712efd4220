//! Bad input: each is refused with its status and a message, and nothing is written (no
//! handle, no parameter, no momentum, no step count).

mod common;

use std::ffi::c_void;
use std::ptr::{null, null_mut};

use common::*;
use lion::LionStatus::*;
use lion::*;

fn create(
    config: &LionConfig,
    tensors: &[LionTensorDesc],
) -> (LionStatus, String, *mut LionOptimizer) {
    let sentinel = 0x1234 as *mut LionOptimizer;
    let mut out = sentinel;
    let st = unsafe { lion_create(config, tensors.as_ptr(), tensors.len(), &mut out) };
    let msg = last_error();
    if st != LION_OK {
        assert_eq!(out, sentinel, "a failed create wrote *out");
        return (st, msg, null_mut());
    }
    (st, msg, out)
}

/// Creating an optimizer of `config` over `tensors` is refused with `want`, and the message
/// mentions `says`; `case` names the attempt in a failure.
fn refused(
    case: &str,
    config: LionConfig,
    tensors: &[LionTensorDesc],
    want: LionStatus,
    says: &str,
) {
    let (st, msg, _) = create(&config, tensors);
    assert_eq!(
        st, want,
        "{case}: expected {want:?} ({says}), got {st:?}: {msg}"
    );
    assert!(
        msg.contains(says),
        "{case}: message {msg:?} should mention {says:?}"
    );
}

#[test]
fn bad_configs_are_refused() {
    let t = [lion_tensor_desc(10, LION_DTYPE_F32)];
    let d = lion_config_default();
    let (inv, unsupported) = (LION_ERROR_INVALID_ARGUMENT, LION_ERROR_UNSUPPORTED);
    let dec = LION_DECAY_DECOUPLED;
    use lion::LionConfig as C; // short, for a table of one case a line
    #[rustfmt::skip]
    let cases = [
        ("NaN lr", C { lr: f32::NAN, ..d }, inv, "lr"),
        ("negative lr", C { lr: -1.0, ..d }, inv, "lr"),
        ("infinite lr", C { lr: f32::INFINITY, ..d }, inv, "lr"),
        ("beta1 above 1", C { beta1: 1.5, ..d }, inv, "beta1"),
        ("negative beta2", C { beta2: -0.1, ..d }, inv, "beta2"),
        ("NaN beta2", C { beta2: f32::NAN, ..d }, inv, "beta2"),
        ("negative decay", C { weight_decay: -0.1, ..d }, inv, "weight_decay"),
        ("infinite decay", C { weight_decay: f32::INFINITY, ..d }, inv, "weight_decay"),
        ("decay_mode 3", C { decay_mode: 3, ..d }, inv, "decay_mode"),
        ("decay_mode MAX", C { decay_mode: u32::MAX, ..d }, inv, "decay_mode"),
        ("decoupled decay, initial lr 0",
            C { decay_mode: dec, weight_decay: 0.1, lr: 0.0, ..d }, inv, "initial lr"),
        ("cautious_factor above 1", C { cautious_factor: 1.5, ..d }, inv, "cautious_factor"),
        ("negative cautious_factor", C { cautious_factor: -0.5, ..d }, inv, "cautious_factor"),
        ("device 7", C { device: 7, ..d }, inv, "device"),
        ("device_index -1", C { device_index: -1, ..d }, inv, "device_index"),
        ("state_dtype 9", C { state_dtype: 9, ..d }, inv, "state_dtype"),
        ("state_dtype 4", C { state_dtype: 4, ..d }, inv, "state_dtype"),
        ("F16 state", C { state_dtype: LION_DTYPE_F16, ..d }, unsupported, "F16"),
        ("a million threads", C { num_threads: 1_000_000, ..d }, inv, "num_threads"),
        ("struct_size 0", C { struct_size: 0, ..d }, inv, "struct_size"),
        ("struct_size 60", C { struct_size: 60, ..d }, inv, "struct_size"),
        ("struct_size 1 MiB", C { struct_size: 1 << 20, ..d }, inv, "struct_size"),
    ];
    for (case, config, want, says) in cases {
        refused(case, config, &t, want, says);
    }
}

#[test]
fn bools_other_than_0_or_1_are_refused() {
    let t = [lion_tensor_desc(10, LION_DTYPE_F32)];
    for offset in [
        std::mem::offset_of!(LionConfig, cautious_weight_decay),
        std::mem::offset_of!(LionConfig, stochastic_rounding),
    ] {
        let mut bytes = [0u8; 64];
        let d = lion_config_default();
        unsafe {
            std::ptr::copy_nonoverlapping(
                &d as *const LionConfig as *const u8,
                bytes.as_mut_ptr(),
                64,
            )
        };
        bytes[offset] = 2;
        let mut out = null_mut();
        let st =
            unsafe { lion_create(bytes.as_ptr() as *const LionConfig, t.as_ptr(), 1, &mut out) };
        assert_eq!(st, LION_ERROR_INVALID_ARGUMENT);
        assert!(last_error().contains("bool"), "{}", last_error());
    }
}

#[test]
fn a_larger_struct_is_accepted_only_when_its_tail_is_zero() {
    #[repr(C)]
    struct Newer {
        base: LionConfig,
        future_option: u64,
    }
    let t = [lion_tensor_desc(10, LION_DTYPE_F32)];
    let mut newer = Newer {
        base: LionConfig {
            struct_size: std::mem::size_of::<Newer>() as u32,
            ..lion_config_default()
        },
        future_option: 0,
    };
    let mut out = null_mut();
    assert_eq!(
        unsafe { lion_create(&newer.base, t.as_ptr(), 1, &mut out) },
        LION_OK
    );
    unsafe { lion_destroy(out) };
    newer.future_option = 1;
    let st = unsafe { lion_create(&newer.base, t.as_ptr(), 1, &mut out) };
    assert_eq!(st, LION_ERROR_UNSUPPORTED);
    assert!(last_error().contains("newer"), "{}", last_error());
}

#[test]
fn bad_tensors_are_refused() {
    let d = lion_config_default();
    let inv = LION_ERROR_INVALID_ARGUMENT;
    let ok = lion_tensor_desc(10, LION_DTYPE_F32);
    use lion::LionTensorDesc as T; // short, for a table of one case a line
    #[rustfmt::skip]
    let cases: [(&str, Vec<T>, &str); 8] = [
        ("param_dtype 3", vec![ok, T { param_dtype: 3, ..ok }], "tensors[1].param_dtype"),
        ("param_dtype 4", vec![ok, T { param_dtype: 4, ..ok }], "tensors[1].param_dtype"),
        ("grad_dtype Q8", vec![T { grad_dtype: LION_DTYPE_Q8, ..ok }], "state dtype only"),
        ("grad_dtype 99", vec![T { grad_dtype: 99, ..ok }], "tensors[0].grad_dtype"),
        ("NaN lr_scale", vec![T { lr_scale: f32::NAN, ..ok }], "lr_scale"),
        ("negative decay scale", vec![T { weight_decay_scale: -1.0, ..ok }], "weight_decay_scale"),
        ("u64::MAX elements", vec![lion_tensor_desc(u64::MAX, LION_DTYPE_F32)], "numel"),
        ("no tensors", vec![], "n_tensors"),
    ];
    for (case, tensors, says) in &cases {
        refused(case, d, tensors, inv, says);
    }
}

#[test]
fn absurd_sizes_fail_cleanly() {
    let d = lion_config_default();
    // 2^61 elements: addressable as a count, but no machine has 8 EiB.
    let (st, msg, _) = create(&d, &[lion_tensor_desc(1 << 61, LION_DTYPE_F32)]);
    assert!(
        matches!(st, LION_ERROR_OUT_OF_MEMORY | LION_ERROR_INVALID_ARGUMENT),
        "{st:?}: {msg}"
    );
    let (st, msg, _) = create(&d, &[lion_tensor_desc(1 << 60, LION_DTYPE_F32); 3]);
    assert!(
        matches!(st, LION_ERROR_OUT_OF_MEMORY | LION_ERROR_INVALID_ARGUMENT),
        "{st:?}: {msg}"
    );
}

#[test]
fn null_pointers_are_refused() {
    let t = [lion_tensor_desc(4, LION_DTYPE_F32)];
    let d = lion_config_default();
    let mut out = null_mut();
    unsafe {
        assert_eq!(
            lion_create(null(), t.as_ptr(), 1, &mut out),
            LION_ERROR_NULL_POINTER
        );
        assert!(last_error().contains("config"));
        assert_eq!(
            lion_create(&d, null(), 1, &mut out),
            LION_ERROR_NULL_POINTER
        );
        assert_eq!(
            lion_create(&d, t.as_ptr(), 1, null_mut()),
            LION_ERROR_NULL_POINTER
        );
        let mut f = 0.0f32;
        let mut n = 0u64;
        let mut z = 0usize;
        assert_eq!(lion_set_lr(null_mut(), 0.1), LION_ERROR_NULL_POINTER);
        assert_eq!(lion_get_lr(null(), &mut f), LION_ERROR_NULL_POINTER);
        assert_eq!(lion_step_count(null(), &mut n), LION_ERROR_NULL_POINTER);
        assert_eq!(lion_state_size(null(), &mut z), LION_ERROR_NULL_POINTER);
        assert_eq!(
            lion_state_save(null(), null_mut(), 0, null_mut()),
            LION_ERROR_NULL_POINTER
        );
        assert_eq!(
            lion_state_load(null_mut(), null(), 0),
            LION_ERROR_NULL_POINTER
        );
        assert_eq!(
            lion_step(null_mut(), null(), null(), 1, null_mut()),
            LION_ERROR_NULL_POINTER
        );
        lion_destroy(null_mut());
        let opt = Opt::new(d, &t).unwrap();
        assert_eq!(lion_get_lr(opt.raw, null_mut()), LION_ERROR_NULL_POINTER);
        assert_eq!(
            lion_step_count(opt.raw, null_mut()),
            LION_ERROR_NULL_POINTER
        );
        assert_eq!(
            lion_state_size(opt.raw, null_mut()),
            LION_ERROR_NULL_POINTER
        );
        assert_eq!(
            lion_state_save(opt.raw, null_mut(), 1 << 20, null_mut()),
            LION_ERROR_NULL_POINTER
        );
        assert_eq!(
            lion_state_load(opt.raw, null(), 10),
            LION_ERROR_NULL_POINTER
        );
        assert!(last_error().contains("buf"), "{}", last_error());
        // A successful call empties the message.
        assert_eq!(lion_get_lr(opt.raw, &mut f), LION_OK);
        assert_eq!(last_error(), "");
    }
}

#[test]
fn bad_lr_is_refused_and_kept() {
    let opt = Opt::new(
        lion_config_default(),
        &[lion_tensor_desc(4, LION_DTYPE_F32)],
    )
    .unwrap();
    for lr in [f32::NAN, -0.5, f32::INFINITY] {
        assert_eq!(
            unsafe { lion_set_lr(opt.raw, lr) },
            LION_ERROR_INVALID_ARGUMENT
        );
    }
    assert_eq!(opt.lr(), 1e-4);
}

/// One step that must be refused: its name, the params and grads passed, n_tensors, the status
/// and a fragment of the message.
type RefusedStep<'a> = (
    &'a str,
    [*mut c_void; 3],
    [*const c_void; 3],
    usize,
    LionStatus,
    &'a str,
);

/// A refused step must leave params, momentum and step count untouched.
fn assert_step_refused(opt: &Opt, step: &RefusedStep, when: &str, watch: &[&Buf]) {
    let (name, params, grads, n, want, says) = *step;
    let case = format!("{name} ({when})");
    let before_state = opt.save();
    let before: Vec<Buf> = watch.iter().map(|b| (*b).clone()).collect();
    let st = unsafe { lion_step(opt.raw, params.as_ptr(), grads.as_ptr(), n, null_mut()) };
    let msg = last_error();
    assert_eq!(st, want, "{case}: {msg}");
    assert!(
        msg.contains(says),
        "{case}: message {msg:?} should mention {says:?}"
    );
    assert_eq!(opt.save(), before_state, "{case}: state changed");
    for (b, w) in before.iter().zip(watch) {
        assert_eq!(b, *w, "{case}: a buffer was written");
    }
}

#[test]
fn bad_steps_write_nothing() {
    let t = [
        lion_tensor_desc(100, LION_DTYPE_F32),
        lion_tensor_desc(50, LION_DTYPE_BF16),
        lion_tensor_desc(0, LION_DTYPE_F32),
    ];
    let opt = Opt::new(
        LionConfig {
            lr: 0.1,
            ..lion_config_default()
        },
        &t,
    )
    .unwrap();
    let mut rng = Rng::new(1);
    let mut p0 = Buf::random(LION_DTYPE_F32, 100, 1.0, &mut rng);
    let mut p1 = Buf::random(LION_DTYPE_BF16, 50, 1.0, &mut rng);
    let mut g0 = Buf::random(LION_DTYPE_F32, 100, 1.0, &mut rng);
    let mut g1 = Buf::random(LION_DTYPE_BF16, 50, 1.0, &mut rng);
    let (pp0, pp1, gp0, gp1) = (
        p0.ptr(),
        p1.ptr(),
        g0.ptr() as *const c_void,
        g1.ptr() as *const c_void,
    );
    let (inv, nul) = (LION_ERROR_INVALID_ARGUMENT, LION_ERROR_NULL_POINTER);
    // The empty third tensor's NULL buffers are fine; a NULL among valid buffers is not.
    let (np, ng) = (null_mut(), null());
    let odd = (pp0 as *mut u8).wrapping_add(1) as *mut c_void;
    let inside = (pp0 as *mut u8).wrapping_add(40) as *mut c_void;
    let (p0_as_grad, g0_as_param) = (pp0 as *const c_void, gp0 as *mut c_void);
    #[rustfmt::skip] // one case a line
    let cases: [RefusedStep; 7] = [
        ("wrong count", [pp0, pp1, np], [gp0, gp1, ng], 2, inv, "n_tensors"),
        ("NULL param", [pp0, np, np], [gp0, gp1, ng], 3, nul, "params[1]"),
        ("NULL grad", [pp0, pp1, np], [gp0, ng, ng], 3, nul, "grads[1]"),
        ("misaligned", [odd, pp1, np], [gp0, gp1, ng], 3, inv, "aligned"),
        // Overlaps: a parameter with its own gradient, with another parameter, with a gradient.
        ("param is its grad", [pp0, pp1, np], [p0_as_grad, gp1, ng], 3, inv, "overlaps"),
        ("param in param", [pp0, inside, np], [gp0, gp1, ng], 3, inv, "overlaps"),
        ("param on a grad", [pp0, g0_as_param, np], [gp0, gp1, ng], 3, inv, "overlaps"),
    ];
    let watch = [&p0, &p1];
    for case in &cases {
        assert_step_refused(&opt, case, "before any step", &watch);
    }
    // Grads may share memory with each other (read-only), and the step then goes through.
    let st = unsafe {
        lion_step(
            opt.raw,
            [pp0, pp1, np].as_ptr(),
            [gp0, gp0, ng].as_ptr(),
            3,
            null_mut(),
        )
    };
    assert_eq!(st, LION_OK, "{}", last_error());
    assert_eq!(opt.step_count(), 1);
    // After a successful step the same pointers skip the overlap sort; new ones are checked
    // again (the overlap first, while the successful step's pointers are the remembered ones).
    for name in ["param in param", "NULL param"] {
        let case = cases.iter().find(|c| c.0 == name).unwrap();
        assert_step_refused(&opt, case, "after a successful step", &watch);
    }
}

#[test]
fn check_finite_refuses_nan_and_inf_and_writes_nothing() {
    let t = [
        lion_tensor_desc(70_000, LION_DTYPE_F32),
        lion_tensor_desc(100, LION_DTYPE_BF16),
    ];
    let opt = Opt::new(
        LionConfig {
            lr: 0.1,
            ..lion_config_default()
        },
        &t,
    )
    .unwrap();
    let mut rng = Rng::new(2);
    let mut p = random_params(&t, &mut rng);
    let before_p = p.clone();
    let before_state = opt.save();
    for (tensor, at, bad) in [
        (0usize, 69_999usize, f64::NAN),
        (1, 3, f64::INFINITY),
        (0, 0, f64::NEG_INFINITY),
    ] {
        let mut g = random_grads(&t, 1.0, &mut rng);
        let mut values = g[tensor].to_f64();
        values[at] = bad;
        g[tensor] = Buf::from_f64(t[tensor].grad_dtype, &values);
        let pp: Vec<*mut c_void> = p.iter_mut().map(Buf::ptr).collect();
        let gp: Vec<*const c_void> = g.iter_mut().map(|b| b.ptr() as *const c_void).collect();
        let options = LionStepOptions {
            check_finite: true,
            ..lion_step_options_default()
        };
        let st = unsafe {
            lion_step_with_options(opt.raw, pp.as_ptr(), gp.as_ptr(), 2, null_mut(), &options)
        };
        assert_eq!(st, LionStatus::LION_ERROR_NON_FINITE);
        assert!(
            last_error().contains(&format!("grads[{tensor}][{at}]")),
            "{}",
            last_error()
        );
        assert_eq!(p, before_p);
        assert_eq!(opt.save(), before_state);
    }
    // Finite gradients pass the check and step.
    let mut g = random_grads(&t, 1.0, &mut rng);
    let pp: Vec<*mut c_void> = p.iter_mut().map(Buf::ptr).collect();
    let gp: Vec<*const c_void> = g.iter_mut().map(|b| b.ptr() as *const c_void).collect();
    let options = LionStepOptions {
        check_finite: true,
        ..lion_step_options_default()
    };
    assert_eq!(
        unsafe {
            lion_step_with_options(opt.raw, pp.as_ptr(), gp.as_ptr(), 2, null_mut(), &options)
        },
        LION_OK
    );
    assert_eq!(opt.step_count(), 1);
}
