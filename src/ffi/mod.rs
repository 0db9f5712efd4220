//! The exported `extern "C"` functions of the ABI contract (docs/ABI.md). Each one is a
//! thin shell over `guard`: argument checks first, then the work, never a panic into C.

pub mod boundary;
pub(crate) mod dist;

use std::ffi::{c_char, c_void};

use crate::abi_types::*;
use crate::config::{self, StepOptions};
use crate::optimizer::Optimizer;
use crate::status::{Error, LionStatus};
use crate::{checkpoint, checkpoint_file};
pub use boundary::LionOptimizer;
use boundary::{guard, guard_infallible, try_ref, try_slice, write_out};
pub use dist::*;

/// A `LionConfig` with every default filled in and `struct_size` set.
#[no_mangle]
pub extern "C" fn lion_config_default() -> LionConfig {
    LionConfig::default()
}

/// A tensor of `numel` elements whose gradient has the parameter's dtype, with both scales 1.
#[no_mangle]
pub extern "C" fn lion_tensor_desc(numel: u64, dtype: LionDType) -> LionTensorDesc {
    LionTensorDesc::new(numel, dtype)
}

/// Creates an optimizer for `n_tensors` tensors and stores its handle in `*out`.
///
/// # Safety
/// `config` points to a `LionConfig` of `config->struct_size` bytes; `tensors` to
/// `n_tensors` descriptions; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn lion_create(
    config: *const LionConfig,
    tensors: *const LionTensorDesc,
    n_tensors: usize,
    out: *mut *mut LionOptimizer,
) -> LionStatus {
    guard(|| {
        let (config, specs) = read_create_args(config, tensors, n_tensors, out)?;
        let optimizer = Optimizer::new(&config, specs)?;
        let handle = Box::new(LionOptimizer::new(optimizer));
        out.write_unaligned(Box::into_raw(handle));
        Ok(())
    })
}

/// `lion_create`'s arguments, checked and read (also `lion_create_distributed`'s).
///
/// # Safety
/// As `lion_create`.
pub(crate) unsafe fn read_create_args(
    config: *const LionConfig,
    tensors: *const LionTensorDesc,
    n_tensors: usize,
    out: *mut *mut LionOptimizer,
) -> crate::status::Result<(config::Config, Vec<config::TensorSpec>)> {
    if out.is_null() {
        return Err(Error::null("out"));
    }
    if config.is_null() {
        return Err(Error::null("config"));
    }
    if tensors.is_null() {
        return Err(Error::null("tensors"));
    }
    if n_tensors == 0 {
        return Err(Error::invalid("n_tensors must be at least 1"));
    }
    let config = config::read_config(config)?;
    if n_tensors > isize::MAX as usize / std::mem::size_of::<LionTensorDesc>() {
        return Err(Error::invalid(format!(
            "n_tensors = {n_tensors} cannot exist"
        )));
    }
    let mut specs = Vec::new();
    specs.try_reserve_exact(n_tensors).map_err(|_| {
        Error::out_of_memory(format!("no memory for {n_tensors} tensor descriptions"))
    })?;
    for i in 0..n_tensors {
        specs.push(config::parse_tensor(&tensors.add(i).read_unaligned(), i)?);
    }
    Ok((config, specs))
}

/// A `LionStepOptions` with every default filled in and `struct_size` set.
#[no_mangle]
pub extern "C" fn lion_step_options_default() -> LionStepOptions {
    LionStepOptions::default()
}

