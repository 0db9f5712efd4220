//! How the vote mode's values travel (`cpu::vote`, and `cuda/lion.cu` on the GPU). A vote
//! or a result is -1, 0 or 1 (a vote of 0, from c exactly 0, is an abstention; a result of 0
//! is a tie). Two packings:
//!
//! - 2 bits an element, 4 a byte (00 = 0, 01 = +1, 11 = -1): every rank's votes in the gather
//!   exchange, which the receivers sum. Element e is bits 2(e % 4).. of byte e / 4.
//! - trits, 5 a byte: the sums exchange's decided results. The byte of results s_0..s_4 is the sum of (s_i + 1) 3^i (3^5 = 243 values of 256). Element e is
//!   trit e % 5 of byte e / 5: 1.6 bits an element, so the sums exchange sends 1.2 (W-1)/W
//!   bytes per parameter per rank instead of 1.25, 0.3x a bf16 gradient all-reduce's.
//!   Trit k of a byte b is (b / 3^k) % 3 - 1 for every b, the 13 bytes no rank sends too.

use crate::dist::config::Exchange;

/// Votes a byte of 2-bit codes holds.
pub(crate) const VOTES_PER_BYTE: usize = 4;
/// Results a byte of trits holds.
pub(crate) const TRITS_PER_BYTE: usize = 5;

/// Values a byte holds of what each rank all-gathers in `exchange` (both engines' buffers).
pub(crate) fn values_per_byte(exchange: Exchange) -> usize {
    match exchange {
        Exchange::Gather => VOTES_PER_BYTE,
        Exchange::Sums => TRITS_PER_BYTE,
    }
}

// MIRROR(vote-codes): src/cuda/lion.cu vote_code, vote_decode
/// 2 bits of a vote: 00 = 0, 01 = +1, 11 = -1.
#[inline(always)]
pub(crate) fn code(v: i8) -> u8 {
    (v as u8) & 3
}

#[inline(always)]
pub(crate) fn decode(bits: u8) -> i32 {
    ((bits << 6) as i8 >> 6) as i32
}

/// The 2-bit value of flattened element `e` in packed bytes.
#[inline(always)]
pub(crate) fn unpack(packed: *const u8, e: u64) -> i32 {
    // SAFETY (callers): `packed` holds at least e / 4 + 1 bytes.
    decode(unsafe { *packed.add((e / 4) as usize) } >> (2 * (e % 4)))
}

/// Packs bytes `bytes` of the 2-bit codes of `n` i8 values (-1, 0, 1) from `from` into `to`.
///
/// # Safety
/// `from` holds `n` values, `to` at least `bytes.end` bytes.
#[inline(always)]
pub(crate) unsafe fn pack_bytes(
    from: *const i8,
    to: *mut u8,
    bytes: std::ops::Range<usize>,
    n: usize,
) {
    if bytes.is_empty() {
        return;
    }
    // Whole bytes first, in a loop without bounds checks, then the last, partial one.
    let per = VOTES_PER_BYTE;
    let whole = bytes.start..bytes.end.min(n / per).max(bytes.start);
    let votes = std::slice::from_raw_parts(from.add(per * whole.start), per * whole.len());
    let out = std::slice::from_raw_parts_mut(to.add(whole.start), whole.len());
    for (byte, v) in out.iter_mut().zip(votes.chunks_exact(per)) {
        *byte = code(v[0]) | code(v[1]) << 2 | code(v[2]) << 4 | code(v[3]) << 6;
    }
    for b in whole.end..bytes.end {
        let mut byte = 0u8;
        for j in 0..per {
            let e = per * b + j;
            if e < n {
                byte |= code(*from.add(e)) << (2 * j);
            }
        }
        *to.add(b) = byte;
    }
}

// MIRROR(vote-trits): src/cuda/lion.cu trit_byte, vote_trits (their bytes and decoding)
/// The byte of the signs of five vote sums: the sum of (sign(s_i) + 1) 3^i.
#[inline(always)]
pub(crate) fn trit_byte(sums: &[i8; TRITS_PER_BYTE]) -> u8 {
    sums.iter()
        .rev()
        .fold(0u8, |byte, s| byte * 3 + (s.signum() + 1) as u8)
}

/// Trit `k` of `byte`: (byte / 3^k) % 3 - 1.
pub(crate) const fn trit(byte: u8, k: usize) -> i32 {
    let mut x = byte as u32;
    let mut d = 0;
    while d < k {
        x /= 3;
        d += 1;
    }
    (x % 3) as i32 - 1
}

