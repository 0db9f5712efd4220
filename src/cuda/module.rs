//! The kernels of src/cuda/lion.cu, compiled by NVRTC (with the prelude of `prelude.rs`) for
//! the device they run on, once per device and process, and loaded into its primary context.

use std::ffi::{c_char, CStr, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys as cu;
use cudarc::nvrtc::sys as rtc;

use super::args::CUDA_THREADS_PER_BLOCK;
use super::driver::{self, check, CUdevice, CUfunction, PrimaryContext};
use super::prelude;
use super::tuning::{Tuning, SHARED_WITHOUT_OPT_IN};
use crate::config::DType;
use crate::status::{Error, LionStatus, Result};

pub(crate) struct Kernels {
    /// lion_update_f32, _bf16 and _q8: one per momentum dtype (`update_for`), so that one
    /// dtype's code does not set the register budget of another's (lion.cu `update_block`).
    update: [CUfunction; STATE_SLOTS],
    pub count: CUfunction,
    /// The distributed modes' (src/cuda/dist.rs, sharded.rs, vote.rs).
    pub agree: CUfunction,
    pub copy: CUfunction,
    pub check_sums: CUfunction,
    pub vote: CUfunction,
    pub signs: CUfunction,
    pub apply: CUfunction,
    /// `lion_step_tensors`'s (`TensorsArgs`), per momentum dtype as `update`.
    update_tensors: [CUfunction; STATE_SLOTS],
    pub count_tensors: CUfunction,
    /// A whole step's with the pointers in a table (`TableArgs`), per momentum dtype as
    /// `update`.
    update_table: [CUfunction; STATE_SLOTS],
    pub count_table: CUfunction,
    /// The dynamic shared memory of each block of the q8 update kernels (q8's ring; 0: none).
    q8_shared: u32,
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
    let _inside = crate::fork::KERNEL_CACHE.enter()?;
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, k)) = cache.iter().find(|(d, _)| *d == dev) {
        return Ok(Arc::clone(k));
    }
    let kernels = Arc::new(load(dev)?);
    cache.push((dev, Arc::clone(&kernels)));
    Ok(kernels)
}

/// NVRTC's failure `code` in `what`: LION_ERROR_OUT_OF_MEMORY where NVRTC ran out of host
/// memory, else LION_ERROR_DEVICE.
fn nvrtc_error(what: &str, code: rtc::nvrtcResult, log: &str) -> Error {
    let message = format!(
        "NVRTC {what} failed ({code:?}){}{log}",
        if log.is_empty() { "" } else { ": " }
    );
    match code {
        rtc::nvrtcResult::NVRTC_ERROR_OUT_OF_MEMORY => Error::out_of_memory(message),
        _ => Error::new(LionStatus::LION_ERROR_DEVICE, message),
    }
}

/// Compiles the program (lion.cu with its generated prelude and layout checks) for the
/// device's own architecture (a cubin); if this NVRTC does not know it, compiles PTX for it
/// instead, which the driver then compiles.
fn compile(tuning: &Tuning, major: i32, minor: i32) -> Result<Vec<u8>> {
    compile_source(prelude::program_for(tuning)?.as_c_str(), major, minor)
}

fn compile_source(source: &CStr, major: i32, minor: i32) -> Result<Vec<u8>> {
    let mut last = String::new();
    for arch in [
        format!("sm_{major}{minor}"),
        format!("compute_{major}{minor}"),
    ] {
        match nvrtc_compile(source, &arch, &[]) {
            Ok((image, _log)) => return Ok(image),
            Err(NvrtcFailure::Create(code)) => {
                return Err(nvrtc_error("nvrtcCreateProgram", code, ""))
            }
            Err(NvrtcFailure::Compile(code @ rtc::nvrtcResult::NVRTC_ERROR_OUT_OF_MEMORY, log)) => {
                return Err(nvrtc_error(&format!("compiling for {arch}"), code, &log))
            }
            Err(NvrtcFailure::Compile(code, log)) => last = format!("{arch}: {code:?}: {log}"),
            Err(NvrtcFailure::Host(e)) => return Err(e),
        }
    }
    Err(Error::new(
        LionStatus::LION_ERROR_DEVICE,
        format!("NVRTC could not compile liblion's kernels: {last}"),
    ))
}

enum NvrtcFailure {
    Create(rtc::nvrtcResult),
    /// The code and NVRTC's log.
    Compile(rtc::nvrtcResult, String),
    /// No host memory for the log or the image.
    Host(Error),
}

