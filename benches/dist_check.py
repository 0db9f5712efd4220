"""Correctness of the CUDA distributed modes on W GPUs of one host (one process per GPU, NCCL
through torch.distributed, liblion borrowing torch's communicator): issue 14's 2-GPU checks and
issue 13's 4/8-GPU ones.

    python3 benches/dist_check.py [--world W] [--steps 50] [--layout gpt2|small]

- sharded: every rank's parameters after each step are bit-identical to one GPU stepping on the
  mean gradient (liblion's single-GPU engine on rank 0, on the sum times 1/W). The gradients
  are multiples of 2^-10 below 2^-3 in magnitude, so that their sum over up to 8 ranks is exact
  in f32 and bf16 whatever order NCCL adds them in (the mode itself is order-free only with such
  sums; with others it is bit-identical to the order the transport adds in).
- vote: every rank's parameters are identical (compared through an all-gather of their bytes)
  and equal to a reference of the majority vote computed on rank 0 from every rank's
  gradients with torch, one f32 operation at a time (f32 parameters, gradients and momentum).
Both exchanges of the vote mode are checked. Prints one line per check and exits non-zero on
a failure. NCCL_NVLS_ENABLE stays 0.
"""
import argparse
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def shapes_of(layout):
    from dist_bench import LAYOUTS
    if layout == "small":
        return [(37,), (1000,), (5, 7), (4099,), (64,), (2,)]
    return LAYOUTS[layout]


def grads_of(shapes, rank, step, dtype):
    """Rank `rank`'s gradients at `step`: k / 1024 for integers |k| < 128 (f32) or < 32 (bf16),
    so that every partial sum over up to 8 ranks is exact in the dtype."""
    g = torch.Generator(device="cuda").manual_seed(1_000_003 * step + rank)
    k = 127 if dtype == torch.float32 else 31
    return [(torch.randint(-k, k + 1, s, device="cuda", generator=g).float() / 1024).to(dtype) for s in shapes]


def params_of(shapes, dtype):
    g = torch.Generator(device="cuda").manual_seed(7)
    return [torch.randn(s, device="cuda", generator=g).to(dtype) for s in shapes]


def handle_for(shapes, dtype, rank, group=None, lr=1e-3, wd=0.1):
    from lion_ffi._lib import DEVICE_CUDA, DTYPE_BF16, DTYPE_F32, Handle, lib, make_config
    code = DTYPE_F32 if dtype == torch.float32 else DTYPE_BF16
    descs = []
    for s in shapes:
        descs.append(lib.lion_tensor_desc(torch.Size(s).numel(), code))
    config = make_config(lr, (0.9, 0.99), wd, device=DEVICE_CUDA, device_index=rank, state_dtype=code,
                         stochastic_rounding=dtype == torch.bfloat16, seed=3)
    return Handle(config, descs, group)


def step(h, params, grads, grad_scale=None):
    from lion_ffi._lib import lib
    options = None
    if grad_scale is not None:
        options = lib.lion_step_options_default()
        options.grad_scale = grad_scale
    h.step([p.data_ptr() for p in params], [g.data_ptr() for g in grads],
           stream=torch.cuda.current_stream().cuda_stream, options=options)


def all_same(params):
    """Whether every rank holds these parameters' bytes."""
    flat = torch.cat([p.detach().reshape(-1).view(torch.uint8) for p in params])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, flat) for g in gathered)


def check_sharded(rank, world, shapes, dtype, steps, comm):
    from lion_ffi.dist import NcclGroup
    h = handle_for(shapes, dtype, rank, NcclGroup("sharded", rank, world, comm=comm))
    params = params_of(shapes, dtype)
    ref = handle_for(shapes, dtype, rank) if rank == 0 else None
    ref_params = params_of(shapes, dtype) if rank == 0 else None
    first_bad = None
    for s in range(steps):
        step(h, params, grads_of(shapes, rank, s, dtype))
        if rank == 0 and first_bad is None:
            every = [grads_of(shapes, r, s, dtype) for r in range(world)]
            total = [sum(g[i].float() for g in every).to(dtype) for i in range(len(shapes))]
            step(ref, ref_params, total, grad_scale=float(torch.tensor(1.0 / world, dtype=torch.float32)))
            torch.cuda.synchronize()
            if not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(params, ref_params)):
                print(f"sharded {dtype}: rank 0 differs from one GPU at step {s}", flush=True)
                first_bad = s  # stop comparing, not stepping: every rank stays in the same collectives
    same = all_same(params)  # collective: every rank, whatever rank 0 found
    blob = h.save()  # collective: the single-process checkpoint
    return first_bad is None and same and (rank != 0 or blob == ref.save())


