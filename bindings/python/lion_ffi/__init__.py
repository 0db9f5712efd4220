"""lion_ffi: liblion (the Lion optimizer with a C ABI) from Python, through ctypes.

    import numpy as np, lion_ffi
    opt = lion_ffi.Lion([w, b], lr=1e-4, weight_decay=0.1)    # numpy arrays, updated in place
    opt.step([gw, gb])
    opt.lr = 5e-5; blob = opt.save(); opt.load(blob)

`lion_ffi.torch.Lion` is a torch.optim.Optimizer, a drop-in for lion_pytorch.Lion.
The library is LION_LIBRARY when it is set and not empty (that file or an OSError, no fallback); otherwise the
one beside this package, then a checkout's target/release, then the system loader's.
"""
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from ._lib import (DECAY_CORRECTED, DECAY_DECOUPLED, DECAY_STANDARD, DTYPE_BF16, DTYPE_F16, DTYPE_F32, DTYPE_Q8,
                   Handle, LionError, LionValueError, StepOptions, lib, make_config)

__all__ = ["Lion", "LionError", "LionValueError", "version", "DECAY_STANDARD", "DECAY_DECOUPLED", "DECAY_CORRECTED"]


def version() -> str:
    return lib.lion_version().decode()


def _bfloat16():
    try:
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        return None


def _dtype_code(dtype, what):
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return DTYPE_F32
    if dtype == np.float16:
        return DTYPE_F16
    bf16 = _bfloat16()
    if bf16 is not None and dtype == bf16:
        return DTYPE_BF16
    raise TypeError(f"{what}: dtype {dtype} is not supported (float32, float16, or bfloat16 with ml_dtypes)")


def _state_code(state_dtype):
    if isinstance(state_dtype, str):
        codes = {"float32": DTYPE_F32, "f32": DTYPE_F32, "bfloat16": DTYPE_BF16, "bf16": DTYPE_BF16, "q8": DTYPE_Q8}
        if state_dtype in codes:
            return codes[state_dtype]
    elif isinstance(state_dtype, (int, np.integer)) and not isinstance(state_dtype, bool) and \
            state_dtype in (DTYPE_F32, DTYPE_BF16, DTYPE_Q8):
        return int(state_dtype)
    elif isinstance(state_dtype, (type, np.dtype)):  # np.float32, np.dtype("float32"), ml_dtypes.bfloat16
        try:
            dtype = np.dtype(state_dtype)
        except TypeError:
            dtype = None
        if dtype == np.float32:
            return DTYPE_F32
        if dtype is not None and _bfloat16() is not None and dtype == _bfloat16():
            return DTYPE_BF16
    raise ValueError(f"state_dtype must be 'float32' ('f32'), 'bfloat16' ('bf16') or 'q8' (8-bit momentum), "
                     f"got {state_dtype!r}")


def _check_array(a, what, writeable):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(a).__name__}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} is not C-contiguous: pass np.ascontiguousarray(...) (and keep it)")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{what} is read-only")


def _per_tensor(values, what, n):
    """`values` (one per parameter, default 1.0) as a list, refusing a list of another length."""
    if values is None:
        return [1.0] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries, expected {n} (one per parameter)")
    return values


def _refuse_creation(dist):
    """Takes part in a distributed creation as a rank that refuses it, for a front end that
    found this rank's arguments wrong: an optimizer of no tensors, which liblion refuses on
    every rank (the others are told another rank refused) instead of leaving them waiting."""
    try:
        Handle(make_config(1.0, (0.9, 0.99), 0.0), [], dist)
    except Exception:  # noqa: BLE001 (refused, as meant; or `dist` is no group: the caller's error stands)
        pass
    if hasattr(dist, "error"):
        dist.error = None


