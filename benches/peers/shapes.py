"""Benchmark shapes shared by the GPU benchmark scripts."""


def gpt2_small():
    """The 148 tensor sizes of GPT-2 small (124,439,808 parameters)."""
    d, vocab, ctx = 768, 50257, 1024
    sizes = [vocab * d, ctx * d]
    for _ in range(12):
        sizes += [d, d, d * 3 * d, 3 * d, d * d, d, d, d, d * 4 * d, 4 * d, 4 * d * d, d]
    return sizes + [d, d]
