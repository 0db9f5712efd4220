//! The CUDA kernels' measured knobs, written into lion.cu's prelude (`prelude::constants_for`):
//! the unroll factor, each update kernel's minimum of resident blocks, how far ahead q8's
//! step asks L2 for its next block, and the stages of q8's ring (whose shared memory the
//! launches pass). `Tuning` reads them once per device, with their overrides. (The chunk
//! sizes, which the host's plan uses, are in `plan.rs`.) BENCHMARKS.md has the runs behind
//! each value.

use super::args::{CUDA_THREADS_PER_BLOCK, ELEMS};

/// Whole strides per unrolled loop body in lion.cu's `update_chunk`, under f32 and under
/// bf16 momentum.
const UNROLL: [u32; 2] = [2, 2];

/// The `__launch_bounds__` minimum of resident blocks per multiprocessor of the update
/// kernels of f32, bf16 and q8 momentum (0: none). Not to force occupancy: a minimum, even
/// of 1, changes ptxas' register choice. With NVRTC 13.0 for sm_90, f32 gets 79 registers
/// instead of 48 and ran 1.5-2% faster on an H100 and 2-4% on an H200; bf16 would get 88 and
/// lost 23% (H100) and 33% (H200 at a minimum of 2), so it has none. q8 is the card's
/// (`q8_min_blocks`). Measured for whole steps with f32 (or, for f32 and bf16 momentum,
/// like-typed) parameters and gradients, not for the `lion_update_tensors_*` kernels, whose
/// register counts differ.
const MIN_BLOCKS: [u32; 2] = [1, 0];

/// q8's minimum on a card whose memory moves fewer than SLOW_BYTES_PER_SM bytes a second per
/// multiprocessor, and on the others. A minimum of 1 gives q8 84 registers instead of 69: 2
/// resident blocks instead of 3, each warp with more loads in flight. On an H100 (3.35 TB/s
/// over 132 multiprocessors: 25 GB/s each) that won, with the L2 prefetch: 90-91% of the copy
/// floor flat, 88-89% GPT-2 small, against 84% / 81% without the minimum. On an H200 (4.8 TB/s:
/// 36 GB/s each), which needs more bytes in flight per multiprocessor, more warps won: 86% /
/// 83-84% without the minimum, 82% / 78% with it. The threshold lies between the two cards;
/// where the driver does not report the bandwidth, the H200's (the reference card's) value.
/// Other cards take the side of the threshold they fall on, unmeasured (an A100 or an H100
/// PCIe below it; an H100 NVL or a GH200 just above it). A MIG slice likely counts its own
/// multiprocessors against the whole card's memory bus, and takes the fast side: a q8 speed
/// choice only, never a result. Measured without q8's ring (Q8_STAGES), which is on since.
const Q8_MIN_BLOCKS_SLOW: u32 = 1;
const Q8_MIN_BLOCKS: u32 = 0;
const SLOW_BYTES_PER_SM: f64 = 30e9;

/// What the knobs depend on (`driver::card`); None where the driver does not report it: the
/// reference card's (an H200's) side for the bandwidth and the architecture, 48 KiB for the
/// shared memory (2 of q8's ring stages).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Card {
    /// The peak memory bandwidth per multiprocessor, in bytes a second.
    pub bytes_per_sm: Option<f64>,
    /// The compute capability's major number (cp.async, q8's ring, from 8).
    pub major: Option<i32>,
    /// The most shared memory a block may use when its kernel asks for it.
    pub shared_per_block: Option<u32>,
}

/// The knobs one card's kernels are compiled and launched with: the defaults for the card or
/// their overrides, read once (`module::load`), so that the prelude and the launches agree.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    pub min_blocks: [u32; 3],
    pub unroll: [u32; 2],
    pub q8_l2_ahead: u32,
    pub q8_stages: u32,
}

impl Tuning {
    pub(crate) fn for_card(card: Card) -> Tuning {
        Tuning {
            min_blocks: min_blocks(card),
            unroll: overridden("LION_CUDA_UNROLL", 1..=MAX_UNROLL, UNROLL),
            q8_l2_ahead: overridden("LION_CUDA_Q8_AHEAD", 0..=MAX_UNROLL, [Q8_L2_AHEAD])[0],
            q8_stages: q8_stages(card),
        }
    }

