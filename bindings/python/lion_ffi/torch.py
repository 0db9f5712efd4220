"""`lion_ffi.torch.Lion`: a torch.optim.Optimizer backed by liblion, a drop-in for
`lion_pytorch.Lion` (same arguments, plus lion-pytorch's cautious variant's `cautious_factor`
and `cautious_wd`). CPU and CUDA tensors (the step is enqueued on the current stream), param
groups, state_dict / load_state_dict, and GradScaler (found_inf skips the step on the device).

Parameters without a gradient (`.grad` None) are skipped, as by every torch optimizer: their
values and momentum stay as they are. liblion steps all tensors of one of its optimizers at
once, so a group starts with one over all its parameters (one C call a step), and at the
first step where some have a gradient and others none, that one is split in two, each part
taking its parameters' momentum along (`_blocks.py`). The parts only get finer: a mixture of
experts ends with one liblion optimizer for the shared parameters and one per expert. Each
costs a C call per step where it has gradients (about 3 us of ctypes and C measured on a CPU,
plus torch's calls; on CUDA its own kernel launch) and, on the CPU, its own `num_threads`
threads (0: one per hardware thread). A split costs, once, host memory of a few times the momentum it
splits. Step counts are per part and restart at 1 at a split; they only key stochastic
rounding, whose bits then differ from an unsplit run's (each part has its own seed, derived
from `seed`; each param group too, group 0 keeping `seed` itself): still unbiased, never the
same bits twice.

A step tells autograd that the parameters were written in place (their version counters), as
torch's own in-place updates do: a backward pass through values saved before the step raises
instead of using the stepped ones.

A group's hyperparameters may change between steps: `lr` goes to liblion as it is; a change of
`betas`, `weight_decay`, `cautious_factor` or `cautious_wd` makes the group's liblion
optimizers anew with the new values, their momentum, step count and lr carried over. A value
liblion refuses raises at the next step, naming the group, before anything is written.

`state_dict()` holds liblion's checkpoint blob per group (a list of (positions, blob) once the
group is split). `load_state_dict` takes that, or lion-pytorch's state dict (Lion or its
cautious variant: an `exp_avg` per parameter), and `state_dict_lion_pytorch()` gives the
momentum back in lion-pytorch's form, so a run moves between the two either way (liblion's
step count starts at 1 after an import; lion-pytorch keeps none). `copy.deepcopy` and pickling
(`torch.save(optimizer)`) carry the momentum as those blobs (not register_step_in_backward's
hooks). torch.distributed.checkpoint's `get_optimizer_state_dict` keeps only "state" and
"param_groups", not the "liblion" key that holds the momentum: loading what it saved raises
(ValueError) rather than starting from no momentum; save the optimizer's own `state_dict()`.

All of a group's parameters must live on one device, and be contiguous (a channels_last one is
not), as their gradients, each gradient of its parameter's size and device, and no two
parameters may share memory (the same tensor twice, views that overlap). Every group is checked
before any is stepped. Momentum belongs to the tensors a group had
when it was made: a group removed from before another, groups reordered, or another tensor put
in a parameter's place is refused at the next step (ValueError), and, in the first two cases,
by `state_dict`, copies and `state_dict_lion_pytorch` until the groups are put back (momentum
is saved by group index); with register_step_in_backward, a hook whose parameter is no longer
at its place is refused. A replaced parameter's state_dict loads into a new optimizer, the
momentum going to the parameter in its place. A refused `load_state_dict` changes nothing.
Momentum is f32, or bf16 when every parameter of the group is bf16 (lion-pytorch keeps it in
the parameter's dtype), unless `state_dtype` says: "f32", "bf16" (half the memory, for any
parameter dtype) or "q8" (8-bit momentum, about 1.016 bytes per element: docs/ABI.md; CPU and
CUDA tensors; `DistributedLion` takes it in vote mode).

`torch.compile`: a compiled function may call `step()` (or run a backward pass that steps in
backward). The step is calls into liblion through ctypes, which dynamo cannot trace: it runs
eagerly there (a graph break), hooks included, so a `fullgraph=True` region cannot hold it.

Stepping during the backward pass (opt-in): `opt.register_step_in_backward()` steps each
parameter as soon as its gradient is accumulated (torch's post-accumulate-grad hooks, the
optimizer-in-backward pattern) and then frees that gradient, so that the gradients of the
whole model never exist at once and the step overlaps the rest of the backward pass. Each hook
is one `lion_step_tensors` call (on CUDA one kernel launch, on the current stream); a backward
pass that gives every parameter its gradient is one step, bit for bit as `loss.backward();
opt.step()` with this class. A parameter that gets no gradient in a backward pass is skipped
(value and momentum unchanged): the pass's round is ended when the backward pass ends
(`lion_round_finish`); a pass that raises is ended so at the next pass's first hook (or at
`state_dict`), the tensors it stepped staying stepped. A group added with `add_param_group`
is stepped in backward too. Do not call `step()` for the parameters (it only ends a round that is
still open, if any); `zero_grad()` is not needed when the gradients are freed. Not for
gradient accumulation over several backward passes (each pass steps) nor for GradScaler
(the gradients are used before it could unscale them: use bf16 autocast), nor for reentrant
checkpointing (`torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`, or any autograd
Function whose backward runs a backward pass, as DeepSpeed's and fairscale's checkpointing do):
such nested passes end before the pass around them and give a parameter used in two segments
its gradient in parts, so a hook that runs inside one is refused with a RuntimeError, even
where no parameter is shared; the non-reentrant kind steps as the plain step. Parameters
frozen (`requires_grad=False`) when the hooks are registered get none: one unfrozen later is
refused (RuntimeError, at the next backward pass's first hook, or by `step()` once it has a
gradient) until the hooks are registered again.
"""
import ctypes
import functools
import operator
import sys
import weakref
from itertools import repeat

import numpy as np
import torch

from ._blocks import Blocks, group_seed
from ._lib import (COMM, DEVICE, DEVICE_CPU, DEVICE_CUDA, DEVICE_UNAVAILABLE, DTYPE_BF16, DTYPE_F16, DTYPE_F32,
                   DTYPE_Q8, PANIC, Handle, LionError, lib,
                   make_config)
from ._torch_hooks import eager_under_compile, step_with_hooks

_CODES = {torch.float32: DTYPE_F32, torch.float16: DTYPE_F16, torch.bfloat16: DTYPE_BF16}
_STATE_CODES = {None: None, "f32": DTYPE_F32, "float32": DTYPE_F32, "bf16": DTYPE_BF16, "bfloat16": DTYPE_BF16,
                "q8": DTYPE_Q8}


def _momentum_dtype(state, params):
    """The momentum's dtype code: `state_dtype`'s (`_STATE_CODES`), else bf16 for a group of bf16
    parameters, else f32."""
    if state is not None:
        return state
    return DTYPE_BF16 if all(p.dtype == torch.bfloat16 for p in params) else DTYPE_F32


