//! A CUDA optimizer in a child of fork(): CUDA does not survive fork, so every call that needs
//! the device is refused with LION_ERROR_DEVICE_UNAVAILABLE, the host-side calls work, and
//! lion_destroy returns without touching the parent's device memory; nothing hangs. The
//! parent's optimizer is unaffected. Needs a GPU: run with --ignored on the GPU machine.

mod common;
mod gpu;

use std::ffi::c_void;

use common::*;
use gpu::DevBuf;
use lion::*;

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored on the GPU machine)"]
fn a_cuda_optimizer_in_a_fork_child_refuses_the_device_and_never_hangs() {
    let _lock = gpu::lock();
    gpu::context().expect("no usable CUDA device on this machine");
    let n = 4099;
    let config = LionConfig {
        device: LION_DEVICE_CUDA,
        lr: 1e-3,
        ..lion_config_default()
    };
    let opt = Opt::new(config, &[lion_tensor_desc(n, LION_DTYPE_F32)]).unwrap();
    let p = DevBuf::from_bytes(&vec![0u8; n as usize * 4]);
    let g = DevBuf::from_bytes(&1.0f32.to_le_bytes().repeat(n as usize));
    let params = [p.as_ptr()];
    let grads = [g.as_ptr() as *const c_void];
    let step = || unsafe {
        lion_step(
            opt.raw,
            params.as_ptr(),
            grads.as_ptr(),
            1,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(step(), LionStatus::LION_OK, "{}", last_error());
    gpu::sync();
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { libc::alarm(30) };
        let mut bad = 0;
        bad += (step() != LionStatus::LION_ERROR_DEVICE_UNAVAILABLE) as i32;
        bad += (!last_error().contains("fork")) as i32;
        let mut count = 0u64;
        let st = unsafe { lion_step_count(opt.raw, &mut count) };
        bad += (st != LionStatus::LION_ERROR_DEVICE_UNAVAILABLE) as i32;
        bad += (unsafe { lion_set_lr(opt.raw, 2e-3) } != LionStatus::LION_OK) as i32;
        bad += (opt.lr() != 2e-3) as i32;
        unsafe { lion_destroy(opt.raw) };
        unsafe { libc::_exit(bad) };
    }
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x} (signal 14 = it hung; exit N = N checks failed)"
    );
    // The parent's optimizer still steps and counts.
    assert_eq!(step(), LionStatus::LION_OK, "{}", last_error());
    assert_eq!(opt.step_count(), 2);
}
