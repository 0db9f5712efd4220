//! Running out of host memory, through this binary's allocator, which fails requests on the
//! threads a test marks (large ones, or any past a budget):
//! - a rank of a sharded optimizer with no memory for its checkpoint still takes part in the
//!   collective save (its gather runs through buffers made at creation), so the other ranks
//!   get theirs and none waits;
//! - creation and a load end in LION_ERROR_OUT_OF_MEMORY, never in the allocator's abort;
//! - a distributed rank out of memory in creation fails every rank, and none waits.

mod common;

use std::ffi::{c_void, CString};

use common::budget::*;
use common::dist::*;
use common::ranks::{on_group, Group};
use common::*;
use lion::*;

#[global_allocator]
static GLOBAL: FailingOnMarkedThreads = FailingOnMarkedThreads;

#[test]
fn a_rank_out_of_memory_for_its_checkpoint_still_takes_part() {
    // A hang fails the test (on_ranks' watchdog) instead of stalling the run.
    std::env::set_var("LION_TEST_RANKS_DEADLINE_S", "60");
    let tensors = scaled_tensors(&[150_001, 7, 99_999], LION_DTYPE_F32, LION_DTYPE_F32);
    let config = LionConfig {
        lr: 0.01,
        num_threads: 1,
        ..lion_config_default()
    };
    let blob = stepped_checkpoint(config, &tensors, 14);
    let dir = std::env::temp_dir().join(format!("lion-save-oom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let group = Group::new(2);
    let out = on_group(&group, |rank, ctx| {
        let opt = rank_opt(config, &tensors, LION_DIST_SHARDED, LION_VOTE_AUTO, ctx).unwrap();
        assert_eq!(opt.load(&blob), LionStatus::LION_OK, "{}", last_error());
        let path = CString::new(dir.join(format!("rank{rank}")).to_str().unwrap()).unwrap();
        // Rank 1 has no memory for anything of 512 KiB or more: not for its checkpoint's bytes
        // (about 1 MB), while this test's transport still copies a round's 256 KiB.
        if rank == 1 {
            fail_from(512 << 10);
        }
        let to_file = unsafe { lion_state_save_file(opt.raw, path.as_ptr()) };
        let file_message = last_error();
        let to_buffer = if rank == 1 {
            let mut size = 0usize;
            unsafe { lion_state_size(opt.raw, &mut size) };
            // A buffer the caller could not make: NULL, as a C caller's failed malloc gives.
            let st = unsafe {
                lion_state_save(opt.raw, std::ptr::null_mut(), size, std::ptr::null_mut())
            };
            (st, Vec::new())
        } else {
            let mut size = 0usize;
            unsafe { lion_state_size(opt.raw, &mut size) };
            let mut buf = vec![0u8; size];
            let st = unsafe {
                lion_state_save(
                    opt.raw,
                    buf.as_mut_ptr() as *mut c_void,
                    size,
                    std::ptr::null_mut(),
                )
            };
            (st, buf)
        };
        fail_from(0);
        (to_file, file_message, to_buffer)
    });
    let (file0, message0, (st0, buf0)) = &out[0];
    let (file1, message1, (st1, _)) = &out[1];
    assert_eq!(*file0, LionStatus::LION_OK, "{message0}");
    assert_eq!(*file1, LionStatus::LION_ERROR_OUT_OF_MEMORY, "{message1}");
    assert_eq!(
        std::fs::read(dir.join("rank0")).unwrap(),
        blob,
        "rank 0's file"
    );
    assert!(
        !dir.join("rank1").exists(),
        "rank 1 wrote a file it had no memory for"
    );
    assert_eq!(
        (*st0, *st1),
        (LionStatus::LION_OK, LionStatus::LION_ERROR_NULL_POINTER)
    );
    assert!(
        *buf0 == blob,
        "rank 0's checkpoint differs from the one loaded"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Creation of an optimizer of many tensors, and a load of its q8 checkpoint, under budgets
/// from nothing to enough, so that each of their allocations is the first to fail in some run:
/// every call ends in LION_OK or LION_ERROR_OUT_OF_MEMORY. Tables as long as the tensors made
/// without a fallible reserve (the pieces of `Piece::whole`, a load's list of the momentum's
/// regions) ended the process in the allocator's abort.
#[test]
fn creation_and_a_load_out_of_memory_end_in_a_status_not_an_abort() {
    let tensors = many_small_tensors();
    let config = LionConfig {
        num_threads: 1,
        state_dtype: LION_DTYPE_Q8,
        ..lion_config_default()
    };
    let blob = Opt::new(config, &tensors).unwrap().save();
    let creations =
        creation_under_budgets(&config, &tensors, (0..24 << 10).step_by(48), "creation");
    let opt = Opt::new(config, &tensors).unwrap();
    // Its own q8 checkpoint (copied in place), and an f32 one (converted through a buffer of
    // the whole state, which a small budget refuses).
    let f32_blob = Opt::new(
        LionConfig {
            state_dtype: LION_DTYPE_F32,
            ..config
        },
        &tensors,
    )
    .unwrap()
    .save();
    let mut loads = Tally::default();
    for blob in [&blob, &f32_blob] {
        for kib in (0..8 << 10).step_by(64) {
            let status = within_budget(kib << 10, || unsafe {
                lion_state_load(opt.raw, blob.as_ptr() as *const c_void, blob.len())
            });
            loads.add(status);
        }
    }
    loads.assert_both("loads");
    println!("creation: {creations:?}; loads: {loads:?}");
}

/// A CPU rank of three that runs out of host memory while it makes its sharded or vote
/// optimizer: every rank fails, none waits (`rank_creation_under_budgets`).
#[test]
fn a_rank_out_of_memory_in_creation_fails_every_rank() {
    std::env::set_var("LION_TEST_RANKS_DEADLINE_S", "60");
    let config = LionConfig {
        num_threads: 1,
        ..lion_config_default()
    };
    // The CPU modes hold the gradients and parameters laid end to end (6.8 MB each here).
    let tensors = many_small_tensors();
    for mode in [LION_DIST_SHARDED, LION_DIST_VOTE] {
        let made = rank_creation_under_budgets(Group::new, config, &tensors, mode, 48, || ());
        println!("mode {mode:?}, rank 1's creation under budgets: {made:?}");
    }
}
