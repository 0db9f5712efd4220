"""The GPT-2 small training run that benches/q8_train.py and benches/dist_train.py share: the
synthetic tokens, the model with its two parameter groups, the lr schedule, one training
step, and the curves' CSV and plot.

The tokens come from a fixed random "grammar" (each token's successor drawn from 4 candidates
with fixed probabilities, over a 512-token slice of the vocabulary), so the loss has somewhere
to go: from ln(50257) = 10.8 through ln(512) = 6.2 (the slice learnt) towards the chain's
entropy (about 1.0); the grammar and the tokens are the same in every process. The model is
transformers' GPT2LMHeadModel from random init (seed 1234), f32 parameters under bf16
autocast; weight decay 0.1 on matrices, none on biases and norms; lr with 30 warm-up steps and
cosine decay.
"""
import csv
import math
import os

import torch

BATCH, SEQ = 16, 256  # rows of SEQ + 1 tokens a step


def batches(steps, batch=BATCH, seq=SEQ, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab_used, fanout = 512, 4
    successors = torch.randint(0, vocab_used, (vocab_used, fanout), generator=g)
    # Flat-Dirichlet weights (normalized exponentials) from `g`: torch.distributions would draw
    # from the global generator, a new grammar in every process (so until 2026-12-05).
    e = -(1 - torch.rand(vocab_used, fanout, generator=g)).log()  # rand is in [0, 1)
    weights = e / e.sum(1, keepdim=True)
    out = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab_used, (batch,), generator=g)
        for t in range(seq):
            choice = torch.multinomial(weights[tokens[:, t]], 1, generator=g).squeeze(1)
            tokens[:, t + 1] = successors[tokens[:, t], choice]
        out.append(tokens)
    return [b.to(device) for b in out]


def model_and_groups(device, dropout=0.1):
    """GPT-2 small from random init, and its parameter groups (with their weight decay).
    `dropout`: GPT-2's 0.1 on residuals, embeddings and attention."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1234)
    config = GPT2Config(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = GPT2LMHeadModel(config).to(device)
    model.train()
    decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.dim() < 2]
    return model, [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def train_step(model, opt, tokens, step, steps, lr):
    """Sets the scheduled lr, and one forward, backward and optimizer step; returns the loss
    (a device tensor: reading it waits for the device)."""
    warm = min(1.0, (step + 1) / 30)
    for group in opt.param_groups:
        group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def final_loss(curve):
    """The mean loss of the last 20 steps."""
    return sum(curve[-20:]) / len(curve[-20:])


def write_curves(path, curves):
    """`curves`: name -> losses, one a step; a CSV of step and one column per name."""
    names = list(curves)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + names)
        for i in range(max(len(c) for c in curves.values())):
            w.writerow([i] + [f"{curves[n][i]:.5f}" if i < len(curves[n]) else "" for n in names])


def plot_curves(path, curves, title):
    """A log-scale plot of the curves where matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(curve, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
