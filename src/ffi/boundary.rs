//! The one boundary every export goes through: panics caught, errors turned into a status
//! and this thread's message, and typed access to the caller's pointers.

use std::any::Any;
use std::ops::{Deref, DerefMut};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use crate::fork::SharedBirth;
use crate::fp_env;
use crate::last_error;
use crate::optimizer::Optimizer;
use crate::status::{Error, LionStatus, Result};

/// The opaque handle C sees. The mutex serialises calls on one handle from many threads.
pub struct LionOptimizer {
    inner: Mutex<Optimizer>,
    /// The process the optimizer works in; a child of fork() revives it on its first call.
    birth: SharedBirth,
    /// The thread inside a call on this handle (`this_thread`), 0 when none: a call from that
    /// same thread (a collective callback calling back into the optimizer whose call made
    /// the collective) is refused, where waiting for the lock it holds would never end.
    holder: AtomicUsize,
}

/// This thread's mark: the address of a thread-local, distinct among live threads.
fn this_thread() -> usize {
    thread_local!(static MARK: u8 = const { 0 });
    MARK.with(|mark| mark as *const u8 as usize)
}

/// The optimizer of a handle, held for one call (`LionOptimizer::lock`).
pub(crate) struct Locked<'a> {
    guard: MutexGuard<'a, Optimizer>,
    holder: &'a AtomicUsize,
}

impl Deref for Locked<'_> {
    type Target = Optimizer;
    fn deref(&self) -> &Optimizer {
        &self.guard
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Optimizer {
        &mut self.guard
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.holder.store(0, Ordering::Release); // before the guard, a field, unlocks
    }
}

fn reentered(what: &str) -> String {
    format!(
        "{what} was called on an optimizer from inside a call on it (a collective callback \
         calling back into the optimizer whose call made the collective): refused, where it \
         would wait forever for the call that runs it"
    )
}

/// Runs the body of an export in the standard floating-point environment (`fp_env`): `LION_OK`
/// and an empty message on success, the error's status and message on failure,
/// `LION_ERROR_PANIC` if anything panicked.
pub fn guard(body: impl FnOnce() -> Result<()>) -> LionStatus {
    let _cancel = CancelDeferred::enter();
    let _fp = fp_env::Standard::enter();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            last_error::clear();
            LionStatus::LION_OK
        }
        Ok(Err(e)) => {
            last_error::set(&e.message);
            e.status
        }
        Err(panic) => {
            last_error::set(&format!(
                "internal error (please report): {}",
                panic_text(&*panic)
            ));
            LionStatus::LION_ERROR_PANIC
        }
    }
}

/// For exports that cannot fail: a panic yields `fallback` instead of unwinding into C.
pub fn guard_infallible<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    let _cancel = CancelDeferred::enter();
    let _fp = fp_env::Standard::enter();
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// Thread cancellation held off for one export. A host thread cancelled with `pthread_cancel`
/// (deferred, the default) acts on it at its next cancellation point: inside liblion that may
/// be a file's write, `pthread_join` of the pool, a read of /sys, or the host's own collective
/// callback, and glibc's forced unwind through liblion's frames (which catch unwinding, or are
/// `extern "C"`) aborts the process. With cancellation disabled for the call, a pending
/// request is acted on at the thread's first cancellation point after liblion returns.
struct CancelDeferred {
    #[cfg(target_os = "linux")]
    previous: libc::c_int,
}

#[cfg(target_os = "linux")]
mod cancel {
    // glibc's and musl's values (pthread.h); not in the libc crate.
    pub(super) const ENABLE: libc::c_int = 0;
    pub(super) const DISABLE: libc::c_int = 1;
    extern "C" {
        pub(super) fn pthread_setcancelstate(
            state: libc::c_int,
            old: *mut libc::c_int,
        ) -> libc::c_int;
    }
}

impl CancelDeferred {
    fn enter() -> CancelDeferred {
        #[cfg(target_os = "linux")]
        {
            let mut previous = cancel::ENABLE;
            // SAFETY: sets this thread's cancel state, the previous one into a local.
            if unsafe { cancel::pthread_setcancelstate(cancel::DISABLE, &mut previous) } != 0 {
                previous = cancel::DISABLE; // nothing changed: nothing to restore
            }
            CancelDeferred { previous }
        }
        #[cfg(not(target_os = "linux"))]
        CancelDeferred {}
    }
}

