//! liblion: the Lion optimizer (Chen et al. 2023, "Symbolic Discovery of Optimization
//! Algorithms") behind a stable C ABI. See README.md and docs/ABI.md.
//!
//! The exported functions live in `ffi`; everything else is the implementation they share.

mod abi_types;
mod buffer;
mod checkpoint;
mod checkpoint_file;
mod config;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod dist;
mod engine;
mod ffi;
mod fork;
mod fp_env;
mod last_error;
mod numerics;
mod optimizer;
mod status;

/// Not part of liblion's API (no C symbol, no stability promise, hidden from the docs): the
/// NCCL transport, reached by this crate's own GPU test (tests/nccl.rs) until an export
/// (`lion_create_distributed`) drives it.
#[doc(hidden)]
pub mod test_hooks {
    pub use crate::dist::nccl::{Nccl, NcclComm};
    pub use crate::dist::{CommDType, Transport};
    pub use crate::fork::watched as fork_watched;
}

pub use abi_types::*;
pub use ffi::*;
pub use status::LionStatus;
