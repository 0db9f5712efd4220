"""GPU benchmark: liblion's CUDA step beside its peers and the copy ceiling, in one run.

    LION_LIBRARY=path/to/liblion.so PYTHONPATH=bindings/python python3 benches/peers/gpu_bench.py

Times with CUDA events (median of 30 steps after 5 warm-up steps) on the current stream, each
step from an idle card, so that its time includes its launch's host time (the history's method);
with LION_BENCH_LAUNCH=hidden, each step is enqueued behind a 0.2 ms spin of the card
(torch.cuda._sleep), so that a launch taking less host time than that is not counted (nvbench's
and triton.testing.do_bench's way: the card's time alone, the host time in its own column):
  - the ceiling: a device-to-device copy (bytes read + written) and the time Lion's bytes take at it
  - liblion (through lion_ffi's ctypes handle, one call per step for all tensors)
  - lion-pytorch 0.2.5: Triton kernel and the plain torch (foreach-style) path
  - DeepSpeed FusedLion (multi-tensor CUDA kernel, JIT-built)
optax.lion under jit runs in its own process (benches/peers/optax_bench.py), since JAX and
torch would share the card's memory. Also prints the host time of one lion_step call.
"""
import os
import statistics
import sys
import time

import torch

from shapes import gpt2_small

REPS, WARMUP = 30, 5
HIDE_LAUNCH = os.environ.get("LION_BENCH_LAUNCH") == "hidden"
SPIN_CYCLES = 400_000  # 0.2 ms at 2 GHz: longer than liblion's or one kernel's launch


def timed(fn):
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if HIDE_LAUNCH:
            torch.cuda._sleep(SPIN_CYCLES)  # the card is busy while the host enqueues below
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth():
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)  # bytes/s, read + write


def same_bytes_copy_ms(nbytes):
    """A device-to-device copy moving `nbytes` (read + written) in one kernel: the ceiling at
    a row's own size, beside the big copy's bandwidth (`copy_bandwidth`). A 0.3 ms step and
    a 1.3 ms one pay the same fixed costs of a launch's start and tail, which a copy of their
    own size pays too."""
    src = torch.ones(nbytes // 8, device="cuda")  # f32: nbytes / 2 read, nbytes / 2 written
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    del src, dst
    return ms


def liblion_step_fn(params, grads, dtype_code):
    """One liblion CUDA optimizer over `params`, stepped on torch's current stream."""
    from lion_ffi._lib import DEVICE_CUDA, Handle, lib, make_config

    descs = [lib.lion_tensor_desc(p.numel(), dtype_code) for p in params]
    handle = Handle(make_config(1e-4, (0.9, 0.99), 0.1, device=DEVICE_CUDA, state_dtype=dtype_code), descs)
    param_ptrs = handle.pointers([p.data_ptr() for p in params])
    grad_ptrs = handle.pointers([g.data_ptr() for g in grads])
    stream = torch.cuda.current_stream().cuda_stream
    return lambda: handle.step(param_ptrs, grad_ptrs, stream=stream), handle


def main():
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (bytes read + written)")
    print("timing: " + ("launch hidden behind a spin of the card (LION_BENCH_LAUNCH=hidden)" if HIDE_LAUNCH
                        else "each step from an idle card, its launch included"))
    cases = [("flat 2^28, f32", [1 << 28], torch.float32, 0), ("GPT-2 small, 148 tensors, f32", gpt2_small(), torch.float32, 0),
             ("flat 2^28, bf16 p, g, m", [1 << 28], torch.bfloat16, 2), ("GPT-2 small, bf16", gpt2_small(), torch.bfloat16, 2)]
    rows = []
    for name, sizes, dtype, code in cases:
        params = [torch.randn(n, device="cuda", dtype=dtype) for n in sizes]
        grads = [torch.randn(n, device="cuda", dtype=dtype) for n in sizes]
        nbytes = sum(sizes) * (20 if dtype == torch.float32 else 10)
        floor = nbytes / bw * 1e3
        row = {"case": name, "floor": floor, "bytes": nbytes, "same_bytes_copy": same_bytes_copy_ms(nbytes)}
        fn, handle = liblion_step_fn(params, grads, code)
        row["liblion"] = timed(fn)
        if len(sizes) > 1:  # host time of one call, queue not full
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                fn()
            row["host_us"] = (time.perf_counter() - t) / 20 * 1e6
            torch.cuda.synchronize()
        del fn, handle
        for p, g in zip(params, grads):
            p.grad = g
        if os.environ.get("LION_BENCH_ONLY_OURS") == "1":
            rows.append(row)
            print(row, flush=True)
            continue
        try:
            from lion_pytorch import Lion
            for triton in (True, False):
                if triton and len(sizes) > 1 and dtype == torch.bfloat16:
                    continue
                o = Lion(params, lr=1e-4, weight_decay=0.1, use_triton=triton)
                row["triton" if triton else "lion-pytorch torch"] = timed(o.step)
                del o
        except Exception as e:
            print(f"lion-pytorch unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        try:
            from deepspeed.ops.lion import FusedLion
            o = FusedLion(params, lr=1e-4, weight_decay=0.1)
            row["deepspeed"] = timed(o.step)
            del o
        except Exception as e:
            print(f"DeepSpeed FusedLion unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        rows.append(row)
        del params, grads
        torch.cuda.empty_cache()
        print(row, flush=True)
    # "of ceiling": of the big copy's bandwidth (the goals' ceiling); "of it": of the same-bytes
    # copy, one flat copy moving the row's bytes, timed as the step is (for GPT-2 small one copy,
    # not 148: the step's per-tensor tails are not in it).
    print("\n| case | copy floor ms | liblion ms | GB/s | of ceiling | same-bytes copy ms | of it | Triton "
          "| lion-pytorch torch | DeepSpeed | host us/call |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda k: f"{r[k]:.2f}" if k in r else "-"
        host = f"{r['host_us']:.1f}" if "host_us" in r else "-"
        print(f"| {r['case']} | {r['floor']:.2f} | {r['liblion']:.3f} | {r['bytes'] / r['liblion'] / 1e6:.0f} | "
              f"{r['floor'] / r['liblion']:.0%} | {r['same_bytes_copy']:.3f} | {r['same_bytes_copy'] / r['liblion']:.0%} | "
              f"{f('triton')} | {f('lion-pytorch torch')} | {f('deepspeed')} | {host} |")


if __name__ == "__main__":
    main()