impl Drop for CancelDeferred {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if self.previous != cancel::DISABLE {
            let mut ignored = 0;
            // SAFETY: restores the state read in `enter`; setting the state is not itself a
            // cancellation point, so a pending request waits for the host's next one.
            unsafe { cancel::pthread_setcancelstate(self.previous, &mut ignored) };
        }
    }
}

fn panic_text(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "a panic without a message"
    }
}

/// A shared reference to a caller's object, or NULL_POINTER naming the argument.
///
/// # Safety
/// A non-NULL `ptr` must point to a valid `T` for the duration of the call.
pub unsafe fn try_ref<'a, T>(ptr: *const T, name: &str) -> Result<&'a T> {
    ptr.as_ref().ok_or_else(|| Error::null(name))
}

/// Writes `value` through a caller's out-pointer (which may be unaligned).
///
/// # Safety
/// A non-NULL `ptr` must be valid for writes of a `T`.
pub unsafe fn write_out<T>(ptr: *mut T, name: &str, value: T) -> Result<()> {
    if ptr.is_null() {
        return Err(Error::null(name));
    }
    ptr.write_unaligned(value);
    Ok(())
}

/// A slice from a caller's (pointer, count), refusing NULL, misalignment and absurd counts.
///
/// # Safety
/// A non-NULL, aligned `ptr` must point to `len` valid `T`s for the duration of the call.
pub unsafe fn try_slice<'a, T>(ptr: *const T, len: usize, name: &str) -> Result<&'a [T]> {
    if ptr.is_null() {
        return Err(Error::null(name));
    }
    if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Error::invalid(format!(
            "{name} is not aligned for its element type"
        )));
    }
    if len > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(Error::invalid(format!(
            "{name}: a count of {len} cannot exist"
        )));
    }
    Ok(std::slice::from_raw_parts(ptr, len))
}

fn poisoned() -> Error {
    Error::new(
        LionStatus::LION_ERROR_PANIC,
        "this optimizer is unusable: an earlier call on it failed with an internal error",
    )
}

impl LionOptimizer {
    pub(crate) fn new(optimizer: Optimizer) -> LionOptimizer {
        LionOptimizer {
            inner: Mutex::new(optimizer),
            birth: SharedBirth::now(),
            holder: AtomicUsize::new(0),
        }
    }

    /// Whether this thread is inside a call on this handle (see `holder`).
    pub(crate) fn held_by_this_thread(&self) -> bool {
        self.holder.load(Ordering::Acquire) == this_thread()
    }

    /// The message for a call refused by `held_by_this_thread` (`what`: the function).
    pub(crate) fn reentry_message(what: &str) -> String {
        reentered(what)
    }

    /// The optimizer, exclusively, for the length of one call.
    pub(crate) fn lock(&self) -> Result<Locked<'_>> {
        if self.held_by_this_thread() {
            return Err(Error::invalid(reentered("a liblion function")));
        }
        let guard = self.lock_inner()?;
        self.holder.store(this_thread(), Ordering::Release);
        Ok(Locked {
            guard,
            holder: &self.holder,
        })
    }

    fn lock_inner(&self) -> Result<MutexGuard<'_, Optimizer>> {
        if !self.birth.is_other_process() {
            return self.inner.lock().map_err(|_| poisoned());
        }
        // A child of fork() starts with one thread: a lock held now was held by a thread of
        // the parent, mid-call, and would never be released. Refuse instead of hanging.
        let mut optimizer = match self.inner.try_lock() {
            Ok(optimizer) => optimizer,
            Err(TryLockError::Poisoned(_)) => return Err(poisoned()),
            Err(TryLockError::WouldBlock) => {
                return Err(Error::unsupported(
                    "this optimizer is unusable in this child of fork(): another thread of \
                     the parent was inside a call on it when the process forked",
                ))
            }
        };
        optimizer.revive_after_fork()?;
        self.birth.renew();
        Ok(optimizer)
    }
}
