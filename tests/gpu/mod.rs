//! Device memory for the GPU tests, through the driver API in the primary context (the one
//! liblion uses), and the check that tells whether this machine can run them at all.
#![allow(dead_code)]

use std::ffi::c_void;

use cudarc::driver::sys;

/// The primary context of device 0, current on this thread; None when the machine has no
/// usable CUDA device.
pub fn context() -> Option<sys::CUcontext> {
    let found = cudarc::get_lib_name_candidates("cuda").iter().any(|n| {
        let n = std::ffi::CString::new(n.as_str()).unwrap();
        let h = unsafe { libc::dlopen(n.as_ptr(), libc::RTLD_NOW) };
        !h.is_null()
    });
    if !found {
        return None;
    }
    unsafe {
        if sys::cuInit(0) != sys::CUresult::CUDA_SUCCESS {
            return None;
        }
        let mut count = 0;
        if sys::cuDeviceGetCount(&mut count) != sys::CUresult::CUDA_SUCCESS || count == 0 {
            return None;
        }
        let mut ctx = std::ptr::null_mut();
        check(sys::cuDevicePrimaryCtxRetain(&mut ctx, 0));
        check(sys::cuCtxSetCurrent(ctx));
        Some(ctx)
    }
}

/// Whether device 0's primary context is this thread's current one.
pub fn is_current() -> bool {
    let (mut current, mut primary) = (std::ptr::null_mut(), std::ptr::null_mut());
    unsafe {
        check(sys::cuCtxGetCurrent(&mut current));
        check(sys::cuDevicePrimaryCtxRetain(&mut primary, 0));
        check(sys::cuDevicePrimaryCtxRelease_v2(0));
    }
    !current.is_null() && current == primary
}

/// One GPU test at a time: a context-wide synchronize (checkpoints do one) in one test would
/// invalidate another test's graph capture.
pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds the GPU lock for the rest of the calling test, and fails it where there is no GPU:
/// GPU tests are `#[ignore]`d (listed as skipped by a plain `cargo test`), so one that runs
/// was asked for (`--ignored`, the GPU bundle) and must not pass without having run.
#[macro_export]
macro_rules! require_gpu {
    () => {
        let _gpu_lock = gpu::lock();
        assert!(
            gpu::context().is_some(),
            "no usable CUDA device on this machine, and this GPU test was asked for (--ignored)"
        );
    };
}

pub fn check(code: sys::CUresult) {
    assert_eq!(code, sys::CUresult::CUDA_SUCCESS, "CUDA call failed");
}

pub struct DevBuf {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

impl DevBuf {
    pub fn new(bytes: usize) -> DevBuf {
        let mut ptr = 0;
        unsafe { check(sys::cuMemAlloc_v2(&mut ptr, bytes.max(1) + 64)) };
        DevBuf { ptr, bytes }
    }
    pub fn from_bytes(data: &[u8]) -> DevBuf {
        let b = DevBuf::new(data.len());
        b.upload(data);
        b
    }
    pub fn upload(&self, data: &[u8]) {
        unsafe {
            check(sys::cuMemcpyHtoD_v2(
                self.ptr,
                data.as_ptr() as *const c_void,
                data.len(),
            ))
        };
    }
    pub fn download(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.bytes];
        unsafe {
            check(sys::cuCtxSynchronize());
            check(sys::cuMemcpyDtoH_v2(
                out.as_mut_ptr() as *mut c_void,
                self.ptr,
                self.bytes,
            ));
        }
        out
    }
    pub fn as_ptr(&self) -> *mut c_void {
        self.ptr as *mut c_void
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        unsafe { sys::cuMemFree_v2(self.ptr) };
    }
}

pub fn sync() {
    unsafe { check(sys::cuCtxSynchronize()) };
}

/// The fake driver's count of launches of the kernel `name` so far (scripts/cuda_on_cpu.sh,
/// tests/c/fake_cuda.c `fake_cuda_launches`); None with a real driver, which has no such hook.
pub fn fake_launches(name: &str) -> Option<u64> {
    let symbol = std::ffi::CString::new("fake_cuda_launches").unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    for lib in ["libcuda.so.1", "libcuda.so"] {
        let lib = std::ffi::CString::new(lib).unwrap();
        unsafe {
            let handle = libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            if handle.is_null() {
                continue;
            }
            let f = libc::dlsym(handle, symbol.as_ptr());
            let count = (!f.is_null()).then(|| {
                let f: extern "C" fn(*const std::ffi::c_char) -> u64 = std::mem::transmute(f);
                f(name.as_ptr())
            });
            libc::dlclose(handle);
            return count;
        }
    }
    None
}

/// One `lion_step` of `opt` on a stream of its own that does not wait for the legacy stream
/// (CU_STREAM_NON_BLOCKING), waited for; the step's status.
pub fn step_on_a_non_blocking_stream(
    opt: *mut lion::LionOptimizer,
    params: &[*mut c_void],
    grads: &[*const c_void],
) -> lion::LionStatus {
    assert_eq!(params.len(), grads.len());
    unsafe {
        let mut stream = std::ptr::null_mut();
        check(sys::cuStreamCreate(
            &mut stream,
            sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
        ));
        let st = lion::lion_step(
            opt,
            params.as_ptr(),
            grads.as_ptr(),
            params.len(),
            stream as *mut c_void,
        );
        check(sys::cuStreamSynchronize(stream));
        check(sys::cuStreamDestroy_v2(stream));
        st
    }
}
