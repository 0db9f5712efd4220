//! An in-process group of ranks for the distributed tests: each rank is a thread with its own
//! optimizer, and the collectives (`LionCollectives`) meet in shared memory. Sums run in rank
//! order, each partial rounded to the element type, so a test can compute the same sums.
#![allow(dead_code)]

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use half::{bf16, f16};
use lion::*;

pub struct Group {
    world: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Vec<u8>>>,
    /// Set by a test to make every rank's collectives fail with this code (as a broken
    /// network would: a failure that only one rank saw would leave the others waiting).
    pub fail_with: Mutex<Option<i32>>,
    /// Set by a test to make each device collective end with no CUDA context current on its
    /// thread, as a collective that switched devices and did not switch back would leave it.
    pub drop_context: AtomicBool,
    /// The buffers are CUDA device memory (a CUDA optimizer's): each collective waits for
    /// the step's stream, then moves the bytes through the host.
    pub device: bool,
    /// Each rank's last reduce-scatter input and all-gather output addresses: a test sees
    /// whether a sharded step read the caller's gradients, and wrote its parameters, in place.
    pub scatter_sends: Mutex<Vec<usize>>,
    pub gather_recvs: Mutex<Vec<usize>>,
    /// Rank 0's collectives, in order: what it was asked to move.
    pub calls: Mutex<Vec<Call>>,
    /// Each rank's current collective, compared before any byte moves: ranks asked for
    /// collectives of another kind, size or type (which MPI or NCCL would pair blindly,
    /// reading and writing past the smaller buffers) all get `MISMATCHED_COLLECTIVES`.
    asked: Mutex<Vec<Option<Call>>>,
}

/// What every rank's collective returns when the ranks asked for different ones.
pub const MISMATCHED_COLLECTIVES: i32 = 77;

/// One collective as a rank was asked for it: `count` elements of `dtype` (received, for a
/// reduce-scatter and an all-reduce; sent, for an all-gather).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Call {
    pub op: Op,
    pub count: usize,
    pub dtype: LionCommDType,
}

impl Call {
    /// The bytes a rank sends for it in a ring of `world` ranks (NCCL's algorithm between
    /// GPUs of one host): an all-reduce sends 2 (W-1)/W of its buffer, a reduce-scatter and
    /// an all-gather (W-1) blocks.
    pub fn ring_bytes(&self, world: usize) -> f64 {
        let bytes = (self.count * comm_size(self.dtype)) as f64;
        let w = world as f64;
        match self.op {
            Op::AllReduce => 2.0 * (w - 1.0) / w * bytes,
            Op::ReduceScatter | Op::AllGather => (w - 1.0) * bytes,
        }
    }
}

/// What a rank hands to liblion as the collectives' context.
pub struct RankContext {
    pub group: Arc<Group>,
    pub rank: usize,
}

impl Group {
    pub fn world(&self) -> usize {
        self.world
    }
}

impl RankContext {
    pub fn group_size(&self) -> usize {
        self.group.world
    }
}

impl Group {
    pub fn new(world: usize) -> Arc<Group> {
        Arc::new(Group {
            world,
            barrier: Barrier::new(world),
            slots: Mutex::new(vec![Vec::new(); world]),
            fail_with: Mutex::new(None),
            drop_context: AtomicBool::new(false),
            device: false,
            scatter_sends: Mutex::new(vec![0; world]),
            gather_recvs: Mutex::new(vec![0; world]),
            calls: Mutex::new(Vec::new()),
            asked: Mutex::new(vec![None; world]),
        })
    }

    /// A group whose ranks are CUDA optimizers on one GPU (device memory, the step's stream).
    pub fn on_device(world: usize) -> Arc<Group> {
        Arc::new(Group {
            world,
            barrier: Barrier::new(world),
            slots: Mutex::new(vec![Vec::new(); world]),
            fail_with: Mutex::new(None),
            drop_context: AtomicBool::new(false),
            device: true,
            scatter_sends: Mutex::new(vec![0; world]),
            gather_recvs: Mutex::new(vec![0; world]),
            calls: Mutex::new(Vec::new()),
            asked: Mutex::new(vec![None; world]),
        })
    }
}

