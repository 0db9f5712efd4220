//! Where each rank's share of the work lies: every tensor's elements laid end to end (the
//! flattened parameters), cut into `world_size` equal slices. The last slice is padded; a
//! rank whose slice starts past the end owns nothing (a tiny model on many ranks).

use crate::config::TensorSpec;
use crate::engine::{Piece, StepBuffers};
use crate::status::{Error, Result};

/// Slices are a multiple of this many elements: 64 bytes of f32, and whole bytes of 2-bit
/// packed votes.
pub(crate) const SLICE_ALIGN: u64 = 16;

/// The vote mode's slices: also whole bytes of results packed 5 a byte
/// (`cpu::vote_codes::trit_byte`), in whole 8-byte words (40 elements, one CUDA thread's).
pub(crate) const VOTE_SLICE_ALIGN: u64 = 80;
const _: () = {
    use crate::cpu::vote_codes::{TRITS_PER_BYTE, VOTES_PER_BYTE};
    assert!(VOTE_SLICE_ALIGN.is_multiple_of(SLICE_ALIGN));
    assert!(SLICE_ALIGN.is_multiple_of(VOTES_PER_BYTE as u64));
    assert!(VOTE_SLICE_ALIGN.is_multiple_of(8 * TRITS_PER_BYTE as u64));
};

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    /// Where each tensor starts in the flattened elements.
    pub offsets: Vec<u64>,
    pub total: u64,
    /// Elements per slice (each rank's, padding included).
    pub slice: u64,
    pub rank: usize,
    pub world_size: usize,
}

impl Layout {
    pub fn new(tensors: &[TensorSpec], rank: usize, world_size: usize) -> Result<Layout> {
        Layout::aligned(tensors, rank, world_size, 1)
    }

    /// As `new`, with every tensor starting at a multiple of `align` elements (the CUDA
    /// engines' 16-byte accesses); the gaps belong to no tensor.
    pub fn aligned(
        tensors: &[TensorSpec],
        rank: usize,
        world_size: usize,
        align: u64,
    ) -> Result<Layout> {
        Layout::sliced(tensors, rank, world_size, align, SLICE_ALIGN)
    }

    /// As `aligned`, with slices a multiple of `slice_align` (a multiple of `SLICE_ALIGN`;
    /// the vote mode's: `VOTE_SLICE_ALIGN`).
    pub fn sliced(
        tensors: &[TensorSpec],
        rank: usize,
        world_size: usize,
        align: u64,
        slice_align: u64,
    ) -> Result<Layout> {
        let mut offsets = Vec::new();
        offsets
            .try_reserve_exact(tensors.len())
            .map_err(|_| Error::out_of_memory("no memory for the tensors' offsets"))?;
        let mut total = 0u64;
        for t in tensors {
            offsets.push(total);
            total = (t.numel.checked_next_multiple_of(align))
                .and_then(|n| total.checked_add(n))
                .ok_or_else(|| Error::invalid("the total number of elements overflows"))?;
        }
        let too_large = || Error::invalid("the flattened tensors are too large to slice");
        let slice = total
            .div_ceil(world_size as u64)
            .checked_next_multiple_of(slice_align)
            .ok_or_else(too_large)?
            .max(slice_align);
        // Every buffer is sized from slice * world_size: it must exist.
        slice
            .checked_mul(world_size as u64)
            .filter(|&n| n <= isize::MAX as u64 / 8)
            .ok_or_else(too_large)?;
        Ok(Layout {
            offsets,
            total,
            slice,
            rank,
            world_size,
        })
    }

    /// Elements of all slices together (`world_size * slice`, at least `total`).
    pub fn padded(&self) -> u64 {
        self.slice * self.world_size as u64
    }

    /// Elements of each rank's slice per round of a checkpoint's gather (`read_state` of the
    /// sharded engines, whose buffers, made at creation, hold one round of every rank's):
    /// at most `per_rank`, and `total` for all ranks together, so that those buffers stay
    /// small beside the slice at any W; at least 1.
    pub fn gather_chunk(&self, per_rank: u64, total: u64) -> u64 {
        let all_ranks = (total / self.world_size as u64).max(1);
        self.slice.min(per_rank).min(all_ranks).max(1)
    }

    /// This rank's flattened elements, [start, end), without the padding.
    pub fn owned(&self) -> (u64, u64) {
        let start = (self.rank as u64 * self.slice).min(self.total);
        (start, (start + self.slice).min(self.total))
    }

    /// The address of the caller's gradients (elements of `size` bytes) if they lie as one
    /// flat buffer of this layout, so that a sharded step can reduce-scatter straight from it
    /// (it only reads) instead of copying them into one: every non-empty tensor at its
    /// flattened offset from one base with no gap after it (a gap would be the caller's
    /// bytes, summed and checked as gradients), and the slices covering exactly the tensors
    /// (the reduce-scatter reads `padded()` elements).
    pub fn flat_grads(&self, buffers: &StepBuffers, size: usize) -> Option<usize> {
        self.flat_base(|t| buffers.grad(t, 0) as usize, buffers, size)
    }

