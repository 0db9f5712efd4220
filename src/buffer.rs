//! A zero-initialised, 64-byte aligned heap buffer whose allocation failure is an error
//! (never an abort), for the optimizer's state.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use crate::status::{Error, Result};

pub struct ZeroedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// The buffer is plain bytes owned by one optimizer; access is synchronised by its owner.
unsafe impl Send for ZeroedBuf {}
unsafe impl Sync for ZeroedBuf {}

impl ZeroedBuf {
    pub fn new(bytes: usize) -> Result<ZeroedBuf> {
        let layout = Layout::from_size_align(bytes.max(64), 64)
            .map_err(|_| Error::invalid(format!("a state of {bytes} bytes cannot be allocated")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).ok_or_else(|| {
            Error::out_of_memory(format!(
                "could not allocate {bytes} bytes of optimizer state"
            ))
        })?;
        Ok(ZeroedBuf { ptr, layout })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the allocation is initialised (zeroed) and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for ZeroedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
