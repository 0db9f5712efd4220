//! The CPU kernels: one chunk of one tensor at a time, in blocks small enough to stay in L1.
//!
//! The bodies are `#[inline(always)]` generics; `isa.rs` instantiates each for the baseline
//! and for AVX2/AVX-512 under `#[target_feature]`, so the same source is vectorized for the
//! machine it runs on. No instruction set changes a result: Rust never fuses a*b+c on its own.

use super::elem::{Elem, Rounding};
use crate::rng::Key;
use crate::update::{lion_aligned, lion_element, Coeffs};

/// Elements converted and updated together (three f32 buffers of this fit in L1).
pub(crate) const BLOCK: usize = 512;

/// The random keys of one tensor's step (only read when stochastic rounding is on).
#[derive(Clone, Copy, Debug)]
pub struct RoundingKeys {
    pub param: Option<Key>,
    pub momentum: Option<Key>,
}

fn rounding(key: Option<Key>, first_index: u64) -> Rounding {
    match key {
        Some(key) => Rounding::Stochastic { key, first_index },
        None => Rounding::Nearest,
    }
}

/// Applies the update to `p`, `m` from `g`; `first_index` is the position of `p[0]` in its
/// tensor (it numbers the stochastic-rounding draws).
#[inline(always)]
pub fn update_chunk<P: Elem, G: Elem, S: Elem>(
    p: &mut [P],
    g: &[G],
    m: &mut [S],
    k: &Coeffs,
    keys: RoundingKeys,
    first_index: u64,
) {
    let mut pbuf = [0f32; BLOCK];
    let mut gbuf = [0f32; BLOCK];
    let mut mbuf = [0f32; BLOCK];
    let mut offset = 0usize;
    for ((pb, gb), mb) in p
        .chunks_mut(BLOCK)
        .zip(g.chunks(BLOCK))
        .zip(m.chunks_mut(BLOCK))
    {
        {
            let pf = P::load_mut(pb, &mut pbuf);
            let gf = G::load(gb, &mut gbuf);
            let mf = S::load_mut(mb, &mut mbuf);
            update_block(pf, gf, mf, k);
        }
        let index = first_index + offset as u64;
        P::store(pb, &pbuf[..pb.len()], rounding(keys.param, index));
        S::store(mb, &mbuf[..mb.len()], rounding(keys.momentum, index));
        offset += pb.len();
    }
}

#[inline(always)]
fn update_block(p: &mut [f32], g: &[f32], m: &mut [f32], k: &Coeffs) {
    let n = p.len();
    let (g, m) = (&g[..n], &mut m[..n]);
    for i in 0..n {
        let (pi, mi) = lion_element(k, p[i], g[i], m[i]);
        p[i] = pi;
        m[i] = mi;
    }
}

/// Counts the elements whose sign(c) agrees with the gradient (Cautious Lion's first pass).
#[inline(always)]
pub fn count_aligned_chunk<G: Elem, S: Elem>(g: &[G], m: &[S], k: &Coeffs) -> u64 {
    let mut gbuf = [0f32; BLOCK];
    let mut mbuf = [0f32; BLOCK];
    let mut total = 0u64;
    for (gb, mb) in g.chunks(BLOCK).zip(m.chunks(BLOCK)) {
        let gf = G::load(gb, &mut gbuf);
        let mf = S::load(mb, &mut mbuf);
        let mut count = 0u32;
        for (&gi, &mi) in gf.iter().zip(mf) {
            count += lion_aligned(k, gi, mi) as u32;
        }
        total += count as u64;
    }
    total
}
