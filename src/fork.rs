//! Knowing whether we are still the process that built an object, or a child of `fork()`.
//!
//! A forked child has one thread: the CPU pool's threads and the CUDA context of its parent
//! do not exist there. A `pthread_atfork` child handler bumps a counter, so an object that
//! recorded the counter at birth can tell, for the price of one relaxed load, that it now
//! lives in another process. glibc unregisters the handler when the library is unloaded.
//!
//! The same handler marks the process-wide locks a thread of the parent held at the fork
//! (`Section`), so that the child refuses what they guard instead of waiting forever.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::status::{Error, LionStatus, Result};

static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Whether the handler is registered (or being registered). Not a `Once`: a child forked
/// while another thread was inside `call_once` would wait for it forever.
static WATCHING: AtomicBool = AtomicBool::new(false);

/// The handler is registered as the library loads (an ELF constructor: in `dlopen`, or before
/// `main`), before any thread can call liblion: no call can race the registration, and a
/// fork can never come between an object's birth and the handler that tells it apart.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static REGISTER_AT_LOAD: extern "C" fn() = register_at_load;

#[cfg(target_os = "linux")]
extern "C" fn register_at_load() {
    watch();
}

/// Whether forks are watched (the constructor ran, or a first use registered the handler).
pub fn watched() -> bool {
    WATCHING.load(Ordering::Relaxed)
}

extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    for section in SECTIONS {
        section.forked();
    }
}

/// Registers the handler where the constructor did not (a static link whose object with it
/// was left out): there the first caller registers and the others go on at once, so a fork
/// from another thread during that first registration goes unseen.
fn watch() {
    if !WATCHING.load(Ordering::Relaxed) && !WATCHING.swap(true, Ordering::AcqRel) {
        // SAFETY: registers a handler that only touches atomics. A failure (ENOMEM) leaves
        // forks undetected, as they were before; nothing else depends on it.
        unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    }
}

/// A process-wide section guarded by a lock that a fork() child inherits as it was: one
/// held by a thread of the parent (initialising CUDA, compiling the kernels, loading NCCL,
/// each of which can take seconds) is never released there, and waiting for it would hang
/// the child. A section counts the threads inside it; the child handler marks a section
/// that had any as abandoned, and `enter` refuses it from then on (in that child and its
/// children) instead of waiting. A thread counted but not yet at the lock, or past it, is
/// refused alike: erring on the side of a clear error.
pub struct Section {
    inside: AtomicUsize,
    abandoned: AtomicBool,
    /// What the refusal names as unusable ("CUDA") and what a thread inside is doing
    /// ("initialising CUDA"), for its message.
    subject: &'static str,
    doing: &'static str,
}

/// Leaves the section when dropped: declare it before the lock's guard, so that it drops after.
pub struct Inside(&'static Section);

impl Drop for Inside {
    fn drop(&mut self) {
        self.0.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Section {
    const fn new(subject: &'static str, doing: &'static str) -> Section {
        Section {
            inside: AtomicUsize::new(0),
            abandoned: AtomicBool::new(false),
            subject,
            doing,
        }
    }

    /// In, before taking the section's lock; LION_ERROR_DEVICE_UNAVAILABLE in a child of
    /// fork() whose parent had a thread inside.
    pub fn enter(&'static self) -> Result<Inside> {
        watch();
        self.inside.fetch_add(1, Ordering::SeqCst);
        let inside = Inside(self);
        if self.abandoned.load(Ordering::SeqCst) {
            return Err(Error::new(
                LionStatus::LION_ERROR_DEVICE_UNAVAILABLE,
                format!(
                    "{} is unusable in this child of fork(): a thread of the parent was {} when \
                     the process forked, and the lock it held is never released here (fork \
                     before that starts, or exec in the child)",
                    self.subject, self.doing
                ),
            ));
        }
        Ok(inside)
    }

    /// The child handler's part (one thread in the child: plain stores).
    fn forked(&self) {
        if self.inside.load(Ordering::SeqCst) > 0 {
            self.abandoned.store(true, Ordering::SeqCst);
            self.inside.store(0, Ordering::SeqCst);
        }
    }
}

/// The driver's probe (`cuda::driver::probe`: dlopen, cuInit).
pub static CUDA_INIT: Section = Section::new("CUDA", "initialising CUDA");
/// The kernels' cache (`cuda::module::kernels`: NVRTC, module loading).
pub static KERNEL_CACHE: Section = Section::new("CUDA", "compiling liblion's CUDA kernels");
/// The NCCL libraries loaded (`dist::nccl::Nccl::load`: dlopen, version check).
pub static NCCL_LOAD: Section = Section::new("NCCL", "loading NCCL");

static SECTIONS: [&Section; 3] = [&CUDA_INIT, &KERNEL_CACHE, &NCCL_LOAD];

/// The process an object was created in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Birth(u64);

impl Birth {
    /// The current process (watching for forks, where the load-time constructor did not).
    pub fn now() -> Birth {
        watch();
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
