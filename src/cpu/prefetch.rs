//! Software prefetch a fixed distance ahead of the kernels' streams.
//!
//! The hardware prefetchers do not cross 4 KiB pages, and a step streams three to five
//! arrays at once. Where the data comes from the last-level cache (a 200 MB model on a
//! server with a 300 MB L3) the kernels stalled at every new page, and compute did not
//! overlap the loads: on the 16-core Sapphire Rapids host of BENCHMARKS.md, flat 2^25 bf16
//! went from 0.68-0.78x of the same-bytes loop to 0.86-0.99x with every line prefetched 4 KiB
//! ahead (8 KiB did as well; 16 KiB, every other line, or into L2 only did worse).
//! Prefetches never fault, so addresses past a buffer's end are harmless (they are formed
//! with `wrapping_add`).
//!
//! `LION_CPU_PREFETCH` (bytes ahead, 0 = off), `LION_CPU_PREFETCH_STRIDE` (bytes between
//! prefetches) and `LION_CPU_PREFETCH_HINT` (`t0`, `t1`) override the defaults, for tuning
//! only: no result depends on them.

use std::sync::OnceLock;

/// Bytes ahead of the element being updated.
const DISTANCE: usize = 4096;
/// Bytes between prefetches of one stream (a cache line: every line).
const STRIDE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    /// Into every cache level (L1 and out).
    T0,
    /// Into L2 and out.
    T1,
}

#[derive(Clone, Copy, Debug)]
pub struct Prefetch {
    pub distance: usize,
    /// A power of two, 64 or more.
    pub stride: usize,
    pub hint: Hint,
}

/// The settings, read from the environment once.
pub fn settings() -> Prefetch {
    static SETTINGS: OnceLock<Prefetch> = OnceLock::new();
    *SETTINGS.get_or_init(|| Prefetch {
        distance: std::env::var("LION_CPU_PREFETCH")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&d| d <= 1 << 20)
            .unwrap_or(DISTANCE),
        stride: std::env::var("LION_CPU_PREFETCH_STRIDE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&s| s.is_power_of_two() && (64..=1 << 20).contains(&s))
            .unwrap_or(STRIDE),
        hint: match std::env::var("LION_CPU_PREFETCH_HINT").as_deref() {
            Ok("t1") => Hint::T1,
            _ => Hint::T0,
        },
    })
}

impl Prefetch {
    /// Prefetches the cache line `distance` bytes past `at`.
    #[inline(always)]
    pub fn line(&self, at: *const u8) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
            let ahead = at.wrapping_add(self.distance) as *const i8;
            // SAFETY: SSE is part of x86-64; a prefetch reads nothing and never faults.
            unsafe {
                match self.hint {
                    Hint::T0 => _mm_prefetch::<_MM_HINT_T0>(ahead),
                    Hint::T1 => _mm_prefetch::<_MM_HINT_T1>(ahead),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = at;
    }

    /// Prefetches `bytes` bytes, `distance` past `at`, a line every `stride` bytes.
    #[inline(always)]
    pub fn range(&self, at: *const u8, bytes: usize) {
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
