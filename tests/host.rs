//! liblion inside a host's life, from C and C++ (tests/host/): called during teardown (atexit,
//! static, thread_local and pthread_key destructors) and in children of fork(). Each program
//! exits non-zero (or is killed) if a call aborts, hangs or returns the wrong status; and in
//! threads cancelled with pthread_cancel inside a call.

mod native;

use native::*;

fn run_host_program(file: &str, cpp: bool, std: &str) {
    let src = repo().join("tests").join("host").join(file);
    let name = format!("host_{}", file.replace('.', "_"));
    let exe = build(&[&src], cpp, std, false, &name);
    run_program(&exe, file);
}

#[test]
fn every_export_works_during_teardown() {
    run_host_program("teardown.cpp", true, "c++17");
}

#[test]
fn a_forked_child_steps_and_destroys_without_hanging() {
    run_host_program("fork.c", false, "c11");
}

#[test]
fn a_cancelled_thread_ends_after_the_call_without_aborting() {
    run_host_program("cancel.c", false, "c11");
}

/// The fork handler is registered as the library loads, before any call: this test calls
/// nothing of liblion before it looks (the other tests here run C programs in processes of
/// their own). Registered at a first call instead, a fork from one thread while another made
/// that first call went unseen by the child (a CUDA first use then hung there).
#[test]
fn forks_are_watched_from_the_library_load_on() {
    assert!(lion::test_hooks::fork_watched());
}