    /// The dynamic shared memory of each block of the q8 update kernels: its ring.
    pub(crate) fn q8_ring_bytes(&self) -> u32 {
        ring_bytes(self.q8_stages)
    }
}

fn ring_bytes(stages: u32) -> u32 {
    stages * (CUDA_THREADS_PER_BLOCK / 32) * Q8_SLOT_BYTES
}

fn q8_min_blocks(card: Card) -> u32 {
    match card.bytes_per_sm {
        Some(b) if b < SLOW_BYTES_PER_SM => Q8_MIN_BLOCKS_SLOW,
        _ => Q8_MIN_BLOCKS,
    }
}

/// The strides ahead of its current block for which each warp of q8's step asks L2
/// (lion.cu's `q8_prefetch_block`). On an H100 with q8's minimum of 1: 1 ran at 90-91% of the
/// copy floor, 2 at 88%, 3 at 81%. On an H200 without it: 86% with 1, 82% with 2, 80% with
/// none (73% with the minimum and none).
/// With q8's ring (Q8_STAGES > 0) the prefetch counts from the ring's last block: it asks for
/// the block Q8_STAGES - 1 + Q8_L2_AHEAD strides ahead (1 was measured without the ring).
const Q8_L2_AHEAD: u32 = 1;

/// Blocks in each warp's ring of q8's step (lion.cu's `q8_ring`, sm_80 and later): with S,
/// S - 1 blocks are on their way into shared memory while the warp steps one; 0 loads each
/// block straight into registers when its step begins. Each stage is Q8_SLOT_BYTES a warp of
/// the launch's dynamic shared memory (2 stages: 38 KiB a block; 4: 76 KiB, above 48 KiB, so
/// the kernels are allowed more at load, and 2 blocks fit a multiprocessor of an H100 or H200;
/// 6: 1 block). Measured as % of the copy floor, flat 2^28 / GPT-2 small (BENCHMARKS.md,
/// 2026-12-06):
/// - H100, each lane's elements in two runs (lion.cu's q8_run_start), in one call: no ring
///   90% / 88%, 3 stages 95% / 94%, 4 96% / 94%, 5 95-96% / 94%, 6 96% / 95%;
/// - H200, each lane's elements in one run of 8 (before the runs): no ring 86% / 85%, 2 stages
///   87% / 85%, 3 93% / 90%, 4 97% / 93%; with `cp.async.cg` instead of `.ca`, 56-66%.
///
/// 4: the fewest stages at the best flat speed on both cards (6 gained 1% on the H100's GPT-2
/// row, at one resident block; one run of each).
const Q8_STAGES: u32 = 4;
const MAX_Q8_STAGES: u32 = 6;

/// MIRROR(q8-slot): src/cuda/lion.cu Q8Slot (its size; a static_assert there checks it): one
/// block's f32 parameters and gradients, its codes, and each lane's copy of its scale.
pub(crate) const Q8_SLOT_BYTES: u32 = {
    let block = crate::numerics::q8::BLOCK as u32;
    2 * 4 * block + block + 4 * (block / ELEMS as u32)
};

/// What a kernel may use of shared memory without asking (`cuFuncSetAttribute`): 48 KiB.
pub(crate) const SHARED_WITHOUT_OPT_IN: u32 = 48 * 1024;
/// More than the update kernels' static shared memory (16 bytes with NVRTC 13.0).
const STATIC_SHARED_MARGIN: u32 = 1024;

/// The largest minimum that means something: 2048 threads per multiprocessor (the most any
/// architecture since Volta has) in blocks of CUDA_THREADS_PER_BLOCK.
const MAX_MIN_BLOCKS: u32 = 2048 / CUDA_THREADS_PER_BLOCK;

/// The most strides an unrolled loop body or q8's prefetch may take (registers and reach).
const MAX_UNROLL: u32 = 8;

// The overrides below are for tuning on a new card (`bash benches/device_gpu.sh tune`): a
// value out of its range, or of the wrong count, is ignored and the default stands.

