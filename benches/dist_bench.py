"""Distributed Lion on several GPUs of one host, one process per GPU (torch.distributed, NCCL):
the time of one optimizer step per mode, with what each rank sends and keeps.

    python3 benches/dist_bench.py [--world W] [--layouts gpt2,gpt2-xl] [--dtypes f32,bf16]

Modes, each on the same parameter layout (every tensor of GPT-2 small, 148 tensors, 124M
parameters; or GPT-2 XL, 580 tensors, 1.56B), gradients already computed:
- ddp:     the DDP baseline: one NCCL all-reduce of the gradients (one flat buffer, as DDP's
           buckets), a scale by 1/W folded into the step, then liblion's single-GPU step;
- sharded: liblion's sharded mode (reduce-scatter, the step on 1/W, all-gather);
- vote-gather, vote-sums: liblion's vote mode with each exchange;
- vote-q8: the vote mode with 8-bit momentum (`state_dtype` Q8; the exchange by W, as AUTO).
Every liblion optimizer borrows torch's communicator. Times: CUDA events around each step on
the current stream, median of `--steps` after `--warmup`, the slowest rank's median. Bytes per
rank per step are those each collective sends in a ring (NCCL's algorithm for these sizes);
state is the optimizer's per GPU (momentum; sharded mode also holds flat copies of gradients
and parameters, listed apart), as computed from the layout, beside the device memory each
optimizer took (`torch.cuda.mem_get_info` before and after its creation; liblion allocates
outside torch's allocator). The gradients are one flat buffer: sharded mode reads it in place
where the layout's slices tile it exactly (GPT-2 small at W = 2, 4, 8; GPT-2 XL at W = 2, 4)
and copies it otherwise (GPT-2 XL at W = 8), as it always copies per-tensor gradients
(DistributedLion's). Each mode's step count is checked after its timing (a step the ranks
skipped would look fast). Rows are printed by rank 0 as they are measured. Set NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 to
force NCCL onto sockets (a stand-in for nodes joined by Ethernet). NCCL_NVLS_ENABLE stays 0.
Prints one markdown table row per (layout, dtype, mode).
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


def gpt2_shapes(n_layer, d, vocab=50257, ctx=1024):
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


LAYOUTS = {"gpt2": gpt2_shapes(12, 768), "gpt2-xl": gpt2_shapes(48, 1600)}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


HEADER = ("| layout | dtype | mode | ms per step | bytes sent per param per rank | state per GPU (MiB) | "
          "collective buffers (MiB) | device memory taken (MiB) |\n|---|---|---|---|---|---|---|---|")


def format_row(row):
    layout, dname, mode, ms, sent, state, extra, took, counted = row
    steps = "" if counted else " (**steps skipped**: the step count is short)"
    return f"| {layout} | {dname} | {mode} | {ms:.3f}{steps} | {sent:.3f} | {state:.0f} | {extra:.0f} | {took:.0f} |"


def timed(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def rank_main(rank, world, port, args, out):
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank), timeout=datetime.timedelta(minutes=3))
    from lion_ffi._lib import DEVICE_CUDA, DTYPE_BF16, DTYPE_F32, DTYPE_Q8, Handle, lib, make_config
    from lion_ffi.dist import NcclGroup
    comm = dist.group.WORLD._get_backend(torch.device("cuda", rank))
    dist.all_reduce(torch.zeros(1, device="cuda"))
    comm_ptr = comm._comm_ptr()
    rows = []
    for layout in args.layouts.split(","):
        shapes = LAYOUTS[layout]
        n = sum(torch.Size(s).numel() for s in shapes)
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            code = DTYPE_F32 if dtype == torch.float32 else DTYPE_BF16
            esize = torch.tensor([], dtype=dtype).element_size()
            g = torch.Generator(device="cuda").manual_seed(rank)
            # Parameters as separate tensors (as a model's), gradients in one flat buffer (as DDP's).
            params = [torch.randn(s, device="cuda", generator=g).to(dtype) for s in shapes]
            flat = torch.randn(n, device="cuda", generator=g).to(dtype) * 1e-3
            grads, at = [], 0
            for p in params:
                grads.append(flat[at:at + p.numel()])
                at += p.numel()
            descs = []
            for _ in params:
                d = lib.lion_tensor_desc(0, code)
                descs.append(d)
            for d, p in zip(descs, params):
                d.numel = p.numel()
            config = make_config(1e-4, (0.9, 0.99), 0.1, device=DEVICE_CUDA, device_index=rank, state_dtype=code)
            q8_config = make_config(1e-4, (0.9, 0.99), 0.1, device=DEVICE_CUDA, device_index=rank,
                                    state_dtype=DTYPE_Q8)
            # 8-bit momentum's bytes (docs/ABI.md): a code each and an f32 scale per 256, or f32
            # for a tensor under 4096 elements.
            q8_state = sum(p.numel() + 4 * -(-p.numel() // 256) if p.numel() >= 4096 else 4 * p.numel()
                           for p in params)
            p_ptrs = [p.data_ptr() for p in params]
            g_ptrs = [x.data_ptr() for x in grads]
            stream = torch.cuda.current_stream().cuda_stream
            modes, took = {}, {}

            def made(make):
                """`make()`, and the device memory it took (MiB)."""
                torch.cuda.synchronize()
                free = torch.cuda.mem_get_info()[0]
                h = make()
                torch.cuda.synchronize()
                return h, (free - torch.cuda.mem_get_info()[0]) / 2**20

            single, took["ddp"] = made(lambda: Handle(config, descs))
            pp, gp = single.pointers(p_ptrs), single.pointers(g_ptrs)
            options = lib.lion_step_options_default()
            options.grad_scale = 1.0 / world

            def ddp():
                dist.all_reduce(flat)
                single.step(pp, gp, stream=stream, options=options)
            modes["ddp"] = (ddp, 2 * (world - 1) / world * esize, n * esize, 0)
            handles = {}
            sums_by_w = 5 <= world <= 127  # what AUTO picks
            for mode, exchange in [("sharded", "auto"), ("vote-gather", "gather"), ("vote-sums", "sums"),
                                   ("vote-q8", "auto")]:
                h, took[mode] = made(lambda: Handle(q8_config if mode == "vote-q8" else config, descs,
                                                    NcclGroup(mode.split("-")[0], rank, world, comm=comm_ptr,
                                                              vote_exchange=exchange)))
                handles[mode] = (h, h.pointers(p_ptrs), h.pointers(g_ptrs))
                del h

                def step(mode=mode):
                    h, a, b = handles[mode]
                    h.step(a, b, stream=stream)
                if mode == "sharded":
                    sent = (world - 1) / world * 2 * esize
                    state = n * esize / world
                    extra = n * esize * 2 * (1 + 1 / world)  # flat gradients and parameters, in and out
                elif mode == "vote-gather" or (mode == "vote-q8" and not sums_by_w):
                    sent, state, extra = (world - 1) / 4, n * esize, n / 4 * (1 + world)
                else:
                    sent, state, extra = 1.2 * (world - 1) / world, n * esize, (n + n / 5) * (1 + 1 / world)
                if mode == "vote-q8":
                    state = q8_state
                modes[mode] = (step, sent, state, extra)
            for mode, (fn, sent, state, extra) in modes.items():
                if args.modes and mode not in args.modes.split(","):
                    continue
                if args.verbose:
                    print(f"rank {rank}: {layout} {dname} {mode}", flush=True)
                ms = timed(fn, args.warmup, args.steps)
                worst = torch.tensor([ms], device="cuda")
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                counted = (single if mode == "ddp" else handles[mode][0]).step_count() == args.warmup + args.steps
                row = (layout, dname, mode, worst.item(), sent, state / 2**20, extra / 2**20, took[mode], counted)
                rows.append(row)
                if rank == 0:
                    print(format_row(row), flush=True)
            del handles, single, modes
            torch.cuda.synchronize()
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=torch.cuda.device_count())
    ap.add_argument("--layouts", default="gpt2,gpt2-xl")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default="", help="a comma-separated subset of ddp,sharded,vote-gather,vote-sums,vote-q8")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/dist_bench_{os.getpid()}.pt"
    mp.spawn(rank_main, args=(args.world, port, args, out), nprocs=args.world, join=True)
    rows = torch.load(out)
    net = "sockets" if os.environ.get("NCCL_P2P_DISABLE") == "1" else "NVLink/default"
    print(f"W={args.world} ({torch.cuda.get_device_name(0)}, {net}, NCCL {torch.cuda.nccl.version()})")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    if not all(row[-1] for row in rows):
        sys.exit(1)

if __name__ == "__main__":
    main()
