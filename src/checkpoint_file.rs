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
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unique = format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    path.with_file_name(unique)
}

pub fn save(opt: &Optimizer, path: &Path) -> Result<()> {
    let size = checkpoint::size(opt);
    let mut blob = Vec::new();
    blob.try_reserve_exact(size)
        .map_err(|_| Error::out_of_memory(format!("no memory for a checkpoint of {size} bytes")))?;
    blob.resize(size, 0);
    checkpoint::save(opt, &mut blob)?;
    let tmp = temporary_beside(path);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_error("could not create", &tmp, e))?;
        file.write_all(&blob)
            .map_err(|e| io_error("could not write", &tmp, e))?;
        file.sync_all()
            .map_err(|e| io_error("could not flush", &tmp, e))?;
        fs::rename(&tmp, path)
            .map_err(|e| io_error("could not rename the new checkpoint onto", path, e))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    // The rename is durable once the folder itself is flushed.
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(folder)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| io_error("could not flush the folder", folder, e))
}

pub fn load(opt: &mut Optimizer, path: &Path) -> Result<()> {
    let expected = checkpoint::size(opt);
    let file = File::open(path).map_err(|e| io_error("could not open", path, e))?;
    // Read at most one byte more than a matching checkpoint: a huge file costs no memory.
    let mut blob = Vec::new();
    blob.try_reserve_exact(expected + 1).map_err(|_| {
        Error::out_of_memory(format!(
            "no memory to read a checkpoint of {expected} bytes"
        ))
    })?;
    file.take(expected as u64 + 1)
        .read_to_end(&mut blob)
        .map_err(|e| io_error("could not read", path, e))?;
    checkpoint::load(opt, &blob)
        .map_err(|e| Error::new(e.status, format!("{}: {}", path.display(), e.message)))
}
