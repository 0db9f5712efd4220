//! Host time of one CUDA `lion_step` for GPT-2 small's 148 tensors (f32): the time the call
//! takes to enqueue the step, measured without the device's time (median of 1000 calls,
//! synchronizing every 20 so that the launch queue never fills). Past the first call of a
//! round, each launch queues behind the steps before it, as a trainer's do; `LION_ROUND=1`
//! synchronizes before every call instead, so that each launches onto an idle card (what
//! benches/cuda/launch_cost.cu's first rows time a bare launch on).
//!
//!   cargo run --release --example cuda_host_time
//!   LION_STREAM=created cargo run --release --example cuda_host_time   # a stream of its own
//!   LION_ROUND=1 cargo run --release --example cuda_host_time          # onto an idle card
use std::ffi::c_void;
use std::time::Instant;

use cudarc::driver::sys;
use lion::*;

#[path = "../benches/common/shapes.rs"]
mod shapes;

fn main() {
    let sizes = shapes::gpt2_small();
    unsafe {
        assert_eq!(
            sys::cuInit(0),
            sys::CUresult::CUDA_SUCCESS,
            "no CUDA device"
        );
        let mut ctx = std::ptr::null_mut();
        sys::cuDevicePrimaryCtxRetain(&mut ctx, 0);
        sys::cuCtxSetCurrent(ctx);
        let alloc = |n: u64| {
            let mut p = 0;
            assert_eq!(
                sys::cuMemAlloc_v2(&mut p, (n * 4) as usize),
                sys::CUresult::CUDA_SUCCESS
            );
            sys::cuMemsetD8_v2(p, 0x3c, (n * 4) as usize);
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
            sys::cuStreamCreate(
                &mut stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            );
        }
        let per_round: usize = std::env::var("LION_ROUND")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(20);
        let mut times = Vec::new();
        for round in 0..=1000 / per_round {
            sys::cuCtxSynchronize();
            for _ in 0..per_round {
                let t = Instant::now();
                let st = lion_step(
                    opt,
                    params.as_ptr(),
                    grads.as_ptr(),
                    params.len(),
                    stream as *mut c_void,
                );
                let us = t.elapsed().as_secs_f64() * 1e6;
                assert_eq!(st, LionStatus::LION_OK);
                if round > 0 {
                    times.push(us);
                }
            }
        }
        sys::cuCtxSynchronize();
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "host time of lion_step, 148 tensors, CUDA ({} stream, {}): median {:.1} us, p10 {:.1} us, p90 {:.1} us",
            if stream.is_null() { "legacy default" } else { "created" },
            if per_round == 1 {
                "each call onto an idle card".to_string()
            } else {
                format!("rounds of {per_round} calls")
            },
            times[times.len() / 2],
            times[times.len() / 10],
            times[times.len() * 9 / 10]
        );
        lion_destroy(opt);
        if !stream.is_null() {
            sys::cuStreamDestroy_v2(stream);
        }
    }
}
