//! How a launch's CUDA blocks split the work: each block takes one chunk of one tensor, and a
//! launch covers at most MAX_TENSORS tensors (their pointers travel in its parameters).

use super::args::{BlockChunk, TensorInfo, CUDA_THREADS_PER_BLOCK, ELEMS, MAX_TENSORS};
use super::driver::DeviceBuffer;
use crate::buffer::try_vec;
use crate::config::{DType, TensorSpec};
use crate::engine::Piece;
use crate::numerics::q8;
use crate::status::{Error, Result};

/// Elements per CUDA block's chunk (each a multiple of CUDA_THREADS_PER_BLOCK * ELEMS).
/// `LION_CUDA_CHUNK` overrides them, for tuning only.
const CUDA_CHUNK_ELEMENTS: u64 = 8 * 1024;
/// Where every tensor moves fewer than NARROW_BYTES per element (p read and written, g read,
/// momentum read and written: 10 bytes for 16-bit parameters, gradients and momentum), a
/// block's chunk is longer. On an H200, bf16 p, g and m ran at 94-95% / 91-92% of the copy
/// ceiling (flat 2^28 / GPT-2 small) with 8 Ki, 96% / 93% with 10 Ki, 96-97% / 93-94% with
/// 12 Ki, 96-97% / 92-93% with 16 Ki; f32 (20 bytes) is flat from 6 to 14 Ki and loses 1-2%
/// from 16 Ki, and f32 parameters and gradients with bf16 momentum (16 bytes) lose 1-2% from
/// 12 Ki, so both keep 8 Ki. The 12- and 14-byte mixes were not measured.
const CUDA_CHUNK_ELEMENTS_NARROW: u64 = 12 * 1024;
const NARROW_BYTES: usize = 16;
/// Under 8-bit momentum: a warp's block step is long (decode, a warp-wide maximum, encode)
/// and a CUDA block's start costs a chain of dependent loads, so fewer, longer chunks win:
/// on an H200, flat 2^28 ran at 63% of the copy ceiling with 8 Ki, 79% with 64 Ki.
const CUDA_CHUNK_ELEMENTS_Q8: u64 = 64 * 1024;

/// Whether `n` elements are a whole number (at least one) of a block's strides.
fn whole_strides(n: u64) -> bool {
    let stride = ELEMS * CUDA_THREADS_PER_BLOCK as u64;
    n >= stride && n.is_multiple_of(stride)
}

/// The chunk length of an optimizer over `tensors` with momentum of dtype `state`.
pub(crate) fn block_chunk_elements(state: DType, tensors: &[TensorSpec]) -> u64 {
    std::env::var("LION_CUDA_CHUNK")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&c| whole_strides(c) && c <= u32::MAX as u64)
        .unwrap_or_else(|| default_chunk_elements(state, tensors))
}

fn default_chunk_elements(state: DType, tensors: &[TensorSpec]) -> u64 {
    let moved = |t: &TensorSpec| 2 * t.param.size() + t.grad.size() + 2 * state.size();
    if state == DType::Q8 {
        CUDA_CHUNK_ELEMENTS_Q8
    } else if tensors.iter().all(|t| moved(t) < NARROW_BYTES) {
        CUDA_CHUNK_ELEMENTS_NARROW
    } else {
        CUDA_CHUNK_ELEMENTS
    }
}

/// The end of a launch in shorter chunks, for tuning (`LION_CUDA_TAPER=CHUNKS,ELEMENTS`: the
/// elements of a launch's last CHUNKS chunks go in chunks of ELEMENTS, a multiple of
/// CUDA_THREADS_PER_BLOCK * ELEMS no longer than the chunk). Blocks start roughly in order, and
/// a launch ends when its last block does: long last blocks leave multiprocessors idle (a
/// bf16 block of 12 Ki elements takes about 19 us on an H200, 6% of GPT-2 small's step),
/// short ones throughout cost each block's start. Off unless set: no taper gained on an H100
/// or an H200 (BENCHMARKS.md).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Taper {
    pub chunks: u64,
    pub elements: u64,
}

pub(crate) fn block_taper(chunk: u64) -> Option<Taper> {
    parse_taper(&std::env::var("LION_CUDA_TAPER").ok()?, chunk)
}

