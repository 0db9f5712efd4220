//! The per-thread message behind `lion_last_error()`.
//!
//! The buffer is reused, so clearing it on success (which every fallible call does) never
//! allocates: `lion_step` stays allocation-free in the steady state.

use std::cell::RefCell;
use std::ffi::c_char;

thread_local! {
    // Always NUL-terminated; an empty message is the single byte 0.
    static MESSAGE: RefCell<Vec<u8>> = RefCell::new(vec![0]);
}

/// Replaces this thread's message. Interior NULs are dropped so the C string stays whole.
pub fn set(message: &str) {
    MESSAGE.with(|m| {
        let mut m = m.borrow_mut();
        m.clear();
        m.extend(message.bytes().filter(|&b| b != 0));
        m.push(0);
    });
}

/// Empties this thread's message without giving back its buffer.
pub fn clear() {
    MESSAGE.with(|m| {
        let mut m = m.borrow_mut();
        m.clear();
        m.push(0);
    });
}

/// A pointer to this thread's message, valid until the next `lion_` call on this thread.
pub fn as_ptr() -> *const c_char {
    MESSAGE.with(|m| m.borrow().as_ptr() as *const c_char)
}