#[cfg(test)]
impl NvrtcFailure {
    fn describe(&self) -> String {
        match self {
            NvrtcFailure::Create(code) => format!("nvrtcCreateProgram: {code:?}"),
            NvrtcFailure::Compile(code, log) => format!("{code:?}: {log}"),
            NvrtcFailure::Host(e) => e.message.clone(),
        }
    }
}

/// `code` of NVRTC's `call` after a compile: a failure is the compile's, named in its log.
fn succeeded(code: rtc::nvrtcResult, call: &str) -> std::result::Result<(), NvrtcFailure> {
    match code {
        rtc::nvrtcResult::NVRTC_SUCCESS => Ok(()),
        code => Err(NvrtcFailure::Compile(code, format!("{call} failed"))),
    }
}

/// `bytes` zeroed bytes for NVRTC to write `what` into, reserved fallibly.
fn nvrtc_buffer(bytes: usize, what: &str) -> std::result::Result<Vec<u8>, NvrtcFailure> {
    let mut buffer = crate::buffer::try_vec(bytes, what).map_err(NvrtcFailure::Host)?;
    buffer.resize(bytes, 0);
    Ok(buffer)
}

/// One NVRTC compilation of `source` for `arch` with the engine's options (no fused
/// multiply-add, C++17) and `extra` ones: the image (a cubin for `sm_*`, NUL-terminated PTX
/// for `compute_*`) and NVRTC's log. The buffers as large as the program or the image are
/// reserved fallibly.
fn nvrtc_compile(
    source: &CStr,
    arch: &str,
    extra: &[&str],
) -> std::result::Result<(Vec<u8>, String), NvrtcFailure> {
    let name = CString::new("lion.cu").unwrap();
    let options: Vec<CString> = [
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "--std=c++17".into(),
    ]
    .into_iter()
    .chain(extra.iter().map(|o| o.to_string()))
    .map(|o| CString::new(o).unwrap())
    .collect();
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    let mut prog = std::ptr::null_mut();
    // SAFETY: valid C strings; the program is destroyed before returning.
    unsafe {
        let code = rtc::nvrtcCreateProgram(
            &mut prog,
            source.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        if code != rtc::nvrtcResult::NVRTC_SUCCESS {
            return Err(NvrtcFailure::Create(code));
        }
        let result = compiled(prog, arch, &option_ptrs);
        rtc::nvrtcDestroyProgram(&mut prog);
        result
    }
}

/// `prog` compiled with `options`: the image and the log (`nvrtc_compile`).
///
/// # Safety
/// `prog` is a live NVRTC program; `options` point to C strings that outlive the call.
unsafe fn compiled(
    prog: rtc::nvrtcProgram,
    arch: &str,
    options: &[*const c_char],
) -> std::result::Result<(Vec<u8>, String), NvrtcFailure> {
    let code = rtc::nvrtcCompileProgram(prog, options.len() as i32, options.as_ptr());
    let mut log_size = 0usize;
    succeeded(
        rtc::nvrtcGetProgramLogSize(prog, &mut log_size),
        "nvrtcGetProgramLogSize",
    )?;
    let mut log = nvrtc_buffer(log_size.max(1), "NVRTC's log")?;
    succeeded(
        rtc::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut c_char),
        "nvrtcGetProgramLog",
    )?;
    log.truncate(log.iter().position(|&b| b == 0).unwrap_or(log.len()));
    let mut log = String::from_utf8(log)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    log.truncate(log.trim_end().len());
    log.drain(..log.len() - log.trim_start().len());
    if code != rtc::nvrtcResult::NVRTC_SUCCESS {
        return Err(NvrtcFailure::Compile(code, log));
    }
    // The image: a cubin for `sm_*`, NUL-terminated PTX for `compute_*`.
    type GetSize = unsafe fn(rtc::nvrtcProgram, *mut usize) -> rtc::nvrtcResult;
    type Get = unsafe fn(rtc::nvrtcProgram, *mut c_char) -> rtc::nvrtcResult;
    let (get_size, get, calls, what): (GetSize, Get, _, _) = if arch.starts_with("sm_") {
        let calls = ["nvrtcGetCUBINSize", "nvrtcGetCUBIN"];
        (
            rtc::nvrtcGetCUBINSize,
            rtc::nvrtcGetCUBIN,
            calls,
            "the kernels' cubin",
        )
    } else {
        let calls = ["nvrtcGetPTXSize", "nvrtcGetPTX"];
        (
            rtc::nvrtcGetPTXSize,
            rtc::nvrtcGetPTX,
            calls,
            "the kernels' PTX",
        )
    };
    let mut size = 0usize;
    succeeded(get_size(prog, &mut size), calls[0])?;
    let mut image = nvrtc_buffer(size, what)?;
    succeeded(get(prog, image.as_mut_ptr() as *mut c_char), calls[1])?;
    Ok((image, log))
}