def _grad_dtype(p):
    """The gradient's dtype; a parameter without one yet (stepping in backward prepares every
    parameter's optimizer before all gradients exist) gets the parameter's, as torch gives."""
    return p.grad.dtype if p.grad is not None else p.dtype


def _layout(p):
    return p.device, p.numel(), p.dtype, _grad_dtype(p), p.is_contiguous() and (p.grad is None or p.grad.is_contiguous())


def _grad_fits(p, g):
    """Whether gradient `g` has parameter `p`'s size and device: liblion reads as many gradient
    elements as the parameter has, at the gradient's address. torch checks both where `.grad`
    is assigned, not where a gradient is re-viewed in place (`p.grad.data = ...`)."""
    return g.numel() == p.numel() and g.device == p.device


def _check_grads(who, index, params, positions):
    """Refuses a gradient that does not fit its parameter (`_grad_fits`)."""
    for i in positions:
        p = params[i]
        g = p.grad
        if g is not None and not _grad_fits(p, g):
            raise ValueError(f"{who}: parameter {i} of group {index} has {p.numel()} elements on {p.device}, "
                             f"its gradient {g.numel()} on {g.device}")


def _check_owners(who, index, params, owners, positions):
    """Refuses, at `positions` of a group, tensors other than those whose momentum it holds
    (`owners`, None where none was recorded yet): a group removed from before another, groups
    reordered, another parameter put in a place. The tensors themselves, as torch's optimizers
    key their state by them: not their ids, which a new tensor may take once an old one is
    freed, nor weak references, which torch.utils.swap_tensors refuses (Module.to under
    swap_module_params_on_conversion)."""
    for i in positions:
        if owners[i] is not None and owners[i] is not params[i]:
            raise ValueError(f"{who}: parameter {i} of group {index} is not the tensor its momentum belongs to "
                             "(groups reordered or removed, or another parameter put in its place); a state_dict "
                             "loads into a new optimizer")


def _check_saved_places(who, groups, owners_by_index):
    """Refuses (ValueError) to save where a tensor whose momentum the optimizer of one group
    index holds (`owners_by_index`: index -> that optimizer's owners) is now at another place (a
    group removed from before another, groups reordered): saved by group index, that momentum
    would load into other parameters. A tensor no longer in any group (a parameter replaced)
    passes: its momentum goes to the parameter in its place, as the step's refusal advises."""
    places = {id(p): (j, k) for j, group in enumerate(groups) for k, p in enumerate(group["params"])}
    for i, owners in owners_by_index.items():
        for k, owner in enumerate(owners):
            at = places.get(id(owner)) if owner is not None else None  # owners are alive: ids are theirs
            if at is not None and at != (i, k):
                raise ValueError(f"{who}: the momentum of parameter {k} of group {i} belongs to the tensor now at "
                                 f"parameter {at[1]} of group {at[0]} (groups reordered or removed): its state "
                                 "cannot be saved by group; put the groups back as they were to save it")


def _check_dist_layouts(index, now, made_for):
    """Raises, naming the first parameter of group `index` whose layout (`_layout`) is not what
    its optimizer was made for, or that is not contiguous."""
    if len(now) != len(made_for):
        raise ValueError(f"lion_ffi.torch.DistributedLion: group {index} now has {len(now)} parameters, its "
                         f"optimizer was created for {len(made_for)}")
    for i, (layout, then) in enumerate(zip(now, made_for)):
        if layout != then or not layout[4]:
            raise ValueError(f"lion_ffi.torch.DistributedLion: parameter {i} of group {index} is now {layout}, "
                             f"its optimizer was created for {then} (device, numel, dtype, grad dtype, "
                             "contiguous)")


def _every_ranks(error):
    """Whether every rank of a distributed optimizer failed alike (a refusal, which liblion
    agrees on collectively), so that each can go on to the next group's collectives; a
    device, NCCL or internal failure may be this rank's alone, and ends the step at once."""
    return error.status not in (DEVICE, DEVICE_UNAVAILABLE, COMM, PANIC)


# Unbound, so that a list of 148 tensors is read in one C loop (`map`) per attribute.
_data_ptr, _is_contiguous = torch.Tensor.data_ptr, torch.Tensor.is_contiguous
_nbytes, _device = operator.attrgetter("nbytes"), operator.attrgetter("device")


try:  # public since torch 2.1; takes a list (one C++ loop) since 2.5
    from torch.autograd.graph import increment_version as _increment_version
except ImportError:
    _increment_version = torch._C._increment_version


def _written(tensors):
    """Tells autograd that liblion wrote `tensors` in place (their version counters), as
    torch's own in-place update does: a backward that saved one of them before the step then
    raises ("modified by an inplace operation") instead of using the stepped values."""
    try:
        _increment_version(tensors)
    except TypeError:  # a torch whose call takes one tensor
        for t in tensors:
            _increment_version(t)


def _quick(params, grads):
    """Besides the parameters' addresses (`_Checked.ptrs`), what `step` reads and compares
    each step before it repeats the full check (`_layout`, in `_make`) where TensorGuards is
    not used (`_Checked`): the byte sizes of every parameter and gradient, and whether they
    are all contiguous, and the gradients' devices (no gradient address is compared here). The full check ran every step and was most of a step's Python time on
    GPT-2 small (BENCHMARKS.md); this reads four attributes a tensor besides the addresses the
    call needs, each of all tensors in one C loop.

    With the addresses, it keeps liblion's reads and writes inside the caller's tensors: liblion writes the byte
    size it was made for at each parameter's address and reads it at each gradient's, and a
    tensor swapped for another of another size, or re-viewed in place with another size or
    layout (`p.data = ...`, `p.grad.data = p.grad.data.bfloat16()`), goes to the full check.
    What it does not see, and only the full check after a change of address or size would: a
    tensor re-viewed in place as another dtype of the same width (`p.data =
    p.data.view(torch.bfloat16)` for a float16 parameter: stepped as float16), and a parameter
    moved to another device at its old address (which torch's caching allocator does not hand
    out while it holds the old memory)."""
    return (list(map(_nbytes, params)), list(map(_nbytes, grads)), list(map(_device, grads)),
            all(map(_is_contiguous, params)) and all(map(_is_contiguous, grads)))


try:  # dynamo's C++ check of tensors' metadata (private; absent or changed: _quick alone)
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:
    _TensorGuards = None


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _guardable(tensors):
    """Whether TensorGuards may read `tensors` (see `_Checked`): torch's own tensor types,
    dense, not nested. Read once a full check, not each step: a dense tensor cannot become
    nested in place, and a tensor of another type fails the guard's type test first."""
    return all(type(t) in _PLAIN_TYPES and t.layout == torch.strided and not t.is_nested for t in tensors)


