//! Host time of one CUDA `lion_step` for GPT-2 small's 148 tensors (f32): the time the call
//! takes to enqueue the step, measured without the device's time, beside the driver's own
//! floor for it measured in the same process, in the same state.
//!
//! The optimizer steps the same buffers every time, so its steps launch with their pointers
//! in a table (src/cuda/pointer_tables.rs: 144 bytes of parameters); with
//! `LION_CUDA_POINTER_TABLES=0`, by value (`StepArgs`, 3984 bytes). Beside each step, the
//! driver calls of either path with no liblion around them: a launch of an empty kernel with
//! a parameter block of 144 bytes, and one of 3984 bytes inside a context push and pop (as
//! liblion launched before it skipped those where its context is current already).
//!
//! Each round (51, the first discarded) synchronizes, enqueues one step untimed so that the
//! card is busy, then times 20 groups of the three calls, the order rotated from group to
//! group. Every call queues behind real steps, as a trainer's step queues behind its backward
//! pass, and the order rotates, so that the host's moods (single medians of 3.6 to 6.8 us on
//! the H100 machines' hosts, BENCHMARKS.md) fall on all alike. Printed: the median of each,
//! and the medians of the step's differences from either within each group: liblion's part of
//! a step's host time, against the driver calls of its own path.
//!
//!   cargo run --release --example cuda_host_time
//!   LION_STREAM=created cargo run --release --example cuda_host_time   # a stream of its own
//!   LION_CUDA_POINTER_TABLES=0 cargo run --release --example cuda_host_time   # by value
use std::ffi::{c_void, CStr};
use std::time::Instant;

use cudarc::driver::sys;
use lion::*;

#[path = "../benches/common/shapes.rs"]
mod shapes;

/// The larger parameter block the driver copies at each launch of a step: `StepArgs`' size
/// (the smaller, `TableArgs`', is 144 bytes: src/cuda/args.rs asserts both, and the PTX below
/// declares both). benches/cuda/launch_cost.cu times bare launches of about these sizes.
const STEP_ARGS_BYTES: usize = 3984;

/// Empty kernels taking a parameter block of either size, in PTX, which the driver compiles
/// for the card at hand: a launch with nothing in it but the driver's work.
const IDLE_PTX: &CStr = c".version 6.0
.target sm_52
.address_size 64
.visible .entry lion_host_time_idle(.param .align 8 .b8 args[3984])
{
    ret;
}
.visible .entry lion_host_time_idle_small(.param .align 8 .b8 args[144])
{
    ret;
}
";

const GROUPS_PER_ROUND: usize = 20;

/// One of the calls a group times.
type TimedCall<'a> = Box<dyn Fn() + 'a>;
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
        let buffers = || -> Vec<*mut c_void> { sizes.iter().map(|&n| alloc(n)).collect() };
        let (params, grads) = (buffers(), buffers());
        let tensors: Vec<LionTensorDesc> = sizes
            .iter()
            .map(|&n| lion_tensor_desc(n, LION_DTYPE_F32))
            .collect();
        let config = LionConfig {
            device: LION_DEVICE_CUDA,
            ..lion_config_default()
        };
        let mut opt = std::ptr::null_mut();
        // The process's first CUDA optimizer compiles the kernels (NVRTC, once per device and
        // process): what a host waits for at its first lion_create.
        let created = Instant::now();
        assert_eq!(
            lion_create(&config, tensors.as_ptr(), tensors.len(), &mut opt),
            LionStatus::LION_OK
        );
        println!(
            "lion_create of the process's first CUDA optimizer (148 tensors, the kernels \
             compiled): {:.2} s",
            created.elapsed().as_secs_f64()
        );
        let tables = std::env::var("LION_CUDA_POINTER_TABLES").as_deref() != Ok("0");
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
            "loading the empty kernels' PTX",
        );
        let function = |name: &CStr| {
            let mut f = std::ptr::null_mut();
            check(
                sys::cuModuleGetFunction(&mut f, module, name.as_ptr()),
                "cuModuleGetFunction",
            );
            f
        };
        let (idle, idle_small) = (
            function(c"lion_host_time_idle"),
            function(c"lion_host_time_idle_small"),
        );
        let block = [0u64; STEP_ARGS_BYTES / 8];
        let step = || {
            let st = lion_step(
                opt,
                params.as_ptr(),
                grads.as_ptr() as *const *const c_void,
                params.len(),
                stream as *mut c_void,
            );
            assert_eq!(st, LionStatus::LION_OK);
        };
        let launch = |f, what| {
            let mut args = [block.as_ptr() as *mut c_void];
            check(
                sys::cuLaunchKernel(
                    f,
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
                what,
            );
        };
        let calls: [(&str, TimedCall); 3] = [
            (
                if tables {
                    "lion_step (its pointers in a table)"
                } else {
                    "lion_step (its pointers by value: LION_CUDA_POINTER_TABLES=0)"
                },
                Box::new(step),
            ),
            (
                "the driver alone: a launch of 144 B",
                Box::new(|| launch(idle_small, "launching the small empty kernel")),
            ),
            (
                "the driver alone: push + a launch of 3984 B + pop",
                Box::new(|| {
                    let mut old = std::ptr::null_mut();
                    check(sys::cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent");
                    launch(idle, "launching the empty kernel");
                    check(sys::cuCtxPopCurrent_v2(&mut old), "cuCtxPopCurrent");
                }),
            ),
        ];
        let (names, calls): (Vec<&str>, Vec<TimedCall>) = calls.into_iter().unzip();
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); calls.len()];
        // Within each group: the step - the 144 B launch, the step - 3984 B with push and pop.
        let mut differences: [Vec<f64>; 2] = Default::default();
        for round in 0..ROUNDS {
            check(sys::cuCtxSynchronize(), "cuCtxSynchronize");
            calls[0](); // the card busy: every timed call queues behind work
            for group in 0..GROUPS_PER_ROUND {
                let mut took = [0.0; 3];
                for k in 0..calls.len() {
                    let i = (group + k) % calls.len();
                    let t = Instant::now();
                    calls[i]();
                    took[i] = t.elapsed().as_secs_f64() * 1e6;
                }
                if round > 0 {
                    for (all, t) in times.iter_mut().zip(took) {
                        all.push(t);
                    }
                    differences[0].push(took[0] - took[1]);
                    differences[1].push(took[0] - took[2]);
                }
            }
        }
        check(sys::cuCtxSynchronize(), "cuCtxSynchronize");
        drop(calls);
        let what = if stream.is_null() {
            "legacy default"
        } else {
            "created"
        };
        let [over_small, over_big] = differences;
        for (name, times) in names.into_iter().zip(times).chain([
            ("lion_step - the 144 B launch, in each group", over_small),
            ("lion_step - push, 3984 B, pop, in each group", over_big),
        ]) {
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
