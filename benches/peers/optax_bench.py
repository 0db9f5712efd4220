"""optax.lion under jit on the same cases as gpu_bench.py (its own process: JAX and torch
would share the card). Median of 30 steps, state and params donated."""
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax
import jax.numpy as jnp
import optax

from shapes import gpt2_small


def main():
    print(f"optax {optax.__version__}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
    for name, sizes, dtype in [("flat 2^28, f32", [1 << 28], jnp.float32), ("GPT-2 small, f32", gpt2_small(), jnp.float32),
                               ("flat 2^28, bf16", [1 << 28], jnp.bfloat16), ("GPT-2 small, bf16", gpt2_small(), jnp.bfloat16)]:
        key = jax.random.PRNGKey(0)
        params = [jax.random.normal(key, (n,), dtype) for n in sizes]
        grads = [jax.random.normal(key, (n,), dtype) for n in sizes]
        tx = optax.lion(1e-4, weight_decay=0.1, mu_dtype=dtype)
        state = tx.init(params)

        @jax.jit
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        step = jax.jit(step, donate_argnums=(0, 1))
        for _ in range(5):
            params, state = step(params, state, grads)
        jax.block_until_ready(params)
        times = []
        for _ in range(30):
            t = time.perf_counter()
            params, state = step(params, state, grads)
            jax.block_until_ready(params)
            times.append((time.perf_counter() - t) * 1e3)
        print(f"| optax.lion jit | {name} | {statistics.median(times):.3f} ms |", flush=True)
        del params, grads, state


if __name__ == "__main__":
    main()
