//! liblion: the Lion optimizer (Chen et al. 2023, "Symbolic Discovery of Optimization
//! Algorithms") behind a stable C ABI. See README.md and ../shared/ABI.md.
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
mod engine;
mod ffi;
mod last_error;
mod numerics;
mod optimizer;
mod status;

pub use abi_types::*;
pub use ffi::*;
pub use status::LionStatus;