fn parse_taper(v: &str, chunk: u64) -> Option<Taper> {
    let [chunks, elements] = super::tuning::parse_list(v, &(1..=u32::MAX))?;
    let (chunks, elements) = (chunks as u64, elements as u64);
    let fits = whole_strides(elements) && elements <= chunk;
    (chunks <= 1 << 20 && fits).then_some(Taper { chunks, elements })
}

/// One launch's chunks of `pieces` in order: `chunk` elements at most, and from `taper`'s
/// last elements of the launch on, its shorter chunks. A chunk starts where its piece does or
/// a whole number of chunks (all multiples of ELEMS and of q8's block) after. The table grows
/// fallibly: a model's chunks are its elements over `chunk`, millions for the largest.
fn launch_chunks(
    pieces: &[Piece],
    chunk: u64,
    taper: Option<Taper>,
    out: &mut Vec<BlockChunk>,
) -> Result<()> {
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    let tail_from = taper.map_or(u64::MAX, |t| {
        total.saturating_sub(t.chunks.saturating_mul(chunk))
    });
    let mut done = 0; // elements of the launch before the current piece
    for p in pieces {
        let mut start = p.first;
        while start < p.first + p.len {
            let at = done + (start - p.first);
            let size = match taper {
                Some(t) if at >= tail_from => t.elements,
                _ => chunk,
            };
            let len = size.min(p.first + p.len - start);
            push(
                out,
                BlockChunk {
                    tensor: p.tensor as u32,
                    len: len as u32,
                    start,
                },
            )?;
            start += len;
        }
        done += p.len;
    }
    Ok(())
}

/// `v.push(item)`, growing `v` (amortized, as `push` does) only where the host has the memory.
fn push<T>(v: &mut Vec<T>, item: T) -> Result<()> {
    v.try_reserve(1).map_err(|_| {
        Error::out_of_memory(format!(
            "could not allocate the chunk table for {} chunks",
            v.len() + 1
        ))
    })?;
    v.push(item);
    Ok(())
}

/// The tensors and chunks of one launch.
pub(crate) struct Launch {
    pub first_tensor: usize,
    pub n_tensors: usize,
    pub first_chunk: usize,
    pub n_chunks: usize,
}

/// The launches over some stretches of tensors, and their chunks in device memory.
pub(crate) struct Plan {
    pub launches: Vec<Launch>,
    chunks: DeviceBuffer,
}

impl Plan {
    /// Chunks of `pieces` (of `n_tensors` tensors, in tensor order as `Piece::whole` and
    /// `Layout::pieces` give them; `chunk` elements at most), launch by launch. A piece that
    /// does not start its tensor starts at a multiple of ELEMS (the 16-byte accesses stay
    /// aligned), and so does every chunk after it. At least one launch, with one idle block if
    /// nothing else: the step's last launch advances the step count.
    pub fn upload(pieces: &[Piece], n_tensors: usize, chunk: u64) -> Result<Plan> {
        debug_assert!(pieces.windows(2).all(|w| w[0].tensor < w[1].tensor));
        debug_assert!(pieces.iter().all(|p| p.first % ELEMS == 0));
        let mut chunks = Vec::new();
        let mut launches = try_vec(n_tensors.div_ceil(MAX_TENSORS).max(1), "the launches")?;
        let taper = block_taper(chunk);
        let mut rest = pieces;
        for first in (0..n_tensors).step_by(MAX_TENSORS) {
            let n = MAX_TENSORS.min(n_tensors - first);
            let first_chunk = chunks.len();
            let (mine, after) = rest.split_at(rest.partition_point(|p| p.tensor < first + n));
            rest = after;
            launch_chunks(mine, chunk, taper, &mut chunks)?;
            if chunks.len() > first_chunk {
                launches.push(Launch {
                    first_tensor: first,
                    n_tensors: n,
                    first_chunk,
                    n_chunks: chunks.len() - first_chunk,
                });
            }
        }
        if launches.is_empty() {
            let idle = BlockChunk {
                tensor: 0,
                len: 0,
                start: 0,
            };
            push(&mut chunks, idle)?;
            launches.push(Launch {
                first_tensor: 0,
                n_tensors: MAX_TENSORS.min(n_tensors),
                first_chunk: 0,
                n_chunks: 1,
            });
        }
        Ok(Plan {
            launches,
            chunks: upload(&chunks, "the chunk table")?,
        })
    }