/// Applies one Lion step to every tensor. `params[i]` and `grads[i]` hold `tensors[i].numel`
/// elements (host memory for CPU). `stream` is a `CUstream` for CUDA and ignored on the CPU,
/// where the step is complete when this returns.
///
/// # Safety
/// `opt` is a live handle; `params` and `grads` point to `n_tensors` pointers to the caller's
/// buffers, each valid for its tensor's size and not used elsewhere during the call.
#[no_mangle]
pub unsafe extern "C" fn lion_step(
    opt: *mut LionOptimizer,
    params: *const *mut c_void,
    grads: *const *const c_void,
    n_tensors: usize,
    stream: *mut c_void,
) -> LionStatus {
    guard(|| {
        let mut opt = try_ref(opt, "opt")?.lock()?;
        let args = (|| {
            Ok((
                try_slice(params, n_tensors, "params")?,
                try_slice(grads, n_tensors, "grads")?,
            ))
        })();
        let (params, grads) = refuse_together(&mut opt, args, stream)?;
        opt.step(params, grads, stream, &StepOptions::default())
    })
}

/// `lion_step` with options for mixed precision and CUDA graphs: a gradient scale, a
/// `found_inf` flag that skips the step where it runs, and an lr read where the step runs
/// (see `LionStepOptions`). `options` may be NULL (the defaults).
///
/// # Safety
/// As `lion_step`; `options` is NULL or points to `options->struct_size` readable bytes, and
/// its pointers are valid where the step runs (device memory for CUDA, host memory for CPU).
#[no_mangle]
pub unsafe extern "C" fn lion_step_with_options(
    opt: *mut LionOptimizer,
    params: *const *mut c_void,
    grads: *const *const c_void,
    n_tensors: usize,
    stream: *mut c_void,
    options: *const LionStepOptions,
) -> LionStatus {
    guard(|| {
        let mut opt = try_ref(opt, "opt")?.lock()?;
        let args = (|| {
            let params = try_slice(params, n_tensors, "params")?;
            let grads = try_slice(grads, n_tensors, "grads")?;
            let options = if options.is_null() {
                StepOptions::default()
            } else {
                config::read_step_options(options)?
            };
            Ok((params, grads, options))
        })();
        let (params, grads, options) = refuse_together(&mut opt, args, stream)?;
        opt.step(params, grads, stream, &options)
    })
}

/// Steps some of the optimizer's tensors: `indices[j]` names a tensor (its place at
/// creation), `params[j]` and `grads[j]` are its buffers. Calls that together step every
/// tensor once, in any order and grouping, make one step, bit for bit as one `lion_step`: the
/// same step number (for stochastic rounding), the same lr (set with `lion_set_lr`, which is
/// refused while a round is open, or `options->lr` on each call), and the step count advances
/// once, at the call that steps the round's last tensors. A tensor stepped twice in a round, an
/// index out of range, and the usual buffer checks are refused (nothing written). While a
/// round is open, `lion_step`, `lion_set_lr` and saving a checkpoint are refused with
/// `LION_ERROR_ROUND_OPEN`. `n_indices` 0 does nothing. CUDA: one launch per call (two with
/// Cautious Lion) for up to 160 tensors. Distributed optimizers: `LION_ERROR_UNSUPPORTED`.
///
/// # Safety
/// As `lion_step_with_options`, with `indices`, `params` and `grads` holding `n_indices`
/// entries each (not read when `n_indices` is 0).
#[no_mangle]
pub unsafe extern "C" fn lion_step_tensors(
    opt: *mut LionOptimizer,
    indices: *const u32,
    n_indices: usize,
    params: *const *mut c_void,
    grads: *const *const c_void,
    stream: *mut c_void,
    options: *const LionStepOptions,
) -> LionStatus {
    guard(|| {
        let mut opt = try_ref(opt, "opt")?.lock()?;
        if n_indices == 0 {
            return opt.step_tensors(&[], &[], &[], stream, &StepOptions::default());
        }
        let indices = try_slice(indices, n_indices, "indices")?;
        let params = try_slice(params, n_indices, "params")?;
        let grads = try_slice(grads, n_indices, "grads")?;
        let options = if options.is_null() {
            StepOptions::default()
        } else {
            config::read_step_options(options)?
        };
        opt.step_tensors(indices, params, grads, stream, &options)
    })
}