/// Every byte's five results, as the f32 signs the apply pass multiplies.
static TRIT_SIGNS: [[f32; TRITS_PER_BYTE]; 256] = {
    let mut table = [[0f32; TRITS_PER_BYTE]; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < TRITS_PER_BYTE {
            table[b][k] = trit(b as u8, k) as f32;
            k += 1;
        }
        b += 1;
    }
    table
};

/// Packs bytes `bytes` of the trits of the signs of i8 sums from `from` into `to`.
///
/// # Safety
/// `from` holds 5 `bytes.end` values, `to` at least `bytes.end` bytes.
#[inline(always)]
pub(crate) unsafe fn pack_trits(from: *const i8, to: *mut u8, bytes: std::ops::Range<usize>) {
    let sums = std::slice::from_raw_parts(
        from.add(TRITS_PER_BYTE * bytes.start),
        TRITS_PER_BYTE * bytes.len(),
    );
    let out = std::slice::from_raw_parts_mut(to.add(bytes.start), bytes.len());
    for (byte, s) in out.iter_mut().zip(sums.chunks_exact(TRITS_PER_BYTE)) {
        *byte = trit_byte(s.try_into().unwrap());
    }
}

/// The results of the flattened elements from `e`, one per entry of `out`, from bytes of
/// trits.
///
/// # Safety
/// `packed` holds the bytes of elements `e..e + out.len()`.
#[inline(always)]
pub(crate) unsafe fn unpack_trits(packed: *const u8, e: u64, out: &mut [f32]) {
    let per = TRITS_PER_BYTE as u64;
    let one = |i: usize| {
        let at = e + i as u64;
        trit(*packed.add((at / per) as usize), (at % per) as usize) as f32
    };
    // Elements up to a byte's start one by one, then whole bytes from the table.
    let head = (((per - e % per) % per) as usize).min(out.len());
    for (i, o) in out[..head].iter_mut().enumerate() {
        *o = one(i);
    }
    let mut byte = packed.add(((e + head as u64) / per) as usize);
    let len = out.len();
    let mut whole = out[head..].chunks_exact_mut(TRITS_PER_BYTE);
    for o in &mut whole {
        o.copy_from_slice(&TRIT_SIGNS[*byte as usize]);
        byte = byte.add(1);
    }
    let whole_end = len - whole.into_remainder().len();
    for (i, o) in out.iter_mut().enumerate().skip(whole_end) {
        *o = one(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_five_results_pack_into_a_byte_that_unpacks_to_them() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..243u32 {
            let mut signs = [0i8; 5];
            let mut x = n;
            for s in &mut signs {
                *s = (x % 3) as i8 - 1;
                x /= 3;
            }
            // Sums of any size give their sign.
            let sums = signs.map(|s| s * 37);
            let byte = trit_byte(&sums);
            assert!(seen.insert(byte));
            assert_eq!(
                byte as u32, n,
                "the byte is the base-3 number of the signs + 1"
            );
            for (k, &s) in signs.iter().enumerate() {
                assert_eq!(trit(byte, k), s as i32);
            }
        }
        // The bytes no rank sends still decode to -1..=1.
        for b in 243..=255u8 {
            assert!((0..5).all(|k| (-1..=1).contains(&trit(b, k))));
        }
    }

    #[test]
    fn unpacking_from_any_element_and_length_reads_the_right_trits() {
        let packed: Vec<u8> = (0..40u32).map(|i| ((i * 97 + 13) % 256) as u8).collect();
        for e in 0..30u64 {
            for len in 0..=(200 - e as usize).min(60) {
                let mut out = vec![9.0f32; len];
                // SAFETY: 40 bytes hold 200 elements.
                unsafe { unpack_trits(packed.as_ptr(), e, &mut out) };
                for (i, &o) in out.iter().enumerate() {
                    let at = e as usize + i;
                    assert_eq!(o, trit(packed[at / 5], at % 5) as f32, "e={e} i={i}");
                }
            }
        }
    }

    #[test]
    fn two_bit_codes_read_back() {
        for v in [-1i8, 0, 1] {
            assert_eq!(decode(code(v)), v as i32);
        }
        let votes: Vec<i8> = (0..11).map(|i| (i % 3) as i8 - 1).collect();
        let mut packed = [0u8; 3];
        // SAFETY: 11 votes, 3 bytes.
        unsafe { pack_bytes(votes.as_ptr(), packed.as_mut_ptr(), 0..3, 11) };
        for (e, &v) in votes.iter().enumerate() {
            assert_eq!(unpack(packed.as_ptr(), e as u64), v as i32);
        }
    }
}
