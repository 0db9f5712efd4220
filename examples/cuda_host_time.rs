//! Host time of one CUDA `lion_step` for GPT-2 small's 148 tensors (f32): the time the call
//! takes to enqueue the step, measured without the device's time, beside the driver's own
//! floor for it measured in the same process, in the same state.
//!
//! Each round (51, the first discarded) synchronizes, enqueues one step untimed so that the
//! card is busy, then times 20 pairs: one `lion_step`, and the driver calls a step makes with
//! no liblion around them (push the context, launch an empty kernel with a parameter block of
//! `StepArgs`' size, pop), the step first in even pairs and second in odd ones. Every call
//! queues behind real steps, as a trainer's step queues behind its backward pass, and the two
//! alternate, so that the host's moods (single medians of 3.6 to 6.8 us on the H100 machines'
//! hosts, BENCHMARKS.md) fall on both alike. Printed: the median of each, and the median of
//! the pairs' differences, liblion's part of a step's host time (also by order in the pair).
//!
//!   cargo run --release --example cuda_host_time
//!   LION_STREAM=created cargo run --release --example cuda_host_time   # a stream of its own
use std::ffi::{c_void, CStr};
use std::time::Instant;

use cudarc::driver::sys;
use lion::*;

#[path = "../benches/common/shapes.rs"]
mod shapes;

/// `StepArgs`' size (src/cuda/args.rs asserts it): the parameter block the driver copies at
/// each launch of a step; benches/cuda/launch_cost.cu times a bare launch of about this size.
const STEP_ARGS_BYTES: usize = 3976;

/// An empty kernel taking a parameter block of STEP_ARGS_BYTES, in PTX, which the driver
/// compiles for the card at hand: a launch with nothing in it but the driver's work.
const IDLE_PTX: &CStr = c".version 6.0
.target sm_52
.address_size 64
.visible .entry lion_host_time_idle(.param .align 8 .b8 args[3976])
{
    ret;
}
";

const PAIRS_PER_ROUND: usize = 20;
const ROUNDS: usize = 51;

fn check(r: sys::CUresult, what: &str) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{what}");
}

fn quantiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 10], v[v.len() / 2], v[v.len() * 9 / 10])
}

fn main() {
    let sizes = shapes::gpt2_small();
    unsafe {
        check(sys::cuInit(0), "no CUDA device");
        let mut ctx = std::ptr::null_mut();
        check(
            sys::cuDevicePrimaryCtxRetain(&mut ctx, 0),
            "cuDevicePrimaryCtxRetain",
        );
        check(sys::cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
        let alloc = |n: u64| {
            let mut p = 0;
            check(sys::cuMemAlloc_v2(&mut p, (n * 4) as usize), "cuMemAlloc");
            check(sys::cuMemsetD8_v2(p, 0x3c, (n * 4) as usize), "cuMemsetD8");
            p as *mut c_void
        };
        let params: Vec<*mut c_void> = sizes.iter().map(|&n| alloc(n)).collect();
        let grads: Vec<*const c_void> = sizes.iter().map(|&n| alloc(n) as *const c_void).collect();
        let tensors: Vec<LionTensorDesc> = sizes
            .iter()
            .map(|&n| lion_tensor_desc(n, LION_DTYPE_F32))
            .collect();
        let config = LionConfig {
            device: LION_DEVICE_CUDA,
            ..lion_config_default()
        };
        let mut opt = std::ptr::null_mut();
        assert_eq!(
            lion_create(&config, tensors.as_ptr(), tensors.len(), &mut opt),
            LionStatus::LION_OK
        );
        // LION_STREAM=created: a non-blocking stream of our own instead of the legacy default.
        let mut stream: sys::CUstream = std::ptr::null_mut();
        if std::env::var("LION_STREAM").as_deref() == Ok("created") {
            // Checked: a failed creation would leave the legacy stream (the erratum of 2026-12-06).
            check(
                sys::cuStreamCreate(
                    &mut stream,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                ),
                "cuStreamCreate",
            );
        }
        let mut module = std::ptr::null_mut();
        check(
            sys::cuModuleLoadData(&mut module, IDLE_PTX.as_ptr() as *const c_void),
            "loading the empty kernel's PTX",
        );
        let mut idle = std::ptr::null_mut();
        check(
            sys::cuModuleGetFunction(&mut idle, module, c"lion_host_time_idle".as_ptr()),
            "cuModuleGetFunction",
        );
        let block = [0u64; STEP_ARGS_BYTES / 8];
        let step = || {
            let st = lion_step(
                opt,
                params.as_ptr(),
                grads.as_ptr(),
                params.len(),
                stream as *mut c_void,
            );
            assert_eq!(st, LionStatus::LION_OK);
        };
        let bare = || {
            let mut args = [block.as_ptr() as *mut c_void];
            let mut old = std::ptr::null_mut();
            check(sys::cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent");
            check(
                sys::cuLaunchKernel(
                    idle,
                    128, // as benches/cuda/launch_cost.cu launches
                    1,
                    1,
                    256,
                    1,
                    1,
                    0,
                    stream,
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                ),
                "launching the empty kernel",
            );
            check(sys::cuCtxPopCurrent_v2(&mut old), "cuCtxPopCurrent");
        };
        let timed = |call: &dyn Fn()| {
            let t = Instant::now();
            call();
            t.elapsed().as_secs_f64() * 1e6
        };
        let (mut steps, mut bares) = (Vec::new(), Vec::new());
        // The pairs' differences, by which came first: [step first, driver alone first].
        let mut differences = [Vec::new(), Vec::new()];
        for round in 0..ROUNDS {
            check(sys::cuCtxSynchronize(), "cuCtxSynchronize");
            step(); // the card busy: every timed call below queues behind work
            for pair in 0..PAIRS_PER_ROUND {
                let (s, b) = if pair % 2 == 0 {
                    let s = timed(&step);
                    (s, timed(&bare))
                } else {
                    let b = timed(&bare);
                    (timed(&step), b)
                };
                if round > 0 {
                    steps.push(s);
                    bares.push(b);
                    differences[pair % 2].push(s - b);
                }
            }
        }
        check(sys::cuCtxSynchronize(), "cuCtxSynchronize");
        let what = if stream.is_null() {
            "legacy default"
        } else {
            "created"
        };
        let [step_first, bare_first] = differences;
        let both = step_first.iter().chain(&bare_first).copied().collect();
        for (name, times) in [
            ("lion_step", steps),
            ("the driver alone (push + launch + pop)", bares),
            ("lion_step - the driver alone, by pair", both),
            ("  the same, pairs with the step first", step_first),
            ("  the same, pairs with the driver alone first", bare_first),
        ] {
            let n = times.len();
            let (p10, median, p90) = quantiles(times);
            println!(
                "host time, 148 tensors, CUDA ({what} stream), {name}: median {median:.2} us, \
                 p10 {p10:.2}, p90 {p90:.2} ({n} behind running steps)"
            );
        }
        lion_destroy(opt);
        sys::cuModuleUnload(module);
        if !stream.is_null() {
            sys::cuStreamDestroy_v2(stream);
        }
    }
}
