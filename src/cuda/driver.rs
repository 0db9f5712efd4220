//! Checked access to the CUDA driver and NVRTC through cudarc's raw bindings.
//!
//! cudarc loads both libraries lazily and panics when one is missing, so `probe` looks for
//! them first (with dlopen) and turns their absence into LION_ERROR_DEVICE_UNAVAILABLE.

use std::ffi::{c_void, CStr, CString};
use std::sync::OnceLock;

use cudarc::driver::sys;

use crate::fork::{self, Birth};
use crate::status::{Error, LionStatus, Result};

pub(crate) use sys::{CUcontext, CUdevice, CUdeviceptr, CUfunction, CUstream};

fn error_name(code: sys::CUresult) -> String {
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName only writes a pointer to a static string.
    unsafe { sys::cuGetErrorName(code, &mut name) };
    if name.is_null() {
        format!("CUDA error {}", code as i32)
    } else {
        // SAFETY: a static NUL-terminated string from the driver.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Turns a driver result into LION_ERROR_DEVICE (or OUT_OF_MEMORY) naming the call.
pub(crate) fn check(code: sys::CUresult, what: &str) -> Result<()> {
    match code {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Err(Error::out_of_memory(format!(
            "{what}: out of device memory"
        ))),
        code => Err(Error::new(
            LionStatus::LION_ERROR_DEVICE,
            format!("{what} failed: {}", error_name(code)),
        )),
    }
}

fn unavailable(message: impl Into<String>) -> Error {
    Error::new(LionStatus::LION_ERROR_DEVICE_UNAVAILABLE, message)
}

fn can_dlopen(name: &str) -> bool {
    let name = CString::new(name).unwrap();
    // SAFETY: dlopen with a valid C string; the handle is closed again at once (the library
    // stays loaded for cudarc if it had loaded it already).
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

/// Whether NVRTC (which needs no driver) can be loaded under one of the names cudarc tries.
pub(crate) fn nvrtc_loadable() -> bool {
    cudarc::get_lib_name_candidates("nvrtc")
        .iter()
        .any(|n| can_dlopen(n))
}

/// Whether the driver and NVRTC can be loaded and the driver initialised, once per process.
pub(crate) fn probe() -> Result<()> {
    static PROBED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let _inside = fork::CUDA_INIT.enter()?;
    PROBED
        .get_or_init(|| {
            if !cudarc::get_lib_name_candidates("cuda").iter().any(|n| can_dlopen(n)) {
                return Err("CUDA is unavailable: no NVIDIA driver (libcuda.so could not be loaded)".into());
            }
            if !nvrtc_loadable() {
                return Err("CUDA is unavailable: the NVIDIA driver is there, but NVRTC (libnvrtc.so), which compiles \
                            liblion's kernels, could not be loaded: install the CUDA runtime \
                            compiler or add its folder to LD_LIBRARY_PATH"
                    .into());
            }
            // SAFETY: plain driver initialisation.
            let code = unsafe { sys::cuInit(0) };
            if code != sys::CUresult::CUDA_SUCCESS {
                return Err(format!("CUDA is unavailable: the driver did not initialise: {}", error_name(code)));
            }
            Ok(())
        })
        .clone()
        .map_err(unavailable)
}

/// The device of ordinal `index`, after `probe`.
pub(crate) fn device(index: i32) -> Result<CUdevice> {
    let mut count = 0;
    // SAFETY: the driver is initialised (probe).
    check(
        unsafe { sys::cuDeviceGetCount(&mut count) },
        "cuDeviceGetCount",
    )?;
    if count == 0 {
        return Err(unavailable(
            "CUDA is unavailable: no CUDA device is visible",
        ));
    }
    if index >= count {
        return Err(unavailable(format!(
            "CUDA device_index {index} is out of range: {count} device(s) visible"
        )));
    }
    let mut dev = 0;
    check(unsafe { sys::cuDeviceGet(&mut dev, index) }, "cuDeviceGet")?;
    Ok(dev)
}

/// One attribute of the device.
fn attribute(dev: CUdevice, a: sys::CUdevice_attribute) -> Result<i32> {
    let mut v = 0;
    // SAFETY: a valid device and attribute.
    check(
        unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) },
        "cuDeviceGetAttribute",
    )
    .map(|_| v)
}

pub(crate) fn compute_capability(dev: CUdevice) -> Result<(i32, i32)> {
    Ok((
        attribute(
            dev,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        )?,
        attribute(
            dev,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        )?,
    ))
}

/// What the kernels' tuning depends on besides the architecture (`tuning::Card`): the peak
/// memory bandwidth per multiprocessor, from the memory clock (kHz, double data rate), the bus
/// width (bits) and the multiprocessor count; the shared memory a block may opt in to. None
/// where the driver reports 0 or fails. `major`: the compute capability's, as the caller read
/// it (`compute_capability`).
pub(crate) fn card(dev: CUdevice, major: i32) -> super::tuning::Card {
    use sys::CUdevice_attribute::*;
    let attr = |a| Some(attribute(dev, a).ok()? as f64).filter(|&v| v > 0.0);
    let bytes_per_sm = (|| {
        let bytes = 2.0
            * attr(CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?
            * 1e3
            * attr(CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?
            / 8.0;
        Some(bytes / attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?)
    })();
    super::tuning::Card {
        bytes_per_sm,
        major: Some(major),
        shared_per_block: attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map(|v| v as u32),
    }
}

/// Lets `f` use `bytes` of dynamic shared memory per block, above the 48 KiB any kernel may.
pub(crate) fn allow_shared(f: CUfunction, bytes: u32, what: &str) -> Result<()> {
    // SAFETY: a loaded function; the attribute takes a byte count.
    check(
        unsafe {
            sys::cuFuncSetAttribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        },
        what,
    )
}

/// The device's primary context (the one the CUDA runtime and PyTorch use), retained.
pub(crate) struct PrimaryContext {
    pub dev: CUdevice,
    pub ctx: CUcontext,
    /// CUDA does not survive fork(): in a child, the context is the parent's.
    birth: Birth,
}

// A CUcontext may be used from any thread.
unsafe impl Send for PrimaryContext {}
unsafe impl Sync for PrimaryContext {}

impl PrimaryContext {
    pub(crate) fn retain(dev: CUdevice) -> Result<PrimaryContext> {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: a valid device.
        check(
            unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
            "cuDevicePrimaryCtxRetain",
        )?;
        Ok(PrimaryContext {
            dev,
            ctx,
            birth: Birth::now(),
        })
    }

    /// True in a child of `fork()`: the device cannot be used, and nothing may be freed on it.
    pub fn belongs_to_parent(&self) -> bool {
        self.birth.is_other_process()
    }

    /// Makes the context current on this thread until the guard drops (push/pop, so the
    /// caller's own current context is left as it was). Where it is current already (a host
    /// on the runtime API, torch included, keeps the device's primary context current), it
    /// is left so: no push or pop, about 0.2 us less for each step (BENCHMARKS.md).
    pub(crate) fn enter(&self) -> Result<ContextGuard> {
        if self.belongs_to_parent() {
            return Err(Error::new(
                LionStatus::LION_ERROR_DEVICE_UNAVAILABLE,
                "this CUDA optimizer was created before fork(), and CUDA cannot be used in a \
                 child of fork(): create the optimizer in the child (after exec, or with \
                 multiprocessing's \"spawn\"), or use the CPU engine there",
            ));
        }
        if current_context() == self.ctx {
            return Ok(ContextGuard { pushed: false });
        }
        // SAFETY: a retained context.
        check(
            unsafe { sys::cuCtxPushCurrent_v2(self.ctx) },
            "cuCtxPushCurrent",
        )?;
        Ok(ContextGuard { pushed: true })
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        if self.belongs_to_parent() {
            return;
        }
        // SAFETY: retained in `retain`.
        unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
    }
}

pub(crate) struct ContextGuard {
    /// Whether `enter` pushed the context (it was not current), so that drop pops it.
    pushed: bool,
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        if !self.pushed {
            return;
        }
        let mut old = std::ptr::null_mut();
        // SAFETY: pops what `enter` pushed.
        unsafe { sys::cuCtxPopCurrent_v2(&mut old) };
    }
}

/// Device memory, freed on drop (with the owning context current).
pub(crate) struct DeviceBuffer {
    pub ptr: CUdeviceptr,
    pub bytes: usize,
}

impl DeviceBuffer {
    /// Allocates and zeroes `bytes` (at least 1) in the current context.
    pub(crate) fn zeroed(bytes: usize, what: &str) -> Result<DeviceBuffer> {
        let mut ptr = 0;
        let size = bytes.max(1);
        // SAFETY: a context is current (the caller entered one).
        check(
            unsafe { sys::cuMemAlloc_v2(&mut ptr, size) },
            &format!("allocating {what} ({size} bytes)"),
        )?;
        let buf = DeviceBuffer { ptr, bytes: size };
        check(unsafe { sys::cuMemsetD8_v2(ptr, 0, size) }, "cuMemsetD8")?;
        Ok(buf)
    }

    pub(crate) fn upload(&self, offset: usize, data: &[u8]) -> Result<()> {
        assert!(offset + data.len() <= self.bytes);
        // SAFETY: inside the allocation; synchronous copy from host memory.
        check(
            unsafe {
                sys::cuMemcpyHtoD_v2(
                    self.ptr + offset as u64,
                    data.as_ptr() as *const c_void,
                    data.len(),
                )
            },
            "cuMemcpyHtoD",
        )
    }

    pub(crate) fn download(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        assert!(offset + out.len() <= self.bytes);
        // SAFETY: inside the allocation; synchronous copy to host memory.
        check(
            unsafe {
                sys::cuMemcpyDtoH_v2(
                    out.as_mut_ptr() as *mut c_void,
                    self.ptr + offset as u64,
                    out.len(),
                )
            },
            "cuMemcpyDtoH",
        )
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed`; the owner keeps its context current while dropping.
        unsafe { sys::cuMemFree_v2(self.ptr) };
    }
}

/// Zeroes `bytes` at `ptr` in stream order (a step's own buffers; graph-capturable).
pub(crate) fn zero_async(ptr: CUdeviceptr, bytes: usize, stream: CUstream) -> Result<()> {
    // SAFETY: `ptr` is a live allocation of at least `bytes` in the current context.
    check(
        unsafe { sys::cuMemsetD8Async(ptr, 0, bytes, stream) },
        "cuMemsetD8Async",
    )
}

/// Whether `stream` captures a CUDA graph now, or the driver cannot tell (the legacy stream
/// while another stream captures, for one): true in both cases.
pub(crate) fn stream_is_capturing(stream: CUstream) -> bool {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE;
    // SAFETY: writes the stream's capture status into `status`.
    let code = unsafe { sys::cuStreamIsCapturing(stream, &mut status) };
    code != sys::CUresult::CUDA_SUCCESS
        || status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
}

/// This thread's current context (NULL: none, or the driver could not say).
pub(crate) fn current_context() -> sys::CUcontext {
    let mut current = std::ptr::null_mut();
    // SAFETY: writes this thread's current context (or NULL) into `current`.
    unsafe { sys::cuCtxGetCurrent(&mut current) };
    current
}

/// Makes `ctx`, this thread's current context before the caller's code ran, current again
/// where that code changed it (nothing to do where it is still current). Code that pushed a context and did not pop it: that context is popped. Code that
/// replaced the top of the stack (`cuCtxSetCurrent`, the runtime's `cudaSetDevice`) or
/// emptied it: `ctx` goes back on top. Code that popped `ctx` off a deeper stack cannot be
/// told from a replacement: `ctx` goes back on top of what is left, one context lower.
pub(crate) fn restore_current(ctx: sys::CUcontext) -> Result<()> {
    let current = current_context();
    if current == ctx {
        return Ok(());
    }
    if !current.is_null() {
        let mut popped = std::ptr::null_mut();
        // SAFETY: a context is current, so the stack has one to pop.
        check(
            unsafe { sys::cuCtxPopCurrent_v2(&mut popped) },
            "cuCtxPopCurrent",
        )?;
        if current_context() == ctx {
            return Ok(());
        }
    }
    // SAFETY: `ctx` is a context this thread had current, still retained by the caller.
    check(unsafe { sys::cuCtxPushCurrent_v2(ctx) }, "cuCtxPushCurrent")
}

/// Waits for all work in the current context (all streams): for checkpoints, never steps.
pub(crate) fn synchronize() -> Result<()> {
    // SAFETY: a context is current.
    check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")
}

/// Refuses an address a kernel on device `ordinal` cannot use: unknown to the driver (plain
/// host memory), or device memory of another device. Pinned and managed memory pass.
pub(crate) fn check_accessible(ptr: usize, ordinal: i32, name: &str) -> Result<()> {
    let attribute = |a: sys::CUpointer_attribute| {
        let mut value = 0u32;
        // SAFETY: both attributes are 32-bit integers written into `value`.
        let code = unsafe {
            sys::cuPointerGetAttribute(&mut value as *mut u32 as *mut c_void, a, ptr as CUdeviceptr)
        };
        (code, value)
    };
    let (code, kind) = attribute(sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE);
    if code != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::invalid(format!(
            "{name} is not memory the CUDA driver knows (host memory from malloc?): \
             a CUDA optimizer steps device memory"
        )));
    }
    if kind == sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
        let (code, on) = attribute(sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL);
        if code == sys::CUresult::CUDA_SUCCESS && on as i32 != ordinal {
            return Err(Error::invalid(format!(
                "{name} is on CUDA device {on}, this optimizer on device {ordinal}"
            )));
        }
    }
    Ok(())
}

/// Launches `f` with one by-value parameter block.
///
/// # Safety
/// `args` must be the kernel's parameter struct, and every pointer in it valid on the device.
pub(crate) unsafe fn launch<T>(
    f: CUfunction,
    blocks: u32,
    threads: u32,
    stream: CUstream,
    args: &T,
    what: &str,
) -> Result<()> {
    launch_with_shared(f, blocks, threads, 0, stream, args, what)
}

/// `launch` with `shared` bytes of dynamic shared memory a block (q8's ring).
///
/// # Safety
/// As `launch`; `shared` at most what `f` may use (`allow_shared`).
pub(crate) unsafe fn launch_with_shared<T>(
    f: CUfunction,
    blocks: u32,
    threads: u32,
    shared: u32,
    stream: CUstream,
    args: &T,
    what: &str,
) -> Result<()> {
    let mut params = [args as *const T as *mut c_void];
    check(
        sys::cuLaunchKernel(
            f,
            blocks,
            1,
            1,
            threads,
            1,
            1,
            shared,
            stream,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        ),
        what,
    )
}