/// Ends the open round of `lion_step_tensors` early: the tensors it did not step keep their
/// values and momentum (as a parameter without a gradient), and the round counts as one step.
/// Without an open round it does nothing. On CUDA the count advances on `stream`.
///
/// # Safety
/// `opt` is NULL or a live handle; `stream` is NULL or a `CUstream` of the optimizer's device.
#[no_mangle]
pub unsafe extern "C" fn lion_round_finish(
    opt: *mut LionOptimizer,
    stream: *mut c_void,
) -> LionStatus {
    guard(|| try_ref(opt, "opt")?.lock()?.finish_round(stream))
}

/// A step's arguments, or their refusal, which a distributed optimizer's other ranks must
/// learn of (they would otherwise wait for this one in the step's collectives).
fn refuse_together<T>(
    opt: &mut Optimizer,
    args: crate::status::Result<T>,
    stream: *mut c_void,
) -> crate::status::Result<T> {
    if args.is_err() {
        opt.refuse_step(stream);
    }
    args
}

/// Frees an optimizer. NULL is a no-op.
///
/// # Safety
/// `opt` is NULL or a handle from `lion_create` that is not used again.
#[no_mangle]
pub unsafe extern "C" fn lion_destroy(opt: *mut LionOptimizer) {
    guard_infallible((), || {
        if opt.is_null() {
            return;
        }
        if (*opt).held_by_this_thread() {
            // From inside a call on it (a collective callback): that call still uses it.
            crate::last_error::set(&LionOptimizer::reentry_message("lion_destroy (not freed)"));
            return;
        }
        drop(Box::from_raw(opt));
    })
}

/// Sets the learning rate for the following steps (finite, >= 0).
///
/// # Safety
/// `opt` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn lion_set_lr(opt: *mut LionOptimizer, lr: f32) -> LionStatus {
    guard(|| try_ref(opt, "opt")?.lock()?.set_lr(lr))
}

/// The current learning rate (the config's `lr` until `lion_set_lr` or a load changes it).
///
/// # Safety
/// `opt` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lion_get_lr(opt: *const LionOptimizer, out: *mut f32) -> LionStatus {
    guard(|| {
        let lr = try_ref(opt, "opt")?.lock()?.lr();
        write_out(out, "out", lr)
    })
}

/// The number of steps taken (restored by `lion_state_load`). On CUDA the count lives on the
/// device, so this waits for the device's queued work. A distributed CUDA optimizer whose
/// ranks differed in a step (which every rank then skipped) returns
/// `LION_ERROR_INVALID_ARGUMENT` saying so, once, leaving `*out` unwritten; the next call
/// returns the count.
///
/// # Safety
/// `opt` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lion_step_count(opt: *const LionOptimizer, out: *mut u64) -> LionStatus {
    guard(|| {
        let step = try_ref(opt, "opt")?.lock()?.step_count_reported()?;
        write_out(out, "out", step)
    })
}

/// The exact size in bytes of the blob `lion_state_save` writes.
///
/// # Safety
/// `opt` is NULL or a live handle; `out_bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lion_state_size(
    opt: *const LionOptimizer,
    out_bytes: *mut usize,
) -> LionStatus {
    guard(|| {
        let size = checkpoint::size(&*try_ref(opt, "opt")?.lock()?);
        write_out(out_bytes, "out_bytes", size)
    })
}