    /// The same for the caller's parameters, so that a sharded step's all-gather can write
    /// every rank's slice straight into them (no gap nor padding: it writes `padded()`
    /// elements, each the tensors' own).
    pub fn flat_params(&self, buffers: &StepBuffers, size: usize) -> Option<usize> {
        self.flat_base(|t| buffers.param(t, 0) as usize, buffers, size)
    }

    fn flat_base(
        &self,
        address: impl Fn(usize) -> usize,
        buffers: &StepBuffers,
        size: usize,
    ) -> Option<usize> {
        if self.padded() != self.total {
            return None;
        }
        let mut base = None;
        for (t, &offset) in self.offsets.iter().enumerate() {
            let numel = buffers.numel(t);
            if numel == 0 {
                continue;
            }
            let next = self.offsets.get(t + 1).copied().unwrap_or(self.total);
            if offset + numel != next {
                return None;
            }
            let at = address(t).wrapping_sub(offset as usize * size);
            if *base.get_or_insert(at) != at {
                return None;
            }
        }
        base
    }

    /// The stretches of tensors inside this rank's slice, in order.
    pub fn pieces(&self, tensors: &[TensorSpec]) -> Result<Vec<Piece>> {
        let (start, end) = self.owned();
        let mut pieces = crate::buffer::try_vec(tensors.len(), "the slice's pieces")?;
        pieces.extend((tensors.iter().zip(&self.offsets).enumerate()).filter_map(
            |(tensor, (t, &offset))| {
                let from = start.max(offset);
                let to = end.min(offset + t.numel);
                (from < to).then(|| Piece {
                    tensor,
                    first: from - offset,
                    len: to - from,
                })
            },
        ));
        Ok(pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DType;

    fn tensors(sizes: &[u64]) -> Vec<TensorSpec> {
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

    #[test]
    fn the_slices_cover_every_element_once() {
        for sizes in [&[5u64, 0, 37, 1000, 3][..], &[1], &[0, 0], &[16, 16, 16]] {
            let t = tensors(sizes);
            let votes = |w: usize| [(w, 1, VOTE_SLICE_ALIGN), (w, 8, VOTE_SLICE_ALIGN)];
            let every = (1..=9).flat_map(|w| [(w, 1, SLICE_ALIGN), (w, 8, SLICE_ALIGN)]);
            for (world, align, slice_align) in every.chain((1..=9).flat_map(votes)) {
                let mut covered = vec![0u32; t.iter().map(|t| t.numel as usize).sum()];
                let start: Vec<u64> = (t.iter().scan(0, |s, t| {
                    *s += t.numel;
                    Some(*s - t.numel)
                }))
                .collect();
                for rank in 0..world {
                    let layout = Layout::sliced(&t, rank, world, align, slice_align).unwrap();
                    assert!(layout.offsets.iter().all(|o| o % align == 0));
                    assert_eq!(layout.slice % slice_align, 0);
                    assert!(layout.padded() >= layout.total);
                    for p in layout.pieces(&t).unwrap() {
                        assert!(p.len > 0 && p.first + p.len <= t[p.tensor].numel);
                        assert!(p.first == 0 || p.first % align == 0);
                        let at = start[p.tensor] + p.first;
                        for e in at..at + p.len {
                            covered[e as usize] += 1;
                        }
                    }
                }
                assert!(covered.iter().all(|&c| c == 1), "{sizes:?} on {world}");
            }
        }
    }

    #[test]
    fn flat_gradients_are_found_only_where_they_are_the_layout() {
        use std::ffi::c_void;
        // f32 gradients at `at` (element offsets into one buffer), under an 8-aligned layout
        // of 8 + 0 + 24 elements (32: two slices of 16 on two ranks).
        let t = tensors(&[8, 0, 24]);
        let layout = Layout::aligned(&t, 0, 2, 8).unwrap();
        let base = 0x10000usize;
        let found = |layout: &Layout, at: [usize; 3], t: &[TensorSpec]| {
            let grads: Vec<*const c_void> =
                at.iter().map(|a| (base + 4 * a) as *const c_void).collect();
            let params = vec![std::ptr::null_mut(); 3];
            // SAFETY: nothing is read through these addresses.
            let b = unsafe { StepBuffers::new(&params, &grads, t) };
            layout.flat_grads(&b, 4)
        };
        assert_eq!(found(&layout, [0, 8, 8], &t), Some(base));
        assert_eq!(
            found(&layout, [0, 999, 8], &t),
            Some(base),
            "an empty tensor's address is not read"
        );
        assert_eq!(found(&layout, [0, 8, 9], &t), None, "not at its offset");
        assert_eq!(found(&layout, [24, 8, 0], &t), None, "out of order");
        // 7 elements: a gap of one before the next tensor (the caller's bytes).
        let gap = tensors(&[7, 0, 24]);
        assert_eq!(found(&layout, [0, 7, 8], &gap), None);
        // 8 + 40 = 48: two slices of 32, the last padded past the tensors.
        let short = tensors(&[8, 0, 40]);
        let padded = Layout::aligned(&short, 0, 2, 8).unwrap();
        assert!(padded.padded() > padded.total);
        assert_eq!(found(&padded, [0, 8, 8], &short), None);
    }
}
