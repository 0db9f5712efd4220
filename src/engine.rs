//! What every engine is handed for a step, and the enum over the engines this build has.

use std::ffi::c_void;

use crate::config::TensorSpec;
use crate::cpu::CpuEngine;

/// The caller's parameter and gradient pointers for one step, already checked: non-NULL for
/// every non-empty tensor, aligned to their dtype, and no parameter overlapping anything.
pub struct StepBuffers<'a> {
    params: &'a [*mut c_void],
    grads: &'a [*const c_void],
    tensors: &'a [TensorSpec],
}

// The pointers are only dereferenced inside disjoint chunks while the step runs.
unsafe impl Sync for StepBuffers<'_> {}

impl<'a> StepBuffers<'a> {
    /// # Safety
    /// The pointers must satisfy the conditions above (see `Optimizer::check_buffers`).
    pub unsafe fn new(
        params: &'a [*mut c_void],
        grads: &'a [*const c_void],
        tensors: &'a [TensorSpec],
    ) -> Self {
        StepBuffers {
            params,
            grads,
            tensors,
        }
    }

    /// Address of element `start` of tensor `t`'s parameters.
    pub fn param(&self, t: usize, start: u64) -> *mut u8 {
        (self.params[t] as *mut u8).wrapping_add(start as usize * self.tensors[t].param.size())
    }

    /// Address of element `start` of tensor `t`'s gradient.
    pub fn grad(&self, t: usize, start: u64) -> *const u8 {
        (self.grads[t] as *const u8).wrapping_add(start as usize * self.tensors[t].grad.size())
    }
}

pub enum Engine {
    Cpu(CpuEngine),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaEngine),
}
