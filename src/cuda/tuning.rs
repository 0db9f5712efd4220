//! The CUDA kernels' measured knobs, written into lion.cu's prelude (`prelude::constants`):
//! the unroll factor, each update kernel's minimum of resident blocks, and how far ahead q8's
//! step asks L2 for its next block. (The chunk sizes, which the host's plan uses, are in
//! `plan.rs`.) BENCHMARKS.md has the runs behind each value.

use super::args::CUDA_THREADS_PER_BLOCK;

/// Whole strides per unrolled loop body in lion.cu's `update_chunk`.
pub(crate) const LION_UNROLL: u32 = 2;

/// The `__launch_bounds__` minimum of resident blocks per multiprocessor of the update
/// kernels of f32, bf16 and q8 momentum (0: none). Not to force occupancy: a minimum, even
/// of 1, changes ptxas' register choice. With NVRTC 13.0 for sm_90, f32 gets 79 registers
/// instead of 48 and ran 1.5-2% faster on an H100 (as its 80 registers did on an H200 before
/// the kernels were split by dtype); q8 gets 84 instead of 69, and with its L2 prefetch ran at
/// 90-91% of its copy floor against 85% (each alone: 81% and 84%); bf16 would get 88 and lost
/// 23%, so it has none. Measured on an H100 only, for whole steps with f32 (or, for f32 and
/// bf16 momentum, like-typed) parameters and gradients: not yet on an H200, nor for the
/// `lion_update_tensors_*` kernels, whose register counts differ.
const MIN_BLOCKS: [u32; 3] = [1, 0, 1];

/// The strides ahead of its current block for which each warp of q8's step asks L2
/// (lion.cu's `q8_prefetch_block`), with MIN_BLOCKS' q8 registers: 1 ran at 90-91% of the
/// copy floor on an H100, 2 at 88%, 3 at 81%.
pub(crate) const Q8_L2_AHEAD: u32 = 1;

/// The largest minimum that means something: 2048 threads per multiprocessor (the most any
/// architecture since Volta has) in blocks of CUDA_THREADS_PER_BLOCK.
const MAX_MIN_BLOCKS: u32 = 2048 / CUDA_THREADS_PER_BLOCK;

/// `MIN_BLOCKS`, or for tuning `LION_CUDA_MIN_BLOCKS=F32,BF16,Q8` (three numbers from 0 to
/// `MAX_MIN_BLOCKS`; anything else is ignored).
pub(crate) fn min_blocks() -> [u32; 3] {
    std::env::var("LION_CUDA_MIN_BLOCKS")
        .ok()
        .and_then(|v| parse_three(&v))
        .unwrap_or(MIN_BLOCKS)
}

fn parse_three(v: &str) -> Option<[u32; 3]> {
    let n: Vec<u32> = v
        .split(',')
        .map(|s| s.trim().parse().ok().filter(|&n| n <= MAX_MIN_BLOCKS))
        .collect::<Option<_>>()?;
    n.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_blocks_override_takes_three_numbers_only() {
        assert_eq!(parse_three("1,0,1"), Some([1, 0, 1]));
        assert_eq!(parse_three(" 2, 3 ,4"), Some([2, 3, 4]));
        assert_eq!(parse_three("8,0,8"), Some([8, 0, 8]));
        for bad in [
            "",
            "1,2",
            "1,2,3,4",
            "1,x,3",
            "-1,0,0",
            "9,0,0",
            "0,0,4294967295",
        ] {
            assert_eq!(parse_three(bad), None, "{bad}");
        }
    }
}
