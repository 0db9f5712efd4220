//! A rank of a sharded optimizer with no memory for its checkpoint still takes part in the
//! collective save (its gather runs through buffers made at creation), so the other ranks get
//! theirs and none waits. The only test in this binary: its allocator fails large requests on
//! the threads a test marks.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ffi::{c_void, CString};

use common::dist::*;
use common::ranks::{on_group, Group};
use common::*;
use lion::*;

struct FailingLarge;

thread_local! {
    /// Allocations of this many bytes or more fail on this thread (0: none fails).
    static FAIL_FROM: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for FailingLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let limit = FAIL_FROM.try_with(Cell::get).unwrap_or(0);
        if limit != 0 && layout.size() >= limit {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: FailingLarge = FailingLarge;

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
            FAIL_FROM.with(|f| f.set(512 << 10));
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
        FAIL_FROM.with(|f| f.set(0));
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
