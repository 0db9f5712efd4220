"""The time `lion_ffi.torch.Lion.step()` adds to liblion's own step (issue 11: a GPT-2 small
step within 1.1x of the kernel).

    LION_LIBRARY=path/to/liblion.so PYTHONPATH=bindings/python python3 benches/torch_step_time.py

- Python time: 148 CPU parameters of 8 elements each (so the step itself is a few us), the
  median of 2000 `step()` calls, beside the `lion_step` call alone with its pointer arrays
  made once, and the parts of the step that BENCHMARKS.md accounts for, each timed alone.
- With CUDA: GPT-2 small's 148 tensors (f32), timed with CUDA events around each call as
  benches/peers/gpu_bench.py times every row: `Lion.step()` against the same handle's
  `lion_step` alone, and their ratio (the issue's measure, each call from an idle card); then
  the same in a loop of 20 steps back to back, as in training.
"""
import inspect
import statistics
import sys
import time

import torch

from lion_ffi._lib import DTYPE_F32
from lion_ffi.torch import Lion, _Checked, _data_ptr, _quick

sys.path.insert(0, __file__.rsplit("/", 1)[0] + "/peers")
from shapes import gpt2_small  # noqa: E402


def python_time():
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(148)]
    for p in params:
        p.grad = torch.randn(8)
    opt = Lion(params, lr=1e-4, weight_decay=0.1, num_threads=1)

    def median_us(fn, n=2000):
        for _ in range(20):
            fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6

    step = median_us(opt.step)
    handle = opt._blocks[0].blocks[0].handle
    pp = handle.pointers([p.data_ptr() for p in params])
    gp = handle.pointers([p.grad.data_ptr() for p in params])
    call = median_us(lambda: handle.step(pp, gp))
    print(f"CPU, 148 x 8 elements, torch {torch.__version__}: Lion.step() {step:.1f} us, "
          f"lion_step alone {call:.1f} us, Python {step - call:.1f} us")
    # The parts BENCHMARKS.md accounts for, each timed alone: what one torch read of all 148
    # tensors costs on this machine, and the step's reads.
    grads = [p.grad for p in params]
    ptrs = list(map(_data_ptr, params))
    checked = _Checked(params, grads, ptrs)
    parts = {
        "reading the gradients": lambda: [p.grad for p in params],
        "the parameters' addresses": lambda: list(map(_data_ptr, params)),
        "the check (_Checked.holds, " + ("TensorGuards" if checked.guard is not None else "_quick") + ")":
            lambda: checked.holds(params, grads, ptrs),
        "_quick's reads (the check without TensorGuards)": lambda: _quick(params, grads),
        "the gradients' addresses": lambda: list(map(_data_ptr, grads)),
        "the step without its wrapper": lambda: inspect.unwrap(type(opt).step)(opt),
    }
    print("  " + "; ".join(f"{name} {median_us(fn):.1f} us" for name, fn in parts.items()))


def cuda_ratio():
    from gpu_bench import liblion_step_fn, timed
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in gpt2_small()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Lion(params, lr=1e-4, weight_decay=0.1)
    step = timed(opt.step)
    fn, handle = liblion_step_fn(params, [p.grad for p in params], DTYPE_F32)
    kernel = timed(fn)
    print(f"CUDA, GPT-2 small f32 ({torch.cuda.get_device_name()}): Lion.step() {step:.3f} ms, "
          f"lion_step alone {kernel:.3f} ms: {step / kernel:.3f}x")

    # The same in a loop of steps, each queued behind the one before it, as a trainer's step
    # queues behind its backward pass: the events time 20 steps back to back (median of 15),
    # where the host's work per step overlaps the card's. The goal above is timed from an idle
    # card; this tells what of the excess a training loop would see.
    def looped(call, n=20, reps=15):
        for _ in range(3):
            call()
        per_step = []
        for _ in range(reps):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                call()
            end.record()
            end.synchronize()
            per_step.append(start.elapsed_time(end) / n)
        return statistics.median(per_step)

    step_loop, kernel_loop = looped(opt.step), looped(fn)
    print(f"  in a loop of 20 steps: Lion.step() {step_loop:.3f} ms a step, lion_step alone {kernel_loop:.3f} ms: "
          f"{step_loop / kernel_loop:.3f}x")

    # The host's part of each, by the host's clock: each call made onto an idle card (the
    # device synchronized before it, outside the time, as the events above start), so that the
    # ratio's difference can be laid to the host's work or not; then in a loop of calls, each
    # queued behind the steps before it, as a trainer's step queues behind its backward pass.
    # On the H200 host of 2026-12-06 a probe timed Lion.step() at 154 us after a
    # synchronization and 95 us in a loop, and this script at 191 us after one (BENCHMARKS.md).
    def host_us(call, after_sync, n=300):
        times = []
        for i in range(n):
            waited = after_sync or i % 50 == 0  # in a loop: a wait every 50 calls, so the queue never fills
            if waited:
                torch.cuda.synchronize()
            t = time.perf_counter()
            call()
            if waited == after_sync:  # in a loop, not the calls right after a wait
                times.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        return statistics.median(times) * 1e6

    for after_sync, what in ((True, "from an idle card"), (False, "in a loop of calls")):
        print(f"  host time {what}: Lion.step() {host_us(opt.step, after_sync):.1f} us, "
              f"lion_step alone {host_us(fn, after_sync):.1f} us")

    # Whether the card adds to the host's wait: `lion_step` alone, timed as above, behind a
    # host spin as long as Lion.step()'s host time from an idle card. Where this ratio matches
    # Lion.step()'s, the excess is the host's time alone; where it is lower, the step's Python
    # costs the card more than its length (the twenty-seventh session's H100: a 145 us excess
    # against 90 us of host time).
    idle_us = host_us(opt.step, True)

    def after_spin():
        until = time.perf_counter() + idle_us * 1e-6
        while time.perf_counter() < until:
            pass
        fn()

    spun = timed(after_spin)
    print(f"  lion_step alone behind a host spin of {idle_us:.1f} us: {spun:.3f} ms, {spun / kernel:.3f}x "
          f"(Lion.step(): {step / kernel:.3f}x)")


if __name__ == "__main__":
    python_time()
    if torch.cuda.is_available():
        cuda_ratio()
