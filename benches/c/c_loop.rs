//! The C ceiling (`same_bytes.c`): compiled at run time into a shared object and loaded with
//! dlopen, so that only the benchmark needs OpenMP, and only where it runs.

use std::ffi::{c_char, c_int, c_void, CString};

use lion::LionConfig;

/// Lion's coefficients of a plain f32 step, as `src/numerics/update.rs` derives them (the
/// standard decay mode, scales 1): what `lion_f32` takes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Coeffs {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    step_size: f32,
    decay_keep: f32,
    grad_scale: f32,
}

impl Coeffs {
    pub fn new(c: &LionConfig) -> Coeffs {
        assert_eq!(c.decay_mode, lion::LION_DECAY_STANDARD);
        Coeffs {
            beta1: c.beta1,
            one_minus_beta1: (1.0 - c.beta1 as f64) as f32,
            beta2: c.beta2,
            one_minus_beta2: (1.0 - c.beta2 as f64) as f32,
            step_size: c.lr,
            decay_keep: (1.0 - c.lr as f64 * c.weight_decay as f64) as f32,
            grad_scale: 1.0,
        }
    }
}

type SameBytesFn = unsafe extern "C" fn(
    c_int,
    usize,
    *const *mut f32,
    *const *const f32,
    *const *mut f32,
    *const usize,
);
type LionFn = unsafe extern "C" fn(
    c_int,
    usize,
    *const *mut f32,
    *const *const f32,
    *const *mut f32,
    *const usize,
    *const Coeffs,
);

pub struct CLoops {
    same_bytes: SameBytesFn,
    lion: LionFn,
}

/// The tensors' pointers as the C functions take them.
pub struct Tensors {
    p: Vec<*mut f32>,
    g: Vec<*const f32>,
    m: Vec<*mut f32>,
    n: Vec<usize>,
}

impl Tensors {
    pub fn new(p: &mut [Vec<f32>], g: &[Vec<f32>], m: &mut [Vec<f32>]) -> Tensors {
        Tensors {
            p: p.iter_mut().map(|t| t.as_mut_ptr()).collect(),
            g: g.iter().map(|t| t.as_ptr()).collect(),
            m: m.iter_mut().map(|t| t.as_mut_ptr()).collect(),
            n: p.iter().map(|t| t.len()).collect(),
        }
    }
}

impl CLoops {
    /// Compiles and loads the loops; None (and why, on stderr) where that fails.
    pub fn load() -> Option<CLoops> {
        match Self::try_load() {
            Ok(c) => Some(c),
            Err(why) => {
                eprintln!("no C loop: {why}");
                None
            }
        }
    }

    fn try_load() -> Result<CLoops, String> {
        let dir = std::env::temp_dir();
        let src = dir.join(format!("lion-bench-{}.c", std::process::id()));
        let so = dir.join(format!("lion-bench-{}.so", std::process::id()));
        std::fs::write(&src, include_str!("same_bytes.c")).map_err(|e| e.to_string())?;
        let out = compiler()
            .args(["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"])
            .args(["-shared", "-fPIC", "-o"])
            .arg(&so)
            .arg(&src)
            .arg("-lm")
            .output()
            .map_err(|e| format!("could not run the C compiler: {e}"))?;
        let _ = std::fs::remove_file(&src);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let path = CString::new(so.to_str().unwrap()).unwrap();
        // SAFETY: a library we just built; its handle is never closed (the functions live as
        // long as the process).
        let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        let _ = std::fs::remove_file(&so);
        if lib.is_null() {
            return Err("dlopen failed".into());
        }
        let sym = |name: &[u8]| -> Result<*mut c_void, String> {
            // SAFETY: a NUL-terminated name, a live handle.
            let f = unsafe { libc::dlsym(lib, name.as_ptr() as *const c_char) };
            (!f.is_null())
                .then_some(f)
                .ok_or("a symbol is missing".into())
        };
        // SAFETY: the C definitions have these signatures.
        unsafe {
            Ok(CLoops {
                same_bytes: std::mem::transmute::<*mut c_void, SameBytesFn>(sym(
                    b"same_bytes_f32\0",
                )?),
                lion: std::mem::transmute::<*mut c_void, LionFn>(sym(b"lion_f32\0")?),
            })
        }
    }

    /// Trivial arithmetic over the tensors (the traffic alone).
    pub fn same_bytes(&self, threads: usize, t: &Tensors) {
        // SAFETY: the pointers come from live, disjoint buffers of the given lengths.
        unsafe {
            (self.same_bytes)(
                threads as c_int,
                t.n.len(),
                t.p.as_ptr(),
                t.g.as_ptr(),
                t.m.as_ptr(),
                t.n.as_ptr(),
            )
        }
    }

    /// One Lion step over the tensors.
    pub fn lion(&self, threads: usize, t: &Tensors, k: &Coeffs) {
        // SAFETY: as above.
        unsafe {
            (self.lion)(
                threads as c_int,
                t.n.len(),
                t.p.as_ptr(),
                t.g.as_ptr(),
                t.m.as_ptr(),
                t.n.as_ptr(),
                k,
            )
        }
    }
}

/// The C compiler that `cc` picks for this target (`CC` overrides it).
fn compiler() -> std::process::Command {
    let target = env!("LION_BUILD_TARGET");
    cc::Build::new()
        .target(target)
        .host(target)
        .opt_level(3)
        .cargo_metadata(false)
        .cargo_warnings(false)
        .out_dir(std::env::temp_dir())
        .get_compiler()
        .to_command()
}
