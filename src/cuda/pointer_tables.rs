//! The caller's tensor addresses in device memory, for a whole step whose addresses came
//! before (lion.cu `TableArgs`).
//!
//! A step's launch carries every tensor's two addresses in its parameters (`StepArgs`, 3976
//! bytes). Queued behind running work, as a trainer's step is, the driver takes about 1 us
//! longer to launch that than a small parameter block (BENCHMARKS.md, launch_cost.cu). Most
//! hosts step the same buffers every time, so the addresses are uploaded into a table here,
//! once, and the launches name the table instead (144 bytes).
//!
//! - A set of addresses is uploaded the second time in a row that it is launched by value, in
//!   the step's stream before its launch: a host whose addresses change every step keeps the
//!   launch by value, with one comparison more.
//! - A table is written once and never again, so that a CUDA graph that captured a launch
//!   naming it still finds its own addresses there, whatever is stepped after. Up to `TABLES`
//!   sets are kept; later ones launch by value.
//! - Nothing is uploaded while the stream captures a graph (a copy from pageable memory
//!   would end the capture); a capture may still name a table uploaded before it.
//! - The upload is ordered before the step's launches in the step's stream, as a step must be
//!   ordered after the step before it on any other stream: a launch on another stream that
//!   names the table comes after it.

use super::driver::{self, CUstream, DeviceBuffer};
use crate::engine::StepBuffers;
use crate::status::Result;

/// Sets of addresses kept per optimizer (say, a host's two alternating gradient buffers).
pub(crate) const TABLES: usize = 4;

/// Above this many tensors, no tables (their memory grows with the tensors: 64 bytes each).
pub(crate) const MAX_TABLE_TENSORS: usize = 1 << 16;

/// `LION_CUDA_POINTER_TABLES=0` turns the tables off for the optimizers created after it
/// (every step by value), to time one path against the other in one build.
fn turned_off() -> bool {
    std::env::var("LION_CUDA_POINTER_TABLES").as_deref() == Ok("0")
}

pub(crate) struct PointerTables {
    /// Room for `TABLES` tables of `entries` u64 each; None: no tables (`MAX_TABLE_TENSORS`,
    /// `turned_off`).
    device: Option<DeviceBuffer>,
    /// Per table: two addresses a tensor (its parameter's, then its gradient's).
    entries: usize,
    /// The uploaded tables' contents, in upload order (`uploaded` of them).
    host: Vec<u64>,
    uploaded: usize,
    /// The table of the last step that found one: looked at first.
    latest: usize,
    /// This step's addresses, and those of the last step launched by value (all 0: none).
    now: Vec<u64>,
    before: Vec<u64>,
}

impl PointerTables {
    /// Tables for `n` tensors, allocated now (a step never allocates). Needs the context
    /// current.
    pub(crate) fn new(n: usize) -> Result<PointerTables> {
        let (entries, device) = if n == 0 || n > MAX_TABLE_TENSORS || turned_off() {
            (0, None)
        } else {
            let bytes = TABLES * 2 * n * 8;
            (
                2 * n,
                Some(DeviceBuffer::zeroed(bytes, "the tensor address tables")?),
            )
        };
        Ok(PointerTables {
            device,
            entries,
            host: vec![0; TABLES * entries],
            uploaded: 0,
            latest: 0,
            now: vec![0; entries],
            before: vec![0; entries],
        })
    }

    /// The device address of a table of `buffers`' addresses, uploading it on `stream` where
    /// this is its second step in a row (see the module's comment); None: launch by value.
    ///
    /// # Safety
    /// The context is current; `stream` is a stream of it (or a default stream).
    pub(crate) unsafe fn table_for(
        &mut self,
        buffers: &StepBuffers,
        stream: CUstream,
    ) -> Result<Option<u64>> {
        let Some(device) = &self.device else {
            return Ok(None);
        };
        let n = self.entries / 2;
        for t in 0..n {
            self.now[2 * t] = buffers.param(t, 0) as u64;
            self.now[2 * t + 1] = buffers.grad(t, 0) as u64;
        }
        let table_at = |k: usize| device.ptr + (k * self.entries * 8) as u64;
        let stored = |k: usize| &self.host[k * self.entries..(k + 1) * self.entries];
        if self.uploaded > 0 && stored(self.latest) == &self.now[..] {
            return Ok(Some(table_at(self.latest)));
        }
        if let Some(k) = (0..self.uploaded).find(|&k| stored(k) == &self.now[..]) {
            self.latest = k;
            return Ok(Some(table_at(k)));
        }
        if self.now == self.before && self.uploaded < TABLES && driver::stream_takes_copies(stream)
        {
            let k = self.uploaded;
            let bytes = as_bytes(&self.now);
            driver::upload_async(table_at(k), bytes, stream)?;
            self.host[k * self.entries..(k + 1) * self.entries].copy_from_slice(&self.now);
            self.uploaded += 1;
            self.latest = k;
            return Ok(Some(table_at(k)));
        }
        std::mem::swap(&mut self.now, &mut self.before);
        Ok(None)
    }
}

fn as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding and a stricter alignment than u8; the length is in bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 8) }
}
