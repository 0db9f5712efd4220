//! The exports of distributed optimizers (additive to ABI 1).

use std::ffi::{c_char, CStr};

use super::boundary::{guard, LionOptimizer};
use super::read_create_args;
use crate::abi_types::*;
use crate::dist::config::read_dist_config;
use crate::dist::nccl::Nccl;
use crate::optimizer::Optimizer;
use crate::status::{Error, LionStatus, Result};

/// A `LionDistConfig` with `struct_size` set: sharded, rank 0 of 1, no transport yet.
#[no_mangle]
pub extern "C" fn lion_dist_config_default() -> LionDistConfig {
    LionDistConfig::default()
}

/// Creates an optimizer that is rank `dist->rank` of `dist->world_size`, in `dist->mode`
/// (sharded or vote), over the transport `dist` names; every rank passes the same config and
/// tensors. Its steps (`lion_step`, `lion_step_with_options`) are collective: every rank must
/// take each one, with the same options set. In sharded mode saving a checkpoint is
/// collective too (it gathers the momentum) and gives the single-process checkpoint, which
/// loads on any number of ranks; in vote mode each rank saves and loads its own momentum.
/// A CPU optimizer runs over the caller's collectives; a CUDA one over NCCL (`nccl_comm` or
/// `nccl_unique_id`) or the caller's collectives, with the step's agreement reached on the
/// device (docs/ABI.md, "Distributed modes", says what differs). Creating one of more than
/// one rank is collective and waits for its checks that every rank's setup is alike, that
/// none refuses its config, and that each rank's `rank` is its place in the collectives (else
/// every rank that takes part fails; docs/ABI.md says which failures come before them).
///
/// # Safety
/// As `lion_create`; `dist` points to `dist->struct_size` readable bytes, and its
/// `collectives` table to `struct_size` bytes whose functions and context stay valid for the
/// optimizer's life.
#[no_mangle]
pub unsafe extern "C" fn lion_create_distributed(
    config: *const LionConfig,
    tensors: *const LionTensorDesc,
    n_tensors: usize,
    dist: *const LionDistConfig,
    out: *mut *mut LionOptimizer,
) -> LionStatus {
    guard(|| {
        if dist.is_null() {
            return Err(Error::null("dist"));
        }
        let dist = read_dist_config(dist)?;
        let args = read_create_args(config, tensors, n_tensors, out).and_then(|args| {
            nccl_library_path(dist.nccl_library)?;
            Ok(args)
        });
        let optimizer = match args {
            Ok((config, specs)) => Optimizer::new_distributed(&config, specs, &dist, None)?,
            // Refused here, this rank still takes part in creation's check on the device its
            // config names (if it names one), so that the other ranks fail with it instead of
            // waiting for it.
            Err(refused) => {
                return match crate::config::read_placement(config) {
                    Some(placed) => {
                        Optimizer::new_distributed(&placed, Vec::new(), &dist, Some(refused))
                            .map(drop)
                    }
                    None => Err(refused),
                }
            }
        };
        out.write_unaligned(Box::into_raw(Box::new(LionOptimizer::new(optimizer))));
        Ok(())
    })
}

/// Writes a new `ncclUniqueId` (`LION_NCCL_UNIQUE_ID_BYTES` = 128 bytes) to `out`, for
/// `LionDistConfig.nccl_unique_id`: call it on one rank and send the bytes to every rank.
/// `nccl_library` is NULL (the libnccl.so.2 this process has loaded, else the loader's search
/// for libnccl.so.2, then libnccl.so) or the path of the NCCL library to load. NCCL missing, not NCCL, or older
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
