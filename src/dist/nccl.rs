//! NCCL as a transport: the library is loaded at run time with dlopen (never linked, never
//! reimplemented), and only the handful of functions below are resolved from it.
//!
//! # Which libnccl
//!
//! `Nccl::load(Some(path))` opens exactly `path` (a path, or a file name the loader searches
//! for). `Nccl::load(None)` tries, in order:
//!
//! 1. `libnccl.so.2` already loaded in this process (`RTLD_NOLOAD`; the loader also matches it
//!    by its soname when it was opened by path). A communicator made by the caller (e.g.
//!    PyTorch's, `LionDistConfig.nccl_comm`) is a pointer into the internals of the library
//!    that made it, so it may only be used through that same library: this step finds it.
//!    PyTorch's CUDA wheels (2.x on Linux) do not link NCCL statically: they depend on the
//!    `nvidia-nccl-cu12` wheel and load its `site-packages/nvidia/nccl/lib/libnccl.so.2` when
//!    `torch` is imported, so after `import torch` this step finds PyTorch's NCCL. A process
//!    whose NCCL is linked statically into another library (old PyTorch builds, some custom
//!    builds) has no `libnccl.so.2` to find, and its communicators cannot be borrowed; make
//!    one from a unique id instead.
//! 2. `libnccl.so.2`, then `libnccl.so`, through the loader's search (`LD_LIBRARY_PATH`,
//!    the system's folders).
//!
//! Failure is LION_ERROR_DEVICE_UNAVAILABLE naming what was tried and the system's reason. A
//! library is loaded once per process for each `path` (the successes are kept; a failure is
//! tried again on the next call, e.g. after `import torch`), and never unloaded: NCCL keeps
//! threads, and communicators may outlive any one optimizer.
//!
//! # Versions
//!
//! NCCL 2.10 or newer is required (`MIN_VERSION`): the functions we call exist since 2.4
//! (`ncclCommGetAsyncError` and `ncclCommAbort` are the newest of them), but bfloat16
//! (`ncclBfloat16`), which the modes send, came in 2.10.3; an older library would refuse it
//! at the first bf16 step with a bare "invalid argument", so it is refused at load with its
//! version instead. `ncclGetLastError` (2.13) is optional: when present, its text is added to
//! error messages. `ncclInProgress` (2.14) only comes from non-blocking communicators.
//!
//! # Costs
//!
//! Before each collective, `ncclCommGetAsyncError` is read: an atomic load in NCCL's host
//! memory, no device work and no wait, so that a communicator that already failed (a peer
//! died, a network error) gives LION_ERROR_COMM at once instead of a hang. A non-blocking
//! communicator (`ncclConfig_t.blocking = 0`, or `NCCL_COMM_BLOCKING=0`) that answers
//! `ncclInProgress` is polled with it until it settles, as NCCL's documentation prescribes.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Arc, Mutex};

use super::{comm_error, Collective, CommDType, Transport};
use crate::abi_types::LION_NCCL_UNIQUE_ID_BYTES;
use crate::fork::Birth;
use crate::status::{Error, LionStatus, Result};

// ---- The part of nccl.h we use, declared here (values from NCCL's public nccl.h.in) ----

/// `ncclResult_t`.
type NcclResult = c_int;
/// `ncclComm_t`: an opaque pointer.
type RawComm = *mut c_void;
/// `ncclDataType_t`.
type NcclDataType = c_int;
/// `ncclRedOp_t`.
type NcclRedOp = c_int;
/// `cudaStream_t`, the same handle as a `CUstream`.
type CudaStream = *mut c_void;

const NCCL_SUCCESS: NcclResult = 0;
/// A non-blocking communicator's operation is still under way (NCCL 2.14+).
const NCCL_IN_PROGRESS: NcclResult = 7;

const NCCL_INT8: NcclDataType = 0;
const NCCL_UINT8: NcclDataType = 1;
const NCCL_UINT64: NcclDataType = 5;
const NCCL_FLOAT16: NcclDataType = 6;
const NCCL_FLOAT32: NcclDataType = 7;
const NCCL_BFLOAT16: NcclDataType = 9;

const NCCL_SUM: NcclRedOp = 0;

