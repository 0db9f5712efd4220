"""CPU peers of liblion, timed the way benches/cpu_step.rs times us (median of 15 steps):
DeepSpeed's AVX CPU Lion and lion-pytorch's foreach Lion on torch, and a same-bytes
torch loop, on flat f32 buffers. Run on the machine whose numbers go into BENCHMARKS.md:

    python3 benches/peers/cpu_peers.py [log2 sizes...]     (default: 25 26)
"""
import os
import statistics
import sys
import time

import torch


def median_ms(fn, reps=15):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def row(name, n, ms):
    gb = 20 * n / 1e9
    print(f"| {name} | 2^{n.bit_length() - 1} f32 | {ms:.2f} | {gb / ms * 1e3:.0f} |", flush=True)


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [25, 26]
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    print(f"\nCPU peers, {threads} threads, torch {torch.__version__}")
    print("| peer | size | ms/step | GB/s |")
    print("|---|---|---|---|")
    for log2 in sizes:
        n = 1 << log2
        p = torch.randn(n)
        p.grad = torch.randn(n)
        try:
            from deepspeed.ops.lion import DeepSpeedCPULion

            opt = DeepSpeedCPULion([p], lr=1e-4, weight_decay=0.1)
            row("DeepSpeed CPU Lion", n, median_ms(opt.step))
            del opt
        except Exception as e:  # a peer that cannot run here is reported, not hidden
            print(f"| DeepSpeed CPU Lion | 2^{log2} | unavailable: {type(e).__name__}: {e} | |")
        try:
            from lion_pytorch import Lion

            opt = Lion([p], lr=1e-4, weight_decay=0.1, use_triton=False)
            row("lion-pytorch 0.2.5 (torch ops)", n, median_ms(opt.step))
            del opt
        except Exception as e:
            print(f"| lion-pytorch | 2^{log2} | unavailable: {type(e).__name__}: {e} | |")
        m = torch.zeros(n)
        g = p.grad

        def same_bytes():  # reads p, g, m; writes p, m
            torch.add(p, g, alpha=-1e-4, out=p)
            torch.add(m, g, alpha=0.01, out=m)

        row("torch same-bytes loop (2 passes)", n, median_ms(same_bytes))


if __name__ == "__main__":
    main()