class _Checked:
    """What the full check (`_layout`, in `_make`) last accepted for a list of parameters and
    their gradients, and the test, each step, that they are still so: the parameters' addresses
    (which the call needs anyway) as read now, and `_quick`'s reads or their equivalent.

    Where this torch has dynamo's `TensorGuards` (its C++ check of the tensors a compiled graph
    was made for), one call of it checks every tensor's dtype, device, sizes and strides, which
    decide its byte size and contiguity: a stricter check than `_quick`'s, in one C++ loop (17
    us for 148 parameters and gradients on this project's VM, against 27 for `_quick`'s four
    reads). A tensor it rejects only repeats the full check. Without it,
    or where it raises, `_quick` alone; and `_quick` alone for tensors other than plain dense
    ones (`_guardable`): TensorGuards reads their sizes and strides in C++, where a nested
    tensor's refusal to give them ends the process instead of raising.

    Neither check reads a tensor's storage: memory taken from under a tensor
    (`p.grad.untyped_storage().resize_(0)`) is not seen, before or after this change."""

    __slots__ = ("ptrs", "guard", "quick")

    def __init__(self, params, grads, ptrs):
        self.ptrs, self.guard, self.quick = ptrs, None, None
        if _TensorGuards is not None and _guardable(params) and _guardable(grads):
            try:
                self.guard = _TensorGuards(*params, *grads, dynamic_dims_sizes=None, dynamic_dims_strides=None)
            except Exception:  # noqa: BLE001 (another torch's signature: the fallback below)
                self.guard = None
        if self.guard is None:
            self.quick = _quick(params, grads)

    def holds(self, params, grads, ptrs):
        if ptrs != self.ptrs:
            return False
        if self.guard is None:
            return _quick(params, grads) == self.quick
        try:
            return self.guard.check(*params, *grads)
        except Exception:  # noqa: BLE001 (a count or an object it does not take: the full check)
            return False


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_of(device):
    """The address of `device`'s current CUDA stream (None on the CPU): torch's own raw read of
    it where torch has one (the one inductor's generated code calls), without the
    `torch.cuda.Stream` object that `current_stream` builds on every call."""
    if device.type != "cuda":
        return None
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


@functools.lru_cache(maxsize=64)
def _all_positions(n):
    return tuple(range(n))


def _amp_options(optimizer, device, flags):
    """The step options for GradScaler's `grad_scale` and `found_inf` (it sets them on the
    optimizer), None without them. `flags` keeps each device's found_inf flag for the step:
    the step reads it on the device, on the current stream, where a flag freed after the call
    is reused only by later work."""
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    if grad_scale is None and found_inf is None:
        return None
    options = lib.lion_step_options_default()
    if grad_scale is not None:
        options.grad_scale = 1.0 / float(grad_scale)  # the scaler multiplied the loss by it
    if found_inf is not None:
        if device not in flags:
            flags[device] = found_inf.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()
        options.found_inf = flags[device].data_ptr()
    return options


def _hyper(group):
    """What a liblion optimizer is made with, besides lr (which it takes at any step)."""
    return tuple(group["betas"]), group["weight_decay"], group["cautious_factor"], group["cautious_wd"]


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _function_backward_codes():
    """The code of torch's call of a custom autograd Function's backward (and of reentrant
    checkpointing's): a post-accumulate-grad hook runs under one only inside a backward pass
    that such a backward started (reentrant checkpointing, DeepSpeed's and fairscale's)."""
    codes = set()
    try:
        from torch.autograd.function import BackwardCFunction
        codes.add(BackwardCFunction.apply.__code__)
    except (ImportError, AttributeError):
        pass
    try:
        from torch.utils.checkpoint import CheckpointFunction
        codes.add(CheckpointFunction.backward.__code__)
    except (ImportError, AttributeError):
        pass
    return frozenset(codes)


_NESTING_CODES = _function_backward_codes()


def _under_function_backward(frame):
    """Whether a custom autograd Function's backward (`_NESTING_CODES`) is on the stack from
    `frame` down: a round's first hook then runs in a nested backward pass."""
    while frame is not None:
        if frame.f_code in _NESTING_CODES:
            return True
        frame = frame.f_back
    return False


def _refuse_nested_pass():
    """Raises for a hook in a backward pass nested in another (reentrant checkpointing,
    `torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`, runs one per segment): each
    nested pass ends before the one around it, and a parameter used in two segments gets its
    gradient in parts, a hook each, so stepping in backward cannot know when a gradient is
    whole. Seen (`Lion._hook`) as a round's first hook under a Function's backward
    (`_under_function_backward`), or a later hook in another graph task than the first's."""
    raise RuntimeError("lion_ffi.torch.Lion: register_step_in_backward cannot step inside a nested backward "
                       "pass, one that an autograd Function's backward runs (reentrant checkpointing: use "
                       "torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or step after the backward "
                       "pass)")


class _PassEnd:
    """`Lion._end_pass`, queued on a backward pass's graph task by `_begin_pass`. Autograd drops
    the task's callbacks unrun when the pass raises; the optimizer holds this only weakly, so
    its death with the pass still open tells that the pass failed (`_end_failed_pass`), where
    a later pass (reentrant checkpointing's, inside this one) would not."""

    __slots__ = ("optimizer", "__weakref__")

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def __call__(self):
        self.optimizer._end_pass()


# The entry each parameter with momentum has in `Lion.state`: the momentum is liblion's (in
# `state_dict()["liblion"]`), but torch's tools read an empty state as an optimizer that never
# stepped (torch.distributed.checkpoint's get_optimizer_state_dict then steps it with zero
# gradients, which decays Lion's momentum), and a state dict that lost the "liblion" key
# (theirs keeps only "state" and "param_groups") must be refused, not loaded as no momentum.
_MARK = "liblion_momentum"


def _check_apart(work):
    """Refuses (ValueError) parameters of one `Lion.step` (`work`: its calls) that share memory:
    the same tensor twice in a group, or views that overlap, in one group or two. liblion
    refuses them within one call only after the groups before it have stepped, and across
    groups not at all (each group's call would step the other's values)."""
    spans = []
    for device, _, ps, ptrs, _, index, positions in work:
        where = (device.type, -1 if device.index is None else device.index)
        spans += [(where, ptr, ptr + p.nbytes, index, i) for p, ptr, i in zip(ps, ptrs, positions) if p.nbytes]
    spans.sort(key=lambda span: span[:2])
    for a, b in zip(spans, spans[1:]):  # sorted by start: an overlap shows between neighbours
        if a[0] == b[0] and b[1] < a[2]:
            raise ValueError(f"lion_ffi.torch.Lion: parameter {b[4]} of group {b[3]} shares memory with parameter "
                             f"{a[4]} of group {a[3]} (the same tensor twice, or views that overlap)")


def _set_lr(who, index, handle, lr):
    """Group `index`'s lr into its liblion optimizer; one liblion refuses (not finite, say)
    raises naming the group."""
    try:
        handle.set_lr(lr)
    except LionError as e:
        raise type(e)(e.status, f"{who}: group {index}: {e.message}") from None


