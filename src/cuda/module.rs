//! The kernels of src/cuda/lion.cu, compiled by NVRTC (with the prelude of `prelude.rs`) for
//! the device they run on, once per device and process, and loaded into its primary context.

use std::ffi::{c_char, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys as cu;
use cudarc::nvrtc::sys as rtc;

use super::driver::{self, check, CUdevice, CUfunction, PrimaryContext};
use super::prelude;
use crate::status::{Error, LionStatus, Result};

pub(crate) struct Kernels {
    pub update: CUfunction,
    pub count: CUfunction,
    /// The distributed modes' (src/cuda/dist.rs, sharded.rs, vote.rs).
    pub agree: CUfunction,
    pub copy: CUfunction,
    pub check_sums: CUfunction,
    pub vote: CUfunction,
    pub signs: CUfunction,
    pub apply: CUfunction,
    /// `lion_step_tensors`'s (`TensorsArgs`).
    pub update_tensors: CUfunction,
    pub count_tensors: CUfunction,
    /// Keeps the primary context (and so the module) alive for the rest of the process:
    /// optimizers come and go, the compiled module stays.
    _context: PrimaryContext,
}

// Function handles may be used from any thread with their context current.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

/// The kernels for `dev`, compiling them on first use.
pub(crate) fn kernels(dev: CUdevice) -> Result<Arc<Kernels>> {
    static CACHE: Mutex<Vec<(CUdevice, Arc<Kernels>)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, k)) = cache.iter().find(|(d, _)| *d == dev) {
        return Ok(Arc::clone(k));
    }
    let kernels = Arc::new(load(dev)?);
    cache.push((dev, Arc::clone(&kernels)));
    Ok(kernels)
}

fn nvrtc_error(what: &str, code: rtc::nvrtcResult, log: &str) -> Error {
    Error::new(
        LionStatus::LION_ERROR_DEVICE,
        format!(
            "NVRTC {what} failed ({code:?}){}{log}",
            if log.is_empty() { "" } else { ": " }
        ),
    )
}

/// Compiles the program (lion.cu with its generated prelude and layout checks) for the
/// device's own architecture (a cubin); if this NVRTC does not know it, compiles PTX for it
/// instead, which the driver then compiles.
fn compile(major: i32, minor: i32) -> Result<Vec<u8>> {
    compile_source(&prelude::program(), major, minor)
}

fn compile_source(source: &str, major: i32, minor: i32) -> Result<Vec<u8>> {
    let src = CString::new(source).unwrap();
    let name = CString::new("lion.cu").unwrap();
    let mut last = String::new();
    for (arch, cubin) in [
        (format!("sm_{major}{minor}"), true),
        (format!("compute_{major}{minor}"), false),
    ] {
        let options: Vec<CString> = [
            format!("--gpu-architecture={arch}"),
            "--fmad=false".into(),
            "--std=c++17".into(),
        ]
        .into_iter()
        .map(|o| CString::new(o).unwrap())
        .collect();
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        let mut prog = std::ptr::null_mut();
        // SAFETY: valid C strings; the program is destroyed below.
        unsafe {
            let code = rtc::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if code != rtc::nvrtcResult::NVRTC_SUCCESS {
                return Err(nvrtc_error("nvrtcCreateProgram", code, ""));
            }
            let code =
                rtc::nvrtcCompileProgram(prog, option_ptrs.len() as i32, option_ptrs.as_ptr());
            let mut log_size = 0usize;
            rtc::nvrtcGetProgramLogSize(prog, &mut log_size);
            let mut log = vec![0u8; log_size.max(1)];
            rtc::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut c_char);
            let log = String::from_utf8_lossy(&log)
                .trim_end_matches('\0')
                .trim()
                .to_string();
            if code != rtc::nvrtcResult::NVRTC_SUCCESS {
                rtc::nvrtcDestroyProgram(&mut prog);
                last = format!("{arch}: {code:?}: {log}");
                continue;
            }
            let mut size = 0usize;
            let mut image;
            if cubin {
                rtc::nvrtcGetCUBINSize(prog, &mut size);
                image = vec![0u8; size];
                rtc::nvrtcGetCUBIN(prog, image.as_mut_ptr() as *mut c_char);
            } else {
                rtc::nvrtcGetPTXSize(prog, &mut size);
                image = vec![0u8; size];
                rtc::nvrtcGetPTX(prog, image.as_mut_ptr() as *mut c_char);
            }
            rtc::nvrtcDestroyProgram(&mut prog);
            return Ok(image);
        }
    }
    Err(Error::new(
        LionStatus::LION_ERROR_DEVICE,
        format!("NVRTC could not compile liblion's kernels: {last}"),
    ))
}

fn load(dev: CUdevice) -> Result<Kernels> {
    let (major, minor) = driver::compute_capability(dev)?;
    let image = compile(major, minor)?;
    let context = PrimaryContext::retain(dev)?;
    let _current = context.enter()?;
    let mut module = std::ptr::null_mut();
    // SAFETY: a cubin or NUL-terminated PTX image, loaded into the current context.
    check(
        unsafe { cu::cuModuleLoadData(&mut module, image.as_ptr() as *const _) },
        "cuModuleLoadData",
    )?;
    let function = |name: &str| -> Result<CUfunction> {
        let name = CString::new(name).unwrap();
        let mut f = std::ptr::null_mut();
        check(
            unsafe { cu::cuModuleGetFunction(&mut f, module, name.as_ptr()) },
            "cuModuleGetFunction",
        )?;
        Ok(f)
    };
    let names = [
        "lion_update",
        "lion_count",
        "lion_agree",
        "lion_copy",
        "lion_check_sums",
        "lion_vote",
        "lion_signs",
        "lion_apply",
        "lion_update_tensors",
        "lion_count_tensors",
    ];
    let mut f = Vec::with_capacity(names.len());
    for name in names {
        f.push(function(name)?);
    }
    drop(_current);
    Ok(Kernels {
        update: f[0],
        count: f[1],
        agree: f[2],
        copy: f[3],
        check_sums: f[4],
        vote: f[5],
        signs: f[6],
        apply: f[7],
        update_tensors: f[8],
        count_tensors: f[9],
        _context: context,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under NVRTC itself (a machine with a GPU): the program compiles, and a lion.cu whose
    /// kernel interface drifted from src/cuda/args.rs does not, refused by the layout checks
    /// (sizes only under NVRTC; the host tests in prelude.rs check offsets).
    #[test]
    #[ignore = "needs an NVIDIA GPU and NVRTC (run with --ignored)"]
    fn nvrtc_compiles_the_program_and_refuses_a_drifted_one() {
        let arch = driver::probe()
            .and_then(|_| driver::device(0))
            .and_then(driver::compute_capability);
        let (major, minor) = arch.unwrap_or_else(|e| {
            panic!(
                "no usable CUDA device, and this GPU test was asked for: {}",
                e.message
            )
        });
        let program = prelude::program();
        if let Err(e) = compile_source(&program, major, minor) {
            panic!("{}", e.message);
        }
        let drifted = program.replacen("  u32 len;\n", "  u64 len;\n", 1);
        assert_ne!(drifted, program);
        let refused =
            compile_source(&drifted, major, minor).expect_err("a drifted lion.cu compiled");
        assert!(
            refused.message.contains("the size of BlockChunk"),
            "{}",
            refused.message
        );
    }
}
