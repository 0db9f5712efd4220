//! The open transport: the caller's own collectives (`LionCollectives`), for MPI, Gloo,
//! torch.distributed, a game engine's network, and the CPU engine's distributed modes.

use std::ffi::c_void;

use super::{comm_error, Collective, CommDType, Transport};
use crate::abi_types::{LionCollectiveFn, LionCollectives, LionCommDType};
use crate::status::{Error, Result};

/// One of the caller's collectives, known to be there.
type CallerFn = unsafe extern "C" fn(
    *mut c_void,
    *const c_void,
    *mut c_void,
    usize,
    LionCommDType,
    *mut c_void,
) -> i32;

/// The caller's table, copied at create (so the caller's struct need not outlive the call),
/// with the rank and world size the caller gave.
pub struct Callbacks {
    context: *mut c_void,
    all_reduce_sum: CallerFn,
    reduce_scatter_sum: CallerFn,
    all_gather: CallerFn,
    rank: usize,
    world_size: usize,
}

// The context is the caller's: the contract says its collectives may be called from the thread
// that calls lion_step, whichever that is.
unsafe impl Send for Callbacks {}

impl Callbacks {
    /// # Safety
    /// `table` was read from the caller's `LionCollectives` (its `struct_size` honoured).
    pub unsafe fn new(table: &LionCollectives, rank: usize, world_size: usize) -> Result<Self> {
        let need = |f: LionCollectiveFn, name: &str| {
            f.ok_or_else(|| Error::null(&format!("collectives->{name}")))
        };
        Ok(Callbacks {
            context: table.context,
            all_reduce_sum: need(table.all_reduce_sum, "all_reduce_sum")?,
            reduce_scatter_sum: need(table.reduce_scatter_sum, "reduce_scatter_sum")?,
            all_gather: need(table.all_gather, "all_gather")?,
            rank,
            world_size,
        })
    }
}

impl Transport for Callbacks {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    unsafe fn run(
        &self,
        op: Collective,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: CommDType,
        stream: *mut c_void,
    ) -> Result<()> {
        let (f, name) = match op {
            Collective::AllReduceSum => (self.all_reduce_sum, "all_reduce_sum"),
            Collective::ReduceScatterSum => (self.reduce_scatter_sum, "reduce_scatter_sum"),
            Collective::AllGather => (self.all_gather, "all_gather"),
        };
        // The caller's code, in the caller's floating-point environment.
        match crate::fp_env::as_caller(|| f(self.context, send, recv, count, dtype.raw(), stream)) {
            0 => Ok(()),
            code => Err(comm_error(format!(
                "the caller's {name} ({count} x {}) returned {code} on rank {} of {}",
                dtype.name(),
                self.rank,
                self.world_size
            ))),
        }
    }
}
