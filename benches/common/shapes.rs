//! Benchmark shapes shared by the CPU benchmark and the CUDA host-time example.

/// The 148 tensor sizes of GPT-2 small (124,439,808 parameters).
pub fn gpt2_small() -> Vec<u64> {
    let (d, vocab, ctx) = (768u64, 50257u64, 1024u64);
    let mut sizes = vec![vocab * d, ctx * d];
    for _ in 0..12 {
        sizes.extend([
            d,
            d,
            d * 3 * d,
            3 * d,
            d * d,
            d,
            d,
            d,
            d * 4 * d,
            4 * d,
            4 * d * d,
            d,
        ]);
    }
    sizes.extend([d, d]);
    sizes
}
