//! The CUDA engine's host side against a fake driver and NVRTC (tests/c/fake_cuda.c: one
//! device whose memory is host memory and whose kernels do nothing), so that what the engine
//! decides on the host is tested on every machine, GPU or not:
//! - a CUDA optimizer is made and stepped (the launches, the pointer checks); the host time of
//!   a step of 148 tensors is printed (liblion's part, without a real driver's);
//! - distributed creation's check on CUDA, three ranks as threads over the in-process
//!   transport: ranks created alike; ranks created differently; a rank whose mode refuses its
//!   config; a rank whose arguments `lion_create` itself refuses; a rank out of device memory
//!   for its mode's buffers. In every refusal, every rank fails, none waits;
//! - creation under host-memory budgets from nothing to enough (this binary's allocator,
//!   `common::budget`), the first one (it compiles the kernels), single-process and on one
//!   rank of three: LION_OK or
//!   LION_ERROR_OUT_OF_MEMORY, never the allocator's abort, and no rank left waiting.
//!
//! Numbers need the real thing (tests/cuda.rs, tests/cuda_dist.rs). The fakes are loaded by a
//! child process of this test (LD_LIBRARY_PATH), so that no real driver is in the way.
#![cfg(all(feature = "cuda", target_os = "linux"))]

mod common;
mod native;

use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::budget::*;
use common::dist::*;
use common::ranks::{on_group, Group};
use common::*;
use lion::*;

const CHILD: &str = "LION_FAKE_CUDA_CHILD";

#[global_allocator]
static GLOBAL: FailingOnMarkedThreads = FailingOnMarkedThreads;