    /// The device address of launch `l`'s chunks.
    pub fn chunks_of(&self, l: &Launch) -> u64 {
        self.chunks.ptr + (l.first_chunk * std::mem::size_of::<BlockChunk>()) as u64
    }
}

/// The tensor table for the kernels: `state_offset` is where each tensor's element 0 lies in
/// the state (or flat) buffer, as a wrapping offset (a slice's tensors may start before it).
pub(crate) fn tensor_table(
    tensors: &[TensorSpec],
    offsets: impl Iterator<Item = u64>,
) -> Result<DeviceBuffer> {
    let mut infos = try_vec(tensors.len(), "the tensor table")?;
    infos.extend(
        (tensors.iter().zip(offsets)).map(|(t, state_offset)| TensorInfo {
            numel: t.numel,
            state_offset,
            lr_scale: t.lr_scale,
            wd_scale: t.weight_decay_scale,
            param_dtype: t.param.raw(),
            grad_dtype: t.grad.raw(),
        }),
    );
    upload(&infos, "the tensor table")
}

/// A device copy of `items` (plain-old-data `repr(C)` structs without padding).
fn upload<T: Copy>(items: &[T], what: &str) -> Result<DeviceBuffer> {
    let bytes = std::mem::size_of_val(items);
    // SAFETY: the kernel structs have no padding (args.rs asserts it).
    let raw = unsafe { std::slice::from_raw_parts(items.as_ptr() as *const u8, bytes) };
    let buf = DeviceBuffer::zeroed(bytes, what)?;
    buf.upload(0, raw)?;
    Ok(buf)
}

/// Elements of every tensor laid end to end, each starting at a multiple of ELEMS.
pub(crate) fn padded_offsets(tensors: &[TensorSpec]) -> Result<(Vec<u64>, u64)> {
    let mut offsets = try_vec(tensors.len(), "the tensors' offsets")?;
    let mut total = 0u64;
    for t in tensors {
        offsets.push(total);
        total = total
            .checked_add(t.numel.div_ceil(ELEMS) * ELEMS)
            .ok_or_else(|| Error::invalid("the total number of elements overflows"))?;
    }
    Ok((offsets, total))
}

/// Under q8 state, where each region of the momentum starts (bytes): a multiple of 16, so that
/// a tensor's codes take 8-byte accesses and its f32 (scales, or a small tensor's momentum)
/// 16-byte ones. lion.cu has it from the prelude.
pub(crate) const STATE_ALIGN: u64 = 16;

/// One tensor's momentum in the engine's state buffer: `state_offset` as `TensorInfo` has it
/// (elements of the state dtype; bytes under q8 state), and the byte ranges (start, length)
/// of the buffer that hold its momentum in checkpoint order (`numerics::q8::tensor_state_bytes`):
/// the whole momentum, or a quantized tensor's codes then its scales.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StateRegion {
    pub state_offset: u64,
    pub ranges: [(usize, usize); 2],
}

/// The momentum of `state` (a copy of the state buffer) in checkpoint order, into `out`.
pub(crate) fn regions_out(regions: &[StateRegion], state: &[u8], out: &mut [u8]) {
    let mut at = 0;
    for &(from, n) in regions.iter().flat_map(|r| &r.ranges) {
        out[at..at + n].copy_from_slice(&state[from..from + n]);
        at += n;
    }
}

/// `regions_out`'s inverse: a checkpoint's momentum into `state`, where the regions say.
pub(crate) fn regions_in(regions: &[StateRegion], momentum: &[u8], state: &mut [u8]) {
    let mut at = 0;
    for &(to, n) in regions.iter().flat_map(|r| &r.ranges) {
        state[to..to + n].copy_from_slice(&momentum[at..at + n]);
        at += n;
    }
}

/// Where a q8 tensor of `numel` elements keeps its scales, from its first code (bytes): past
/// its codes, at the next multiple of STATE_ALIGN (lion.cu's `q8_scales`).
pub(crate) fn q8_scales_at(numel: u64) -> u64 {
    numel.next_multiple_of(STATE_ALIGN)
}