def _drop_stale_marks(optimizer):
    """Drops the marks (_MARK) of tensors no longer in a group (a parameter replaced, a group
    removed): torch's state_dict looks every key of `state` up in the groups."""
    present = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for p in [p for p in optimizer.state if id(p) not in present]:
        del optimizer.state[p]


def _refuse_lost_momentum(who, state_dict):
    """Refuses a state dict whose parameters had momentum (their marks, _MARK) but that has no
    "liblion" key, which holds it: loaded, it would start from no momentum."""
    if "liblion" not in state_dict and any(_MARK in s and "exp_avg" not in s
                                           for s in state_dict.get("state", {}).values()):
        raise ValueError(f"{who}.load_state_dict: this state dict lost liblion's momentum (its 'liblion' key; "
                         "torch.distributed.checkpoint's get_optimizer_state_dict keeps only 'state' and "
                         "'param_groups'): save and load the optimizer's own state_dict()")


class Lion(torch.optim.Optimizer):
    # GradScaler hands over `grad_scale` and `found_inf` instead of unscaling the gradients.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, use_triton=False,
                 decoupled_weight_decay=False, cautious_factor=1.0, cautious_wd=False, *,
                 stochastic_rounding=False, seed=0, num_threads=0, state_dtype=None):
        if state_dtype not in _STATE_CODES:
            raise ValueError(f"state_dtype must be None (f32, or bf16 for a group of bf16 parameters), 'f32', "
                             f"'bf16' or 'q8', got {state_dtype!r}")
        if not lr > 0.0:
            raise ValueError(f"lr must be > 0, got {lr}")
        extra = dict(stochastic_rounding=stochastic_rounding, seed=seed, num_threads=num_threads)
        # Refuse here, not at the first step, what cannot go into the C struct (betas not a pair,
        # integers out of range); groups with their own betas are checked at their first step.
        make_config(lr, betas, weight_decay, decoupled_weight_decay, cautious_factor=cautious_factor,
                    cautious_weight_decay=cautious_wd, **extra)
        if not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1], got {betas}")
        del use_triton  # liblion has its own kernels
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, cautious_factor=cautious_factor,
                        cautious_wd=cautious_wd)
        super().__init__(params, defaults)
        self._init_lr = lr
        self._decoupled = decoupled_weight_decay
        self._extra = extra
        self._state = _STATE_CODES[state_dtype]
        self._blocks = {}  # group index -> Blocks
        self._in_backward = None  # register_step_in_backward's hooks
        self._pass = None  # the backward pass being stepped: see _begin_pass
        self._pass_task = -1  # its graph task's id, where torch says (_refuse_nested_pass)
        self._pass_end = None  # a weak reference to its _PassEnd, where autograd holds one
        self._hooks = None  # register_step_in_backward's hook handles, while registered
        self._frozen = None  # (group, position, parameter) of those it could not hook (frozen)

    def _state_dtype(self, group):
        return _momentum_dtype(self._state, group["params"])

    def _blocks_of(self, index, group):
        n = len(group["params"])
        blocks = self._blocks.setdefault(index, Blocks(n, self._extra["seed"], index))
        if blocks.n != n:
            raise ValueError(f"lion_ffi.torch.Lion: group {index} now has {n} parameters, its optimizer was "
                             f"created for {blocks.n}")
        return blocks

    def _create(self, index, group, positions, seed):
        params = group["params"]
        device = params[positions[0]].device
        if any(p.device != device for p in params):
            raise ValueError(f"lion_ffi.torch.Lion: group {index} has parameters on several devices; "
                             "a group's parameters must share one")
        descs = []
        for i in positions:
            p = params[i]
            if p.dtype not in _CODES or _grad_dtype(p) not in _CODES:
                raise TypeError(f"lion_ffi.torch.Lion: parameter {i} of group {index}: dtype {p.dtype} / grad "
                                f"{_grad_dtype(p)} is not supported (float32, float16, bfloat16)")
            if p.grad is not None and p.grad.layout != torch.strided:
                raise ValueError(f"lion_ffi.torch.Lion: parameter {i} of group {index}: its gradient is "
                                 f"{p.grad.layout}; liblion steps dense gradients (nn.Embedding: sparse=False)")
            if not p.is_contiguous() or (p.grad is not None and not p.grad.is_contiguous()):
                raise ValueError(f"lion_ffi.torch.Lion: parameter {i} of group {index}: parameters and gradients "
                                 "must be contiguous")
            if p.numel() and p.data_ptr() == 0:
                raise ValueError(f"lion_ffi.torch.Lion: parameter {i} of group {index} has no memory of its own "
                                 "(data_ptr() is 0: a DTensor, as FSDP2 shards parameters, or a meta tensor); "
                                 "liblion steps plain tensors")
            d = lib.lion_tensor_desc(p.numel(), _CODES[p.dtype])
            d.grad_dtype = _CODES[_grad_dtype(p)]
            descs.append(d)
        return Handle(self._config(index, group, seed, device), descs)

    def _config(self, index, group, seed, device, **override):
        """The LionConfig of group `index`'s optimizers on `device` (`override`: make_config's
        keywords to change, as `_check_config` does)."""
        cuda = device.type == "cuda"
        try:
            return make_config(self._init_lr, group["betas"], group["weight_decay"], self._decoupled,
                               cautious_factor=group["cautious_factor"], cautious_weight_decay=group["cautious_wd"],
                               device=DEVICE_CUDA if cuda else DEVICE_CPU,
                               device_index=(device.index or 0) if cuda else 0,
                               state_dtype=self._state_dtype(group), **dict(self._extra, seed=seed, **override))
        except (TypeError, ValueError) as e:
            raise type(e)(f"lion_ffi.torch.Lion: group {index}: {e}") from None

    def _check_config(self, index, group):
        """What a saved blob of group `index` is checked with before it replaces the group's
        momentum (`Blocks.load`): the group's config, on the CPU, one thread."""
        return self._config(index, group, 0, torch.device("cpu"), num_threads=1)

    def _make(self, index, group, block):
        """The block's liblion optimizer, checked against its parameters, made (anew, for new
        hyperparameters) where needed, with the group's lr."""
        params, owners = group["params"], self._blocks[index].owners
        _check_owners("lion_ffi.torch.Lion", index, params, owners, block.positions)
        layouts = [_layout(params[i]) for i in block.positions]
        if block.handle is not None:
            # liblion writes the layout's numel through each pointer: a parameter swapped for
            # another size, dtype or device (or made non-contiguous) since then is refused.
            for i, now, then in zip(block.positions, layouts, block.made_for[0]):
                if now != then:
                    raise ValueError(f"lion_ffi.torch.Lion: parameter {i} of group {index} is now {now}, its "
                                     f"optimizer was created for {then} (device, numel, dtype, grad dtype, "
                                     "contiguous)")
            if block.made_for[1] != _hyper(group):
                block.release()
        _check_grads("lion_ffi.torch.Lion", index, params, block.positions)  # the parameters as made for
        if block.handle is None:
            try:
                block.make(lambda positions, seed: self._create(index, group, positions, seed))
            except LionError as e:
                raise type(e)(e.status, f"lion_ffi.torch.Lion: group {index} (parameters "
                                        f"{list(block.positions)}): {e.message}") from None
            block.made_for = (layouts, _hyper(group))
            for i in block.positions:
                owners[i] = params[i]
                self.state[params[i]][_MARK] = True
        _set_lr("lion_ffi.torch.Lion", index, block.handle, group["lr"])
        return block.handle

    def register_step_in_backward(self, free_grads=True):
        """Steps each parameter as soon as its gradient is accumulated in a backward pass (see
        the module's docstring), and with `free_grads` sets its `.grad` to None then. Returns a
        handle whose `remove()` unregisters the hooks (after a backward pass has ended)."""
        if self._in_backward is not None:
            raise RuntimeError("lion_ffi.torch.Lion: register_step_in_backward was already called")
        if not hasattr(lib, "lion_step_tensors"):
            raise RuntimeError(f"lion_ffi.torch.Lion: the liblion at {lib._name} has no lion_step_tensors")
        self._hooks, self._frozen, self._free_grads = [], [], free_grads
        try:
            for index in range(len(self.param_groups)):
                self._hook_group(index)
        except BaseException:
            for h in self._hooks:  # none stays registered, so a later call starts afresh
                h.remove()
            self._hooks = self._frozen = None
            raise
        optimizer = self

        class Registration:
            def remove(self):
                optimizer._end_pass()
                for h in optimizer._hooks:
                    h.remove()
                optimizer._in_backward = optimizer._hooks = optimizer._frozen = None

        self._in_backward = Registration()
        return self._in_backward

    def _hook_group(self, index):
        """Hooks every parameter of group `index` that requires a gradient; a frozen one (which
        torch cannot hook) is recorded, and `step()` refuses it once it has a gradient."""
        for position, p in enumerate(self.param_groups[index]["params"]):
            if not p.requires_grad:
                self._frozen.append((index, position, p))
                continue
            hook = functools.partial(self._hook, index, position, self._free_grads)
            self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def _check_frozen(self, at_pass=False):
        """A parameter frozen when the hooks were registered and unfrozen since has no hook: it
        would never be stepped. Refused at each backward pass's first hook (`at_pass`) once it
        requires a gradient, and by `step()` once it has one."""
        for index, position, p in self._frozen:
            if p.requires_grad and (at_pass or p.grad is not None):
                raise RuntimeError(f"lion_ffi.torch.Lion: parameter {position} of group {index} did not require "
                                   "a gradient when register_step_in_backward was called, so it has no hook, and "
                                   "requires one now: remove() the registration and register again")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if getattr(self, "_hooks", None) is not None:  # stepping in backward: the new group too
            index, hooks = len(self.param_groups) - 1, len(self._hooks)
            try:
                self._hook_group(index)
            except BaseException:
                for h in self._hooks[hooks:]:
                    h.remove()
                del self._hooks[hooks:]
                self._frozen = [f for f in self._frozen if f[0] != index]
                self.param_groups.pop()
                raise

    def _begin_pass(self):
        """At a backward pass's first hook: every group's liblion optimizers made (checked,
        with the group's lr and hyperparameters) while no round is open, where each parameter
        lives in them, and the end of the pass queued."""
        where, counts, calls = {}, {}, []
        for index, group in enumerate(self.param_groups):
            blocks = self._blocks_of(index, group)
            for block in blocks.arrange(range(len(group["params"])), group["lr"]):
                handle = self._make(index, group, block)
                counts[id(handle)] = [handle, 0, len(block.positions), group["params"][block.positions[0]].device]
                for slot, position in enumerate(block.positions):
                    where[index, position] = (handle, slot)
                ps = [group["params"][i] for i in block.positions]
                calls.append((ps[0].device, handle, ps, list(map(_data_ptr, ps)), None, index, block.positions))
        _check_apart(calls)  # as a step's: the hooks step the parameters one by one
        self._pass, self._pass_end = (where, counts), None
        engine = getattr(torch.autograd.Variable, "_execution_engine", None)
        if engine is not None and hasattr(engine, "queue_callback"):
            end = _PassEnd(self)
            engine.queue_callback(end)  # runs when this backward pass ends
            self._pass_end = weakref.ref(end)  # autograd holds it until then

    def _end_failed_pass(self):
        """Ends the rounds of a backward pass that raised (autograd dropped its _PassEnd unrun),
        as `step()` ends a pass's: the next pass checks the tensors and takes the group's lr and
        hyperparameters anew, and a checkpoint can be saved."""
        if self._pass is not None and self._pass_end is not None and self._pass_end() is None:
            self._end_pass()

    @eager_under_compile  # queued by _begin_pass: it may run where dynamo traces
    def _end_pass(self):
        """Ends the rounds that the pass left open (parameters without a gradient in it)."""
        if self._pass is None:
            return
        _, counts = self._pass
        self._pass = None
        for handle, stepped, n, device in counts.values():
            if 0 < stepped < n:
                handle.finish_round(_stream_of(device))

    @eager_under_compile  # a compiled function's backward pass calls it
    @torch.no_grad()
    def _hook(self, index, position, free_grads, p):
        if p.grad is None:
            return
        self._end_failed_pass()
        task = _graph_task_id()  # -1 where torch does not say
        if self._pass is None:
            if _under_function_backward(sys._getframe(1)):  # once a round: the later hooks compare tasks
                _refuse_nested_pass()
            self._check_frozen(at_pass=True)
            self._begin_pass()
            self._pass_task = task
        elif 0 <= self._pass_task != task >= 0:
            _refuse_nested_pass()
        where, counts = self._pass
        params = self.param_groups[index]["params"] if index < len(self.param_groups) else ()
        if position >= len(params) or params[position] is not p:
            # Its slot was made for the tensor now at that place, if any: stepping p there would
            # read and write another size at p's address.
            raise ValueError(f"lion_ffi.torch.Lion: a hooked parameter is no longer parameter {position} of group "
                             f"{index} (groups reordered or removed, or another parameter put in its place since "
                             "register_step_in_backward): remove() the registration and register again")
        handle, slot = where[index, position]
        g = p.grad
        if g.dtype != p.dtype or not g.is_contiguous() or not _grad_fits(p, g):
            raise ValueError(f"lion_ffi.torch.Lion: parameter {position} of group {index}: its gradient must be "
                             f"contiguous, of its dtype, size and device (got {g.numel()} x {g.dtype} on {g.device})")
        stream = None
        if p.device.type == "cuda":
            current = torch.cuda.current_stream(p.device)
            g.record_stream(current)  # the step reads it there, after it may be freed below
            stream = current.cuda_stream
        handle.step_tensors([slot], [p.data_ptr()], [g.data_ptr()], stream=stream)
        _written(p)
        entry = counts[id(handle)]
        entry[1] += 1
        if free_grads:
            p.grad = None
        if entry[1] == entry[2]:
            entry[1] = 0  # the round is complete: the step is counted

    @step_with_hooks  # no no_grad: the step runs no torch operation that autograd would record
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._in_backward is not None:
            # The hooks stepped every parameter that got a gradient; a round still open (a
            # pass whose end was not queued) ends here.
            self._end_pass()
            self._check_frozen()
            return loss
        # Every group's tensors are checked (parameters that share memory too: `_check_apart`), and
        # its liblion optimizers made, before any is stepped. liblion's own checks of a call (a
        # gradient that overlaps a parameter, say) come with that call: a group it refuses raises
        # after the groups before it have stepped.
        work, checked = [], []
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            if any(map(operator.is_, grads, repeat(None))):
                have = [i for i, g in enumerate(grads) if g is not None]
                if not have:
                    continue
            else:
                have = None  # every parameter has its gradient
            for block in self._blocks_of(index, group).arrange(have, group["lr"]):
                if block.positions == _all_positions(len(params)):  # the usual block: every tensor, in order
                    ps, gs = params, grads
                else:
                    ps, gs = [params[i] for i in block.positions], [grads[i] for i in block.positions]
                ptrs = list(map(_data_ptr, ps))
                if (block.handle is None or block.checked is None or not block.checked.holds(ps, gs, ptrs)
                        or block.made_for[1] != _hyper(group)):
                    handle = self._make(index, group, block)  # the full check, and made anew if need be
                    checked.append((block, _Checked(ps, gs, ptrs)))
                else:
                    handle = block.handle
                    _set_lr("lion_ffi.torch.Lion", index, handle, group["lr"])
                work.append((ps[0].device, handle, ps, ptrs, list(map(_data_ptr, gs)), index, block.positions))
        if checked:  # the full check ran: with the blocks it accepted, the step's tensors are apart
            _check_apart(work)
            for block, check in checked:
                block.checked = check
        flags = {}
        for device, handle, ps, param_ptrs, grad_ptrs, _, _ in work:
            options = _amp_options(self, device, flags)
            handle.step(param_ptrs, grad_ptrs, stream=_stream_of(device), options=options)
            _written(ps)
        return loss

    # torch's Optimizer pickles and copies only defaults, state and param_groups; the momentum
    # lives in liblion's optimizers, which go as their checkpoints and are made anew from them
    # at the copy's first step (register_step_in_backward's hooks are not copied).
    _COPIED = ("_init_lr", "_decoupled", "_extra", "_state")

    def _saved_blocks(self):
        """Every group's blocks as their checkpoints (`Blocks.save`), by group index: the
        state dict's "liblion" key, and what a copy carries (those of groups removed from the
        end left out), once `_check_saved_places` passes."""
        self._check_momentum_places()
        return {i: b.save() for i, b in self._blocks.items() if b.blocks and i < len(self.param_groups)}

    def _check_momentum_places(self):
        _check_saved_places("lion_ffi.torch.Lion", self.param_groups,
                            {i: b.owners for i, b in self._blocks.items()})

    def __getstate__(self):
        self._end_failed_pass()
        _drop_stale_marks(self)
        if self._pass is not None:
            raise RuntimeError("lion_ffi.torch.Lion: cannot be copied or pickled inside a backward pass that "
                               "steps it")
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in self._COPIED})
        state["liblion"] = self._saved_blocks()
        return state

    def __setstate__(self, state):
        if "_init_lr" not in state:  # torch's load_state_dict ends here too, with its own two keys
            return super().__setstate__(state)
        state = dict(state)
        saved = state.pop("liblion", {})
        super().__setstate__(state)
        self._blocks, self._in_backward, self._pass, self._pass_end = {}, None, None, None
        self._hooks = self._frozen = None
        for index, group in enumerate(self.param_groups):
            if index in saved:
                self._blocks_of(index, group).load(saved[index], f"lion_ffi.torch.Lion: group {index}",
                                                   [p.numel() for p in group["params"]],
                                                   self._check_config(index, group))

    def state_dict(self):
        self._end_failed_pass()
        _drop_stale_marks(self)
        state = super().state_dict()
        state["liblion"] = self._saved_blocks()
        return state

    def load_state_dict(self, state_dict):
        """Loads a state_dict of this class, or of lion-pytorch's Lion or cautious Lion (whose
        `exp_avg`s become the momentum; the group keys it lacks take this optimizer's defaults).
        One it refuses changes nothing."""
        _refuse_lost_momentum("lion_ffi.torch.Lion", state_dict)
        state_dict = dict(state_dict)
        saved = state_dict.pop("liblion", None)
        if saved is not None and any(type(k) is not int or k < 0 for k in saved):
            # Keys of groups removed from the end (past the saved groups) are left out below.
            raise ValueError(f"lion_ffi.torch.Lion.load_state_dict: its 'liblion' key is keyed by {list(saved)!r}, "
                             "not by group indexes (a state dict changed on its way, through JSON say)")
        self._end_failed_pass()
        # torch's load puts new groups and state in place of the old ones, which it leaves as they were.
        before = self.param_groups, self.state, self._blocks
        try:
            super().load_state_dict(state_dict)
            self._blocks = {}
            for index, group in enumerate(self.param_groups):
                for key, value in self.defaults.items():
                    group.setdefault(key, value)
                blocks = self._blocks_of(index, group)
                if saved is None:
                    self._import(index, group, blocks)
                elif index in saved:
                    blocks.load(saved[index], f"lion_ffi.torch.Lion: group {index}",
                                [p.numel() for p in group["params"]], self._check_config(index, group))
        except BaseException:
            self.param_groups, self.state, self._blocks = before
            raise
        self.state.clear()  # the imported exp_avgs, now in liblion's blobs
        for index, blocks in self._blocks.items():
            for block in blocks.blocks:
                for i in block.positions:
                    self.state[self.param_groups[index]["params"][i]][_MARK] = True

    def _import(self, index, group, blocks):
        positions, tensors = [], []
        for i, p in enumerate(group["params"]):
            exp_avg = self.state.get(p, {}).get("exp_avg")
            if exp_avg is None:
                continue
            if exp_avg.shape != p.shape or exp_avg.dtype not in _CODES:
                raise ValueError(f"lion_ffi.torch.Lion: parameter {i} of group {index}: exp_avg is "
                                 f"{tuple(exp_avg.shape)} x {exp_avg.dtype}, the parameter {tuple(p.shape)} x "
                                 f"{p.dtype}")
            positions.append(i)
            tensors.append(exp_avg.detach().to("cpu").contiguous())
        if positions:
            momenta = [(t.data_ptr(), t.numel(), _CODES[t.dtype]) for t in tensors]
            blocks.blocks = [blocks.with_momentum(positions, momenta, self._state_dtype(group), group["lr"])]

    def state_dict_lion_pytorch(self):
        """This optimizer's state as lion-pytorch 0.2.5's Lion (and its cautious variant) saves it:
        torch's layout, with an `exp_avg` (the momentum, in the parameter's dtype, shape and
        device) for each parameter that has momentum. `lion_pytorch.Lion.load_state_dict` takes it."""
        _drop_stale_marks(self)
        self._check_momentum_places()
        state = super().state_dict()
        state["state"] = {}  # liblion's marks (_MARK) out: lion-pytorch reads a state entry as its own
        for index, group in enumerate(self.param_groups):
            if index not in self._blocks:
                continue
            momenta, code = self._blocks[index].momentum()
            for i, m in momenta.items():
                p = group["params"][i]
                t = torch.from_numpy(m.view(np.int16) if code == DTYPE_BF16 else m)
                t = t.view(torch.bfloat16) if code == DTYPE_BF16 else t
                exp_avg = t.to(device=p.device, dtype=p.dtype).reshape(p.shape)
                state["state"][state["param_groups"][index]["params"][i]] = {"exp_avg": exp_avg}
        return state


