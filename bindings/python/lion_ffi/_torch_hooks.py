"""`step_with_hooks`: the wrapper torch puts around every optimizer's `step`
(`torch.optim.Optimizer.profile_hook_step`: a profiler range, the step pre and post hooks,
`_optimizer_step_code`), doing the same work, but opening the profiler range only while a
profiler runs.

Why: torch's wrapper cost 13 us of `lion_ffi.torch.Lion.step()`'s 90 us of Python for GPT-2
small's 148 tensors (BENCHMARKS.md), 7 of them the `record_function` it opens on every step,
profiler or not. A wrapper marked `hooked` is not wrapped again by torch
(`Optimizer._patch_step_function`).

Twin: torch's `Optimizer.profile_hook_step` (torch 2.5 to 2.15 alike). It reads torch's private
dicts of global hooks; where a torch lacks them (or the profiler query, or the optimizer's step
hooks), `step_with_hooks` leaves the hooks to torch's wrapper, as before.
tests/test_torch_hooks.py checks the hooks, their order and their power to change the arguments
against torch's own wrapper.

Under `torch.compile`, the wrapped step runs eagerly, a graph break (`eager_under_compile`, also
used for the hooks of `register_step_in_backward`): tracing it failed before.

What torch's wrapper does that this one does not: open the range for RecordFunction observers
other than the profiler (an `ExecutionTraceObserver` on its own, without a profiler, sees no
Lion step; Kineto's on-demand tracing is likely the same).
"""
import functools
from itertools import chain

import torch
import torch.optim.optimizer as _optim

_global_pre = getattr(_optim, "_global_optimizer_pre_hooks", None)
_global_post = getattr(_optim, "_global_optimizer_post_hooks", None)
_profiler_enabled = getattr(torch._C._autograd, "_profiler_enabled", None)
_eval_frame = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
_set_eval_frame = getattr(_eval_frame, "set_eval_frame", None)


def _skip_code_of(eval_frame):
    """Dynamo's "never trace this code object" (`torch._dynamo.eval_frame.skip_code`), from
    torch's C module (importing torch._dynamo at this module's import costs 0.7-0.9 s): itself
    in torch 2.5, a frame execution strategy by 2.11. None where neither is there, or where
    its form has changed."""
    if hasattr(eval_frame, "skip_code"):
        return eval_frame.skip_code
    try:
        skip = eval_frame._FrameExecStrategy(eval_frame._FrameAction.SKIP, eval_frame._FrameAction.DEFAULT)
        set_strategy = eval_frame.set_code_exec_strategy
    except (AttributeError, TypeError, ValueError):
        return None
    return lambda code: set_strategy(code, skip)


_skip_code = _skip_code_of(_eval_frame)
AVAILABLE = (None not in (_global_pre, _global_post, _profiler_enabled)
             and all(hasattr(torch.optim.Optimizer, name) for name in ("_optimizer_step_code", "register_step_pre_hook")))


def _run(step, args, kwargs):
    self = args[0]
    for pre_hook in chain(_global_pre.values(), self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got "
                                   f"{result}.")
    out = step(*args, **kwargs)
    self._optimizer_step_code()
    for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_post.values()):
        post_hook(self, args, kwargs)
    return out


def _reaches(f, target):
    """Whether `f` is `target` or wraps it (`__wrapped__`, as functools.wraps and torch's
    decorators set it: a subclass may re-decorate the step it inherits)."""
    while f is not target:
        f = getattr(f, "__wrapped__", None)
        if f is None:
            return False
    return True


def step_with_hooks(step):
    """`step` in torch's optimizer-step wrapper (see the module's docstring)."""
    if not AVAILABLE:
        return eager_under_compile(step)  # torch wraps it with its own hooks

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        if not _reaches(type(args[0]).step, wrapper):
            # A subclass's own step, which torch wrapped and which ran the hooks, called this one.
            return step(*args, **kwargs)
        if _profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(args[0]).__name__}.step"):
                return _run(step, args, kwargs)
        return _run(step, args, kwargs)

    wrapper.hooked = True
    return eager_under_compile(wrapper)


def eager_under_compile(fn):
    """`fn`, run eagerly when a function compiled by torch.compile calls it (a graph break):
    the step is calls into liblion through ctypes, which dynamo cannot trace (it failed in
    `_blocks.py`). What `torch.compiler.disable` does, at 0.09 us a call where that costs 2.9
    us on torch 2.5 (0.28 on 2.11): dynamo does not inline it (`_torchdynamo_disable`, as
    `torch._dynamo.skip` marks a function) nor trace its frame (`skip_code`), and it turns
    dynamo off for the frames it calls (`set_eval_frame`), then back on. Where this torch lacks
    either, `fn` is left as it is."""
    if _set_eval_frame is None or _skip_code is None:
        return fn

    @functools.wraps(fn)
    def eager(*args, **kwargs):
        prior = _set_eval_frame(None)
        try:
            return fn(*args, **kwargs)
        finally:
            if prior is not None:
                _set_eval_frame(prior)

    try:
        _skip_code(eager.__code__)
    except (TypeError, ValueError, RuntimeError):
        return fn
    eager._torchdynamo_disable = True  # a call to it from traced code is a graph break, not inlined
    eager._torchdynamo_disable_msg = (f"lion_ffi: {fn.__qualname__} calls liblion through ctypes and runs eagerly; "
                                      "it cannot be part of a fullgraph=True region")
    return eager
