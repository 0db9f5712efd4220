"""Does 8-bit momentum train? GPT-2 small (124M, transformers' GPT2LMHeadModel, random init) on
synthetic tokens, the same run with liblion's Lion and f32, bf16 and q8 momentum side by side.

    python3 benches/q8_train.py [--steps 600] [--lr 1e-4] [--out DIR]

The run (tokens, model, schedule) is benches/synthetic_gpt2.py's; every run sees the same
batches (B = 16, T = 256), lr 1e-4 by default. Writes DIR/q8_train.csv (step, loss per state
dtype), prints the mean loss of the last 20 steps per run and q8's and bf16's difference from
f32's, and draws DIR/q8_train.png when matplotlib is there.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
from synthetic_gpt2 import batches, final_loss, model_and_groups, plot_curves, train_step, write_curves  # noqa: E402


def run(state_dtype, data, steps, lr, device):
    from lion_ffi.torch import Lion
    model, groups = model_and_groups(device)
    opt = Lion(groups, lr=lr, betas=(0.9, 0.99), state_dtype=state_dtype)
    losses = []
    for step in range(steps):
        losses.append(train_step(model, opt, data[step], step, steps, lr).item())
        if step % 50 == 0 or step == steps - 1:
            print(f"{state_dtype} step {step}: {losses[-1]:.4f}", flush=True)
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", default=".")
    ap.add_argument("--states", default="f32,bf16,q8")
    args = ap.parse_args()
    device = "cuda"
    data = batches(args.steps, device=device)
    states = args.states.split(",")
    curves = {s: run(s, data, args.steps, args.lr, device) for s in states}
    os.makedirs(args.out, exist_ok=True)
    write_curves(os.path.join(args.out, "q8_train.csv"), curves)
    final = {s: final_loss(c) for s, c in curves.items()}
    for s in states:
        rel = (final[s] / final["f32"] - 1) * 100 if "f32" in final else 0.0
        print(f"final (mean of the last 20 steps) {s}: {final[s]:.4f} ({rel:+.2f}% against f32)")
    plot_curves(os.path.join(args.out, "q8_train.png"), {f"{s} momentum": c for s, c in curves.items()},
                f"GPT-2 small, random init, synthetic tokens, liblion Lion ({torch.cuda.get_device_name(0)})")


if __name__ == "__main__":
    main()
