//! The counter-based hash behind stochastic rounding.
//!
//! Each rounded element draws `bits(key, index)`, where the key mixes (seed, step, tensor,
//! stream): no state is carried between calls, so results do not depend on the thread count,
//! the chunking or the device. The constants reach the CUDA kernels through their prelude.
//!
//! MIRROR(hash): src/cuda/lion.cu mix64, hash32, make_key, key_bits

/// Which buffer a draw rounds: parameters and momentum must not share their noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stream {
    Param = 0,
    Momentum = 1,
}

/// splitmix64's multipliers, and its increment (2^64 / the golden ratio).
pub(crate) const MIX64_MUL1: u64 = 0xbf58_476d_1ce4_e5b9;
pub(crate) const MIX64_MUL2: u64 = 0x94d0_49bb_1331_11eb;
pub(crate) const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
/// lowbias32's multipliers.
pub(crate) const HASH32_MUL1: u32 = 0x7feb_352d;
pub(crate) const HASH32_MUL2: u32 = 0x846c_a68b;

/// splitmix64's finalizer.
#[inline(always)]
pub(crate) fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(MIX64_MUL1);
    x ^= x >> 27;
    x = x.wrapping_mul(MIX64_MUL2);
    x ^ (x >> 31)
}

/// Chris Wellons' "lowbias32": a 32-bit bijection with good avalanche that vectorizes well.
#[inline(always)]
pub(crate) fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(HASH32_MUL1);
    x ^= x >> 15;
    x = x.wrapping_mul(HASH32_MUL2);
    x ^ (x >> 16)
}

/// The per-(seed, step, tensor, stream) key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Key {
    pub lo: u32,
    pub hi: u32,
}

impl Key {
    pub(crate) fn new(seed: u64, step: u64, tensor: u64, stream: Stream) -> Key {
        let t = mix64((tensor << 1 | stream as u64).wrapping_add(GOLDEN_GAMMA));
        let k = mix64(seed ^ mix64(step ^ t));
        Key {
            lo: k as u32,
            hi: (k >> 32) as u32,
        }
    }

    /// 32 random bits for element `index` of the tensor.
    #[inline(always)]
    pub(crate) fn bits(self, index: u64) -> u32 {
        let h = hash32(index as u32 ^ self.lo);
        hash32(h ^ self.hi ^ (index >> 32) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_differ_across_every_coordinate() {
        let base = Key::new(1, 2, 3, Stream::Param);
        assert_ne!(base, Key::new(2, 2, 3, Stream::Param));
        assert_ne!(base, Key::new(1, 3, 3, Stream::Param));
        assert_ne!(base, Key::new(1, 2, 4, Stream::Param));
        assert_ne!(base, Key::new(1, 2, 3, Stream::Momentum));
        assert_ne!(base.bits(0), base.bits(1));
        assert_ne!(base.bits(5), base.bits(5 + (1 << 32)));
    }

    #[test]
    fn bits_are_roughly_uniform() {
        let key = Key::new(7, 1, 0, Stream::Param);
        let n = 1 << 16;
        let mut buckets = [0u32; 16];
        for i in 0..n {
            buckets[(key.bits(i) >> 28) as usize] += 1;
        }
        let expect = n as f64 / 16.0;
        for b in buckets {
            assert!((b as f64 - expect).abs() < 0.05 * expect, "{buckets:?}");
        }
    }
}
