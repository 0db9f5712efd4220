//! An allocator for a test binary's `#[global_allocator]` that fails requests on the threads a
//! test marks: large ones (`fail_from`), or any past a budget (`within_budget`), so that
//! liblion's running out of host memory is tested without running the machine out of it.
//! Unmarked threads allocate as usual.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct FailingOnMarkedThreads;

thread_local! {
    /// Allocations of this many bytes or more fail on this thread (0: none fails).
    static FAIL_FROM: Cell<usize> = const { Cell::new(0) };
    /// Bytes this thread may still allocate (usize::MAX: no budget); a request of 4 KiB or
    /// more past it fails (smaller ones come from memory the allocator already has, as under
    /// a real limit, and the error messages' own allocations are not what is tested).
    static BUDGET: Cell<usize> = const { Cell::new(usize::MAX) };
}

unsafe impl GlobalAlloc for FailingOnMarkedThreads {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let limit = FAIL_FROM.try_with(Cell::get).unwrap_or(0);
        if limit != 0 && layout.size() >= limit {
            return std::ptr::null_mut();
        }
        let left = BUDGET.try_with(Cell::get).unwrap_or(usize::MAX);
        if left != usize::MAX {
            if layout.size() >= 4096 && layout.size() > left {
                return std::ptr::null_mut();
            }
            let _ = BUDGET.try_with(|b| b.set(left.saturating_sub(layout.size())));
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

/// 20,000 tensors, most of 3 elements: creation's tables (tens of bytes a tensor) are then
/// the large allocations that a budget refuses.
pub fn many_small_tensors() -> Vec<lion::LionTensorDesc> {
    (0..20_000)
        .map(|i| lion::lion_tensor_desc(if i % 50 == 0 { 4099 } else { 3 }, lion::LION_DTYPE_F32))
        .collect()
}

/// From now on this thread's allocations of `bytes` or more fail (0: none).
pub fn fail_from(bytes: usize) {
    FAIL_FROM.with(|f| f.set(bytes));
}

/// Runs `f` with this thread allowed `bytes` of allocations in all (freeing gives none back).
pub fn within_budget<T>(bytes: usize, f: impl FnOnce() -> T) -> T {
    BUDGET.with(|b| b.set(bytes));
    let out = f();
    BUDGET.with(|b| b.set(usize::MAX));
    out
}

/// `lion_create` of `tensors` within each budget of `kibs` (KiB): every call ends in LION_OK
/// or LION_ERROR_OUT_OF_MEMORY, and both are seen (`what` names the sweep where not).
pub fn creation_under_budgets(
    config: &lion::LionConfig,
    tensors: &[lion::LionTensorDesc],
    kibs: impl Iterator<Item = usize>,
    what: &str,
) -> Tally {
    creation_under_budgets_seen(config, tensors, kibs, what, |_| {})
}

/// The same, with liblion's message of each creation refused for memory given to `refused`.
pub fn creation_under_budgets_seen(
    config: &lion::LionConfig,
    tensors: &[lion::LionTensorDesc],
    kibs: impl Iterator<Item = usize>,
    what: &str,
    mut refused: impl FnMut(String),
) -> Tally {
    let mut made = Tally::default();
    for kib in kibs {
        let mut raw = std::ptr::null_mut();
        let status = within_budget(kib << 10, || unsafe {
            lion::lion_create(config, tensors.as_ptr(), tensors.len(), &mut raw)
        });
        unsafe { lion::lion_destroy(raw) };
        if status == lion::LionStatus::LION_ERROR_OUT_OF_MEMORY {
            refused(super::last_error());
        }
        made.add(status);
    }
    made.assert_both(what);
    made
}

/// Calls that ended in LION_OK and calls refused for memory, under budgets; any other status
/// fails the test (with liblion's message).
#[derive(Default, Debug)]
pub struct Tally {
    pub ok: u32,
    pub out_of_memory: u32,
}

impl Tally {
    pub fn add(&mut self, status: lion::LionStatus) {
        if status == lion::LionStatus::LION_OK {
            self.ok += 1;
        } else {
            assert_eq!(
                status,
                lion::LionStatus::LION_ERROR_OUT_OF_MEMORY,
                "{}",
                super::last_error()
            );
            self.out_of_memory += 1;
        }
    }

    /// Both outcomes were seen: the sweep reached from too little to enough.
    pub fn assert_both(&self, what: &str) {
        assert!(
            self.ok > 0 && self.out_of_memory > 0,
            "{what}: {} made, {} refused for memory: widen the sweep",
            self.ok,
            self.out_of_memory
        );
    }
}