/// Writes the checkpoint blob into `buf`; `*out_written` (if not NULL) gets its size. A buffer
/// smaller than `lion_state_size` is refused and nothing is written. Sharded mode: collective
/// (every rank calls it), and a rank refused for `buf` or `buf_len` still takes part; a
/// failure after the gather's first round may leave `buf` partly written, never a checkpoint
/// that loads (docs/ABI.md, "Distributed modes").
///
/// # Safety
/// `opt` is NULL or a live handle; `buf` is NULL or writable for `buf_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn lion_state_save(
    opt: *const LionOptimizer,
    buf: *mut c_void,
    buf_len: usize,
    out_written: *mut usize,
) -> LionStatus {
    guard(|| {
        let opt = try_ref(opt, "opt")?.lock()?;
        opt.refuse_open_round("lion_state_save")?;
        let needed = checkpoint::size(&opt);
        let refused = if buf.is_null() {
            Some(Error::null("buf"))
        } else if buf_len < needed {
            Some(Error::invalid(format!(
                "buf_len is {buf_len} bytes; the state needs {needed} (lion_state_size)"
            )))
        } else {
            None
        };
        if let Some(e) = refused {
            // A collective save (sharded) still takes part, or the other ranks would wait;
            // this rank's own refusal is its error.
            if opt.collective_checkpoint() {
                let _ = checkpoint::take_part(&opt);
            }
            return Err(e);
        }
        let buf = std::slice::from_raw_parts_mut(buf as *mut u8, needed);
        let written = checkpoint::save(&opt, buf)?;
        if !out_written.is_null() {
            out_written.write_unaligned(written);
        }
        Ok(())
    })
}

/// Restores momentum, step count and lr from a blob of `lion_state_save`. A truncated,
/// modified, other-version or other-layout blob is refused (CORRUPT_STATE) and the optimizer
/// is left as it was.
///
/// # Safety
/// `opt` is NULL or a live handle; `buf` is NULL or readable for `buf_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn lion_state_load(
    opt: *mut LionOptimizer,
    buf: *const c_void,
    buf_len: usize,
) -> LionStatus {
    guard(|| {
        let mut opt = try_ref(opt, "opt")?.lock()?;
        let blob = try_slice(buf as *const u8, buf_len, "buf")?;
        checkpoint::load(&mut opt, blob)
    })
}

/// Writes the checkpoint to the file `path` so that a crash or a full disk at any moment
/// leaves the previous file whole: a temporary file beside it is written, flushed and renamed
/// over it. A stale `.NAME.tmp-*` file may remain after a crash, never a half-written `path`.
///
/// # Safety
/// `opt` is NULL or a live handle; `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn lion_state_save_file(
    opt: *const LionOptimizer,
    path: *const c_char,
) -> LionStatus {
    guard(|| {
        let opt = try_ref(opt, "opt")?.lock()?;
        let path = match c_path(path) {
            Ok(path) => path,
            Err(e) => {
                // A collective save: this rank still takes part in the gather, so that the
                // others do not wait for it.
                if opt.collective_checkpoint() {
                    let _ = checkpoint::take_part(&opt);
                }
                return Err(e);
            }
        };
        opt.refuse_open_round("lion_state_save_file")?;
        checkpoint_file::save(&opt, &path)
    })
}

/// Loads a checkpoint file written by `lion_state_save_file` (or the bytes of
/// `lion_state_save`), with the checks of `lion_state_load`.
///
/// # Safety
/// `opt` is NULL or a live handle; `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn lion_state_load_file(
    opt: *mut LionOptimizer,
    path: *const c_char,
) -> LionStatus {
    guard(|| {
        let mut opt = try_ref(opt, "opt")?.lock()?;
        checkpoint_file::load(&mut opt, &c_path(path)?)
    })
}

unsafe fn c_path(path: *const c_char) -> crate::status::Result<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    if path.is_null() {
        return Err(Error::null("path"));
    }
    let bytes = std::ffi::CStr::from_ptr(path).to_bytes();
    if bytes.is_empty() {
        return Err(Error::invalid("path is empty"));
    }
    Ok(std::ffi::OsStr::from_bytes(bytes).into())
}

/// This thread's message for the last failed call: never NULL, empty when there is none,
/// valid until the next `lion_` call on this thread.
#[no_mangle]
pub extern "C" fn lion_last_error() -> *const c_char {
    crate::last_error::as_ptr()
}

/// The library's version, "MAJOR.MINOR.PATCH".
#[no_mangle]
pub extern "C" fn lion_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The ABI version (1).
#[no_mangle]
pub extern "C" fn lion_abi_version() -> u32 {
    LION_ABI_VERSION
}