/// The kernels `load` takes from the module: the update kernels of a whole step and of
/// `lion_step_tensors` first, per momentum dtype in `state_slot`'s order, then the others in
/// the order of `Kernels`' fields (the whole step's table kernels, added later, last: at
/// UPDATE_TABLE_AT and after).
const KERNEL_NAMES: [&str; 18] = [
    "lion_update_f32",
    "lion_update_bf16",
    "lion_update_q8",
    "lion_update_tensors_f32",
    "lion_update_tensors_bf16",
    "lion_update_tensors_q8",
    "lion_count",
    "lion_agree",
    "lion_copy",
    "lion_check_sums",
    "lion_vote",
    "lion_signs",
    "lion_apply",
    "lion_count_tensors",
    "lion_update_table_f32",
    "lion_update_table_bf16",
    "lion_update_table_q8",
    "lion_count_table",
];

/// Where each set of update kernels starts in KERNEL_NAMES.
const UPDATE_AT: usize = 0;
const UPDATE_TENSORS_AT: usize = STATE_SLOTS;
const UPDATE_TABLE_AT: usize = KERNEL_NAMES.len() - STATE_SLOTS - 1; // then lion_count_table

fn load(dev: CUdevice) -> Result<Kernels> {
    let (major, minor) = driver::compute_capability(dev)?;
    let tuning = Tuning::for_card(driver::card(dev, major));
    let image = compile(&tuning, major, minor)?;
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
    let mut f = Vec::with_capacity(KERNEL_NAMES.len());
    for name in KERNEL_NAMES {
        f.push(function(name)?);
    }
    let q8_shared = tuning.q8_ring_bytes();
    if q8_shared > SHARED_WITHOUT_OPT_IN {
        let q8 = state_slot(DType::Q8);
        for slot in [UPDATE_AT + q8, UPDATE_TENSORS_AT + q8, UPDATE_TABLE_AT + q8] {
            let what = format!(
                "letting {} use {q8_shared} bytes of shared memory",
                KERNEL_NAMES[slot]
            );
            driver::allow_shared(f[slot], q8_shared, &what)?;
        }
    }
    drop(_current);
    Ok(Kernels {
        update: std::array::from_fn(|s| f[UPDATE_AT + s]),
        update_tensors: std::array::from_fn(|s| f[UPDATE_TENSORS_AT + s]),
        count: f[6],
        agree: f[7],
        copy: f[8],
        check_sums: f[9],
        vote: f[10],
        signs: f[11],
        apply: f[12],
        count_tensors: f[13],
        update_table: std::array::from_fn(|s| f[UPDATE_TABLE_AT + s]),
        count_table: f[UPDATE_TABLE_AT + STATE_SLOTS],
        q8_shared,
        _context: context,
    })
}

/// An update kernel as its launches need it.
pub(crate) struct Update {
    f: CUfunction,
    name: &'static str,
    /// Bytes of dynamic shared memory a block (q8's ring).
    shared: u32,
}

impl Update {
    /// Launches it on `blocks` blocks of CUDA_THREADS_PER_BLOCK threads.
    ///
    /// # Safety
    /// As `driver::launch`: `args` is the kernel's parameter struct (`StepArgs`, `TableArgs`
    /// or `TensorsArgs`), every pointer in it valid on the device.
    pub unsafe fn launch<T>(&self, blocks: u32, stream: driver::CUstream, args: &T) -> Result<()> {
        let threads = CUDA_THREADS_PER_BLOCK;
        driver::launch_with_shared(
            self.f,
            blocks,
            threads,
            self.shared,
            stream,
            args,
            self.name,
        )
    }
}

impl Kernels {
    /// The update kernel of an optimizer whose momentum is of dtype `state`.
    pub fn update_for(&self, state: DType) -> Update {
        let slot = state_slot(state);
        self.update_at(self.update[slot], UPDATE_AT + slot, state)
    }

