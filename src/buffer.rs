//! A zero-initialised heap buffer, 64-byte aligned or at a given offset in its first page,
//! whose allocation failure is an error (never an abort), for the optimizer's state;
//! `try_vec`, the same for a table; and `FallibleText`, the same for text made with `write!`.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use crate::status::{Error, Result};

pub struct ZeroedBuf {
    /// The allocation.
    ptr: NonNull<u8>,
    layout: Layout,
    /// Where the buffer starts in it.
    offset: usize,
}

// The buffer is plain bytes owned by one optimizer; access is synchronised by its owner.
unsafe impl Send for ZeroedBuf {}
unsafe impl Sync for ZeroedBuf {}

impl ZeroedBuf {
    /// `what` names the buffer in the error of a failed allocation ("the momentum").
    pub fn new(bytes: usize, what: &str) -> Result<ZeroedBuf> {
        Self::at_page_offset(bytes, None, what)
    }

    /// A buffer that starts `page_offset` bytes (a multiple of 64, below 4096) past a page
    /// boundary; None: 64-byte aligned, wherever the allocator puts it.
    pub fn at_page_offset(
        bytes: usize,
        page_offset: Option<usize>,
        what: &str,
    ) -> Result<ZeroedBuf> {
        let (align, offset) = match page_offset {
            Some(o) => (4096, o),
            None => (64, 0),
        };
        debug_assert!(offset % 64 == 0 && offset < 4096);
        let layout = bytes
            .checked_add(offset)
            .and_then(|b| Layout::from_size_align(b.max(64), align).ok())
            .ok_or_else(|| {
                Error::invalid(format!("{what} of {bytes} bytes cannot be allocated"))
            })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).ok_or_else(|| {
            Error::out_of_memory(format!("could not allocate {bytes} bytes for {what}"))
        })?;
        Ok(ZeroedBuf {
            ptr,
            layout,
            offset,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: the offset lies inside the allocation.
        unsafe { self.ptr.as_ptr().add(self.offset) }
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the allocation is initialised (zeroed) and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.layout.size() - self.offset) }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.layout.size() - self.offset) }
    }
}

impl Drop for ZeroedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// An empty Vec with room for `n` entries, or LION_ERROR_OUT_OF_MEMORY naming `what`.
pub(crate) fn try_vec<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Error::out_of_memory(format!("could not allocate {what} for {n} entries")))?;
    Ok(v)
}

/// Text made with `write!` whose growth is reserved fallibly: a write that finds no memory
/// fails (`fmt::Error`) where a `String`'s would abort the process. For the CUDA program's
/// text (src/cuda/prelude.rs).
#[cfg(feature = "cuda")]
pub(crate) struct FallibleText(String);

#[cfg(feature = "cuda")]
impl FallibleText {
    /// Empty, with room for `bytes`; LION_ERROR_OUT_OF_MEMORY naming `what` if there is none.
    pub fn with_capacity(bytes: usize, what: &str) -> Result<FallibleText> {
        let mut text = String::new();
        text.try_reserve_exact(bytes).map_err(|_| {
            Error::out_of_memory(format!("could not allocate {bytes} bytes for {what}"))
        })?;
        Ok(FallibleText(text))
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

#[cfg(feature = "cuda")]
impl std::fmt::Write for FallibleText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.try_reserve(s.len()).map_err(|_| std::fmt::Error)?;
        self.0.push_str(s);
        Ok(())
    }
}
