//! The NCCL loader and transport against a fake libnccl (tests/c/fake_nccl.c: nccl.h's entry
//! points acting as a world of one on host memory), so that everything but NCCL's own work is
//! tested on machines without NCCL or a GPU: version and symbol checks, the search for an
//! already loaded libnccl.so.2, the unique id passed by value, dtype codes, error messages,
//! non-blocking `ncclInProgress`, asynchronous errors, borrow checks, destroy or abort on
//! drop, fork. tests/nccl.rs runs the real NCCL on GPUs.

mod native;

use std::ffi::{c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use lion::test_hooks::{CommDType, Nccl, NcclComm, Transport};
use lion::*;

const ID_BYTES: usize = LION_NCCL_UNIQUE_ID_BYTES;

fn last_error() -> String {
    unsafe { CStr::from_ptr(lion_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The fake's state is global: one test at a time.
fn lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

struct Fakes {
    /// NCCL 2.21.5, soname libnccl.so.2.
    good: CString,
    /// NCCL 2.8.4, without ncclGetLastError.
    old: CString,
    /// NCCL 2.10.3 without ncclAllGather.
    partial: CString,
}

fn build_fake(dir: &Path, file: &str, soname: &str, defines: &[&str]) -> CString {
    let path = dir.join(file);
    // Built beside, then renamed over: a test binary of another profile may have it loaded.
    let tmp = dir.join(format!("{file}.tmp-{}", std::process::id()));
    let mut cmd = native::compiler(false, "c99");
    cmd.args(["-shared", "-fPIC", "-O1"])
        .arg(format!("-Wl,-soname,{soname}"))
        .args(defines)
        .arg(native::repo().join("tests").join("c").join("fake_nccl.c"))
        .arg("-o")
        .arg(&tmp);
    native::run_ok(&mut cmd, &format!("compiling the fake NCCL {file}"));
    std::fs::rename(&tmp, &path).unwrap();
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn fakes() -> &'static Fakes {
    static FAKES: OnceLock<Fakes> = OnceLock::new();
    FAKES.get_or_init(|| {
        let mut dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        if !dir.exists() {
            dir = std::env::temp_dir(); // a GPU bundle, run away from the build tree
        }
        let dir = dir.join("fake-nccl");
        std::fs::create_dir_all(&dir).unwrap();
        Fakes {
            good: build_fake(
                &dir,
                "libnccl.so.2",
                "libnccl.so.2",
                &["-DFAKE_VERSION=22105"],
            ),
            old: build_fake(
                &dir,
                "libnccl-old.so",
                "libnccl-fake-old.so",
                &["-DFAKE_VERSION=2804", "-DFAKE_NO_LAST_ERROR"],
            ),
            partial: build_fake(
                &dir,
                "libnccl-partial.so",
                "libnccl-fake-partial.so",
                &["-DFAKE_VERSION=21003", "-DFAKE_OMIT_ALLGATHER"],
            ),
        }
    })
}

/// The good fake's test controls (the same loaded object liblion uses).
struct Controls {
    counts: unsafe extern "C" fn(*mut c_int),
    last_id: unsafe extern "C" fn(*mut u8),
    last_call: unsafe extern "C" fn(*mut u8, *mut usize, *mut c_int, *mut c_int, *mut *mut c_void),
    set_async: unsafe extern "C" fn(*mut c_void, c_int, c_int),
    in_progress: unsafe extern "C" fn(*mut c_void) -> c_int,
    fail_next: unsafe extern "C" fn(c_int),
    set_device: unsafe extern "C" fn(c_int),
}

fn controls() -> Controls {
    unsafe {
        let handle = libc::dlopen(fakes().good.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        assert!(!handle.is_null());
        /// `name` as a function pointer of type F.
        unsafe fn symbol<F: Copy>(handle: *mut c_void, name: &CStr) -> F {
            let address = libc::dlsym(handle, name.as_ptr());
            assert!(!address.is_null(), "{name:?}");
            std::mem::transmute_copy::<*mut c_void, F>(&address)
        }
        Controls {
            counts: symbol(handle, c"fake_counts"),
            last_id: symbol(handle, c"fake_last_id"),
            last_call: symbol(handle, c"fake_last_call"),
            set_async: symbol(handle, c"fake_set_async"),
            in_progress: symbol(handle, c"fake_in_progress"),
            fail_next: symbol(handle, c"fake_fail_next"),
            set_device: symbol(handle, c"fake_set_device"),
        }
    }
}

impl Controls {
    /// (destroyed, aborted, group depth, ids made).
    fn counts(&self) -> [c_int; 4] {
        let mut out = [0; 4];
        unsafe { (self.counts)(out.as_mut_ptr()) };
        out
    }
    fn last_id(&self) -> [u8; ID_BYTES] {
        let mut out = [0; ID_BYTES];
        unsafe { (self.last_id)(out.as_mut_ptr()) };
        out
    }
    /// (name, count, ncclDataType_t, ncclRedOp_t, stream).
    fn last_call(&self) -> (String, usize, c_int, c_int, *mut c_void) {
        let mut name = [0u8; 32];
        let (mut count, mut dtype, mut op, mut stream) = (0, 0, 0, std::ptr::null_mut());
        unsafe {
            (self.last_call)(
                name.as_mut_ptr(),
                &mut count,
                &mut dtype,
                &mut op,
                &mut stream,
            )
        };
        let name = CStr::from_bytes_until_nul(&name).unwrap();
        (
            name.to_string_lossy().into_owned(),
            count,
            dtype,
            op,
            stream,
        )
    }
}

/// The fake's ids: byte i of its n-th id is i + n.
fn is_a_fake_id(id: &[u8]) -> bool {
    id.windows(2).all(|w| w[1] == w[0].wrapping_add(1))
}

fn unique_id(library: Option<&CStr>) -> (LionStatus, Vec<u8>) {
    let mut out = vec![0xAAu8; ID_BYTES];
    let library = library.map_or(std::ptr::null(), CStr::as_ptr);
    let status = unsafe { lion_nccl_unique_id(library, out.as_mut_ptr(), ID_BYTES) };
    (status, out)
}

#[test]
fn a_library_by_path_makes_the_unique_id() {
    let _lock = lock();
    let (status, id) = unique_id(Some(&fakes().good));
    assert_eq!(status, LionStatus::LION_OK, "{}", last_error());
    assert_eq!(last_error(), "");
    assert!(is_a_fake_id(&id), "{id:?}");
}

#[test]
fn an_nccl_older_than_2_10_is_refused_with_its_version() {
    let _lock = lock();
    let (status, id) = unique_id(Some(&fakes().old));
    assert_eq!(status, LionStatus::LION_ERROR_DEVICE_UNAVAILABLE);
    let message = last_error();
    assert!(message.contains("NCCL 2.8.4"), "{message}");
    assert!(message.contains("2.10 or newer"), "{message}");
    assert!(message.contains("libnccl-old.so"), "{message}");
    assert!(id.iter().all(|&b| b == 0xAA), "written on failure");
}

#[test]
fn an_nccl_without_a_needed_function_is_refused_naming_it() {
    let _lock = lock();
    let (status, id) = unique_id(Some(&fakes().partial));
    assert_eq!(status, LionStatus::LION_ERROR_DEVICE_UNAVAILABLE);
    let message = last_error();
    assert!(message.contains("no symbol ncclAllGather"), "{message}");
    assert!(message.contains("libnccl-partial.so"), "{message}");
    assert!(id.iter().all(|&b| b == 0xAA), "written on failure");
}

#[test]
fn without_a_path_the_libnccl_already_loaded_is_used() {
    let _lock = lock();
    // As `import torch` does: the library is loaded by its full path, from a folder the
    // loader does not search. Its soname, libnccl.so.2, is what the search matches.
    let controls = controls();
    let made = controls.counts()[3];
    let (status, id) = unique_id(None);
    assert_eq!(status, LionStatus::LION_OK, "{}", last_error());
    assert!(is_a_fake_id(&id), "{id:?}");
    assert_eq!(
        controls.counts()[3],
        made + 1,
        "the id came from another NCCL"
    );
    let nccl = Nccl::load(None).unwrap();
    assert!(
        nccl.describe().contains("fake-nccl/libnccl.so.2"),
        "{}",
        nccl.describe()
    );
}

fn fake_nccl() -> std::sync::Arc<Nccl> {
    Nccl::load(Some(&fakes().good)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_library_reports_its_version_and_file() {
    let _lock = lock();
    let nccl = fake_nccl();
    assert_eq!(nccl.version(), (2, 21, 5));
    assert!(
        nccl.describe().starts_with("NCCL 2.21.5 ("),
        "{}",
        nccl.describe()
    );
    // Loaded once per path.
    assert!(std::sync::Arc::ptr_eq(&nccl, &fake_nccl()));
}

#[test]
fn a_communicator_is_made_from_the_id_it_is_given() {
    let _lock = lock();
    let (nccl, controls) = (fake_nccl(), controls());
    let mut id = [0u8; ID_BYTES];
    for (i, b) in id.iter_mut().enumerate() {
        *b = (i * 37 % 251) as u8;
    }
    let comm = NcclComm::init(nccl, &id, 0, 1, 0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        controls.last_id(),
        id,
        "the id did not arrive whole (passed by value)"
    );
    assert_eq!(
        (comm.rank(), comm.world_size(), comm.cuda_device()),
        (0, 1, 0)
    );
}

#[test]
fn collectives_pass_their_arguments_and_nccl_h_dtype_codes() {
    let _lock = lock();
    let (nccl, controls) = (fake_nccl(), controls());
    let comm = NcclComm::init(nccl, &[7; ID_BYTES], 0, 1, 0).unwrap();
    let stream = 0x5eed0 as *mut c_void;
    let codes = [
        (CommDType::F32, 7),
        (CommDType::F16, 6),
        (CommDType::BF16, 9),
        (CommDType::I8, 0),
        (CommDType::U8, 1),
        (CommDType::U64, 5),
    ];
    for (dtype, code) in codes {
        let n = 13;
        let send: Vec<u8> = (0..n * dtype.size()).map(|i| i as u8 ^ 0x5a).collect();
        for call in ["ncclAllReduce", "ncclReduceScatter", "ncclAllGather"] {
            let mut recv = vec![0u8; send.len()];
            let (s, r) = (
                send.as_ptr() as *const c_void,
                recv.as_mut_ptr() as *mut c_void,
            );
            unsafe {
                match call {
                    "ncclAllReduce" => comm.all_reduce_sum(s, r, n, dtype, stream),
                    "ncclReduceScatter" => comm.reduce_scatter_sum(s, r, n, dtype, stream),
                    _ => comm.all_gather(s, r, n, dtype, stream),
                }
            }
            .unwrap_or_else(|e| panic!("{call} {}: {e}", dtype.name()));
            assert_eq!(recv, send, "{call} {}", dtype.name());
            assert_eq!(
                controls.last_call(),
                (call.to_string(), n, code, 0, stream),
                "{call} {}",
                dtype.name()
            );
        }
    }
    // A group opens and closes around its body.
    let depth = controls.counts()[2];
    comm.group(|c| {
        assert_eq!(controls.counts()[2], depth + 1);
        let x = 1.0f32.to_le_bytes();
        let mut y = [0u8; 4];
        unsafe {
            c.all_reduce_sum(
                x.as_ptr() as *const c_void,
                y.as_mut_ptr() as *mut c_void,
                1,
                CommDType::F32,
                stream,
            )
        }
    })
    .unwrap();
    assert_eq!(controls.counts()[2], depth);
}

#[test]
fn a_failed_collective_is_comm_naming_the_call_and_nccl_s_words() {
    let _lock = lock();
    let (nccl, controls) = (fake_nccl(), controls());
    let comm = NcclComm::init(nccl, &[1; ID_BYTES], 0, 1, 0).unwrap();
    let x = [0u8; 32];
    let mut y = [0u8; 32];
    let (s, r) = (x.as_ptr() as *const c_void, y.as_mut_ptr() as *mut c_void);
    unsafe { (controls.fail_next)(4) };
    let e =
        unsafe { comm.all_reduce_sum(s, r, 8, CommDType::F32, std::ptr::null_mut()) }.unwrap_err();
    assert_eq!(e.status, LionStatus::LION_ERROR_COMM);
    for part in [
        "ncclAllReduce of 8 f32 elements failed",
        "invalid argument",
        "NCCL error 4",
        "fake: the last error",
        "NCCL 2.21.5",
    ] {
        assert!(e.message.contains(part), "{part:?} not in: {}", e.message);
    }
    // The communicator is still healthy: the next call works, and drop destroys it.
    unsafe { comm.all_reduce_sum(s, r, 8, CommDType::F32, std::ptr::null_mut()) }.unwrap();
    let [destroyed, aborted, ..] = controls.counts();
    drop(comm);
    assert_eq!(controls.counts()[..2], [destroyed + 1, aborted]);
}

#[test]
fn a_non_blocking_in_progress_is_waited_out() {
    let _lock = lock();
    let (nccl, controls) = (fake_nccl(), controls());
    let comm = NcclComm::init(nccl, &[2; ID_BYTES], 0, 1, 0).unwrap();
    let x = 3.0f32.to_le_bytes();
    let mut y = [0u8; 4];
    let (s, r) = (x.as_ptr() as *const c_void, y.as_mut_ptr() as *mut c_void);
    // Before the call: the state check waits.
    unsafe { (controls.set_async)(comm.as_raw(), 0, 3) };
    unsafe { comm.all_reduce_sum(s, r, 1, CommDType::F32, std::ptr::null_mut()) }
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(y, x);
    // The call answers ncclInProgress: waited out after it.
    y = [0; 4];
    let r = y.as_mut_ptr() as *mut c_void;
    unsafe { (controls.fail_next)(7) };
    unsafe { comm.all_reduce_sum(s, r, 1, CommDType::F32, std::ptr::null_mut()) }
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(y, x);
    assert_eq!(
        unsafe { (controls.in_progress)(comm.as_raw()) },
        0,
        "returned while NCCL still said ncclInProgress"
    );
}

#[test]
fn an_asynchronous_error_fails_the_next_collective_and_drop_aborts() {
    let _lock = lock();
    let (nccl, controls) = (fake_nccl(), controls());
    let comm = NcclComm::init(nccl, &[3; ID_BYTES], 0, 1, 0).unwrap();
    unsafe { (controls.set_async)(comm.as_raw(), 6, 0) }; // ncclRemoteError
    let x = [0u8; 4];
    let mut y = [0xEEu8; 4];
    let e = unsafe {
        comm.reduce_scatter_sum(
            x.as_ptr() as *const c_void,
            y.as_mut_ptr() as *mut c_void,
            1,
            CommDType::F32,
            std::ptr::null_mut(),
        )
    }
    .unwrap_err();
    assert_eq!(e.status, LionStatus::LION_ERROR_COMM);
    assert!(e.message.contains("ncclReduceScatter"), "{}", e.message);
    assert!(e.message.contains("has failed"), "{}", e.message);
    assert!(e.message.contains("remote process exited"), "{}", e.message);
    assert_eq!(y, [0xEE; 4], "the collective ran on a failed communicator");
    let [destroyed, aborted, ..] = controls.counts();
    drop(comm);
    assert_eq!(controls.counts()[..2], [destroyed, aborted + 1]);
}

#[test]
fn a_borrowed_communicator_is_checked_and_never_destroyed() {
    let _lock = lock();
    let (nccl, controls) = (fake_nccl(), controls());
    let comm = NcclComm::init(nccl.clone(), &[4; ID_BYTES], 0, 1, 0).unwrap();
    let raw = comm.as_raw();

    let e = unsafe { NcclComm::borrow(nccl.clone(), raw, 0, 2) }
        .err()
        .unwrap();
    assert_eq!(e.status, LionStatus::LION_ERROR_INVALID_ARGUMENT);
    assert!(
        e.message.contains("has 1 ranks (ncclCommCount)") && e.message.contains("world_size is 2"),
        "{}",
        e.message
    );
    let e = unsafe { NcclComm::borrow(nccl.clone(), raw, 1, 1) }
        .err()
        .unwrap();
    assert_eq!(e.status, LionStatus::LION_ERROR_INVALID_ARGUMENT);
    assert!(e.message.contains("rank"), "{}", e.message);
    let e = unsafe { NcclComm::borrow(nccl.clone(), std::ptr::null_mut(), 0, 1) }
        .err()
        .unwrap();
    assert_eq!(e.status, LionStatus::LION_ERROR_NULL_POINTER);
    assert!(e.message.contains("nccl_comm"), "{}", e.message);

    let before = controls.counts();
    let borrowed = unsafe { NcclComm::borrow(nccl.clone(), raw, 0, 1) }.unwrap();
    assert_eq!((borrowed.rank(), borrowed.world_size()), (0, 1));
    let x = 5.0f32.to_le_bytes();
    let mut y = [0u8; 4];
    unsafe {
        borrowed.all_gather(
            x.as_ptr() as *const c_void,
            y.as_mut_ptr() as *mut c_void,
            1,
            CommDType::F32,
            std::ptr::null_mut(),
        )
    }
    .unwrap();
    assert_eq!(y, x);
    drop(borrowed);
    assert_eq!(
        controls.counts()[..2],
        before[..2],
        "a borrowed communicator was freed"
    );
    // A failed borrowed one is not aborted either: it is the caller's.
    unsafe { (controls.set_async)(raw, 6, 0) };
    let e = unsafe { NcclComm::borrow(nccl.clone(), raw, 0, 1) }
        .err()
        .unwrap();
    assert_eq!(e.status, LionStatus::LION_ERROR_COMM);
    assert_eq!(
        controls.counts()[..2],
        before[..2],
        "a borrowed communicator was freed"
    );
    unsafe { (controls.set_async)(raw, 0, 0) };
    drop(comm);
}

#[test]
fn init_refuses_bad_ranks_a_failed_init_and_a_communicator_on_another_device() {
    let _lock = lock();
    let (nccl, controls) = (fake_nccl(), controls());
    let id = [5; ID_BYTES];
    for (rank, world) in [(1, 1), (0, 0), (3, 2)] {
        let e = NcclComm::init(nccl.clone(), &id, rank, world, 0)
            .err()
            .unwrap();
        assert_eq!(
            e.status,
            LionStatus::LION_ERROR_INVALID_ARGUMENT,
            "{rank} of {world}"
        );
    }
    // The fake refuses worlds of more than one, as NCCL refuses a bad init.
    let e = NcclComm::init(nccl.clone(), &id, 0, 2, 0).err().unwrap();
    assert_eq!(e.status, LionStatus::LION_ERROR_COMM);
    assert!(
        e.message
            .contains("ncclCommInitRank (rank 0 of 2) failed: invalid argument"),
        "{}",
        e.message
    );
    // NCCL bound the communicator to the current device, not the one asked for: refused,
    // and the communicator destroyed.
    let [destroyed, ..] = controls.counts();
    unsafe { (controls.set_device)(1) };
    let e = NcclComm::init(nccl.clone(), &id, 0, 1, 0).err();
    unsafe { (controls.set_device)(0) };
    let e = e.unwrap();
    assert_eq!(e.status, LionStatus::LION_ERROR_DEVICE);
    assert!(e.message.contains("device 1"), "{}", e.message);
    assert_eq!(controls.counts()[0], destroyed + 1);
}

#[test]
fn in_a_fork_child_a_communicator_is_refused_and_left_alone() {
    let _lock = lock();
    let (nccl, controls) = (fake_nccl(), controls());
    let comm = NcclComm::init(nccl, &[6; ID_BYTES], 0, 1, 0).unwrap();
    let before = controls.counts();
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut bad = 0;
        let x = [0u8; 4];
        let mut y = [0u8; 4];
        let r = unsafe {
            comm.all_reduce_sum(
                x.as_ptr() as *const c_void,
                y.as_mut_ptr() as *mut c_void,
                1,
                CommDType::F32,
                std::ptr::null_mut(),
            )
        };
        bad += !matches!(&r, Err(e) if e.status == LionStatus::LION_ERROR_DEVICE_UNAVAILABLE
            && e.message.contains("fork")) as i32;
        drop(comm);
        bad += (controls.counts()[..2] != before[..2]) as i32;
        unsafe { libc::_exit(bad) };
    }
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x} (exit N = N checks failed)"
    );
    drop(comm);
    assert_eq!(controls.counts()[0], before[0] + 1);
}
