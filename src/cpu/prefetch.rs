//! Software prefetch a fixed distance ahead of the kernels' streams.
//!
//! A kernel with a 16-bit array does several times the work per byte of an f32 one, and its
//! out-of-order window then reaches too few cache lines ahead to keep the memory system busy:
//! compute and loads stopped overlapping. On the 16-core Sapphire Rapids host of
//! BENCHMARKS.md, flat 2^25 bf16 (its 192 MB served from the 300 MB L3) went from 0.68-0.78x
//! of the same-bytes loop to 0.86-0.99x with every line prefetched 4 KiB ahead into L1 (8 KiB
//! did as well; 16 KiB, every other line, or into L2 only did worse). On a Zen 4 VM the same
//! prefetch into L1 made f32 steps 20-40% slower, and prefetching into L2 helped bf16 there:
//! so f32-only kernels do not prefetch, and AMD CPUs prefetch into L2.
//!
//! The q8 kernels prefetch too, f32 arrays included, and at their own pace: a block's lines
//! (256 elements) while they encode the block four before it (1024 elements: 4 KiB of f32).
//! Their encoder is half their compute and touches no memory; with every prefetch left to
//! the hardware, which follows demand misses, the memory idled while it ran, and a step of
//! f32 parameters with 8-bit momentum on the Zen 4 VM ran at 0.73-0.89x of a loop moving the
//! same bytes (1.02-1.19x with these prefetches: BENCHMARKS.md).
//!
//! Prefetches never fault, so addresses past a buffer's end are harmless (they are formed
//! with `wrapping_add`). `LION_CPU_PREFETCH` (bytes ahead, 0 = off; when set, f32 kernels
//! prefetch too; the q8 kernels go a quarter as many elements ahead),
//! `LION_CPU_PREFETCH_STRIDE` (bytes between prefetches) and
//! `LION_CPU_PREFETCH_HINT` (`t0`, `t1`) override the defaults, for tuning only: no result
//! depends on them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Elements per block of the generic and F16C kernels, each block after prefetching ahead of
/// its arrays: one 4 KiB page of f32.
pub(crate) const CPU_BLOCK_ELEMENTS: usize = 1024;

/// (first element, length) of the blocks that cover `len` elements.
pub(crate) fn blocks(len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(CPU_BLOCK_ELEMENTS)
        .map(move |start| (start, CPU_BLOCK_ELEMENTS.min(len - start)))
}

/// Bytes ahead of the element being updated.
const DISTANCE: usize = 4096;
/// Bytes between prefetches of one stream (a cache line: every line).
const STRIDE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hint {
    /// Into every cache level (L1 and out).
    T0,
    /// Into L2 and out.
    T1,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Prefetch {
    pub distance: usize,
    /// A power of two, 64 or more.
    pub stride: usize,
    pub hint: Hint,
}

/// For a kernel whose arrays are all f32 (`all_f32`) or not.
pub(crate) fn settings(all_f32: bool) -> Prefetch {
    let s = defaults();
    if all_f32 && !s.asked {
        Prefetch {
            distance: 0,
            ..s.prefetch
        }
    } else {
        s.prefetch
    }
}

#[derive(Clone, Copy)]
struct Defaults {
    prefetch: Prefetch,
    /// `LION_CPU_PREFETCH` was set.
    asked: bool,
}

/// For the q8 kernels (`kernel::q8_update_chunk`): the defaults, on for every dtype.
pub(crate) fn settings_q8() -> Prefetch {
    defaults().prefetch
}

/// The settings, read from the environment once per process (more than once where threads
/// race to read them first: the same values). Kept in an atomic, not a `OnceLock`: a child of
/// fork() whose parent had a thread inside the `OnceLock`'s initialisation would wait for it
/// forever on its first CPU step.
fn defaults() -> Defaults {
    static SETTINGS: AtomicU64 = AtomicU64::new(0);
    let packed = SETTINGS.load(Ordering::Relaxed);
    if packed != 0 {
        return Defaults::unpack(packed);
    }
    let read = read_defaults();
    SETTINGS.store(read.pack(), Ordering::Relaxed);
    read
}

fn read_defaults() -> Defaults {
    let asked = std::env::var("LION_CPU_PREFETCH")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&d| d <= 1 << 20);
    Defaults {
        prefetch: Prefetch {
            distance: asked.unwrap_or(DISTANCE),
            stride: std::env::var("LION_CPU_PREFETCH_STRIDE")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&s| s.is_power_of_two() && (64..=1 << 20).contains(&s))
                .unwrap_or(STRIDE),
            hint: match std::env::var("LION_CPU_PREFETCH_HINT").as_deref() {
                Ok("t1") => Hint::T1,
                Ok("t0") => Hint::T0,
                _ if super::isa::amd() => Hint::T1,
                _ => Hint::T0,
            },
        },
        asked: asked.is_some(),
    }
}

