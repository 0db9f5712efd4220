"""liblion inside a Python host's life: a fork child (multiprocessing's "fork" start method,
and os.fork) steps and drops its copy of an optimizer without hanging, with the same bits as
the parent. Each child runs under a timeout: a hang fails the test instead of blocking it."""
import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lion_ffi

N = 70001  # large enough for the thread pool


def _make(num_threads):
    rng = np.random.default_rng(7)
    p = rng.standard_normal(N).astype(np.float32)
    g = rng.standard_normal(N).astype(np.float32)
    return p, g, lion_ffi.Lion([p], lr=1e-3, weight_decay=0.1, num_threads=num_threads)


def _child_steps(opt, p, g, queue):
    opt.step([g])
    opt.step([g])
    queue.put((opt.step_count, p.tobytes()))
    del opt  # lion_destroy in the child


@pytest.mark.parametrize("num_threads", [0, 4])
def test_multiprocessing_fork_child_steps_and_drops_the_optimizer(num_threads):
    p, g, opt = _make(num_threads)
    opt.step([g])
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_steps, args=(opt, p, g, queue))
    child.start()
    # Read before joining: a child that put a large item waits until it is consumed.
    try:
        steps, child_p = queue.get(timeout=60)
    except Exception:
        child.kill()
        pytest.fail("the fork child hung or died before reporting")
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the fork child hung while dropping the optimizer")
    assert child.exitcode == 0
    # The parent takes the same two steps: same bits, and it was not disturbed by the child.
    opt.step([g])
    opt.step([g])
    assert steps == opt.step_count == 3
    assert child_p == p.tobytes()


def test_os_fork_child_exits_with_a_live_optimizer():
    # The child ends at interpreter exit with the optimizer still alive (its finalizer runs
    # then); this hung when the pool's threads were waited for in the child.
    script = textwrap.dedent(f"""
        import os, sys, numpy as np
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(lion_ffi.__file__)))!r})
        import lion_ffi
        p = np.ones({N}, np.float32); g = np.ones({N}, np.float32)
        opt = lion_ffi.Lion([p], lr=1e-3, num_threads=4)
        opt.step([g])
        pid = os.fork()
        if pid == 0:
            opt.step([g])
            sys.exit(0)  # interpreter exit with `opt` alive
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=60, env=os.environ.copy())
    assert done.returncode == 0