/// `ncclUniqueId`: `struct { char internal[128]; }`, passed by value to ncclCommInitRank.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; LION_NCCL_UNIQUE_ID_BYTES],
}

const _: () = assert!(std::mem::size_of::<UniqueId>() == 128);

/// The oldest NCCL accepted, as (major, minor): see the module's doc.
pub const MIN_VERSION: (i32, i32) = (2, 10);

type CountFn = unsafe extern "C" fn(RawComm, *mut c_int) -> NcclResult;
type ReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    NcclDataType,
    NcclRedOp,
    RawComm,
    CudaStream,
) -> NcclResult;

/// The functions resolved from the library.
struct Fns {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_count: CountFn,
    comm_user_rank: CountFn,
    comm_cu_device: CountFn,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut NcclResult) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    /// NCCL 2.13+.
    get_last_error: Option<unsafe extern "C" fn(RawComm) -> *const c_char>,
    all_reduce: ReduceFn,
    reduce_scatter: ReduceFn,
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        NcclDataType,
        RawComm,
        CudaStream,
    ) -> NcclResult,
    group_start: unsafe extern "C" fn() -> NcclResult,
    group_end: unsafe extern "C" fn() -> NcclResult,
}

/// A loaded NCCL library.
pub struct Nccl {
    fns: Fns,
    /// NCCL_VERSION_CODE of the library (ncclGetVersion).
    version: i32,
    /// The file the library was loaded from (or what was asked for, if the loader cannot say).
    file: String,
}

fn unavailable(message: impl Into<String>) -> Error {
    Error::new(LionStatus::LION_ERROR_DEVICE_UNAVAILABLE, message)
}

/// The loader's message for the last failed dl* call on this thread.
fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string, valid until the next dl* call
    // on this thread; it is copied at once.
    let text = unsafe { libc::dlerror() };
    if text.is_null() {
        "no reason given".into()
    } else {
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }
}

fn dlopen(name: &CStr, flags: c_int) -> std::result::Result<*mut c_void, String> {
    // SAFETY: a valid C string. Loading runs the library's initialisers, as any dlopen does.
    let handle = unsafe { libc::dlopen(name.as_ptr(), flags) };
    if handle.is_null() {
        Err(dl_error())
    } else {
        Ok(handle)
    }
}

/// `symbol` of the library `handle`, as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the C signature of `symbol` in every NCCL version accepted.
unsafe fn resolve<F: Copy>(handle: *mut c_void, symbol: &CStr, library: &str) -> Result<F> {
    resolve_optional(handle, symbol).ok_or_else(|| {
        unavailable(format!(
            "{library} is not a usable NCCL library: it has no symbol {}",
            symbol.to_string_lossy()
        ))
    })
}

/// As `resolve`, None when the library does not have it.
unsafe fn resolve_optional<F: Copy>(handle: *mut c_void, symbol: &CStr) -> Option<F> {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    let address = libc::dlsym(handle, symbol.as_ptr());
    if address.is_null() {
        None
    } else {
        Some(std::mem::transmute_copy::<*mut c_void, F>(&address))
    }
}

/// "MAJOR.MINOR.PATCH" of a NCCL_VERSION_CODE (X*1000+Y*100+Z up to 2.8, X*10000+Y*100+Z from
/// 2.9 on).
fn version_parts(code: i32) -> (i32, i32, i32) {
    if code >= 10000 {
        (code / 10000, code % 10000 / 100, code % 100)
    } else {
        (code / 1000, code % 1000 / 100, code % 100)
    }
}

