//! The exports of distributed optimizers (additive to ABI 1).

use std::ffi::{c_char, CStr};

use super::boundary::guard;
use crate::abi_types::LION_NCCL_UNIQUE_ID_BYTES;
use crate::dist::nccl::Nccl;
use crate::status::{Error, LionStatus, Result};

/// Writes a new `ncclUniqueId` (`LION_NCCL_UNIQUE_ID_BYTES` = 128 bytes) to `out`, for
/// `LionDistConfig.nccl_unique_id`: call it on one rank and send the bytes to every rank.
/// `nccl_library` is NULL (the libnccl.so.2 this process has loaded, else the loader's search
/// for libnccl.so.2) or the path of the NCCL library to load. NCCL missing, not NCCL, or older
/// than 2.10: LION_ERROR_DEVICE_UNAVAILABLE; ncclGetUniqueId failing: LION_ERROR_COMM. `out`
/// is written only on success.
///
/// # Safety
/// `nccl_library` is NULL or a NUL-terminated string; `out` is NULL or writable for `out_len`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn lion_nccl_unique_id(
    nccl_library: *const c_char,
    out: *mut u8,
    out_len: usize,
) -> LionStatus {
    guard(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        if out_len < LION_NCCL_UNIQUE_ID_BYTES {
            return Err(Error::invalid(format!(
                "out_len is {out_len} bytes; an ncclUniqueId needs \
                 {LION_NCCL_UNIQUE_ID_BYTES} (LION_NCCL_UNIQUE_ID_BYTES)"
            )));
        }
        let id = Nccl::load(nccl_library_path(nccl_library)?)?.unique_id()?;
        std::ptr::copy_nonoverlapping(id.as_ptr(), out, id.len());
        Ok(())
    })
}

/// The caller's `nccl_library`: None for NULL; an empty string is refused.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string that outlives the returned reference.
pub(crate) unsafe fn nccl_library_path<'a>(path: *const c_char) -> Result<Option<&'a CStr>> {
    if path.is_null() {
        return Ok(None);
    }
    let path = CStr::from_ptr(path);
    if path.is_empty() {
        return Err(Error::invalid(
            "nccl_library is an empty string: give the path of libnccl.so.2, or NULL to \
             search for it",
        ));
    }
    Ok(Some(path))
}
