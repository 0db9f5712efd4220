//! The CPU kernels: one chunk of one tensor at a time, in a single fused loop (read, update,
//! round, write) that LLVM vectorizes for every dtype combination.
//!
//! The bodies are `#[inline(always)]` generics; `isa.rs` instantiates each for the baseline
//! and for AVX2/AVX-512 under `#[target_feature]`, so the same source is vectorized for the
//! machine it runs on. No instruction set changes a result: Rust never fuses a*b+c on its own.

use super::elem::{Elem, Nearest, Rounder, Stochastic};
use super::prefetch::Prefetch;
use crate::numerics::q8;
use crate::numerics::rng::Key;
use crate::numerics::update::{lion_element, signs_agree, Coeffs};

/// The random keys of one tensor's step (None: round to nearest even).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RoundingKeys {
    pub param: Option<Key>,
    pub momentum: Option<Key>,
}

/// Applies the update to `p`, `m` from `g`; `first_index` is the position of `p[0]` in its
/// tensor (it numbers the stochastic-rounding draws).
#[inline(always)]
pub(crate) fn update_chunk<P: Elem, G: Elem, S: Elem>(
    p: &mut [P],
    g: &[G],
    m: &mut [S],
    k: &Coeffs,
    keys: RoundingKeys,
    first_index: u64,
) {
    if k.is_plain() {
        with_rounding::<P, G, S, true>(p, g, m, k, keys, first_index)
    } else {
        with_rounding::<P, G, S, false>(p, g, m, k, keys, first_index)
    }
}

#[inline(always)]
fn with_rounding<P: Elem, G: Elem, S: Elem, const PLAIN: bool>(
    p: &mut [P],
    g: &[G],
    m: &mut [S],
    k: &Coeffs,
    keys: RoundingKeys,
    first_index: u64,
) {
    match (keys.param, keys.momentum) {
        (None, None) => fused::<_, _, _, _, _, PLAIN>(p, g, m, k, Nearest, Nearest, first_index),
        (Some(kp), None) => {
            fused::<_, _, _, _, _, PLAIN>(p, g, m, k, Stochastic(kp), Nearest, first_index)
        }
        (None, Some(km)) => {
            fused::<_, _, _, _, _, PLAIN>(p, g, m, k, Nearest, Stochastic(km), first_index)
        }
        (Some(kp), Some(km)) => {
            fused::<_, _, _, _, _, PLAIN>(p, g, m, k, Stochastic(kp), Stochastic(km), first_index)
        }
    }
}

#[inline(always)]
fn fused<P: Elem, G: Elem, S: Elem, RP: Rounder, RM: Rounder, const PLAIN: bool>(
    p: &mut [P],
    g: &[G],
    m: &mut [S],
    k: &Coeffs,
    round_p: RP,
    round_m: RM,
    first_index: u64,
) {
    let n = p.len();
    let (g, m) = (&g[..n], &mut m[..n]);
    for i in 0..n {
        let (pi, mi) = lion_element::<PLAIN>(k, p[i].to_f32(), g[i].to_f32(), m[i].to_f32());
        let index = first_index + i as u64;
        p[i] = round_p.round(pi, index);
        m[i] = round_m.round(mi, index);
    }
}

/// Counts the elements whose sign(c) agrees with the gradient (Cautious Lion's first pass).
#[inline(always)]
pub(crate) fn count_agreeing_chunk<G: Elem, S: Elem>(g: &[G], m: &[S], k: &Coeffs) -> u64 {
    let n = g.len();
    let m = &m[..n];
    let mut total = 0u64;
    // u32 partial counts vectorize; a chunk is far below 2^32 elements.
    for (gb, mb) in g.chunks(1 << 20).zip(m.chunks(1 << 20)) {
        let mut count = 0u32;
        for (gi, mi) in gb.iter().zip(mb) {
            count += signs_agree(k, gi.to_f32(), mi.to_f32()) as u32;
        }
        total += count as u64;
    }
    total
}