impl Defaults {
    /// Bit 63: set (0 is "not read yet"); 0-31 the distance (at most 2^20), 32-37 the
    /// stride's log2 (at most 20), 38 T1, 39 asked.
    fn pack(self) -> u64 {
        let p = self.prefetch;
        1 << 63
            | p.distance as u64
            | (p.stride.trailing_zeros() as u64) << 32
            | u64::from(p.hint == Hint::T1) << 38
            | u64::from(self.asked) << 39
    }

    fn unpack(v: u64) -> Defaults {
        Defaults {
            prefetch: Prefetch {
                distance: (v & 0xffff_ffff) as usize,
                stride: 1 << ((v >> 32) & 0x3f),
                hint: if v >> 38 & 1 == 1 { Hint::T1 } else { Hint::T0 },
            },
            asked: v >> 39 & 1 == 1,
        }
    }
}

impl Prefetch {
    /// Prefetches the cache line `distance` bytes past `at`.
    #[inline(always)]
    pub(crate) fn line(&self, at: *const u8) {
        self.touch(at.wrapping_add(self.distance));
    }

    /// Prefetches the cache line of `at`.
    #[inline(always)]
    fn touch(&self, at: *const u8) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
            let at = at as *const i8;
            // SAFETY: SSE is part of x86-64; a prefetch reads nothing and never faults.
            unsafe {
                match self.hint {
                    Hint::T0 => _mm_prefetch::<_MM_HINT_T0>(at),
                    Hint::T1 => _mm_prefetch::<_MM_HINT_T1>(at),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = at;
    }

    /// Prefetches ahead of `n` elements of each array, given as (start, element size).
    #[inline(always)]
    pub(crate) fn arrays(&self, arrays: &[(*const u8, usize)], n: usize) {
        for &(at, size) in arrays {
            self.range(at, n * size);
        }
    }

    /// Prefetches elements `first..first + n` of each array (start, element size), moved
    /// ahead by `distance / 4` elements: the distance counts f32 elements, so that arrays of
    /// every element size (the q8 kernels' codes are bytes) stay at the same element.
    #[inline(always)]
    pub(crate) fn elements(&self, arrays: &[(*const u8, usize)], first: usize, n: usize) {
        if self.distance == 0 {
            return;
        }
        let from = first + self.distance / 4;
        for &(at, size) in arrays {
            let at = at.wrapping_add(from * size);
            let mut offset = 0;
            while offset < n * size {
                self.touch(at.wrapping_add(offset));
                offset += self.stride;
            }
        }
    }

    /// Prefetches `bytes` bytes, `distance` past `at`, a line every `stride` bytes.
    #[inline(always)]
    pub(crate) fn range(&self, at: *const u8, bytes: usize) {
        if self.distance == 0 {
            return;
        }
        let mut offset = 0;
        while offset < bytes {
            self.line(at.wrapping_add(offset));
            offset += self.stride;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_survive_their_packing() {
        for distance in [0, 64, 4096, 1 << 20] {
            for stride in [64, 128, 1 << 20] {
                for hint in [Hint::T0, Hint::T1] {
                    for asked in [false, true] {
                        let d = Defaults {
                            prefetch: Prefetch {
                                distance,
                                stride,
                                hint,
                            },
                            asked,
                        };
                        let back = Defaults::unpack(d.pack());
                        assert_eq!(
                            (back.prefetch.distance, back.prefetch.stride),
                            (distance, stride)
                        );
                        assert_eq!((back.prefetch.hint, back.asked), (hint, asked));
                        assert_ne!(d.pack(), 0, "0 means not read yet");
                    }
                }
            }
        }
    }
}
