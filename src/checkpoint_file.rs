//! Checkpoint files that survive crashes: the blob goes to a temporary file in the same folder,
//! is flushed to disk, and is renamed over the old checkpoint; the folder is flushed too. A
//! crash, a kill or a full disk at any moment leaves the previous checkpoint whole.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::checkpoint;
use crate::optimizer::Optimizer;
use crate::status::{Error, LionStatus, Result};

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::new(
        LionStatus::LION_ERROR_IO,
        format!("{what} {}: {e}", path.display()),
    )
}

/// A name beside `path` that no other writer (thread or process) uses at the same time.
fn temporary_beside(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A name near NAME_MAX (255 bytes) would leave no room for the suffix: its start will do.
    let mut keep = name.len().min(128);
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    name.truncate(keep);
    // The pid and a counter are unique on one machine; the clock's nanoseconds tell apart
    // writers that share a pid (containers) on a shared file system.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let unique = format!(
        ".{name}.tmp-{}-{}-{nanos:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    path.with_file_name(unique)
}

/// Writes the checkpoint of `opt` to `path` (see the module's doc). Everything that can be
/// refused is tried before the old file is replaced: the folder is opened first, so that
/// only the folder's flush, after the rename, can fail with the new file in place.
///
/// `path` naming a symbolic link: the link is replaced by the new file, as rename(2) does;
/// its target is left alone. An existing file's permission bits are kept.
pub fn save(opt: &Optimizer, path: &Path) -> Result<()> {
    let size = checkpoint::size(opt);
    let mut blob = Vec::new();
    if blob.try_reserve_exact(size).is_err() {
        if opt.collective_checkpoint() {
            let _ = checkpoint::take_part(opt); // the others wait for this rank's part
        }
        return Err(Error::out_of_memory(format!(
            "no memory for a checkpoint of {size} bytes"
        )));
    }
    blob.resize(size, 0);
    checkpoint::save(opt, &mut blob)?;
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let saving = |what: &str, e: std::io::Error| {
        Error::new(
            LionStatus::LION_ERROR_IO,
            format!("could not save {}: {what}: {e}", path.display()),
        )
    };
    // Opened for the final flush; a folder we may write but not read is refused here.
    let dir = File::open(folder).map_err(|e| {
        saving(
            &format!("could not open its folder {}", folder.display()),
            e,
        )
    })?;
    let mode = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Some(m.permissions()),
        _ => None,
    };
    let tmp = temporary_beside(path);
    let mut created = false;
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| saving(&format!("could not create {}", tmp.display()), e))?;
        created = true;
        if let Some(mode) = &mode {
            file.set_permissions(mode.clone())
                .map_err(|e| saving("could not give the new file the old one's mode", e))?;
        }
        file.write_all(&blob)
            .map_err(|e| saving(&format!("could not write {}", tmp.display()), e))?;
        file.sync_all()
            .map_err(|e| saving(&format!("could not flush {}", tmp.display()), e))?;
        fs::rename(&tmp, path).map_err(|e| saving("could not rename the new checkpoint onto it", e))
    })();
    if written.is_err() {
        if created {
            let _ = fs::remove_file(&tmp); // ours only: never another writer's
        }
        return written;
    }
    // The rename is durable once the folder itself is flushed.
    dir.sync_all().map_err(|e| {
        Error::new(
            LionStatus::LION_ERROR_IO,
            format!(
                "{}: the new checkpoint is in place, but not known to be durable: flushing \
                 its folder {} failed: {e}",
                path.display(),
                folder.display()
            ),
        )
    })
}

/// Loads the checkpoint file `path` into `opt`, with every check of `checkpoint::load`.
/// It reads at most one byte more than the largest checkpoint `opt` could load (f32 momentum:
/// a file of any state dtype converts on load), so a huge file costs no memory.
pub fn load(opt: &mut Optimizer, path: &Path) -> Result<()> {
    let largest = checkpoint::largest_size(opt).unwrap_or(usize::MAX - 1);
    let too_large = || {
        Error::corrupt(format!(
            "{}: the file is larger than any checkpoint of this optimizer ({largest} bytes at \
             most, with f32 momentum)",
            path.display()
        ))
    };
    let mut file = File::open(path).map_err(|e| io_error("could not open", path, e))?;
    // A regular file's length is known before reading; a file that is not regular (a pipe)
    // is read up to the bound.
    let length = match file.metadata() {
        Ok(m) if m.is_file() => m.len(),
        _ => 0,
    };
    if length > largest as u64 {
        return Err(too_large());
    }
    // The first buffer: the file's length or this optimizer's own checkpoint, and one byte to
    // see the end without growing it.
    let first = (length as usize)
        .max(checkpoint::size(opt))
        .saturating_add(1);
    let blob = read_at_most(&mut file, path, first, largest + 1)?;
    if blob.len() > largest {
        return Err(too_large()); // it grew while read
    }
    checkpoint::load(opt, &blob)
        .map_err(|e| Error::new(e.status, format!("{}: {}", path.display(), e.message)))
}

/// The bytes of `file` up to its end or `limit`, whichever comes first, in a buffer of
/// `first` bytes (at most `limit`) grown as needed: every allocation is fallible.
fn read_at_most(file: &mut File, path: &Path, first: usize, limit: usize) -> Result<Vec<u8>> {
    let mut blob = Vec::new();
    let mut filled = 0;
    loop {
        if filled == blob.len() {
            if filled == limit {
                break;
            }
            let grown = match filled {
                0 => first,
                n => n.saturating_mul(2),
            }
            .clamp(1, limit);
            blob.try_reserve_exact(grown - filled).map_err(|_| {
                Error::out_of_memory(format!(
                    "no memory to read {grown} bytes of the checkpoint {}",
                    path.display()
                ))
            })?;
            blob.resize(grown, 0);
        }
        match file.read(&mut blob[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error("could not read", path, e)),
        }
    }
    blob.truncate(filled);
    Ok(blob)
}