/// The file a symbol of a loaded library comes from.
fn file_of(address: *const c_void) -> Option<String> {
    // SAFETY: dladdr only reads the loader's tables; dli_fname is NULL or a string that lives
    // as long as the library, which is never unloaded.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(address, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        Some(
            CStr::from_ptr(info.dli_fname)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

impl Nccl {
    /// The NCCL library at `path`, or found as the module's doc says (`path` None), loaded
    /// once per process. Missing, not NCCL, or too old: LION_ERROR_DEVICE_UNAVAILABLE.
    pub fn load(path: Option<&CStr>) -> Result<Arc<Nccl>> {
        static LOADED: Mutex<Vec<(Option<CString>, Arc<Nccl>)>> = Mutex::new(Vec::new());
        if path.is_some_and(|p| p.is_empty()) {
            return Err(Error::invalid(
                "nccl_library is an empty string: give the path of libnccl.so.2, or NULL to \
                 search for it",
            ));
        }
        let _inside = crate::fork::NCCL_LOAD.enter()?;
        // The list only ever grows by whole entries: a panic elsewhere cannot leave it torn.
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, nccl)) = loaded.iter().find(|(p, _)| p.as_deref() == path) {
            return Ok(nccl.clone());
        }
        let nccl = Arc::new(Self::open(path)?);
        loaded.push((path.map(CStr::to_owned), nccl.clone()));
        Ok(nccl)
    }

    fn open(path: Option<&CStr>) -> Result<Nccl> {
        let (handle, asked) = match path {
            Some(path) => {
                let shown = path.to_string_lossy().into_owned();
                let handle = dlopen(path, libc::RTLD_NOW | libc::RTLD_LOCAL).map_err(|why| {
                    unavailable(format!(
                        "the NCCL library \"{shown}\" (nccl_library) could not be loaded: {why}"
                    ))
                })?;
                (handle, shown)
            }
            None => Self::search()?,
        };
        // SAFETY: the signatures are nccl.h's, unchanged since NCCL 2.4.
        let result = unsafe { Self::bind(handle, &asked) };
        if result.is_err() {
            // Not NCCL, or too old: nothing of it is used. (A library this process had
            // already loaded only loses the reference this dlopen added.)
            // SAFETY: a handle from dlopen, used by nothing else.
            unsafe { libc::dlclose(handle) };
        }
        result
    }

    /// The library without a path: already loaded, then the loader's search.
    fn search() -> Result<(*mut c_void, String)> {
        let soname = c"libnccl.so.2";
        if let Ok(handle) = dlopen(soname, libc::RTLD_NOW | libc::RTLD_NOLOAD) {
            return Ok((
                handle,
                "libnccl.so.2 (already loaded in this process)".into(),
            ));
        }
        let mut tried = Vec::new();
        for name in [soname, c"libnccl.so"] {
            match dlopen(name, libc::RTLD_NOW | libc::RTLD_LOCAL) {
                Ok(handle) => return Ok((handle, name.to_string_lossy().into_owned())),
                Err(why) => tried.push(why),
            }
        }
        Err(unavailable(format!(
            "NCCL was not found: no libnccl.so.2 is loaded in this process, and the loader \
             could not open libnccl.so.2 ({}) nor libnccl.so ({}). Install NCCL (the \
             nvidia-nccl-cu12 pip package that PyTorch uses, or the system's libnccl2), add \
             its folder to LD_LIBRARY_PATH, or give its path in nccl_library \
             (LionDistConfig.nccl_library)",
            tried[0], tried[1]
        )))
    }

    /// Resolves the table from `handle` and checks the version.
    ///
    /// # Safety
    /// `handle` is a live dlopen handle.
    unsafe fn bind(handle: *mut c_void, asked: &str) -> Result<Nccl> {
        let get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult =
            resolve(handle, c"ncclGetVersion", asked)?;
        let file = file_of(get_version as *const c_void).unwrap_or_else(|| asked.to_string());
        let mut version = 0;
        let code = get_version(&mut version);
        if code != NCCL_SUCCESS {
            return Err(unavailable(format!(
                "{file}: ncclGetVersion failed (NCCL error {code})"
            )));
        }
        let (major, minor, patch) = version_parts(version);
        if (major, minor) < MIN_VERSION {
            return Err(unavailable(format!(
                "NCCL {major}.{minor}.{patch} ({file}) is too old: liblion needs NCCL {}.{} or \
                 newer (bfloat16 collectives came in 2.10)",
                MIN_VERSION.0, MIN_VERSION.1
            )));
        }
        let fns = Fns {
            get_unique_id: resolve(handle, c"ncclGetUniqueId", &file)?,
            comm_init_rank: resolve(handle, c"ncclCommInitRank", &file)?,
            comm_destroy: resolve(handle, c"ncclCommDestroy", &file)?,
            comm_abort: resolve(handle, c"ncclCommAbort", &file)?,
            comm_count: resolve(handle, c"ncclCommCount", &file)?,
            comm_user_rank: resolve(handle, c"ncclCommUserRank", &file)?,
            comm_cu_device: resolve(handle, c"ncclCommCuDevice", &file)?,
            comm_get_async_error: resolve(handle, c"ncclCommGetAsyncError", &file)?,
            get_error_string: resolve(handle, c"ncclGetErrorString", &file)?,
            get_last_error: resolve_optional(handle, c"ncclGetLastError"),
            all_reduce: resolve(handle, c"ncclAllReduce", &file)?,
            reduce_scatter: resolve(handle, c"ncclReduceScatter", &file)?,
            all_gather: resolve(handle, c"ncclAllGather", &file)?,
            group_start: resolve(handle, c"ncclGroupStart", &file)?,
            group_end: resolve(handle, c"ncclGroupEnd", &file)?,
        };
        Ok(Nccl { fns, version, file })
    }

    /// The library's version, (major, minor, patch).
    pub fn version(&self) -> (i32, i32, i32) {
        version_parts(self.version)
    }

    /// "NCCL 2.21.5 (/path/libnccl.so.2)", for messages.
    pub fn describe(&self) -> String {
        let (major, minor, patch) = self.version();
        format!("NCCL {major}.{minor}.{patch} ({})", self.file)
    }

    /// A new `ncclUniqueId` (ncclGetUniqueId): on one rank, for every rank's `NcclComm::init`.
    /// NCCL starts its bootstrap listener here, which the ranks' init then connects to.
    pub fn unique_id(&self) -> Result<[u8; LION_NCCL_UNIQUE_ID_BYTES]> {
        let mut id = UniqueId {
            internal: [0; LION_NCCL_UNIQUE_ID_BYTES],
        };
        // SAFETY: writes one ncclUniqueId into `id`.
        let code = unsafe { (self.fns.get_unique_id)(&mut id) };
        if code != NCCL_SUCCESS {
            return Err(comm_error(format!(
                "ncclGetUniqueId failed: {}",
                self.error_text(code, std::ptr::null_mut())
            )));
        }
        Ok(id.internal.map(|b| b as u8))
    }

    /// NCCL's words for `code`, its last error (2.13+) when it has one, and the version.
    fn error_text(&self, code: NcclResult, comm: RawComm) -> String {
        // SAFETY: ncclGetErrorString returns a static string for any code (or NULL, checked).
        let name = unsafe { (self.fns.get_error_string)(code) };
        let mut text = if name.is_null() {
            format!("NCCL error {code}")
        } else {
            format!(
                "{} (NCCL error {code})",
                unsafe { CStr::from_ptr(name) }.to_string_lossy()
            )
        };
        if let Some(get_last_error) = self.fns.get_last_error {
            // SAFETY: returns NULL or a NUL-terminated string owned by NCCL; copied at once.
            let last = unsafe { get_last_error(comm) };
            if !last.is_null() {
                let last = unsafe { CStr::from_ptr(last) }.to_string_lossy();
                let last = last.trim();
                if !last.is_empty() {
                    text.push_str(&format!("; NCCL's last error: {last}"));
                }
            }
        }
        text.push_str(&format!(" [{}]", self.describe()));
        text
    }
}