#[test]
fn cuda_host_side_against_a_fake_driver() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let dir = fakes("host");
    let search = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{}:{old}", dir.display()),
        _ => dir.display().to_string(),
    };
    let log = dir.join("child.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["cuda_host_side_against_a_fake_driver", "--exact"])
        .args(["--nocapture", "--test-threads", "1"])
        .env("LD_LIBRARY_PATH", search)
        .env(CHILD, "1")
        // The first compile runs out of memory; NVRTC's log and image are 64 KiB.
        .env("LION_FAKE_NVRTC_OUT_OF_MEMORY", "1")
        .env("LION_FAKE_NVRTC_OUTPUT_BYTES", (64 << 10).to_string())
        // The fake's collectives are instant: ranks left waiting fail the child in a minute.
        .env("LION_TEST_RANKS_DEADLINE_S", "60")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("running this test against the fakes");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    println!("{text}");
    let status = status.unwrap_or_else(|| panic!("the child ran past 300 s (killed):\n{text}"));
    assert!(status.success(), "the child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
}

/// Builds libcuda.so and libnvrtc.so from tests/c/fake_cuda.c into a folder of their own
/// (`tag`: one per test, which each remove theirs).
fn fakes(tag: &str) -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    if !dir.exists() {
        dir = std::env::temp_dir(); // a GPU bundle, run away from the build tree
    }
    let dir = dir.join(format!("fake-cuda-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, defines) in [
        ("libcuda.so", &[][..]),
        ("libnvrtc.so", &["-DFAKE_NVRTC"][..]),
    ] {
        let mut cmd = native::compiler(false, "c11");
        cmd.args(["-shared", "-fPIC", "-O1"])
            .arg(format!("-Wl,-soname,{file}"))
            .args(defines)
            .arg(native::repo().join("tests").join("c").join("fake_cuda.c"))
            .arg("-o")
            .arg(dir.join(file));
        native::run_ok(&mut cmd, &format!("compiling the fake {file}"));
    }
    dir
}

/// A child of fork() made while a thread of the parent initialises CUDA, compiles the kernels
/// or loads NCCL (each made slow by the fakes) is refused on that path with
/// LION_ERROR_DEVICE_UNAVAILABLE, where it waited forever for the lock the parent's thread held
/// (tests/host/fork_init.c); its CPU calls work, and the parent goes on.
#[test]
fn a_fork_during_a_first_use_refuses_that_use_in_the_child_and_never_hangs() {
    let dir = fakes("fork");
    let nccl = dir.join("libnccl.so.2");
    let mut cmd = native::compiler(false, "c99");
    cmd.args(["-shared", "-fPIC", "-O1", "-Wl,-soname,libnccl.so.2"])
        .arg("-DFAKE_VERSION=22105")
        .arg(native::repo().join("tests").join("c").join("fake_nccl.c"))
        .arg("-o")
        .arg(&nccl);
    native::run_ok(&mut cmd, "compiling the fake NCCL");
    let src = native::repo()
        .join("tests")
        .join("host")
        .join("fork_init.c");
    let exe = native::build(&[&src], false, "c11", false, "host_fork_init");
    for (which, slow) in [
        ("cuda", "LION_FAKE_CUDA_INIT_DELAY_MS"),
        ("nvrtc", "LION_FAKE_NVRTC_COMPILE_DELAY_MS"),
        ("nccl", "LION_FAKE_NCCL_VERSION_DELAY_MS"),
    ] {
        let mut cmd = Command::new(&exe);
        cmd.arg(which)
            .arg(&nccl)
            .env("LD_LIBRARY_PATH", &dir)
            .env(slow, "1500");
        let text = native::run_ok(&mut cmd, &format!("fork_init {which}"));
        native::assert_checks_passed(&text, which);
        print!("{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn cuda(config: LionConfig) -> LionConfig {
    LionConfig {
        device: LION_DEVICE_CUDA,
        ..config
    }
}

/// The fake driver's hook: allocations of `bytes` or more on the calling thread fail.
fn fail_allocs_from(bytes: usize) {
    let name = CString::new("libcuda.so").unwrap();
    let symbol = CString::new("fake_cuda_fail_allocs_from").unwrap();
    unsafe {
        let lib = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        assert!(!lib.is_null(), "the fake driver is not loaded");
        let f = libc::dlsym(lib, symbol.as_ptr());
        assert!(!f.is_null(), "libcuda.so is not the fake (no {symbol:?})");
        let f: extern "C" fn(usize) = std::mem::transmute(f);
        f(bytes);
        libc::dlclose(lib);
    }
}

fn child() {
    first_creation_out_of_host_memory(); // first: it is the one that compiles the kernels
    one_process();
    creation_out_of_host_memory();
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        distributed_creation(mode);
        distributed_creation_out_of_host_memory(mode);
    }
}

/// The process's first CUDA creations, which compile the kernels: NVRTC out of memory (the
/// fake's first compile), then host-memory budgets from nothing to enough, where each of
/// liblion's buffers of the compile (the program's text, NVRTC's log and image, 64 KiB each
/// from the fake) is the first refused in some run. LION_OK or LION_ERROR_OUT_OF_MEMORY,
/// never the allocator's abort, and a creation after a refused compile compiles again.
fn first_creation_out_of_host_memory() {
    let tensors = scaled_tensors(&[1000, 37], LION_DTYPE_F32, LION_DTYPE_F32);
    let config = cuda(lion_config_default());
    let err = Opt::new(config, &tensors)
        .err()
        .expect("NVRTC out of memory refused");
    assert_eq!(err.0, LionStatus::LION_ERROR_OUT_OF_MEMORY, "{}", err.1);
    assert!(err.1.contains("NVRTC_ERROR_OUT_OF_MEMORY"), "{}", err.1);
    let mut refused = [
        "the CUDA program's text",
        "NVRTC's log",
        "the kernels' cubin",
    ]
    .map(|what| (what, 0));
    let made = creation_under_budgets_seen(
        &config,
        &tensors,
        (0..320).step_by(4),
        "a first CUDA creation (the kernels' compile)",
        |message| {
            let which = refused.iter_mut().find(|(what, _)| message.contains(*what));
            which
                .unwrap_or_else(|| panic!("refused elsewhere: {message}"))
                .1 += 1;
        },
    );
    assert!(
        refused.iter().all(|r| r.1 > 0),
        "not each buffer refused: {refused:?}"
    );
    println!("a first CUDA creation under budgets: {made:?}, refused {refused:?}");
}

/// A CUDA optimizer of many tensors made, saved and loaded under host-memory budgets from
/// nothing to enough, for each momentum dtype: each allocation of creation (the chunk table,
/// the tensor table, the state layout, the pointer tables' host side) is the first to fail in
/// some run, and a save's or a load's host copy of the momentum.
fn creation_out_of_host_memory() {
    let tensors = many_small_tensors();
    for state in [LION_DTYPE_F32, LION_DTYPE_BF16, LION_DTYPE_Q8] {
        let config = cuda(LionConfig {
            state_dtype: state,
            ..lion_config_default()
        });
        drop(Opt::new(config, &tensors).expect("made without a budget")); // the kernels, once
        let what = format!("CUDA creation, state {state:?}");
        let made = creation_under_budgets(&config, &tensors, (0..16 << 10).step_by(64), &what);
        // A save into the caller's buffer, and loads of its own checkpoint and of an f32 one
        // (converted), each through a host copy of the whole momentum.
        let opt = Opt::new(config, &tensors).unwrap();
        let own = opt.save();
        let f32_blob = Opt::new(cuda(lion_config_default()), &tensors)
            .unwrap()
            .save();
        let (mut saved, mut loaded) = (Tally::default(), Tally::default());
        let mut buf = vec![0u8; own.len()];
        for kib in (0..24 << 10).step_by(256) {
            let mut written = 0;
            saved.add(within_budget(kib << 10, || unsafe {
                lion_state_save(
                    opt.raw,
                    buf.as_mut_ptr() as *mut c_void,
                    buf.len(),
                    &mut written,
                )
            }));
            for blob in [&own, &f32_blob] {
                loaded.add(within_budget(kib << 10, || unsafe {
                    lion_state_load(opt.raw, blob.as_ptr() as *const c_void, blob.len())
                }));
            }
        }
        saved.assert_both(&format!("CUDA saves, state {state:?}"));
        loaded.assert_both(&format!("CUDA loads, state {state:?}"));
        assert_eq!(
            opt.save(),
            own,
            "the loads under budgets changed the momentum"
        );
        println!("CUDA under budgets, state {state:?}: creation {made:?}, saves {saved:?}, loads {loaded:?}");
    }
}

/// Rank 1 of three makes its CUDA optimizer under host-memory budgets from nothing to enough
/// (`rank_creation_under_budgets`).
fn distributed_creation_out_of_host_memory(mode: LionDistMode) {
    let config = cuda(lion_config_default());
    let on_thread = || fail_allocs_from(usize::MAX); // a thread may have been another test's rank
    let made = rank_creation_under_budgets(
        Group::on_device,
        config,
        &many_small_tensors(),
        mode,
        24,
        on_thread,
    );
    println!("mode {mode:?}, rank 1's CUDA creation under budgets: {made:?}");
}

fn one_process() {
    let sizes = [1000u64, 37, 4099, 5];
    let tensors = scaled_tensors(&sizes, LION_DTYPE_F32, LION_DTYPE_F32);
    let opt = Opt::new(cuda(lion_config_default()), &tensors).expect("a CUDA optimizer");
    // The fake takes every address for device memory, and its kernels write nothing.
    let mut params = random_params(&tensors, &mut Rng::new(1));
    let mut grads = random_grads(&tensors, 1.0, &mut Rng::new(2));
    assert_eq!(
        opt.step(&mut params, &mut grads),
        LionStatus::LION_OK,
        "{}",
        last_error()
    );
    drop(opt);
    // Host time of one step of GPT-2 small's 148 tensors (8 elements each: the host's work
    // does not depend on the sizes), a real driver's launch excluded.
    let tensors = scaled_tensors(&[8; 148], LION_DTYPE_F32, LION_DTYPE_F32);
    let opt = Opt::new(cuda(lion_config_default()), &tensors).expect("148 tensors");
    let mut params = random_params(&tensors, &mut Rng::new(3));
    let mut grads = random_grads(&tensors, 1.0, &mut Rng::new(4));
    let p: Vec<*mut c_void> = params.iter_mut().map(|b| b.ptr()).collect();
    let g: Vec<*const c_void> = grads.iter_mut().map(|b| b.ptr() as *const c_void).collect();
    let mut times = Vec::new();
    for _ in 0..2000 {
        let t = std::time::Instant::now();
        let st = unsafe { lion_step(opt.raw, p.as_ptr(), g.as_ptr(), 148, std::ptr::null_mut()) };
        times.push(t.elapsed());
        assert_eq!(st, LionStatus::LION_OK);
    }
    times.sort();
    println!(
        "host time of lion_step, 148 tensors, fake driver ({} build): median {:.2} us (p10 {:.2}, \
         p90 {:.2})",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        times[1000].as_secs_f64() * 1e6,
        times[200].as_secs_f64() * 1e6,
        times[1800].as_secs_f64() * 1e6
    );
}

/// Creation on three ranks where rank 1's config is `odd(config)`, after `before()` on its
/// thread; every rank's result, after a step where `step` is set and every rank succeeded.
fn create_three(
    mode: LionDistMode,
    odd: impl Fn(LionConfig) -> LionConfig + Sync,
    before: impl Fn() + Sync,
    step: bool,
) -> Vec<Result<(), (LionStatus, String)>> {
    let tensors = tensors_of(LION_DTYPE_F32, LION_DTYPE_F32);
    let group = Group::on_device(3);
    let (created, all_tried) = (AtomicUsize::new(0), Barrier::new(3));
    on_group(&group, |rank, ctx| {
        let base = cuda(LionConfig {
            lr: 0.01,
            ..lion_config_default()
        });
        fail_allocs_from(usize::MAX); // a thread may have been another test's rank
        let config = if rank == 1 {
            before();
            odd(base)
        } else {
            base
        };
        let opt = rank_opt(config, &tensors, mode, LION_VOTE_AUTO, ctx);
        created.fetch_add(opt.is_ok() as usize, Ordering::SeqCst);
        all_tried.wait();
        // A step only where every rank made its optimizer: the others would wait in it.
        let opt = opt?;
        if !step || created.load(Ordering::SeqCst) < 3 {
            return Ok(());
        }
        let mut params = random_params(&tensors, &mut Rng::new(5));
        let mut grads = grads_for(&tensors, rank, 0, 6);
        match opt.step(&mut params, &mut grads) {
            LionStatus::LION_OK => Ok(()),
            st => Err((st, last_error())),
        }
    })
}

fn distributed_creation(mode: LionDistMode) {
    let m = if mode == LION_DIST_SHARDED {
        "sharded"
    } else {
        "vote"
    };
    for (rank, r) in create_three(mode, |c| c, || (), true)
        .into_iter()
        .enumerate()
    {
        r.unwrap_or_else(|e| panic!("{m}: rank {rank} created alike and stepped: {e:?}"));
    }
    let all_refuse =
        |what: &str, results: Vec<Result<(), (LionStatus, String)>>, own: (LionStatus, &str)| {
            assert_refused_beside(&results, 1, own.0, own.1, &format!("{m}, {what}"))
        };
    let differently = create_three(mode, |c| LionConfig { seed: 7, ..c }, || (), false);
    for (rank, r) in differently.into_iter().enumerate() {
        let (code, message) = r.expect_err("ranks created differently must fail");
        assert_eq!(
            code,
            LionStatus::LION_ERROR_INVALID_ARGUMENT,
            "{m}: rank {rank}"
        );
        assert!(message.contains("created differently"), "{m}: {message}");
    }
    all_refuse(
        "a negative lr",
        create_three(mode, |c| LionConfig { lr: -1.0, ..c }, || (), false),
        (LionStatus::LION_ERROR_INVALID_ARGUMENT, "lr"),
    );
    if mode == LION_DIST_SHARDED {
        // (The vote mode takes 8-bit momentum.)
        all_refuse(
            "8-bit momentum",
            create_three(
                mode,
                |c| LionConfig {
                    state_dtype: LION_DTYPE_Q8,
                    ..c
                },
                || (),
                false,
            ),
            (LionStatus::LION_ERROR_UNSUPPORTED, "8-bit momentum"),
        );
    }
    // Out of device memory for the mode's buffers (the check's own 112 bytes fit).
    all_refuse(
        "out of device memory",
        create_three(mode, |c| c, || fail_allocs_from(4096), false),
        (LionStatus::LION_ERROR_OUT_OF_MEMORY, "out of device memory"),
    );
}
