//! NCCL, loaded at run time: what `lion_nccl_unique_id` says where NCCL is missing, not NCCL,
//! or given bad arguments (these run anywhere), and the collectives of the NCCL transport on
//! real GPUs (ignored here: run them with --ignored on a GPU machine that has NCCL).

mod gpu;

use std::ffi::{c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;

use lion::test_hooks::{CommDType, Nccl, NcclComm, Transport};
use lion::*;

const ID_BYTES: usize = LION_NCCL_UNIQUE_ID_BYTES;

fn last_error() -> String {
    unsafe { CStr::from_ptr(lion_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Whether the loader's search finds a libnccl here, as `Nccl::load(None)` searches.
fn loader_finds_nccl() -> bool {
    ["libnccl.so.2", "libnccl.so"].iter().any(|name| {
        let name = CString::new(*name).unwrap();
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        !handle.is_null()
    })
}

/// `lion_nccl_unique_id` into a buffer of 0xAA bytes: the status, the buffer.
fn unique_id(library: Option<&CStr>, out_len: usize) -> (LionStatus, Vec<u8>) {
    let mut out = vec![0xAAu8; ID_BYTES.max(out_len)];
    let library = library.map_or(std::ptr::null(), CStr::as_ptr);
    let status = unsafe { lion_nccl_unique_id(library, out.as_mut_ptr(), out_len) };
    (status, out)
}

fn untouched(out: &[u8]) -> bool {
    out.iter().all(|&b| b == 0xAA)
}

#[test]
fn without_a_path_nccl_is_found_or_the_message_says_how_to_name_it() {
    let (status, out) = unique_id(None, ID_BYTES);
    if loader_finds_nccl() {
        // This machine has NCCL: the id is made and written.
        assert_eq!(status, LionStatus::LION_OK, "{}", last_error());
        assert!(!untouched(&out[..ID_BYTES]), "no id was written");
        assert_eq!(last_error(), "");
    } else {
        assert_eq!(status, LionStatus::LION_ERROR_DEVICE_UNAVAILABLE);
        let message = last_error();
        assert!(message.contains("NCCL"), "{message}");
        assert!(message.contains("libnccl.so.2"), "{message}");
        assert!(message.contains("nccl_library"), "{message}");
        assert!(untouched(&out), "written on failure");
        // A failure is not remembered: the next call searches again, and says the same.
        let (again, _) = unique_id(None, ID_BYTES);
        assert_eq!(again, LionStatus::LION_ERROR_DEVICE_UNAVAILABLE);
        assert_eq!(last_error(), message);
    }
}

#[test]
fn a_missing_library_file_is_device_unavailable_naming_the_path() {
    let path = c"/nonexistent/liblion-test/libnccl.so.2";
    let (status, out) = unique_id(Some(path), ID_BYTES);
    assert_eq!(status, LionStatus::LION_ERROR_DEVICE_UNAVAILABLE);
    let message = last_error();
    assert!(
        message.contains("/nonexistent/liblion-test/libnccl.so.2"),
        "{message}"
    );
    assert!(message.contains("nccl_library"), "{message}");
    assert!(untouched(&out), "written on failure");
}

#[test]
fn a_library_that_is_not_nccl_is_device_unavailable_naming_the_missing_symbol() {
    // glibc's libm: loadable everywhere this library runs, and no NCCL.
    let (status, out) = unique_id(Some(c"libm.so.6"), ID_BYTES);
    assert_eq!(status, LionStatus::LION_ERROR_DEVICE_UNAVAILABLE);
    let message = last_error();
    assert!(message.contains("libm"), "{message}");
    assert!(message.contains("no symbol ncclGetVersion"), "{message}");
    assert!(untouched(&out), "written on failure");
}

#[test]
fn a_short_buffer_is_refused_before_anything_is_loaded_or_written() {
    // Whatever the library (missing here), the arguments are checked first.
    for library in [None, Some(c"/nonexistent/libnccl.so.2")] {
        let (status, out) = unique_id(library, 64);
        assert_eq!(status, LionStatus::LION_ERROR_INVALID_ARGUMENT);
        let message = last_error();
        assert!(message.contains("out_len"), "{message}");
        assert!(message.contains("128"), "{message}");
        assert!(untouched(&out), "written on failure");
    }
}

#[test]
fn a_null_out_is_a_null_pointer() {
    let status = unsafe { lion_nccl_unique_id(std::ptr::null(), std::ptr::null_mut(), ID_BYTES) };
    assert_eq!(status, LionStatus::LION_ERROR_NULL_POINTER);
    assert!(last_error().contains("out"), "{}", last_error());
}

#[test]
fn an_empty_library_path_is_refused() {
    let (status, out) = unique_id(Some(c""), ID_BYTES);
    assert_eq!(status, LionStatus::LION_ERROR_INVALID_ARGUMENT);
    assert!(last_error().contains("nccl_library"), "{}", last_error());
    assert!(untouched(&out), "written on failure");
}

// ---- On GPUs, with NCCL ----

const DTYPES: [CommDType; 6] = [
    CommDType::F32,
    CommDType::F16,
    CommDType::BF16,
    CommDType::I8,
    CommDType::U8,
    CommDType::U64,
];

/// The NCCL library of the GPU tests: env LION_NCCL_LIBRARY, else the loader's search.
fn library_from_env() -> Option<CString> {
    std::env::var_os("LION_NCCL_LIBRARY").map(|p| CString::new(p.as_bytes()).unwrap())
}

/// Rank `rank`'s `n` integers (of salt `salt`), small enough that the sums over two ranks are
/// exact in every dtype (bf16 holds integers up to 256 exactly, i8 up to 127).
fn values(dtype: CommDType, rank: usize, n: usize, salt: usize) -> Vec<i64> {
    (0..n)
        .map(|i| {
            let v = ((i * 7 + rank * 13 + salt * 5) % 101) as i64;
            match dtype {
                CommDType::U8 => v,
                CommDType::U64 => v * 1_000_000_007,
                _ => v - 50,
            }
        })
        .collect()
}

fn encode(dtype: CommDType, values: &[i64]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| match dtype {
            CommDType::F32 => (v as f32).to_le_bytes().to_vec(),
            CommDType::F16 => half::f16::from_f32(v as f32).to_le_bytes().to_vec(),
            CommDType::BF16 => half::bf16::from_f32(v as f32).to_le_bytes().to_vec(),
            CommDType::I8 => vec![v as i8 as u8],
            CommDType::U8 => vec![v as u8],
            CommDType::U64 => (v as u64).to_le_bytes().to_vec(),
        })
        .collect()
}

fn sum_over_ranks(dtype: CommDType, world: usize, n: usize, salt: usize) -> Vec<i64> {
    let mut sum = vec![0i64; n];
    for rank in 0..world {
        for (s, v) in sum.iter_mut().zip(values(dtype, rank, n, salt)) {
            *s += v;
        }
    }
    sum
}

/// Makes device `ordinal`'s primary context current on this thread.
fn make_current(ordinal: i32) {
    use cudarc::driver::sys;
    unsafe {
        let mut dev = 0;
        gpu::check(sys::cuDeviceGet(&mut dev, ordinal));
        let mut ctx = std::ptr::null_mut();
        gpu::check(sys::cuDevicePrimaryCtxRetain(&mut ctx, dev));
        gpu::check(sys::cuCtxSetCurrent(ctx));
    }
}

fn device_count() -> i32 {
    let mut count = 0;
    gpu::check(unsafe { cudarc::driver::sys::cuDeviceGetCount(&mut count) });
    count
}

/// A new unique id through the export, from the library of `library_from_env`.
fn new_unique_id() -> [u8; ID_BYTES] {
    let library = library_from_env();
    let (status, out) = unique_id(library.as_deref(), ID_BYTES);
    assert_eq!(status, LionStatus::LION_OK, "{}", last_error());
    out[..ID_BYTES].try_into().unwrap()
}

/// Rank `rank` of `world` (on device `rank`): every collective on every dtype, checked; then a
/// borrow of the same communicator. Collective: every rank runs it at the same time.
fn run_rank(id: &[u8; ID_BYTES], rank: usize, world: usize) {
    make_current(rank as i32);
    let nccl = Nccl::load(library_from_env().as_deref()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("rank {rank}: {}", nccl.describe());
    let comm = NcclComm::init(nccl.clone(), id, rank, world, rank as i32)
        .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
    assert_eq!((comm.rank(), comm.world_size()), (rank, world));
    assert_eq!(comm.cuda_device(), rank as i32);
    // A world of one steps on the default stream (NULL), larger ones on a stream of their own.
    let mut stream: *mut c_void = std::ptr::null_mut();
    if world > 1 {
        use cudarc::driver::sys;
        let mut s = std::ptr::null_mut();
        gpu::check(unsafe {
            sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        });
        stream = s as *mut c_void;
    }
    let n = 1031;
    for dtype in DTYPES {
        let size = dtype.size();
        let poison = |elements: usize| gpu::DevBuf::from_bytes(&vec![0xA5; elements * size]);

        let send = gpu::DevBuf::from_bytes(&encode(dtype, &values(dtype, rank, n, 0)));
        let recv = poison(n);
        unsafe { comm.all_reduce_sum(send.as_ptr(), recv.as_ptr(), n, dtype, stream) }
            .unwrap_or_else(|e| panic!("{e}"));
        let expected = encode(dtype, &sum_over_ranks(dtype, world, n, 0));
        assert!(
            recv.download() == expected,
            "all_reduce_sum {}, rank {rank} of {world}",
            dtype.name()
        );

        let send = gpu::DevBuf::from_bytes(&encode(dtype, &values(dtype, rank, world * n, 1)));
        let recv = poison(n);
        unsafe { comm.reduce_scatter_sum(send.as_ptr(), recv.as_ptr(), n, dtype, stream) }
            .unwrap_or_else(|e| panic!("{e}"));
        let sums = sum_over_ranks(dtype, world, world * n, 1);
        let expected = encode(dtype, &sums[rank * n..(rank + 1) * n]);
        assert!(
            recv.download() == expected,
            "reduce_scatter_sum {}, rank {rank} of {world}",
            dtype.name()
        );

        let send = gpu::DevBuf::from_bytes(&encode(dtype, &values(dtype, rank, n, 2)));
        let recv = poison(world * n);
        unsafe { comm.all_gather(send.as_ptr(), recv.as_ptr(), n, dtype, stream) }
            .unwrap_or_else(|e| panic!("{e}"));
        let expected: Vec<u8> = (0..world)
            .flat_map(|r| encode(dtype, &values(dtype, r, n, 2)))
            .collect();
        assert!(
            recv.download() == expected,
            "all_gather {}, rank {rank} of {world}",
            dtype.name()
        );
    }

    // The same communicator, borrowed: a wrong world or rank is refused naming both values.
    let refused = unsafe { NcclComm::borrow(nccl.clone(), comm.as_raw(), 0, world + 1) }
        .err()
        .expect("a borrow with the wrong world_size was accepted");
    assert_eq!(refused.status, LionStatus::LION_ERROR_INVALID_ARGUMENT);
    assert!(
        refused.message.contains(&format!("has {world} ranks"))
            && refused
                .message
                .contains(&format!("world_size is {}", world + 1)),
        "{}",
        refused.message
    );
    if world > 1 {
        let other = (rank + 1) % world;
        let refused = unsafe { NcclComm::borrow(nccl.clone(), comm.as_raw(), other, world) }
            .err()
            .expect("a borrow with the wrong rank was accepted");
        assert_eq!(refused.status, LionStatus::LION_ERROR_INVALID_ARGUMENT);
        assert!(
            refused.message.contains(&format!("is rank {rank}"))
                && refused.message.contains(&format!("rank is {other}")),
            "{}",
            refused.message
        );
    }
    let borrowed = unsafe { NcclComm::borrow(nccl.clone(), comm.as_raw(), rank, world) }
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(borrowed.cuda_device(), rank as i32);
    let ones = gpu::DevBuf::from_bytes(&1.0f32.to_le_bytes().repeat(8));
    let recv = gpu::DevBuf::new(32);
    let sum_of_ones = (world as f32).to_le_bytes().repeat(8);
    unsafe { borrowed.all_reduce_sum(ones.as_ptr(), recv.as_ptr(), 8, CommDType::F32, stream) }
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recv.download(), sum_of_ones);
    // Dropping the borrowed one leaves the communicator alive.
    drop(borrowed);
    unsafe { comm.all_reduce_sum(ones.as_ptr(), recv.as_ptr(), 8, CommDType::F32, stream) }
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recv.download(), sum_of_ones);
    drop(comm);
    if !stream.is_null() {
        gpu::check(unsafe { cudarc::driver::sys::cuStreamDestroy_v2(stream as _) });
    }
}

/// A world of one on GPU 0 (ncclCommInitRank takes nranks = 1): every collective on every
/// dtype, where a sum is the input and a gather a copy. NCCL is the library named by env
/// LION_NCCL_LIBRARY, else the loader's search (libnccl.so.2). With PyTorch's NCCL:
/// `LION_NCCL_LIBRARY=$(python3 -c "import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])")/lib/libnccl.so.2`
/// (`__path__`, not `__file__`, which a namespace package lacks). Run:
/// `cargo test --test nccl -- --ignored --nocapture`, or `tests/nccl --ignored` in a GPU bundle.
#[test]
#[ignore = "needs NCCL and a GPU (run with --ignored on the GPU machine)"]
fn a_world_of_one_runs_every_collective_on_every_dtype() {
    let _lock = gpu::lock();
    gpu::context().expect("no usable CUDA device on this machine");
    let id = new_unique_id();
    run_rank(&id, 0, 1);
}

/// Two ranks, one thread each, on GPUs 0 and 1 of this process: sums, blocks in rank order,
/// and gathers, on every dtype. NCCL as in the test above. Asked for on fewer than 2 GPUs it
/// fails; the bundle's run-tests.sh leaves `two_gpus` tests out (as skipped) on such machines.
#[test]
#[ignore = "needs NCCL and two GPUs (run with --ignored on the GPU machine)"]
fn two_ranks_on_two_gpus_sum_scatter_and_gather_in_rank_order() {
    let _lock = gpu::lock();
    gpu::context().expect("no usable CUDA device on this machine");
    assert!(
        device_count() >= 2,
        "this test needs 2 CUDA devices and was asked for on a machine with fewer"
    );
    let id = new_unique_id();
    // ncclCommInitRank waits for every rank: if one thread fails before it joins, the other
    // would wait forever. End the process instead of hanging.
    unsafe { libc::alarm(300) };
    std::thread::scope(|s| {
        let ranks: Vec<_> = (0..2)
            .map(|rank| s.spawn(move || run_rank(&id, rank, 2)))
            .collect();
        for rank in ranks {
            rank.join().unwrap();
        }
    });
    unsafe { libc::alarm(0) };
}
