//! Knowing whether we are still the process that built an object, or a child of `fork()`.
//!
//! A forked child has one thread: the CPU pool's threads and the CUDA context of its parent
//! do not exist there. A `pthread_atfork` child handler bumps a counter, so an object that
//! recorded the counter at birth can tell, for the price of one relaxed load, that it now
//! lives in another process. glibc unregisters the handler when the library is unloaded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(0);
static WATCH: Once = Once::new();

extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// The process an object was created in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Birth(u64);

impl Birth {
    /// The current process; starts watching for forks on first use.
    pub fn now() -> Birth {
        WATCH.call_once(|| {
            // SAFETY: registers a handler that only touches an atomic. A failure (ENOMEM)
            // leaves forks undetected, as they were before; nothing else depends on it.
            unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        });
        Birth(GENERATION.load(Ordering::Relaxed))
    }

    /// True in a child of `fork()` made after this object was created.
    pub fn is_other_process(self) -> bool {
        GENERATION.load(Ordering::Relaxed) != self.0
    }
}

/// A `Birth` that can be renewed through a shared reference: the handle's, renewed in the
/// child by the first call that revives the optimizer there.
pub struct SharedBirth(AtomicU64);

impl SharedBirth {
    pub fn now() -> SharedBirth {
        SharedBirth(AtomicU64::new(Birth::now().0))
    }

    pub fn is_other_process(&self) -> bool {
        Birth(self.0.load(Ordering::Relaxed)).is_other_process()
    }

    /// From now on, this process is the object's own.
    pub fn renew(&self) {
        self.0
            .store(GENERATION.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}