/// A communicator of NCCL, as a `Transport`: made by `init` from a unique id (then destroyed
/// on drop), or the caller's, borrowed (never destroyed). Calls on it are serialised by its
/// owner (the optimizer's lock): it is `Send`, not `Sync`.
pub struct NcclComm {
    nccl: Arc<Nccl>,
    comm: RawComm,
    rank: usize,
    world: usize,
    /// The CUDA device ordinal of the communicator (ncclCommCuDevice).
    device: i32,
    /// Made by `init`: destroyed on drop.
    owned: bool,
    /// An asynchronous error was seen: drop aborts instead of destroying.
    broken: Cell<bool>,
    /// NCCL does not survive fork(): in a child, the communicator is the parent's.
    birth: Birth,
}

// SAFETY: an NCCL communicator may be used from any thread, one thread at a time.
unsafe impl Send for NcclComm {}

fn check_rank_world(rank: usize, world: usize) -> Result<()> {
    if world == 0 || world > c_int::MAX as usize {
        return Err(Error::invalid(format!(
            "world_size is {world}: it must be in [1, {}]",
            c_int::MAX
        )));
    }
    if rank >= world {
        return Err(Error::invalid(format!(
            "rank is {rank}: it must be in [0, world_size = {world})"
        )));
    }
    Ok(())
}

