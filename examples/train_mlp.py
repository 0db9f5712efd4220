"""Trains a small MLP in numpy through liblion (lion_ffi): y = sin(3x)cos(2y) on [-1, 1]^2.
Prints the loss falling; exits non-zero if it did not fall 10x.

    PYTHONPATH=bindings/python python3 examples/train_mlp.py
"""
import sys

import numpy as np

import lion_ffi

rng = np.random.default_rng(0)
sizes = [(2, 64), (64,), (64, 64), (64,), (64, 1), (1,)]
params = [(rng.uniform(-1, 1, s) * (np.sqrt(3 / s[0]) if len(s) == 2 else 0)).astype(np.float32) for s in sizes]
w1, b1, w2, b2, w3, b3 = params
opt = lion_ffi.Lion(params, lr=1e-3, weight_decay=0.1, weight_decay_scales=[1, 0, 1, 0, 1, 0])
print(f"liblion {lion_ffi.version()}: training a 2-64-64-1 MLP with Lion from Python")
steps, first, last = 3000, [], []
for step in range(1, steps + 1):
    x = rng.uniform(-1, 1, (64, 2)).astype(np.float32)
    y = (np.sin(3 * x[:, :1]) * np.cos(2 * x[:, 1:])).astype(np.float32)
    h1 = np.tanh(x @ w1 + b1)
    h2 = np.tanh(h1 @ w2 + b2)
    out = h2 @ w3 + b3
    err = out - y
    loss = float(np.mean(err ** 2))
    d_out = 2 * err / len(x)
    d2 = (d_out @ w3.T) * (1 - h2 ** 2)
    d1 = (d2 @ w2.T) * (1 - h1 ** 2)
    grads = [x.T @ d1, d1.sum(0), h1.T @ d2, d2.sum(0), h2.T @ d_out, d_out.sum(0)]
    opt.lr = 1e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
    opt.step([np.ascontiguousarray(g, dtype=np.float32) for g in grads])
    (first if step <= 50 else last if step > steps - 100 else []).append(loss)
    if step == 1 or step % 500 == 0:
        print(f"step {step:5d}  loss {loss:.5f}")
print(f"mean loss: first 50 steps {np.mean(first):.5f}, last 100 steps {np.mean(last):.5f}")
sys.exit(0 if np.mean(last) < 0.1 * np.mean(first) else 1)