    /// The same with the pointers in a table (`TableArgs`).
    pub fn update_table_for(&self, state: DType) -> Update {
        let slot = state_slot(state);
        self.update_at(self.update_table[slot], UPDATE_TABLE_AT + slot, state)
    }

    /// The same for `lion_step_tensors`.
    pub fn update_tensors_for(&self, state: DType) -> Update {
        let slot = state_slot(state);
        self.update_at(self.update_tensors[slot], UPDATE_TENSORS_AT + slot, state)
    }

    fn update_at(&self, f: CUfunction, name_at: usize, state: DType) -> Update {
        let shared = if state == DType::Q8 {
            self.q8_shared
        } else {
            0
        };
        Update {
            f,
            name: KERNEL_NAMES[name_at],
            shared,
        }
    }
}

/// Momentum dtypes with kernels of their own: f32, bf16 and q8.
const STATE_SLOTS: usize = 3;

/// The place of momentum dtype `state` in `Kernels::update`. f16 momentum is refused when an
/// optimizer is created or loaded, so no step asks for it: each kernel reads its own dtype's
/// momentum, and another's would be read at the wrong width.
fn state_slot(state: DType) -> usize {
    match state {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::Q8 => 2,
        DType::F16 => unreachable!("f16 momentum is refused at creation and load"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The architecture the offline test compiles for: the H100 and H200 of BENCHMARKS.md.
    const OFFLINE_ARCH: &str = "sm_90";

    /// NVRTC alone, no GPU or driver: the program compiles to a cubin with every kernel that
    /// `load` takes, and a lion.cu whose kernel interface drifted from src/cuda/args.rs is
    /// refused by the layout checks (sizes only under NVRTC; the host tests in prelude.rs
    /// check offsets). Prints ptxas' registers and spills per kernel. scripts/test.sh runs it
    /// with the NVRTC that scripts/nvrtc.sh installs, so that an error in the CUDA source
    /// fails CI on a machine without a GPU, not the next session that has one.
    #[test]
    #[ignore = "needs NVRTC, not a GPU (scripts/test.sh runs it with scripts/nvrtc.sh's NVRTC)"]
    fn nvrtc_compiles_every_kernel_without_a_gpu() {
        assert!(
            driver::nvrtc_loadable(),
            "no NVRTC to load: `LD_LIBRARY_PATH=$(bash scripts/nvrtc.sh)` provides one"
        );
        let program = prelude::program_for(&prelude::reference_tuning()).unwrap();
        let log = match nvrtc_compile(program.as_c_str(), OFFLINE_ARCH, &["--ptxas-options=-v"]) {
            Ok((cubin, log)) => {
                assert!(!cubin.is_empty());
                log
            }
            Err(e) => panic!("{OFFLINE_ARCH}: {}", e.describe()),
        };
        let usage = ptxas_usage(&log);
        for name in KERNEL_NAMES {
            assert!(
                usage.iter().any(|u| u.0 == name),
                "no kernel {name} in the cubin: {log}"
            );
        }
        println!(
            "{OFFLINE_ARCH}, per kernel: registers, spill stores, spill loads, shared memory (bytes)"
        );
        for (name, registers, stores, loads, shared) in &usage {
            println!("  {name}: {registers}, {stores}, {loads}, {shared}");
        }
        // The variants the tuning may pick must compile too: a card of slower memory per
        // multiprocessor (an H100's 25 GB/s) gets other q8 kernels (tuning.rs `q8_min_blocks`),
        // and q8's ring (lion.cu `q8_ring`: cp.async into the launch's dynamic shared memory,
        // which ptxas does not count) takes as many stages as the card's shared memory holds
        // (the program above: 2, for a card that does not say; an H100 or H200: 4), or none
        // (`LION_CUDA_Q8_STAGES=0`, and cards before sm_80).
        use crate::cuda::tuning::{Card, Tuning};
        let slow = Card {
            bytes_per_sm: Some(25e9),
            ..Card::default()
        };
        let ring = |card, q8_stages| Tuning {
            q8_stages,
            ..Tuning::for_card(card)
        };
        let variants = [
            (
                "with an H100's memory bandwidth per multiprocessor",
                Tuning::for_card(slow),
            ),
            ("without q8's ring", ring(Card::default(), 0)),
            ("with q8's ring of 4 stages", ring(Card::default(), 4)),
            (
                "with q8's ring of 4 stages, an H100's bandwidth",
                ring(slow, 4),
            ),
        ];
        let ptx_arch = OFFLINE_ARCH.replace("sm_", "compute_");
        for (what, tuning) in variants {
            let source = prelude::program_for(&tuning).unwrap();
            match nvrtc_compile(source.as_c_str(), OFFLINE_ARCH, &["--ptxas-options=-v"]) {
                Ok((_, log)) => {
                    println!("the same, {what}:");
                    for (name, registers, stores, loads, shared) in ptxas_usage(&log) {
                        if name.ends_with("_q8") {
                            println!("  {name}: {registers}, {stores}, {loads}, {shared}");
                        }
                    }
                }
                Err(e) => panic!("{OFFLINE_ARCH}, {what}: {}", e.describe()),
            }
            // The ring is in the code exactly where the tuning asks for it.
            let ptx = match nvrtc_compile(source.as_c_str(), &ptx_arch, &[]) {
                Ok((ptx, _)) => String::from_utf8_lossy(&ptx).into_owned(),
                Err(_) => panic!("{ptx_arch}, {what}: no PTX"),
            };
            let has_ring = ptx.contains("cp.async.wait_group");
            assert_eq!(
                has_ring,
                tuning.q8_stages > 0,
                "{what}: cp.async in the PTX"
            );
        }
        let text = program.text();
        let drifted = text.replacen("  u32 len;\n", "  u64 len;\n", 1);
        assert_ne!(drifted, text);
        let arch = OFFLINE_ARCH.replace("sm_", "compute_");
        match nvrtc_compile(&CString::new(drifted).unwrap(), &arch, &[]) {
            Err(NvrtcFailure::Compile(_, log)) => {
                assert!(log.contains("the size of BlockChunk"), "{log}")
            }
            Ok(_) => panic!("a drifted lion.cu compiled"),
            Err(e) => panic!("{}", e.describe()),
        }
    }

    /// (kernel, registers, spill store bytes, spill load bytes) from ptxas' verbose log.
    fn ptxas_usage(log: &str) -> Vec<(String, u32, u32, u32, u32)> {
        let number_before = |line: &str, unit: &str| -> u32 {
            let at = line
                .find(unit)
                .unwrap_or_else(|| panic!("no '{unit}' in '{line}'"));
            line[..at]
                .split_whitespace()
                .last()
                .unwrap()
                .parse()
                .unwrap()
        };
        let mut usage = Vec::new();
        let mut lines = log.lines();
        while let Some(line) = lines.next() {
            let Some(rest) = line.split("Compiling entry function '").nth(1) else {
                continue;
            };
            let name = rest.split('\'').next().unwrap().to_string();
            let spills = lines.find(|l| l.contains("spill stores")).unwrap();
            let used = lines.find(|l| l.contains(" registers")).unwrap();
            // ptxas leaves out a kernel's shared memory when it has none.
            let shared = match used.contains(" bytes smem") {
                true => number_before(used, " bytes smem"),
                false => 0,
            };
            usage.push((
                name,
                number_before(used, " registers"),
                number_before(spills, " bytes spill stores"),
                number_before(spills, " bytes spill loads"),
                shared,
            ));
        }
        usage
    }

    /// A check kernel for the q8 test below, appended to the program: the fast code route
    /// (q8_encode_bits, q8_decode4) against the CPU's formulas, written out here with the
    /// correctly rounded root (src/numerics/q8.rs encode, decode).
    const Q8_ROUTE_CHECK: &str = r#"
struct Q8RouteArgs { unsigned long long *bad; u32 *sample; u32 top, every; };
extern "C" __global__ void q8_route_check(const Q8RouteArgs a) {
  const u64 threads = (u64)gridDim.x * blockDim.x;
  for (u64 b = blockIdx.x * (u64)blockDim.x + threadIdx.x; b <= a.top; b += threads) {
    const float y = __uint_as_float((u32)b);
    for (int s = 0; s < 2; s++) {
      const float x = s ? -y : y;
      const int fast = (int)(signed char)(u8)q8_encode_bits(x, 1.0f);
      const int k0 = __float2int_rz(__fsqrt_rn(y));
      int k = k0 + (y > (float)(k0 * (k0 + 1)) + 0.5f ? 1 : 0);
      if (k == 0 && x != 0.0f) k = 1;
      if (fast != (x < 0.0f ? -k : k)) atomicAdd(a.bad, 1ull);
      if (b % a.every == 0) a.sample[2 * (b / a.every) + s] = (u32)fast;
    }
  }
  if (blockIdx.x == 0 && threadIdx.x < 256) {
    // Every code, decoded with units of every kind (normal, subnormal, huge, NaN).
    const float units[5] = {1.0f, 3.7e-5f, 1e-40f, 2e34f, __uint_as_float(Q8_NAN_SCALE_BITS)};
    const int code = (int)threadIdx.x - 128;
    u32 word = 0;
    for (int j = 0; j < Q8_RUN; j++) word |= (u32)(u8)(signed char)(code == -128 ? 0 : code) << (8 * j);
    for (int u = 0; u < 5; u++) {
      float v[Q8_RUN];
      q8_decode4(word, units[u], v);
      for (int j = 0; j < Q8_RUN; j++)
        if (__float_as_uint(v[j]) != __float_as_uint(q8_decode(code == -128 ? 0 : code, units[u]))) atomicAdd(a.bad, 1ull);
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    // A nonzero x whose |x| * encoder underflows to 0 keeps its sign.
    if ((int)(signed char)(u8)q8_encode_bits(1e-45f, 0.5f) != 1) atomicAdd(a.bad, 1ull);
    if ((int)(signed char)(u8)q8_encode_bits(-1e-45f, 0.5f) != -1) atomicAdd(a.bad, 1ull);
  }
}
"#;

    #[repr(C)]
    struct Q8RouteArgs {
        bad: u64,
        sample: u64,
        top: u32,
        every: u32,
    }

    /// The CUDA engine's 8-bit momentum codes come from an approximate square root (no
    /// correctly rounded one, no conversion instructions): for every f32 input of the
    /// encoder's range (|x| * encoder up to a little over 127^2), both signs, the code equals
    /// the CPU formula's, and a sample of them equals the CPU's own `encode`; decoding agrees
    /// for every code.
    #[test]
    #[ignore = "needs an NVIDIA GPU and NVRTC (run with --ignored)"]
    fn q8_fast_codes_equal_the_cpus_for_every_input() {
        use driver::DeviceBuffer;
        let dev = driver::probe()
            .and_then(|_| driver::device(0))
            .unwrap_or_else(|e| panic!("no usable CUDA device for this GPU test: {}", e.message));
        let (major, minor) = driver::compute_capability(dev).unwrap();
        let source = CString::new(format!("{}{Q8_ROUTE_CHECK}", prelude::program())).unwrap();
        let image =
            compile_source(&source, major, minor).unwrap_or_else(|e| panic!("{}", e.message));
        let context = PrimaryContext::retain(dev).unwrap();
        let _current = context.enter().unwrap();
        let mut module = std::ptr::null_mut();
        let mut f = std::ptr::null_mut();
        let name = CString::new("q8_route_check").unwrap();
        unsafe {
            check(
                cu::cuModuleLoadData(&mut module, image.as_ptr() as *const _),
                "load",
            )
            .unwrap();
            check(
                cu::cuModuleGetFunction(&mut f, module, name.as_ptr()),
                "function",
            )
            .unwrap();
        }
        // y = 127^2 * (1 + 2^-12) and below: past the largest y (the scale's own, in f32).
        let top = (crate::numerics::q8::MAX_LEVEL * (1.0 + 1.0 / 4096.0)).to_bits();
        let every = 4099u32;
        let samples = (top / every + 1) as usize * 2;
        let bad = DeviceBuffer::zeroed(8, "count").unwrap();
        let sample = DeviceBuffer::zeroed(4 * samples, "samples").unwrap();
        let args = Q8RouteArgs {
            bad: bad.ptr,
            sample: sample.ptr,
            top,
            every,
        };
        unsafe { driver::launch(f, 8192, 256, std::ptr::null_mut(), &args, "q8_route_check") }
            .unwrap();
        driver::synchronize().unwrap();
        let mut count = [0u8; 8];
        bad.download(0, &mut count).unwrap();
        assert_eq!(u64::from_le_bytes(count), 0, "codes or values that differ");
        let mut raw = vec![0u8; 4 * samples];
        sample.download(0, &mut raw).unwrap();
        for (n, word) in raw.chunks_exact(4).enumerate() {
            let y = f32::from_bits((n / 2) as u32 * every);
            let x = if n % 2 == 1 { -y } else { y };
            let gpu = i32::from_le_bytes(word.try_into().unwrap());
            assert_eq!(gpu, crate::numerics::q8::encode(x, 1.0) as i32, "x = {x:e}");
        }
        drop(sample);
        drop(bad);
        unsafe { cu::cuModuleUnload(module) };
    }
}