fn nccl_dtype(dtype: CommDType) -> NcclDataType {
    match dtype {
        CommDType::F32 => NCCL_FLOAT32,
        CommDType::F16 => NCCL_FLOAT16,
        CommDType::BF16 => NCCL_BFLOAT16,
        CommDType::I8 => NCCL_INT8,
        CommDType::U8 => NCCL_UINT8,
        CommDType::U64 => NCCL_UINT64,
    }
}

impl NcclComm {
    /// Uses the caller's communicator `comm` (an `ncclComm_t` made by `nccl`), checking that it
    /// is rank `rank` of `world` (ncclCommCount, ncclCommUserRank; a mismatch is
    /// LION_ERROR_INVALID_ARGUMENT naming both values) and has not failed. It is never
    /// destroyed here: the caller keeps it alive for as long as this lives.
    ///
    /// # Safety
    /// `comm` is NULL or a live communicator made by the library `nccl` (the same file: see
    /// the module's doc), not destroyed while this lives.
    pub unsafe fn borrow(
        nccl: Arc<Nccl>,
        comm: *mut c_void,
        rank: usize,
        world: usize,
    ) -> Result<NcclComm> {
        if comm.is_null() {
            return Err(Error::null("nccl_comm"));
        }
        check_rank_world(rank, world)?;
        let mut this = NcclComm {
            nccl,
            comm,
            rank,
            world,
            device: -1,
            owned: false,
            broken: Cell::new(false),
            birth: Birth::now(),
        };
        this.settle("nccl_comm")?;
        let count = this.query(this.nccl.fns.comm_count, "ncclCommCount")?;
        if count as usize != world {
            return Err(Error::invalid(format!(
                "nccl_comm has {count} ranks (ncclCommCount), but world_size is {world}"
            )));
        }
        let user_rank = this.query(this.nccl.fns.comm_user_rank, "ncclCommUserRank")?;
        if user_rank as usize != rank {
            return Err(Error::invalid(format!(
                "nccl_comm is rank {user_rank} (ncclCommUserRank), but rank is {rank}"
            )));
        }
        this.device = this.query(this.nccl.fns.comm_cu_device, "ncclCommCuDevice")?;
        Ok(this)
    }

    /// Makes rank `rank` of a new communicator of `world` ranks from `unique_id`
    /// (ncclCommInitRank), destroyed when this drops.
    ///
    /// Collective: it returns when all `world` ranks have called it with the same id, and
    /// blocks until then. NCCL binds the communicator to the current CUDA device: the caller
    /// (the CUDA engine) makes device `device_ordinal`'s primary context current on this
    /// thread first; a communicator made on another device is refused (LION_ERROR_DEVICE)
    /// and destroyed.
    pub fn init(
        nccl: Arc<Nccl>,
        unique_id: &[u8; LION_NCCL_UNIQUE_ID_BYTES],
        rank: usize,
        world: usize,
        device_ordinal: i32,
    ) -> Result<NcclComm> {
        check_rank_world(rank, world)?;
        let id = UniqueId {
            internal: unique_id.map(|b| b as c_char),
        };
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: writes a communicator handle into `comm`; the id is passed by value.
        let code =
            unsafe { (nccl.fns.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) };
        if code != NCCL_SUCCESS && code != NCCL_IN_PROGRESS {
            let message = format!(
                "ncclCommInitRank (rank {rank} of {world}) failed: {}",
                nccl.error_text(code, comm)
            );
            if !comm.is_null() {
                // A non-blocking init may leave a handle behind; nothing else will free it.
                // SAFETY: a handle NCCL returned.
                unsafe { (nccl.fns.comm_abort)(comm) };
            }
            return Err(comm_error(message));
        }
        let mut this = NcclComm {
            nccl,
            comm,
            rank,
            world,
            device: -1,
            owned: true,
            broken: Cell::new(false),
            birth: Birth::now(),
        };
        // From here on, `this` frees the communicator if anything fails.
        this.settle("ncclCommInitRank")?;
        this.device = this.query(this.nccl.fns.comm_cu_device, "ncclCommCuDevice")?;
        if this.device != device_ordinal {
            return Err(Error::new(
                LionStatus::LION_ERROR_DEVICE,
                format!(
                    "ncclCommInitRank made a communicator on CUDA device {}, not on the \
                     optimizer's device {device_ordinal}: that device's context was not current",
                    this.device
                ),
            ));
        }
        Ok(this)
    }

