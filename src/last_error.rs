//! The per-thread message behind `lion_last_error()`.
//!
//! The buffer is reused, so clearing it on success (which every fallible call does) never
//! allocates: `lion_step` stays allocation-free in the steady state.
//!
//! A host may call liblion while its thread is being torn down (an `atexit` handler, a C++
//! static or `thread_local` destructor, a `pthread_key` destructor), when this thread's
//! storage may already be gone. Every access therefore uses `try_with`: the message is then
//! dropped, the call still returns its status, and `lion_last_error()` returns `UNAVAILABLE`.

use std::cell::RefCell;
use std::ffi::{c_char, CStr};

thread_local! {
    // Always NUL-terminated; an empty message is the single byte 0.
    static MESSAGE: RefCell<Vec<u8>> = RefCell::new(vec![0]);
}

/// What `lion_last_error()` returns when this thread's message storage no longer exists.
pub const UNAVAILABLE: &CStr =
    c"the error message is unavailable: this thread's storage is already destroyed (the thread or process is exiting)";

/// Replaces this thread's message. Interior NULs are dropped so the C string stays whole.
pub fn set(message: &str) {
    let _ = MESSAGE.try_with(|m| {
        // A re-entrant borrow cannot happen (nothing here calls back), but never panic.
        if let Ok(mut m) = m.try_borrow_mut() {
            m.clear();
            // Out of memory for a longer message: as much of it as the buffer holds.
            let fits = match m.try_reserve(message.len() + 1) {
                Ok(()) => message.len(),
                Err(_) => m.capacity().saturating_sub(1),
            };
            m.extend(message.bytes().take(fits).filter(|&b| b != 0));
            m.push(0);
        }
    });
}

/// Empties this thread's message without giving back its buffer.
pub fn clear() {
    let _ = MESSAGE.try_with(|m| {
        if let Ok(mut m) = m.try_borrow_mut() {
            m.clear();
            m.push(0);
        }
    });
}

/// A pointer to this thread's message, valid until the next `lion_` call on this thread, or
/// the static `UNAVAILABLE` once the thread's storage is gone.
pub fn as_ptr() -> *const c_char {
    MESSAGE
        .try_with(|m| match m.try_borrow() {
            Ok(m) => m.as_ptr() as *const c_char,
            Err(_) => UNAVAILABLE.as_ptr(),
        })
        .unwrap_or(UNAVAILABLE.as_ptr())
}