def vote_reference(shapes, world, steps, lr=1e-3, wd=0.1, b1=0.9, b2=0.99):
    """The majority vote in torch, f32, one operation at a time (liblion's order)."""
    params = params_of(shapes, torch.float32)
    momenta = [[torch.zeros(s, device="cuda") for s in shapes] for _ in range(world)]
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731 (the C struct's float)
    b1, b2, lr, wd = f32(b1), f32(b2), f32(lr), f32(wd)
    # liblion's coefficients: computed in f64 from the f32 values, rounded once (numerics::update).
    omb1, omb2, keep = f32(1.0 - b1), f32(1.0 - b2), f32(1.0 - lr * wd)
    lr32 = torch.tensor(lr, dtype=torch.float32).cuda()
    for s in range(steps):
        grads = [grads_of(shapes, r, s, torch.float32) for r in range(world)]
        for t in range(len(shapes)):
            votes = torch.zeros(shapes[t], device="cuda", dtype=torch.int32)
            for r in range(world):
                m, g = momenta[r][t], grads[r][t]
                c = (m * torch.tensor(b1, device="cuda")) + (g * torch.tensor(omb1, device="cuda"))
                votes += torch.sign(c).to(torch.int32)
                momenta[r][t] = (m * torch.tensor(b2, device="cuda")) + (g * torch.tensor(omb2, device="cuda"))
            u = torch.sign(votes).float()
            params[t] = (params[t] * torch.tensor(keep, device="cuda")) - (lr32 * u)
    return params


def check_vote(rank, world, shapes, steps, comm, exchange):
    from lion_ffi.dist import NcclGroup
    h = handle_for(shapes, torch.float32, rank, NcclGroup("vote", rank, world, comm=comm, vote_exchange=exchange))
    params = params_of(shapes, torch.float32)
    for s in range(steps):
        step(h, params, grads_of(shapes, rank, s, torch.float32))
    ok = all_same(params)
    if rank == 0:
        want = vote_reference(shapes, world, steps)
        torch.cuda.synchronize()
        for t, (a, b) in enumerate(zip(params, want)):
            if not torch.equal(a, b):
                bad = (a != b).sum().item()
                print(f"vote {exchange}: tensor {t} differs from the reference in {bad} elements", flush=True)
                ok = False
                break
    return ok


def rank_main(rank, world, port, args, out):
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank), timeout=datetime.timedelta(minutes=3))
    dist.all_reduce(torch.zeros(1, device="cuda"))
    comm = dist.group.WORLD._get_backend(torch.device("cuda", rank))._comm_ptr()
    shapes = shapes_of(args.layout)
    results = []

    def record(name, ok):
        results.append((name, ok))
        if rank == 0:  # this rank's view now; the verdict over every rank is written at the end
            print(f"rank 0: {'ok' if ok else 'FAILED'}: {name} (W={world}, {args.layout})", flush=True)

    for dtype in (torch.float32, torch.bfloat16):
        record(f"sharded {dtype}", check_sharded(rank, world, shapes, dtype, args.steps, comm))
    vote_steps = min(args.steps, 10)  # the torch reference is slow on GPT-2's 148 tensors
    for exchange in ("gather", "sums"):
        record(f"vote {exchange}", check_vote(rank, world, shapes, vote_steps, comm, exchange))
    verdicts = torch.tensor([ok for _, ok in results], device="cuda", dtype=torch.int32)
    dist.all_reduce(verdicts, op=dist.ReduceOp.MIN)
    if rank == 0:
        with open(out, "w") as f:
            for (name, _), ok in zip(results, verdicts.tolist()):
                f.write(f"{'ok' if ok else 'FAILED'}: {name} (W={world}, {args.layout})\n")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=torch.cuda.device_count())
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layout", default="gpt2")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/dist_check_{os.getpid()}.txt"
    mp.spawn(rank_main, args=(args.world, port, args, out), nprocs=args.world, join=True)
    text = open(out).read()
    print(text, end="")
    sys.exit(1 if "FAILED" in text else 0)


if __name__ == "__main__":
    main()