    /// The CUDA device ordinal the communicator works on.
    pub fn cuda_device(&self) -> i32 {
        self.device
    }

    /// The `ncclComm_t`.
    pub fn as_raw(&self) -> *mut c_void {
        self.comm
    }

    /// The library the communicator belongs to.
    pub fn nccl(&self) -> &Arc<Nccl> {
        &self.nccl
    }

    /// Runs `body` between ncclGroupStart and ncclGroupEnd, so that NCCL launches the
    /// collectives it enqueues together. ncclGroupEnd runs even when `body` fails.
    pub fn group<T>(&self, body: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        self.usable("ncclGroupStart")?;
        // SAFETY: no arguments.
        let code = unsafe { (self.nccl.fns.group_start)() };
        if code != NCCL_SUCCESS {
            return Err(self.failure("ncclGroupStart", code));
        }
        let value = body(self);
        // SAFETY: closes the group opened above.
        let code = unsafe { (self.nccl.fns.group_end)() };
        let ended = self.finish("ncclGroupEnd", code);
        let value = value?;
        ended.map(|_| value)
    }

    /// An int query of the communicator (count, rank, device).
    fn query(&self, f: CountFn, what: &str) -> Result<i32> {
        let mut value: c_int = -1;
        // SAFETY: a live communicator; writes one int.
        let code = unsafe { f(self.comm, &mut value) };
        if code != NCCL_SUCCESS {
            return Err(self.failure(what, code));
        }
        Ok(value)
    }

    /// LION_ERROR_COMM for a call that returned `code`; notes whether the communicator broke.
    fn failure(&self, what: &str, code: NcclResult) -> Error {
        let mut state = NCCL_SUCCESS;
        // SAFETY: a live communicator; writes one int.
        let read = unsafe { (self.nccl.fns.comm_get_async_error)(self.comm, &mut state) };
        if read != NCCL_SUCCESS || (state != NCCL_SUCCESS && state != NCCL_IN_PROGRESS) {
            self.broken.set(true);
        }
        comm_error(format!(
            "{what} failed: {}",
            self.nccl.error_text(code, self.comm)
        ))
    }

    /// Ok when a call's `code` is success; a non-blocking communicator's `ncclInProgress` is
    /// waited out.
    fn finish(&self, what: &str, code: NcclResult) -> Result<()> {
        match code {
            NCCL_SUCCESS => Ok(()),
            NCCL_IN_PROGRESS => self.settle(what),
            code => Err(self.failure(what, code)),
        }
    }

    /// Reads the communicator's asynchronous state (a host read) until it is not
    /// `ncclInProgress`: Ok if it is healthy, LION_ERROR_COMM if it has failed.
    fn settle(&self, what: &str) -> Result<()> {
        loop {
            let mut state = NCCL_SUCCESS;
            // SAFETY: a live communicator; writes one int.
            let code = unsafe { (self.nccl.fns.comm_get_async_error)(self.comm, &mut state) };
            if code != NCCL_SUCCESS {
                return Err(self.failure("ncclCommGetAsyncError", code));
            }
            match state {
                NCCL_SUCCESS => return Ok(()),
                NCCL_IN_PROGRESS => std::thread::yield_now(),
                state => {
                    self.broken.set(true);
                    return Err(comm_error(format!(
                        "{what}: the NCCL communicator has failed (ncclCommGetAsyncError): {}",
                        self.nccl.error_text(state, self.comm)
                    )));
                }
            }
        }
    }