class DistributedLion(torch.optim.Optimizer):
    """Distributed Lion for a torch.distributed (NCCL) job, one process per GPU: liblion's
    sharded mode (ZeRO-1: each rank keeps the momentum of 1/W of the parameters; gradients
    reduce-scattered, parameters all-gathered; bit-identical to one process on the mean
    gradient) or vote mode (Distributed Lion, majority vote: no gradient is sent, only 2-bit
    votes; every rank keeps the momentum of its own gradients).

        dist.init_process_group("nccl", ...)            # torch.cuda.set_device(local_rank) first
        model = Net().cuda()                            # NOT wrapped in DDP: this optimizer
        opt = DistributedLion(model.parameters(), lr=1e-4, weight_decay=0.1, mode="vote")
        loss_fn(model(x), y).backward()                 # each rank on its own batch
        opt.step()                                      # collective: every rank, every step

    The step goes on the current CUDA stream, collectives included, and never waits for the
    device. `process_group`: the group of ranks (default: the world). `join`: 'borrow' uses
    the group's own NCCL communicator (torch's `ProcessGroupNCCL._comm_ptr()`, the same libnccl
    torch loaded), 'unique_id' makes liblion's own from an id broadcast through the group, and
    'auto' (default) borrows where torch lets it. Each param group is one liblion optimizer; all
    of a group's parameters live on this rank's GPU, contiguous, and in sharded mode share one
    dtype (and their gradients one). A parameter without a gradient steps with a zero gradient
    (in vote mode, its rank abstains where its momentum is zero). GradScaler works as with
    `Lion` (a found_inf on any rank skips the step on every rank). `state_dtype` picks the
    momentum's dtype as `Lion`'s does ('q8', 8-bit momentum, in vote mode only: the sharded
    mode refuses it).

    Every rank must create this optimizer alike (same groups, hyperparameters and seed) and
    call `step()`, and in sharded mode `state_dict()`, together. A sharded `state_dict()` holds
    the single-process checkpoint, loadable on any number of ranks; a vote one holds this rank's
    momentum. A group whose step one rank refuses (its tensors changed since creation, say)
    raises there and is skipped on every rank, while the other groups step; a group that one
    rank refuses at creation (at its first step) fails on every rank, as do ranks created
    differently; betas, weight_decay, cautious_factor and cautious_wd are taken at a group's
    first step (or `load_state_dict`), and a later change of one raises at the next step (the
    step skipped on every rank); ranks whose lr or step count come to differ skip every step, and the next
    `step_count()` raises.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, mode="sharded",
                 process_group=None, join="auto", vote_exchange="auto", decoupled_weight_decay=False,
                 cautious_factor=1.0, cautious_wd=False, stochastic_rounding=False, seed=0,
                 state_dtype=None):
        if not lr > 0.0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if state_dtype not in _STATE_CODES:
            raise ValueError(f"state_dtype must be None (f32, or bf16 for a group of bf16 parameters), 'f32', "
                             f"'bf16' or 'q8', got {state_dtype!r}")
        if mode not in ("sharded", "vote"):
            raise ValueError(f"mode must be 'sharded' or 'vote', got {mode!r}")
        if join not in ("auto", "borrow", "unique_id"):
            raise ValueError(f"join must be 'auto', 'borrow' or 'unique_id', got {join!r}")
        make_config(lr, betas, weight_decay, decoupled_weight_decay, cautious_factor=cautious_factor,
                    cautious_weight_decay=cautious_wd, stochastic_rounding=stochastic_rounding, seed=seed)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, cautious_factor=cautious_factor,
                        cautious_wd=cautious_wd)
        super().__init__(params, defaults)
        import torch.distributed as tdist
        self._dist = tdist
        self._pg = process_group if process_group is not None else tdist.group.WORLD
        self._mode, self._join, self._exchange = mode, join, vote_exchange
        self._init_lr, self._decoupled = lr, decoupled_weight_decay
        self._extra = dict(stochastic_rounding=stochastic_rounding, seed=seed)
        self._state = _STATE_CODES[state_dtype]
        self._handles = {}  # group index -> Handle
        self._zeros = {}  # parameter -> a zero gradient, for steps where it has none

    def __getstate__(self):
        raise TypeError("lion_ffi.torch.DistributedLion cannot be copied or pickled (its liblion optimizers are "
                        "made together by every rank over one communicator): save its state_dict() and load "
                        "it into a new one, made on every rank")

    def _nccl_group(self, device):
        from .dist import NcclGroup, nccl_unique_id
        d, pg = self._dist, self._pg
        rank, world = d.get_rank(pg), d.get_world_size(pg)
        kw = dict(vote_exchange=self._exchange)
        if self._join in ("auto", "borrow"):
            try:
                backend = pg._get_backend(device)
                # torch makes the NCCL communicator at the group's first collective on the device.
                d.all_reduce(torch.zeros(1, device=device), group=pg)
                comm = backend._comm_ptr()
                if comm:
                    return NcclGroup(self._mode, rank, world, comm=comm, **kw)
                why = "its _comm_ptr() is 0"
            except (AttributeError, RuntimeError) as e:
                why = f"{type(e).__name__}: {e}"
            if self._join == "borrow":
                raise RuntimeError(f"lion_ffi.torch.DistributedLion: cannot borrow the process group's NCCL "
                                   f"communicator ({why}); use join='unique_id'")
        ids = [nccl_unique_id() if rank == 0 else None]
        d.broadcast_object_list(ids, src=d.get_global_rank(pg, 0), group=pg, device=device)
        return NcclGroup(self._mode, rank, world, unique_id=ids[0], **kw)

    def _handle(self, index, group):
        """Group `index`'s liblion optimizer, made (collectively) at its first use. A group this
        rank refuses still takes part in making it, with arguments liblion refuses on every
        rank, so that the other ranks fail with it instead of waiting for it."""
        handle = self._handles.get(index)
        if handle is not None:
            return handle
        params = group["params"]
        first = params[0].device if params and params[0].device.type == "cuda" else None
        device = first or torch.device("cuda", torch.cuda.current_device())
        try:
            descs = self._descs(params, device if first is not None else None)
            config = make_config(self._init_lr, group["betas"], group["weight_decay"], self._decoupled,
                                 cautious_factor=group["cautious_factor"],
                                 cautious_weight_decay=group["cautious_wd"], device=DEVICE_CUDA,
                                 device_index=device.index or 0, state_dtype=_momentum_dtype(self._state, params),
                                 **dict(self._extra, seed=group_seed(self._extra["seed"], index)))
        except Exception as refused:  # noqa: BLE001 (whatever it is, the other ranks must hear of it)
            # No tensors: refused on every rank, this one included, after the same joins.
            nothing = make_config(1.0, (0.9, 0.99), 0.0, device=DEVICE_CUDA, device_index=device.index or 0)
            nccl = self._nccl_group(device)
            try:
                Handle(nothing, [], nccl)
            except LionError:
                pass
            if isinstance(refused, (TypeError, ValueError)):
                raise type(refused)(f"lion_ffi.torch.DistributedLion: group {index}: {refused}") from None
            raise
        handle = Handle(config, descs, self._nccl_group(device))
        handle.device, handle.hyper = device, _hyper(group)
        handle.made_for, handle.checked = [_layout(p) for p in params], None
        handle.owners = list(params)
        self._handles[index] = handle
        for p in params:  # as Lion's: torch's tools read an empty state as never stepped
            self.state[p][_MARK] = True
        return handle

    @staticmethod
    def _descs(params, device):
        if not params:
            raise ValueError("it has no parameters")
        if device is None or any(p.device != device for p in params):
            raise ValueError("every parameter must be on this rank's one CUDA device")
        descs = []
        for i, p in enumerate(params):
            g = p.grad
            if g is not None and not _grad_fits(p, g):
                raise ValueError(f"parameter {i} has {p.numel()} elements on {p.device}, its gradient {g.numel()} "
                                 f"on {g.device}")
            if p.dtype not in _CODES or _grad_dtype(p) not in _CODES or not p.is_contiguous():
                raise ValueError(f"parameter {i} must be contiguous float32, float16 or bfloat16 (its gradient "
                                 "too)")
            if p.numel() and p.data_ptr() == 0:
                raise ValueError(f"parameter {i} has no memory of its own (data_ptr() is 0: a DTensor, as FSDP2 "
                                 "shards parameters); liblion steps plain tensors")
            d = lib.lion_tensor_desc(p.numel(), _CODES[p.dtype])
            d.grad_dtype = _CODES[_grad_dtype(p)]
            descs.append(d)
        return descs

    def _grad(self, p):
        if p.grad is not None:
            return p.grad
        zero = self._zeros.get(p)
        if zero is None:
            zero = self._zeros[p] = torch.zeros_like(p)
        return zero

    @step_with_hooks
    def step(self, closure=None):
        """One collective step of every group. A group that one rank refuses (its tensors
        changed, say) is skipped on every rank and the others step; its error is raised after."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flags, error = {}, None
        for index, group in enumerate(self.param_groups):
            try:
                handle = self._handle(index, group)  # a refusal here is every rank's
            except LionError as e:
                if not _every_ranks(e):
                    raise
                error = error or e
                continue
            except (TypeError, ValueError) as e:
                error = error or e
                continue
            stream = _stream_of(handle.device)
            try:
                if _hyper(group) != handle.hyper:
                    raise ValueError(f"lion_ffi.torch.DistributedLion: group {index}: its betas, weight_decay, "
                                     "cautious_factor or cautious_wd changed since its first step, which they "
                                     "were taken at (lr may change at any step): make a new DistributedLion on "
                                     "every rank and load this one's state_dict() into it")
                params = group["params"]
                grads = [p.grad for p in params]
                if any(map(operator.is_, grads, repeat(None))):
                    grads = [self._grad(p) for p in params]
                ptrs = list(map(_data_ptr, params))
                if handle.checked is None or not handle.checked.holds(params, grads, ptrs):
                    # A zero gradient from _grad has its parameter's dtype and layout.
                    _check_owners("lion_ffi.torch.DistributedLion", index, params, handle.owners,
                                  range(min(len(params), len(handle.owners))))
                    _check_dist_layouts(index, [_layout(p) for p in params], handle.made_for)
                    _check_grads("lion_ffi.torch.DistributedLion", index, params, range(len(params)))
                    handle.checked = _Checked(params, grads, ptrs)
                _set_lr("lion_ffi.torch.DistributedLion", index, handle, group["lr"])
                options = _amp_options(self, handle.device, flags)
                ptrs = handle._pointer_array(ptrs, 0), handle._pointer_array(list(map(_data_ptr, grads)), 1)
            except Exception as e:  # noqa: BLE001 (whatever it is, the other ranks must hear of it)
                handle.refuse_step(stream)  # the other ranks are in this step's collectives
                error = error or e
                continue
            try:
                handle.step(*ptrs, stream=stream, options=options)
            except LionError as e:
                if not _every_ranks(e):
                    raise
                error = error or e
            else:
                _written(params)
        if error is not None:
            raise error
        return loss

    def step_count(self, index=0):
        """Steps taken by group `index`'s optimizer (waits for the device; raises if a step was
        skipped because the ranks differ)."""
        out = ctypes.c_uint64()
        from ._lib import check
        check(lib.lion_step_count(self._handles[index].ptr, ctypes.byref(out)), "lion_step_count")
        return out.value

    def state_dict(self):
        """Collective in sharded mode: every rank calls it (the momentum is gathered)."""
        # Every rank refuses alike (their groups are alike) before the collective saves.
        _check_saved_places("lion_ffi.torch.DistributedLion", self.param_groups,
                            {i: h.owners for i, h in self._handles.items()})
        _drop_stale_marks(self)
        state = super().state_dict()
        state["liblion"] = {i: h.save() for i, h in self._handles.items()}
        state["liblion_mode"] = self._mode
        return state

    def load_state_dict(self, state_dict):
        """Collective: every rank calls it. The groups' blobs load one after another, each on
        every rank together: a blob that liblion refuses raises after the groups before it
        have loaded (unlike `Lion.load_state_dict`, which changes nothing then); loading a
        good state_dict puts every group back."""
        _refuse_lost_momentum("lion_ffi.torch.DistributedLion", state_dict)
        state_dict = dict(state_dict)
        saved = state_dict.pop("liblion", {})
        mode = state_dict.pop("liblion_mode", self._mode)
        if saved and mode != self._mode:
            raise ValueError(f"lion_ffi.torch.DistributedLion: a {mode} state_dict cannot load into {self._mode} mode")
        super().load_state_dict(state_dict)
        # A group saved before its first step starts anew, as saved; one whose hyperparameters
        # the state_dict changes is made anew with them (at its load below: every rank loads).
        for index in [i for i, h in self._handles.items()
                      if i not in saved or h.hyper != _hyper(self.param_groups[i])]:
            del self._handles[index]
        for index, blob in saved.items():
            self._handle(index, self.param_groups[index]).load(blob)
