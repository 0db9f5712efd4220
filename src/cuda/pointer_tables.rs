//! The caller's tensor addresses in device memory, for a whole step whose addresses came
//! before (lion.cu `TableArgs`).
//!
//! A step's launch carries every tensor's two addresses in its parameters (`StepArgs`, 3984
//! bytes). Queued behind running work, as a trainer's step is, the driver takes about 0.7 us
//! longer to launch that than a small parameter block (BENCHMARKS.md, cuda_host_time). Most
//! hosts step the same buffers every time, so the addresses go into a table in device memory,
//! once, and the launches name the table instead (144 bytes).
//!
//! - The second time in a row that a set of addresses launches by value, its update launch
//!   also writes them into a free table (`StepArgs::fill_table`, block 0); the steps after it
//!   that bring the same addresses name that table. Nothing is copied from the host: a copy
//!   from pageable memory is a call that CUDA refuses while another thread captures a graph
//!   in global mode, and refusing it would end that capture. A host whose addresses change
//!   every step keeps the launch by value, with one comparison more.
//! - A table is written once and never again, so that a CUDA graph that captured a launch
//!   naming it still finds its own addresses there, whatever is stepped after. Up to `TABLES`
//!   sets are kept; later ones launch by value.
//! - No table is taken while the stream captures a graph: the fill would happen only if the
//!   graph ran. A capture may still name a table filled before it.
//! - The fill is ordered before the next step's launches in the step's stream, as a step must
//!   be ordered after the step before it on any other stream: a launch on another stream that
//!   names the table comes after it.

use super::driver::{self, CUstream, DeviceBuffer};
use crate::buffer::try_vec;
use crate::engine::StepBuffers;
use crate::status::{Error, Result};

/// Sets of addresses kept per optimizer (say, a host's two alternating gradient buffers).
pub(crate) const TABLES: usize = 4;

/// Above this many tensors, no tables (their memory grows with the tensors: 64 bytes each).
pub(crate) const MAX_TABLE_TENSORS: usize = 1 << 16;

/// `LION_CUDA_POINTER_TABLES=0` turns the tables off for the optimizers created after it
/// (every step by value), to time one path against the other in one build.
fn turned_off() -> bool {
    std::env::var("LION_CUDA_POINTER_TABLES").as_deref() == Ok("0")
}

/// How one step's launches carry its tensors' addresses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Carried {
    /// In the table at this device address.
    Table(u64),
    /// By value; where `fill` is not 0, the update launches write them into the table there
    /// too (`PointerTables::filled` once they are enqueued).
    ByValue { fill: u64 },
}

pub(crate) struct PointerTables {
    /// Room for `TABLES` tables of `entries` u64 each; None: no tables (`MAX_TABLE_TENSORS`,
    /// `turned_off`).
    device: Option<DeviceBuffer>,
    /// Per table: two addresses a tensor (its parameter's, then its gradient's).
    entries: usize,
    /// The filled tables' contents, in the order they were filled (`filled` of them).
    host: Vec<u64>,
    count: usize,
    /// The table of the last step that found one: looked at first.
    latest: usize,
    /// This step's addresses; those of the last step launched by value (all 0: none).
    now: Vec<u64>,
    before: Vec<u64>,
    /// The table that this step's launches fill, until `filled` takes it.
    filling: Option<usize>,
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
        let zeros = |n: usize| {
            let mut v = try_vec(n, "the tensor address tables")?;
            v.resize(n, 0);
            Ok::<_, Error>(v)
        };
        Ok(PointerTables {
            device,
            entries,
            host: zeros(TABLES * entries)?,
            count: 0,
            latest: 0,
            now: zeros(entries)?,
            before: zeros(entries)?,
            filling: None,
        })
    }

    /// How this step's launches on `stream` carry `buffers`' addresses (see the module's
    /// comment). Needs the context current.
    pub(crate) fn carry(&mut self, buffers: &StepBuffers, stream: CUstream) -> Carried {
        self.filling = None;
        let Some(device) = &self.device else {
            return Carried::ByValue { fill: 0 };
        };
        let n = self.entries / 2;
        for t in 0..n {
            self.now[2 * t] = buffers.param(t, 0) as u64;
            self.now[2 * t + 1] = buffers.grad(t, 0) as u64;
        }
        let table_at = |k: usize| device.ptr + (k * self.entries * 8) as u64;
        let stored = |k: usize| &self.host[k * self.entries..(k + 1) * self.entries];
        // The latest table first: a host that steps the same buffers finds it at once.
        let mut tables = (0..self.count).map(|i| (self.latest + i) % self.count);
        if let Some(k) = tables.find(|&k| *stored(k) == *self.now) {
            self.latest = k;
            return Carried::Table(table_at(k));
        }
        let fill = if self.now == self.before
            && self.count < TABLES
            && !driver::stream_is_capturing(stream)
        {
            self.filling = Some(self.count);
            table_at(self.count)
        } else {
            0
        };
        std::mem::swap(&mut self.now, &mut self.before);
        Carried::ByValue { fill }
    }

    /// This step's launches, which fill the table `carry` chose, are enqueued: the steps
    /// after it with the same addresses name it. (Not called where a launch failed: the
    /// table stays free.)
    pub(crate) fn filled(&mut self) {
        if let Some(k) = self.filling.take() {
            self.host[k * self.entries..(k + 1) * self.entries].copy_from_slice(&self.before);
            self.count += 1;
            self.latest = k;
        }
    }
}
