"""GPU benchmark: liblion's CUDA step beside its peers and the copy ceiling, in one run.

    LION_LIBRARY=path/to/liblion.so python3 benches/peers/gpu_bench.py

Times with CUDA events (median of 30 steps after 5 warm-up steps) on the current stream:
  - the ceiling: a device-to-device copy (bytes read + written) and the time Lion's bytes take at it
  - liblion (ctypes, one call per step for all tensors)
  - lion-pytorch 0.2.5: Triton kernel and the plain torch (foreach-style) path
  - DeepSpeed FusedLion (multi-tensor CUDA kernel, JIT-built)
optax.lion under jit runs in its own process (benches/peers/optax_bench.py), since JAX and
torch would share the card's memory. Also prints the host time of one lion_step call.
"""
import ctypes
import os
import statistics
import sys
import time

import torch

REPS, WARMUP = 30, 5


def gpt2_small():
    d, vocab, ctx = 768, 50257, 1024
    sizes = [vocab * d, ctx * d]
    for _ in range(12):
        sizes += [d, d, d * 3 * d, 3 * d, d * d, d, d, d, d * 4 * d, 4 * d, 4 * d * d, d]
    return sizes + [d, d]


def timed(fn):
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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


class LibLion:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.lion_last_error.restype = ctypes.c_char_p

    def check(self, status, what):
        if status != 0:
            raise RuntimeError(f"{what}: {status}: {self.lib.lion_last_error().decode()}")


class LionConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("lr", ctypes.c_float), ("beta1", ctypes.c_float),
                ("beta2", ctypes.c_float), ("weight_decay", ctypes.c_float), ("decay_mode", ctypes.c_uint32),
                ("cautious_factor", ctypes.c_float), ("cautious_weight_decay", ctypes.c_bool),
                ("device", ctypes.c_uint32), ("device_index", ctypes.c_int32), ("state_dtype", ctypes.c_uint32),
                ("stochastic_rounding", ctypes.c_bool), ("seed", ctypes.c_uint64), ("num_threads", ctypes.c_uint32)]


class LionTensorDesc(ctypes.Structure):
    _fields_ = [("numel", ctypes.c_uint64), ("param_dtype", ctypes.c_uint32), ("grad_dtype", ctypes.c_uint32),
                ("lr_scale", ctypes.c_float), ("weight_decay_scale", ctypes.c_float)]


def liblion_step_fn(lion, params, grads, dtype_code):
    lib = lion.lib
    lib.lion_config_default.restype = LionConfig
    cfg = lib.lion_config_default()
    cfg.lr, cfg.weight_decay, cfg.device, cfg.state_dtype = 1e-4, 0.1, 1, dtype_code
    descs = (LionTensorDesc * len(params))()
    for i, p in enumerate(params):
        descs[i] = LionTensorDesc(p.numel(), dtype_code, dtype_code, 1.0, 1.0)
    opt = ctypes.c_void_p()
    lion.check(lib.lion_create(ctypes.byref(cfg), descs, len(params), ctypes.byref(opt)), "lion_create")
    P = (ctypes.c_void_p * len(params))(*[p.data_ptr() for p in params])
    G = (ctypes.c_void_p * len(grads))(*[g.data_ptr() for g in grads])
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    step = lib.lion_step
    step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    n = len(params)

    def fn():
        status = step(opt, P, G, n, stream)
        if status != 0:
            lion.check(status, "lion_step")

    return fn, opt


def main():
    lib_path = os.environ.get("LION_LIBRARY", "liblion.so")
    lion = LibLion(lib_path)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (bytes read + written)")
    cases = [("flat 2^28, f32", [1 << 28], torch.float32, 0), ("GPT-2 small, 148 tensors, f32", gpt2_small(), torch.float32, 0),
             ("flat 2^28, bf16 p, g, m", [1 << 28], torch.bfloat16, 2), ("GPT-2 small, bf16", gpt2_small(), torch.bfloat16, 2)]
    rows = []
    for name, sizes, dtype, code in cases:
        params = [torch.randn(n, device="cuda", dtype=dtype) for n in sizes]
        grads = [torch.randn(n, device="cuda", dtype=dtype) for n in sizes]
        nbytes = sum(sizes) * (20 if dtype == torch.float32 else 10)
        floor = nbytes / bw * 1e3
        row = {"case": name, "floor": floor, "bytes": nbytes}
        fn, opt = liblion_step_fn(lion, params, grads, code)
        row["liblion"] = timed(fn)
        if len(sizes) > 1:  # host time of one call, queue not full
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                fn()
            row["host_us"] = (time.perf_counter() - t) / 20 * 1e6
            torch.cuda.synchronize()
        lion.lib.lion_destroy(opt)
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
    print("\n| case | copy floor ms | liblion ms | GB/s | of ceiling | Triton | lion-pytorch torch | DeepSpeed | host us/call |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda k: f"{r[k]:.2f}" if k in r else "-"
        print(f"| {r['case']} | {r['floor']:.2f} | {r['liblion']:.3f} | {r['bytes'] / r['liblion'] / 1e6:.0f} | "
              f"{r['floor'] / r['liblion']:.0%} | {f('triton')} | {f('lion-pytorch torch')} | {f('deepspeed')} | "
              f"{r['host_us']:.1f} |" if "host_us" in r else
              f"| {r['case']} | {r['floor']:.2f} | {r['liblion']:.3f} | {r['bytes'] / r['liblion'] / 1e6:.0f} | "
              f"{r['floor'] / r['liblion']:.0%} | {f('triton')} | {f('lion-pytorch torch')} | {f('deepspeed')} | - |")


if __name__ == "__main__":
    main()