/// `bytes` of device memory at `ptr`, once the work queued on `stream` is done.
unsafe fn from_device(ptr: *const c_void, bytes: usize, stream: *mut c_void) -> Vec<u8> {
    use cudarc::driver::sys;
    let ok = sys::CUresult::CUDA_SUCCESS;
    assert_eq!(sys::cuStreamSynchronize(stream as sys::CUstream), ok);
    let mut out = vec![0u8; bytes];
    if bytes > 0 {
        let r = sys::cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut c_void, ptr as u64, bytes);
        assert_eq!(r, ok);
    }
    out
}

unsafe fn to_device(ptr: *mut c_void, data: &[u8]) {
    use cudarc::driver::sys;
    if !data.is_empty() {
        let r = sys::cuMemcpyHtoD_v2(ptr as u64, data.as_ptr() as *const c_void, data.len());
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
    }
}

pub fn comm_size(dtype: LionCommDType) -> usize {
    match dtype {
        LION_COMM_F32 => 4,
        LION_COMM_F16 | LION_COMM_BF16 => 2,
        LION_COMM_I8 | LION_COMM_U8 => 1,
        LION_COMM_U64 => 8,
        _ => panic!("unknown LionCommDType {dtype}"),
    }
}

/// a + b in `dtype`, little-endian bytes, rounded as the type's own addition rounds.
pub fn add(dtype: LionCommDType, a: &[u8], b: &[u8], out: &mut [u8]) {
    match dtype {
        LION_COMM_F32 => {
            let s = f32::from_le_bytes(a.try_into().unwrap())
                + f32::from_le_bytes(b.try_into().unwrap());
            out.copy_from_slice(&s.to_le_bytes());
        }
        LION_COMM_F16 => {
            let s = f16::from_le_bytes(a.try_into().unwrap()).to_f32()
                + f16::from_le_bytes(b.try_into().unwrap()).to_f32();
            out.copy_from_slice(&f16::from_f32(s).to_le_bytes());
        }
        LION_COMM_BF16 => {
            let s = bf16::from_le_bytes(a.try_into().unwrap()).to_f32()
                + bf16::from_le_bytes(b.try_into().unwrap()).to_f32();
            out.copy_from_slice(&bf16::from_f32(s).to_le_bytes());
        }
        LION_COMM_I8 => out[0] = (a[0] as i8).wrapping_add(b[0] as i8) as u8,
        LION_COMM_U8 => out[0] = a[0].wrapping_add(b[0]),
        LION_COMM_U64 => {
            let s = u64::from_le_bytes(a.try_into().unwrap())
                .wrapping_add(u64::from_le_bytes(b.try_into().unwrap()));
            out.copy_from_slice(&s.to_le_bytes());
        }
        _ => panic!("unknown LionCommDType {dtype}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
}

unsafe fn collective(
    op: Op,
    context: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: LionCommDType,
    stream: *mut c_void,
) -> i32 {
    let ctx = &*(context as *const RankContext);
    let g = &ctx.group;
    if let Some(code) = *g.fail_with.lock().unwrap() {
        return code;
    }
    if ctx.rank == 0 {
        g.calls.lock().unwrap().push(Call { op, count, dtype });
    }
    let call = Call { op, count, dtype };
    g.asked.lock().unwrap()[ctx.rank] = Some(call);
    g.barrier.wait();
    let alike = g.asked.lock().unwrap().iter().all(|c| *c == Some(call));
    g.barrier.wait(); // every rank has compared before any asks for its next
    if !alike {
        return MISMATCHED_COLLECTIVES;
    }
    match op {
        Op::ReduceScatter => g.scatter_sends.lock().unwrap()[ctx.rank] = send as usize,
        Op::AllGather => g.gather_recvs.lock().unwrap()[ctx.rank] = recv as usize,
        Op::AllReduce => {}
    }
    let size = comm_size(dtype);
    let send_elems = match op {
        Op::ReduceScatter => count * g.world,
        _ => count,
    };
    let mine = match g.device {
        true => from_device(send, send_elems * size, stream),
        false => std::slice::from_raw_parts(send as *const u8, send_elems * size).to_vec(),
    };
    g.slots.lock().unwrap()[ctx.rank] = mine;
    g.barrier.wait();
    {
        let slots = g.slots.lock().unwrap();
        let (out_len, block) = match op {
            Op::AllReduce => (count * size, 0),
            Op::ReduceScatter => (count * size, ctx.rank * count * size),
            Op::AllGather => (g.world * count * size, 0),
        };
        let mut staged = vec![0u8; if g.device { out_len } else { 0 }];
        let out = match g.device {
            true => &mut staged[..],
            false => std::slice::from_raw_parts_mut(recv as *mut u8, out_len),
        };
        match op {
            Op::AllGather => {
                for (r, s) in slots.iter().enumerate() {
                    out[r * count * size..(r + 1) * count * size].copy_from_slice(s);
                }
            }
            _ => {
                out.copy_from_slice(&slots[0][block..block + out_len]);
                let mut sum = vec![0u8; size];
                for s in &slots[1..] {
                    for (o, x) in out
                        .chunks_exact_mut(size)
                        .zip(s[block..block + out_len].chunks_exact(size))
                    {
                        add(dtype, o, x, &mut sum);
                        o.copy_from_slice(&sum);
                    }
                }
            }
        }
        if g.device {
            to_device(recv, &staged);
        }
    }
    g.barrier.wait();
    if g.device && g.drop_context.load(Ordering::Relaxed) {
        let none = std::ptr::null_mut();
        let r = cudarc::driver::sys::cuCtxSetCurrent(none);
        assert_eq!(r, cudarc::driver::sys::CUresult::CUDA_SUCCESS);
    }
    0
}

unsafe extern "C" fn all_reduce_sum(
    context: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: LionCommDType,
    stream: *mut c_void,
) -> i32 {
    collective(Op::AllReduce, context, send, recv, count, dtype, stream)
}

unsafe extern "C" fn reduce_scatter_sum(
    context: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: LionCommDType,
    stream: *mut c_void,
) -> i32 {
    collective(Op::ReduceScatter, context, send, recv, count, dtype, stream)
}

unsafe extern "C" fn all_gather(
    context: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: LionCommDType,
    stream: *mut c_void,
) -> i32 {
    collective(Op::AllGather, context, send, recv, count, dtype, stream)
}

/// The collectives of one rank (`context` must outlive the optimizer made with them).
pub fn collectives(context: &RankContext) -> LionCollectives {
    LionCollectives {
        struct_size: std::mem::size_of::<LionCollectives>() as u32,
        context: context as *const RankContext as *mut c_void,
        all_reduce_sum: Some(all_reduce_sum),
        reduce_scatter_sum: Some(reduce_scatter_sum),
        all_gather: Some(all_gather),
    }
}

/// `on_ranks` over `group`'s ranks, each body given its rank and its place in the group.
pub fn on_group<T: Send>(
    group: &Arc<Group>,
    body: impl Fn(usize, &RankContext) -> T + Sync,
) -> Vec<T> {
    on_ranks(group.world(), |rank| {
        let ctx = RankContext {
            group: group.clone(),
            rank,
        };
        body(rank, &ctx)
    })
}

/// How long `on_ranks` waits for its ranks before it ends the test process: a rank that left
/// a collective the others wait in would otherwise hang the test run instead of failing it.
/// `LION_TEST_RANKS_DEADLINE_S` sets it in seconds (a test whose ranks do no real work, as
/// against a fake driver, fails sooner).
fn ranks_deadline() -> std::time::Duration {
    let seconds = std::env::var("LION_TEST_RANKS_DEADLINE_S")
        .ok()
        .and_then(|s| s.parse().ok());
    std::time::Duration::from_secs(seconds.unwrap_or(600))
}

/// Runs `body(rank)` on `world` threads at once and returns their results in rank order.
/// Ranks still running after `ranks_deadline()` abort the process, saying so (a failure, not
/// a hang).
pub fn on_ranks<T: Send>(world: usize, body: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let deadline = ranks_deadline();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(deadline) {
            eprintln!(
                "on_ranks: {world} ranks still running after {deadline:?}: a rank left a \
                 collective that the others wait in (a hang); aborting"
            );
            std::process::abort();
        }
    });
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let body = &body;
                s.spawn(move || body(r))
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect::<Vec<_>>()
    });
    drop(done); // the watchdog sees the channel close and returns
    watchdog.join().unwrap();
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| std::panic::resume_unwind(e)))
        .collect()
}