    /// Refuses a communicator of the parent in a child of fork(), or one that has failed.
    fn usable(&self, what: &str) -> Result<()> {
        if self.birth.is_other_process() {
            return Err(Error::new(
                LionStatus::LION_ERROR_DEVICE_UNAVAILABLE,
                "this NCCL communicator was made before fork(), and neither NCCL nor CUDA can \
                 be used in a child of fork(): create the optimizer in the child (after exec, \
                 or with multiprocessing's \"spawn\")",
            ));
        }
        self.settle(what)
    }

    /// One collective: the state check, the call, its result.
    fn collective(
        &self,
        what: &str,
        count: usize,
        dtype: CommDType,
        call: impl FnOnce() -> NcclResult,
    ) -> Result<()> {
        self.usable(what)?;
        let code = call();
        if code == NCCL_SUCCESS {
            return Ok(());
        }
        self.finish(
            &format!("{what} of {count} {} elements", dtype.name()),
            code,
        )
    }
}

impl Transport for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    unsafe fn run(
        &self,
        op: Collective,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: CommDType,
        stream: *mut c_void,
    ) -> Result<()> {
        let (fns, d, comm) = (&self.nccl.fns, nccl_dtype(dtype), self.comm);
        let what = match op {
            Collective::AllReduceSum => "ncclAllReduce",
            Collective::ReduceScatterSum => "ncclReduceScatter",
            Collective::AllGather => "ncclAllGather",
        };
        self.collective(what, count, dtype, || match op {
            Collective::AllReduceSum => {
                (fns.all_reduce)(send, recv, count, d, NCCL_SUM, comm, stream)
            }
            Collective::ReduceScatterSum => {
                (fns.reduce_scatter)(send, recv, count, d, NCCL_SUM, comm, stream)
            }
            Collective::AllGather => (fns.all_gather)(send, recv, count, d, comm, stream),
        })
    }
}

/// Destroys a communicator made by `init` (ncclCommDestroy, or ncclCommAbort if it has failed:
/// destroying a failed one could wait forever for a peer that is gone); a borrowed one is left
/// alone, and so is one in a child of fork(). Destroying is local to this rank (NCCL frees the
/// process's communicators of a clique when the last of them is destroyed). NCCL makes the
/// communicator's device current on this thread while destroying (cudaSetDevice): the owner
/// drops it inside `PrimaryContext::enter`, whose pop restores the caller's context.
impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.owned || self.birth.is_other_process() {
            return;
        }
        // A non-blocking communicator still busy is waited for; a failed one is aborted.
        let healthy = !self.broken.get() && self.settle("dropping the communicator").is_ok();
        // SAFETY: the communicator made in `init`, used by nothing after this.
        unsafe {
            if healthy {
                (self.nccl.fns.comm_destroy)(self.comm);
            } else {
                (self.nccl.fns.comm_abort)(self.comm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_decode_in_both_encodings() {
        assert_eq!(version_parts(2804), (2, 8, 4));
        assert_eq!(version_parts(21003), (2, 10, 3));
        assert_eq!(version_parts(22105), (2, 21, 5));
        assert_eq!(version_parts(22703), (2, 27, 3));
        assert!(version_parts(2804) < (2, 10, 0));
    }

    #[test]
    fn comm_dtypes_map_to_nccl_h() {
        assert_eq!(nccl_dtype(CommDType::I8), 0);
        assert_eq!(nccl_dtype(CommDType::U8), 1);
        assert_eq!(nccl_dtype(CommDType::U64), 5);
        assert_eq!(nccl_dtype(CommDType::F16), 6);
        assert_eq!(nccl_dtype(CommDType::F32), 7);
        assert_eq!(nccl_dtype(CommDType::BF16), 9);
    }

    #[test]
    fn ranks_and_worlds_are_checked() {
        assert!(check_rank_world(0, 1).is_ok());
        assert!(check_rank_world(3, 4).is_ok());
        assert_eq!(
            check_rank_world(0, 0).unwrap_err().status,
            LionStatus::LION_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(
            check_rank_world(4, 4).unwrap_err().status,
            LionStatus::LION_ERROR_INVALID_ARGUMENT
        );
        assert!(check_rank_world(0, c_int::MAX as usize + 1).is_err());
    }
}