/// The device layout of the momentum and the state buffer's size in bytes. f32 and bf16
/// state: the tensors' elements end to end, each starting at a multiple of ELEMS
/// (`padded_offsets`). q8 state (`numerics::q8`), in bytes, each region starting at a multiple
/// of STATE_ALIGN: a tensor of at least `q8::MIN_NUMEL` elements has its `numel` codes (i8),
/// then its `ceil(numel / 256)` f32 scales; a smaller one its `numel` f32.
pub(crate) fn state_layout(
    tensors: &[TensorSpec],
    state: DType,
) -> Result<(Vec<StateRegion>, usize)> {
    let too_big = || Error::invalid("the momentum's size overflows");
    let addr = |v: u64| usize::try_from(v).map_err(|_| too_big());
    let mut regions = try_vec(tensors.len(), "the momentum's layout")?;
    if state != DType::Q8 {
        let size = state.size() as u64;
        let (offsets, total) = padded_offsets(tensors)?;
        for (t, &offset) in tensors.iter().zip(&offsets) {
            let at = offset.checked_mul(size).ok_or_else(too_big)?;
            let len = t.numel.checked_mul(size).ok_or_else(too_big)?;
            regions.push(StateRegion {
                state_offset: offset,
                ranges: [(addr(at)?, addr(len)?), (0, 0)],
            });
        }
        let bytes = total.checked_mul(size).ok_or_else(too_big)?;
        return Ok((regions, addr(bytes)?));
    }
    let mut total = 0u64;
    for t in tensors {
        let at = total;
        let (ranges, end) = if q8::quantized(state, t.numel) {
            let scales = at.checked_add(q8_scales_at(t.numel)).ok_or_else(too_big)?;
            let scale_bytes = q8::blocks(t.numel) * 4;
            let end = scales.checked_add(scale_bytes).ok_or_else(too_big)?;
            let codes = (addr(at)?, addr(t.numel)?);
            ([codes, (addr(scales)?, addr(scale_bytes)?)], end)
        } else {
            let len = t.numel.checked_mul(4).ok_or_else(too_big)?;
            let end = at.checked_add(len).ok_or_else(too_big)?;
            ([(addr(at)?, addr(len)?), (0, 0)], end)
        };
        regions.push(StateRegion {
            state_offset: at,
            ranges,
        });
        total = end
            .checked_next_multiple_of(STATE_ALIGN)
            .ok_or_else(too_big)?;
    }
    Ok((regions, addr(total)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(sizes: &[u64]) -> Vec<TensorSpec> {
        sizes
            .iter()
            .map(|&numel| TensorSpec {
                numel,
                param: DType::F32,
                grad: DType::F32,
                lr_scale: 1.0,
                weight_decay_scale: 1.0,
            })
            .collect()
    }

    /// With or without a taper, a launch's chunks cover its pieces exactly once, in order,
    /// each inside one piece, aligned as the kernels need; the taper's chunks are its length.
    #[test]
    fn tapered_chunks_cover_every_element_once() {
        let pieces = [
            Piece {
                tensor: 0,
                first: 0,
                len: 50_000,
            },
            Piece {
                tensor: 1,
                first: 0,
                len: 7,
            },
            Piece {
                tensor: 2,
                first: 4096,
                len: 30_001,
            },
        ];
        let total: u64 = pieces.iter().map(|p| p.len).sum();
        for taper in [
            None,
            Some(Taper {
                chunks: 3,
                elements: 2048,
            }),
            Some(Taper {
                chunks: 100,
                elements: 4096,
            }),
        ] {
            let mut out = Vec::new();
            launch_chunks(&pieces, 8192, taper, &mut out).unwrap();
            let mut at = 0;
            let mut next = pieces.iter().map(|p| p.first).collect::<Vec<_>>();
            for c in &out {
                let p = &pieces[c.tensor as usize];
                assert_eq!(
                    c.start, next[c.tensor as usize],
                    "{taper:?}: in order, no gap"
                );
                assert!(c.len > 0 && c.start + c.len as u64 <= p.first + p.len);
                assert_eq!((c.start - p.first) % 2048, 0, "{taper:?}: aligned");
                let tail = taper.is_some_and(|t| at >= total.saturating_sub(t.chunks * 8192));
                let size = if tail { taper.unwrap().elements } else { 8192 };
                assert!(c.len as u64 == size || c.start + c.len as u64 == p.first + p.len);
                next[c.tensor as usize] += c.len as u64;
                at += c.len as u64;
            }
            assert_eq!(at, total);
        }
        let whole = |n| Taper {
            chunks: 2,
            elements: n,
        };
        assert_eq!(parse_taper("2, 4096", 8192), Some(whole(4096)));
        for bad in ["2,3000", "0,2048", "2,16384", "2", "x,2048", "2,0"] {
            assert_eq!(parse_taper(bad, 8192), None, "{bad}");
        }
    }

    /// The longer chunk only where every tensor moves fewer than 16 bytes per element.
    #[test]
    fn chunks_are_longer_only_for_narrow_steps() {
        use DType::*;
        let typed = |param, grad| TensorSpec {
            param,
            grad,
            ..specs(&[1])[0]
        };
        let chunk = |state, t: &[TensorSpec]| default_chunk_elements(state, t);
        assert_eq!(chunk(F32, &specs(&[5, 7])), CUDA_CHUNK_ELEMENTS);
        assert_eq!(chunk(BF16, &specs(&[5])), CUDA_CHUNK_ELEMENTS); // 16 bytes
        assert_eq!(chunk(Q8, &specs(&[5])), CUDA_CHUNK_ELEMENTS_Q8);
        let narrow = [typed(BF16, BF16), typed(F16, BF16), typed(BF16, F32)]; // 10, 10, 12
        assert_eq!(chunk(BF16, &narrow), CUDA_CHUNK_ELEMENTS_NARROW);
        assert_eq!(chunk(BF16, &[typed(F32, BF16)]), CUDA_CHUNK_ELEMENTS_NARROW); // 14
        let mixed = [typed(BF16, BF16), typed(F32, F32)];
        assert_eq!(chunk(BF16, &mixed), CUDA_CHUNK_ELEMENTS);
        assert_eq!(chunk(F32, &[typed(BF16, BF16)]), CUDA_CHUNK_ELEMENTS_NARROW); // 14
        let whole_strides = ELEMS * CUDA_THREADS_PER_BLOCK as u64;
        assert_eq!(CUDA_CHUNK_ELEMENTS_NARROW % whole_strides, 0);
    }

    /// Every region is aligned, inside the buffer and apart from the others, and the ranges
    /// hold exactly a checkpoint's momentum (`q8::tensor_state_bytes`) in its order.
    #[test]
    fn state_layouts_hold_the_checkpoint_layout() {
        let sizes = [
            1,
            7,
            0,
            4095,
            4096,
            4096 + 37,
            16384 + 337,
            32768 + 13,
            100_003,
        ];
        for state in [DType::F32, DType::BF16, DType::Q8] {
            let tensors = specs(&sizes);
            let (regions, bytes) = state_layout(&tensors, state).unwrap();
            let mut used = vec![false; bytes];
            for (t, r) in tensors.iter().zip(&regions) {
                let held: usize = r.ranges.iter().map(|&(_, n)| n).sum();
                assert_eq!(
                    Some(held as u64),
                    q8::tensor_state_bytes(state, t.numel),
                    "{state:?} {}",
                    t.numel
                );
                let first = if state == DType::Q8 {
                    r.state_offset
                } else {
                    r.state_offset * state.size() as u64
                };
                assert_eq!(r.ranges[0].0 as u64, first);
                for &(at, n) in r.ranges.iter().filter(|r| r.1 > 0) {
                    assert_eq!(at as u64 % STATE_ALIGN, 0);
                    for u in &mut used[at..at + n] {
                        assert!(!*u, "{state:?}: regions overlap");
                        *u = true;
                    }
                }
                if q8::quantized(state, t.numel) {
                    // lion.cu's q8_scales: past the codes, at the next multiple of STATE_ALIGN.
                    assert_eq!(r.ranges[1].0 as u64, r.state_offset + q8_scales_at(t.numel));
                    assert_eq!(r.ranges[1].0 as u64 % STATE_ALIGN, 0);
                }
            }
        }
    }
}