/// `MIN_BLOCKS` and the card's q8 minimum, or `LION_CUDA_MIN_BLOCKS=F32,BF16,Q8` (each 0 to
/// `MAX_MIN_BLOCKS`).
fn min_blocks(card: Card) -> [u32; 3] {
    let [f32, bf16] = MIN_BLOCKS;
    let default = [f32, bf16, q8_min_blocks(card)];
    overridden("LION_CUDA_MIN_BLOCKS", 0..=MAX_MIN_BLOCKS, default)
}

/// `Q8_STAGES`, or `LION_CUDA_Q8_STAGES` (0 to `MAX_Q8_STAGES`), as many as the card's shared
/// memory holds (48 KiB where it does not say), and none before sm_80 (no cp.async).
fn q8_stages(card: Card) -> u32 {
    let wanted = overridden("LION_CUDA_Q8_STAGES", 0..=MAX_Q8_STAGES, [Q8_STAGES])[0];
    stages_that_fit(wanted, card)
}

fn stages_that_fit(wanted: u32, card: Card) -> u32 {
    // The kernels' own static shared memory counts against the same limit: a margin for it.
    let room = card.shared_per_block.unwrap_or(SHARED_WITHOUT_OPT_IN);
    let room = room.saturating_sub(STATIC_SHARED_MARGIN);
    match card.major {
        Some(major) if major < 8 => 0,
        _ => (0..=wanted)
            .rev()
            .find(|&s| ring_bytes(s) <= room)
            .unwrap_or(0),
    }
}

fn overridden<const N: usize>(
    name: &str,
    range: std::ops::RangeInclusive<u32>,
    default: [u32; N],
) -> [u32; N] {
    std::env::var(name)
        .ok()
        .and_then(|v| parse_list(&v, &range))
        .unwrap_or(default)
}

/// `N` comma-separated numbers, each in `range`.
pub(crate) fn parse_list<const N: usize>(
    v: &str,
    range: &std::ops::RangeInclusive<u32>,
) -> Option<[u32; N]> {
    let n: Vec<u32> = v
        .split(',')
        .map(|s| s.trim().parse().ok().filter(|n| range.contains(n)))
        .collect::<Option<_>>()?;
    n.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_take_their_count_of_numbers_in_range_only() {
        let blocks = 0..=MAX_MIN_BLOCKS;
        let parse_three = |v| parse_list::<3>(v, &blocks);
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
        let unroll = 1..=MAX_UNROLL;
        assert_eq!(parse_list::<2>("4,8", &unroll), Some([4, 8]));
        for bad in ["0,2", "2,9", "2", "2,2,2"] {
            assert_eq!(parse_list::<2>(bad, &unroll), None, "{bad}");
        }
        assert_eq!(parse_list::<1>("0", &(0..=MAX_UNROLL)), Some([0]));
    }

    #[test]
    fn q8_takes_its_minimum_by_the_cards_bandwidth() {
        let card = |b| Card {
            bytes_per_sm: b,
            ..Card::default()
        };
        let h100 = card(Some(3.35e12 / 132.0));
        let h200 = card(Some(4.8e12 / 132.0));
        assert_eq!(q8_min_blocks(h100), Q8_MIN_BLOCKS_SLOW);
        assert_eq!(q8_min_blocks(h200), Q8_MIN_BLOCKS);
        assert_eq!(q8_min_blocks(card(None)), q8_min_blocks(h200));
    }

    #[test]
    fn q8s_ring_takes_the_stages_the_cards_shared_memory_holds() {
        let card = |major, shared| Card {
            major,
            shared_per_block: shared,
            ..Card::default()
        };
        let h100 = card(Some(9), Some(232_448));
        assert_eq!(stages_that_fit(4, h100), 4);
        assert_eq!(stages_that_fit(2, h100), 2);
        assert_eq!(stages_that_fit(0, h100), 0);
        // sm_86 and sm_89: 99 KiB a block.
        assert_eq!(stages_that_fit(4, card(Some(8), Some(101_376))), 4);
        // Unreported: what any kernel may use, 48 KiB, two stages.
        assert_eq!(stages_that_fit(4, card(None, None)), 2);
        assert!(ring_bytes(2) <= SHARED_WITHOUT_OPT_IN && ring_bytes(3) > SHARED_WITHOUT_OPT_IN);
        // No cp.async before sm_80.
        assert_eq!(stages_that_fit(2, card(Some(7), Some(98_304))), 0);
    }
}
