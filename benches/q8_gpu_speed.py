"""The CUDA engine's step with f32, bf16 and 8-bit momentum, beside a copy ceiling measured in
the same run (torch's device-to-device copy of the same bytes, median of 30).

    LION_LIBRARY=.../liblion.so python3 benches/q8_gpu_speed.py
    LION_BENCH_STATES=q8 ...   (only the momentum dtypes named, comma-separated)

Cases: flat 2^28 and GPT-2 small's 148 tensors, f32 parameters and gradients. Bytes per element:
p read and written, g read (12), plus the momentum read and written: 8 (f32), 4 (bf16), or 2
for q8 codes and 8/256 for their f32 scales (tensors under 4096 elements keep f32 momentum:
counted as such). The floor is those bytes at the copy's speed.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_bench import LAYOUTS, timed  # noqa: E402
from lion_ffi._lib import DEVICE_CUDA, DTYPE_BF16, DTYPE_F32, DTYPE_Q8, Handle, lib, make_config  # noqa: E402


def momentum_bytes(numel, state):
    if state == DTYPE_F32 or (state == DTYPE_Q8 and numel < 4096):
        return 8 * numel
    if state == DTYPE_BF16:
        return 4 * numel
    return 2 * numel + 8 * ((numel + 255) // 256)


def main():
    cases = {"flat 2^28": [(1 << 28,)], "GPT-2 small": LAYOUTS["gpt2"]}
    wanted = os.environ.get("LION_BENCH_STATES", "f32,bf16,q8").split(",")
    states = [(n, d) for n, d in [("f32", DTYPE_F32), ("bf16", DTYPE_BF16), ("q8", DTYPE_Q8)] if n in wanted]
    print(f"{torch.cuda.get_device_name(0)}, f32 p and g; ms are medians of 30 steps")
    print("| case | momentum | bytes moved | copy floor ms | liblion ms | of ceiling |")
    print("|---|---|---|---|---|---|")
    for name, shapes in cases.items():
        params = [torch.randn(s, device="cuda") for s in shapes]
        grads = [torch.randn(s, device="cuda") * 1e-3 for s in shapes]
        numels = [p.numel() for p in params]
        for state_name, state in states:
            moved = sum(12 * n + momentum_bytes(n, state) for n in numels)
            src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            copy_ms = timed(lambda: dst.copy_(src), 5, 30)  # reads and writes moved/2 each
            del src, dst
            descs = [lib.lion_tensor_desc(n, DTYPE_F32) for n in numels]
            config = make_config(1e-4, (0.9, 0.99), 0.1, device=DEVICE_CUDA, state_dtype=state)
            h = Handle(config, descs)
            pp = h.pointers([p.data_ptr() for p in params])
            gp = h.pointers([g.data_ptr() for g in grads])
            stream = torch.cuda.current_stream().cuda_stream
            ms = timed(lambda: h.step(pp, gp, stream=stream), 5, 30)
            print(f"| {name} | {state_name} | {moved / 2**30:.2f} GiB | {copy_ms:.3f} | {ms:.3f} | "
                  f"{copy_ms / ms:.0%} |", flush=True)
            del h


if __name__ == "__main__":
    main()