/// The update of a chunk of a tensor with 8-bit momentum (`numerics::q8`): `codes` and
/// `scales` are the chunk's, which starts on a block boundary (a chunk holds whole blocks
/// but for the tensor's last one). Each block is decoded, updated into a buffer of f32 on the
/// stack, and encoded with its new scale. The momentum always rounds to nearest (the format's
/// rule); `keys.param` rounds 16-bit parameters stochastically. `ahead` prefetches a later
/// block's lines during each encoding (`prefetch::settings_q8`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn q8_update_chunk<P: Elem, G: Elem>(
    p: &mut [P],
    g: &[G],
    codes: &mut [i8],
    scales: &mut [f32],
    k: &Coeffs,
    keys: RoundingKeys,
    first_index: u64,
    ahead: Prefetch,
) {
    let at = (first_index, ahead);
    match (k.is_plain(), keys.param) {
        (true, None) => q8_fused::<_, _, _, true>(p, g, codes, scales, k, Nearest, at),
        (false, None) => q8_fused::<_, _, _, false>(p, g, codes, scales, k, Nearest, at),
        (true, Some(kp)) => q8_fused::<_, _, _, true>(p, g, codes, scales, k, Stochastic(kp), at),
        (false, Some(kp)) => q8_fused::<_, _, _, false>(p, g, codes, scales, k, Stochastic(kp), at),
    }
}

// MIRROR(q8): src/cuda/lion.cu q8_update_chunk, q8_count_chunk (one warp a block) the block
// step: decode with the old scale, the update of `lion_element` per element, encode with the
// new scale; Cautious Lion's count on the decoded momentum
#[inline(always)]
fn q8_fused<P: Elem, G: Elem, RP: Rounder, const PLAIN: bool>(
    p: &mut [P],
    g: &[G],
    codes: &mut [i8],
    scales: &mut [f32],
    k: &Coeffs,
    round_p: RP,
    (first_index, ahead): (u64, Prefetch),
) {
    let n = p.len();
    let (g, codes) = (&g[..n], &mut codes[..n]);
    let arrays = [
        (p.as_ptr() as *const u8, size_of::<P>()),
        (g.as_ptr() as *const u8, size_of::<G>()),
        (codes.as_ptr() as *const u8, 1),
    ];
    let blocks = p
        .chunks_mut(q8::BLOCK)
        .zip(g.chunks(q8::BLOCK))
        .zip(codes.chunks_mut(q8::BLOCK));
    // The new momentum of one block, between the update and the encoder (zeroed once).
    let mut next = [0f32; q8::BLOCK];
    for (b, ((p, g), codes)) in blocks.enumerate() {
        let unit = q8::unit(scales[b]);
        let first = first_index + (b * q8::BLOCK) as u64;
        let len = p.len();
        // One length for every slice, so that the loop has no bounds checks and vectorizes.
        let (g, codes, next) = (&g[..len], &mut codes[..len], &mut next[..len]);
        let mut max = 0u32;
        for i in 0..len {
            let m = q8::decode(codes[i], unit);
            let (pi, mi) = lion_element::<PLAIN>(k, p[i].to_f32(), g[i].to_f32(), m);
            p[i] = round_p.round(pi, first + i as u64);
            next[i] = mi;
            max = max.max(q8::abs_bits(mi));
        }
        // The encoder touches no memory: the memory fetches a later block meanwhile.
        ahead.elements(&arrays, b * q8::BLOCK, q8::BLOCK);
        scales[b] = q8::encode_block_with_max(next, codes, max);
    }
}

/// Cautious Lion's count over a chunk with 8-bit momentum (blocks as in `q8_update_chunk`).
#[inline(always)]
pub(crate) fn q8_count_agreeing_chunk<G: Elem>(
    g: &[G],
    codes: &[i8],
    scales: &[f32],
    k: &Coeffs,
) -> u64 {
    let mut total = 0u64;
    for (b, (g, codes)) in g.chunks(q8::BLOCK).zip(codes.chunks(q8::BLOCK)).enumerate() {
        let unit = q8::unit(scales[b]);
        let mut count = 0u32;
        for (gi, &c) in g.iter().zip(codes) {
            count += signs_agree(k, gi.to_f32(), q8::decode(c, unit)) as u32;
        }
        total += count as u64;
    }
    total
}