class Lion:
    """The Lion optimizer over numpy arrays, updated in place on the CPU.

    Every hyperparameter of liblion's ABI is a keyword (a CPU optimizer; each gradient of its
    parameter's dtype; `step` takes `grad_scale` and `check_finite`; torch users on CUDA:
    `lion_ffi.torch`): `decoupled_weight_decay` (lion-pytorch's) or
    `decay_mode` (lion_ffi.DECAY_*), `cautious_factor` (1 = off, 0 = Cautious Lion),
    `cautious_weight_decay`, `state_dtype` ('float32', 'bfloat16' or 'q8': 8-bit momentum, about
    1.016 bytes per element, docs/ABI.md), `stochastic_rounding`,
    `seed`, `num_threads` (0 = one per hardware thread), and per-tensor `lr_scales` / `weight_decay_scales`.
    `dist`: a `lion_ffi.dist.Group` makes this one rank of a distributed optimizer (then the
    construction, `step`, and `save` in sharded mode, are collective).
    """

    def __init__(self, params: Iterable[np.ndarray], lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, decoupled_weight_decay: bool = False, decay_mode: Optional[int] = None,
                 cautious_factor: float = 1.0, cautious_weight_decay: bool = False,
                 state_dtype: Union[str, np.dtype] = "float32", stochastic_rounding: bool = False, seed: int = 0,
                 num_threads: int = 0, lr_scales: Optional[Sequence[float]] = None,
                 weight_decay_scales: Optional[Sequence[float]] = None, dist=None) -> None:
        try:
            if isinstance(params, np.ndarray):
                raise TypeError("params must be a list of arrays (an array alone would be stepped as one "
                                "tensor per row)")
            self.params = list(params)
            if not self.params:
                raise ValueError("params is empty")
            lr_scales = _per_tensor(lr_scales, "lr_scales", len(self.params))
            weight_decay_scales = _per_tensor(weight_decay_scales, "weight_decay_scales", len(self.params))
            descs = []
            for i, p in enumerate(self.params):
                _check_array(p, f"params[{i}]", writeable=True)
                d = lib.lion_tensor_desc(p.size, _dtype_code(p.dtype, f"params[{i}]"))
                d.lr_scale, d.weight_decay_scale = float(lr_scales[i]), float(weight_decay_scales[i])
                descs.append(d)
            config = make_config(lr, betas, weight_decay, decoupled_weight_decay, decay_mode, cautious_factor,
                                 cautious_weight_decay, state_dtype=_state_code(state_dtype),
                                 stochastic_rounding=stochastic_rounding, seed=seed, num_threads=num_threads)
        except Exception:
            if dist is not None:
                _refuse_creation(dist)  # the other ranks are in the creation's check
            raise
        try:
            self._handle = Handle(config, descs, dist)  # collective with more than one rank
        except LionError as e:
            if dist is not None and dist.error is not None:  # a collective's own exception
                cause, dist.error = dist.error, None
                raise e from cause
            raise
        self._layout = [(p.size, p.dtype) for p in self.params]

    def _check_params(self):
        # The arrays are the caller's: one may have been made read-only (or resized) since
        # construction, and liblion would write through its pointer regardless.
        for i, (p, (size, dtype)) in enumerate(zip(self.params, self._layout)):
            _check_array(p, f"params[{i}]", writeable=True)
            if p.size != size or p.dtype != dtype:
                raise ValueError(f"params[{i}] is now {p.size} x {p.dtype}, the optimizer was created for "
                                 f"{size} x {dtype}")

    def step(self, grads: Iterable[np.ndarray], *, grad_scale: float = 1.0, check_finite: bool = False) -> None:
        """Updates the parameters in place from `grads` (one array per parameter, same size;
        float32, float16 or bfloat16). Everything is checked before anything is written. Every
        parameter needs a gradient at every step (liblion steps them together, and a zero
        gradient still moves a parameter): give parameters that may lack one their own Lion.
        (`lion_ffi.torch.Lion` skips a parameter without a gradient.)"""
        try:
            grads = self._checked_grads(grads)
            options = None
            if grad_scale != 1.0 or check_finite:
                options = lib.lion_step_options_default()
                options.grad_scale, options.check_finite = float(grad_scale), bool(check_finite)
        except Exception:
            dist = self._handle.dist
            if dist is not None:
                self._handle.refuse_step()  # the other ranks are in this step's collectives
                dist.error = None  # a collective's exception there is not this error's cause
            raise
        try:
            self._handle.step([p.ctypes.data for p in self.params], [g.ctypes.data for g in grads],
                              options=options)
        except LionError as e:
            dist = self._handle.dist
            if dist is not None and dist.error is not None:  # the collective's own exception
                cause, dist.error = dist.error, None
                raise e from cause
            raise

    def _checked_grads(self, grads):
        self._check_params()
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"expected {len(self.params)} gradients, got {len(grads)}")
        for i, (p, g) in enumerate(zip(self.params, grads)):
            _check_array(g, f"grads[{i}]", writeable=False)
            _dtype_code(g.dtype, f"grads[{i}]")
            if g.size != p.size:
                raise ValueError(f"grads[{i}] has {g.size} elements, params[{i}] has {p.size}")
            if _dtype_code(g.dtype, "") != _dtype_code(p.dtype, ""):
                raise TypeError(f"grads[{i}] is {g.dtype} but params[{i}] is {p.dtype}: the optimizer was "
                                "created for gradients of the parameters' dtype")
        return grads

    @property
    def lr(self) -> float:
        return self._handle.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._handle.lr = value

    @property
    def step_count(self) -> int:
        return self._handle.step_count

    def save(self) -> bytes:
        """The checkpoint blob (bytes): momentum, step count, lr."""
        return self._handle.save()

    def load(self, blob: bytes) -> None:
        self._handle.load(blob)

    def save_file(self, path) -> None:
        """Writes the checkpoint to the file `path` (str, bytes or os.PathLike) so that a crash
        or a full disk at any moment leaves the previous file whole (a temporary file beside
        it, flushed and renamed over it)."""
        self._handle.save_file(path)

    def load_file(self, path) -> None:
        """Loads a checkpoint file of `save_file` (or `save`'s bytes written to a file)."""
        self._handle.load_file(path)
