"""Does distributed Lion train as one GPU does? (issue 14's short real training, issue 13's
convergence run.) GPT-2 small from random init on synthetic tokens (benches/synthetic_gpt2.py),
the global batch held fixed at 16 rows of 256 tokens a step:

- `single`: one GPU, `lion_ffi.torch.Lion`, the whole batch;
- `sharded`, `vote`: W processes, one GPU each, `lion_ffi.torch.DistributedLion` in that mode
  (the model not wrapped in DDP), rank r on rows [r * 16/W, (r + 1) * 16/W) of the same batches;
  each mode at each W of `--world` (a list: issue 13 asks for W = 4 and 8 side by side).

    python3 benches/dist_train.py --world 4,8 [--steps 300] [--modes single,sharded,vote] [--out DIR]

Dropout is off (GPT-2's default 0.1 would draw other masks for other splits of the batch), so
sharded, which steps on the mean gradient, should follow `single` closely (not bit for bit:
the batch's split changes the order of the gradient sums in the backward pass). Vote is
Distributed Lion: each rank's momentum of its own gradients and a majority vote of their signs;
its paper reports it within noise of global Lion. A distributed run's loss is the mean of its
ranks'. At the end every rank's parameters are compared with rank 0's (both modes keep them
identical).

Writes DIR/dist_train_w{W,...}.csv (step, loss per run; rewritten after each run, so that a run
that fails loses nothing of the others) and DIR/dist_train_w{W,...}.png (matplotlib), and prints
each mode's mean loss over the last 20 steps, its difference from `single`'s, and its
milliseconds a step after the first 10 (with a wait for the loss every step). A mode that
fails is reported and the others go on; the exit status is then 1. NCCL_NVLS_ENABLE stays 0.
"""
import argparse
import datetime
import gc
import os
import socket
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
from synthetic_gpt2 import BATCH, batches, final_loss, model_and_groups, plot_curves, train_step, write_curves  # noqa: E402,E501

WARMUP = 10  # steps left out of the time a step


def run_single(data, steps, lr):
    from lion_ffi.torch import Lion
    model, groups = model_and_groups("cuda", dropout=0.0)
    opt = Lion(groups, lr=lr, betas=(0.9, 0.99))
    losses = []
    for step in range(steps):
        if step == WARMUP:
            start = time.perf_counter()
        losses.append(train_step(model, opt, data[step].cuda(), step, steps, lr).item())
        if step % 50 == 0 or step == steps - 1:
            print(f"single step {step}: {losses[-1]:.4f}", flush=True)
    return losses, (time.perf_counter() - start) * 1e3 / (steps - WARMUP)


def _rank(rank, world, port, mode, steps, lr, data_path, out):
    import torch.distributed as dist
    from lion_ffi.torch import DistributedLion
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank), timeout=datetime.timedelta(minutes=3))
    try:
        data = torch.load(data_path)
        rows = BATCH // world
        model, groups = model_and_groups("cuda", dropout=0.0)
        opt = DistributedLion(groups, lr=lr, betas=(0.9, 0.99), mode=mode)
        losses = []
        for step in range(steps):
            if step == WARMUP:
                start = time.perf_counter()
            tokens = data[step][rank * rows:(rank + 1) * rows].cuda()
            loss = train_step(model, opt, tokens, step, steps, lr)
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            losses.append(loss.item())
            if rank == 0 and (step % 50 == 0 or step == steps - 1):
                print(f"{mode} W={world} step {step}: {losses[-1]:.4f}", flush=True)
        ms = (time.perf_counter() - start) * 1e3 / (steps - WARMUP)
        same = True
        for p in model.parameters():
            theirs = p.detach().clone()
            dist.broadcast(theirs, 0)
            same = same and torch.equal(theirs, p.detach())
        flags = torch.tensor([0 if same else 1], device="cuda")
        dist.all_reduce(flags)
        if rank == 0:
            torch.save({"losses": losses, "ms": ms, "ranks_differ": int(flags.item())}, os.path.join(out, f"{mode}.pt"))
    except BaseException:
        # Not destroy_process_group: since torch 2.6 it waits for this rank's collectives,
        # which the other ranks may never join. Exiting makes mp.spawn end them.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


def run_distributed(mode, world, data_path, steps, lr, out):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(world, port, mode, steps, lr, data_path, out), nprocs=world, join=True)
    r = torch.load(os.path.join(out, f"{mode}.pt"))
    return r["losses"], r["ms"], r["ranks_differ"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default=str(torch.cuda.device_count()), help="world sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--modes", default="single,sharded,vote")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    worlds = [int(w) for w in args.world.split(",")]
    for w in worlds:
        if not 2 <= w <= torch.cuda.device_count() or BATCH % w:
            sys.exit(f"--world {w}: needs that many GPUs (this machine has {torch.cuda.device_count()}) and must "
                     f"divide the batch's {BATCH} rows")
    if args.steps < WARMUP + 20:
        sys.exit(f"--steps {args.steps}: at least {WARMUP + 20} (timed after {WARMUP}, the final loss over 20)")
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    modes = args.modes.split(",")
    data = batches(args.steps)
    curves, ms, failed = {}, {}, []
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "dist_train_w" + ",".join(map(str, worlds)))
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "tokens.pt")
        torch.save(data, data_path)
        runs = [(mode, w) for mode in modes for w in ([None] if mode == "single" else worlds)]
        for mode, w in runs:
            name = mode if w is None else f"{mode} W={w}"
            try:
                if w is None:
                    curves[name], ms[name] = run_single(data, args.steps, args.lr)
                    gc.collect()
                    torch.cuda.empty_cache()  # rank 0 trains on this GPU next
                else:
                    curves[name], ms[name], differ = run_distributed(mode, w, data_path, args.steps, args.lr, tmp)
                    if differ:
                        print(f"{name}: {differ} rank(s) ended with parameters unlike rank 0's", flush=True)
                        failed.append(name)
            except Exception:  # noqa: BLE001 (report it, and run the others)
                traceback.print_exc()
                print(f"{name}: failed", flush=True)
                failed.append(name)
                continue
            write_curves(stem + ".csv", curves)
    base = final_loss(curves["single"]) if "single" in curves else None
    for name, curve in curves.items():
        against = f" ({(final_loss(curve) / base - 1) * 100:+.2f}% against single)" if base else ""
        print(f"final (mean of the last 20 steps) {name}: {final_loss(curve):.4f}{against}; {ms[name]:.1f} ms a step")
    if curves:
        plot_curves(stem + ".png", curves, f"GPT-2 small, random init, synthetic tokens, global batch {BATCH} x 256 "
                    f"({torch.cuda.get_device_name(0)})")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
