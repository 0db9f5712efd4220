"""Does 8-bit momentum train? GPT-2 small (124M, transformers' GPT2LMHeadModel, random init) on
synthetic tokens, the same run with liblion's Lion and f32, bf16 and q8 momentum side by side.

    python3 benches/q8_train.py [--steps 600] [--lr 1e-4] [--out DIR]

The tokens come from a fixed random "grammar" (each token's successor drawn from 4 candidates
with fixed probabilities, over a 512-token slice of the vocabulary), so the loss has somewhere
to go: from ln(50257) = 10.8 through ln(512) = 6.2 (the slice learnt) towards the chain's
entropy (about 1.0). Every run sees the same
batches (B = 16, T = 256), lr 1e-4 with 30 warm-up steps and cosine decay, weight decay 0.1,
f32 parameters, bf16 autocast. Writes DIR/q8_train.csv (step, loss per state dtype), prints the
mean loss of the last 20 steps per run and q8's and bf16's difference from f32's, and draws
DIR/q8_train.png when matplotlib is there.
"""
import argparse
import csv
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))


def batches(steps, batch, seq, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab_used, fanout = 512, 4
    successors = torch.randint(0, vocab_used, (vocab_used, fanout), generator=g)
    weights = torch.distributions.Dirichlet(torch.ones(fanout)).sample((vocab_used,))
    out = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab_used, (batch,), generator=g)
        for t in range(seq):
            choice = torch.multinomial(weights[tokens[:, t]], 1, generator=g).squeeze(1)
            tokens[:, t + 1] = successors[tokens[:, t], choice]
        out.append(tokens)
    return [b.to(device) for b in out]


def run(state_dtype, data, steps, lr, device):
    from transformers import GPT2Config, GPT2LMHeadModel
    from lion_ffi.torch import Lion
    torch.manual_seed(1234)
    model = GPT2LMHeadModel(GPT2Config()).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = Lion([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
               betas=(0.9, 0.99), state_dtype=state_dtype)
    losses = []
    for step in range(steps):
        warm = min(1.0, (step + 1) / 30)
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        tokens = data[step]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
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
    data = batches(args.steps, 16, 256, device)
    states = args.states.split(",")
    curves = {s: run(s, data, args.steps, args.lr, device) for s in states}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "q8_train.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + states)
        for i in range(args.steps):
            w.writerow([i] + [f"{curves[s][i]:.5f}" for s in states])
    final = {s: sum(c[-20:]) / 20 for s, c in curves.items()}
    for s in states:
        rel = (final[s] / final["f32"] - 1) * 100 if "f32" in final else 0.0
        print(f"final (mean of the last 20 steps) {s}: {final[s]:.4f} ({rel:+.2f}% against f32)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for s in states:
            ax.plot(curves[s], label=f"{s} momentum", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.set_title(f"GPT-2 small, random init, synthetic tokens, liblion Lion ({torch.cuda.get_device_name(0)})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "q8_train.png"), dpi=120)
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
