//! Status codes returned across the C ABI, and the internal error type that carries one.

use std::fmt;

/// The result of every fallible `lion_` function. Values are fixed by the ABI contract.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LionStatus {
    LION_OK = 0,
    /// A required pointer is NULL.
    LION_ERROR_NULL_POINTER = 1,
    /// A value out of range, a count or size that does not match, an unknown enum value,
    /// a non-finite hyperparameter, a misaligned or overlapping buffer.
    LION_ERROR_INVALID_ARGUMENT = 2,
    /// Valid, but not built or not available for this backend/dtype.
    LION_ERROR_UNSUPPORTED = 3,
    /// CUDA asked for, but no driver, no device, or the index is out of range.
    LION_ERROR_DEVICE_UNAVAILABLE = 4,
    /// A CUDA call failed.
    LION_ERROR_DEVICE = 5,
    /// Host or device allocation failed (or a thread could not be started).
    LION_ERROR_OUT_OF_MEMORY = 6,
    /// A checkpoint blob is truncated, tampered with, of another version, or made for other
    /// tensors.
    LION_ERROR_CORRUPT_STATE = 7,
    /// An internal bug was caught at the boundary.
    LION_ERROR_PANIC = 8,
    /// (Additive to ABI 1.) A file could not be read or written: the message has the path and
    /// the system's reason.
    LION_ERROR_IO = 9,
    /// (Additive to ABI 1.) `check_finite` found a NaN or Inf gradient; nothing was written.
    LION_ERROR_NON_FINITE = 10,
    /// (Additive to ABI 1.) A collective of a distributed optimizer failed (NCCL's error, or
    /// the caller's transport's non-zero code, in the message).
    LION_ERROR_COMM = 11,
    /// (Additive to ABI 1.) A round of `lion_step_tensors` is open (some tensors stepped, not
    /// all): a call that needs whole steps (`lion_step`, `lion_set_lr`, saving a checkpoint)
    /// is refused until the round is completed or `lion_round_finish` ends it; nothing was
    /// written.
    LION_ERROR_ROUND_OPEN = 12,
}

/// An error on its way to the boundary: the status to return and the message for
/// `lion_last_error()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub status: LionStatus,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(status: LionStatus, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }
    pub fn null(what: &str) -> Self {
        Self::new(
            LionStatus::LION_ERROR_NULL_POINTER,
            format!("{what} is NULL"),
        )
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(LionStatus::LION_ERROR_INVALID_ARGUMENT, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(LionStatus::LION_ERROR_UNSUPPORTED, message)
    }
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(LionStatus::LION_ERROR_CORRUPT_STATE, message)
    }
    pub fn round_open(message: impl Into<String>) -> Self {
        Self::new(LionStatus::LION_ERROR_ROUND_OPEN, message)
    }
    pub fn out_of_memory(message: impl Into<String>) -> Self {
        Self::new(LionStatus::LION_ERROR_OUT_OF_MEMORY, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.status, self.message)
    }
}

impl std::error::Error for Error {}
