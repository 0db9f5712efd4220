"""Loading liblion and declaring its C ABI (include/lion.h) for ctypes."""
import array
import ctypes
import ctypes.util
import operator
import os
from pathlib import Path

# MIRROR(abi-constants): include/lion.h LionStatus, LION_DTYPE_*, LION_DEVICE_*, LION_DECAY_*; checked by bindings/python/tests/test_layout.py
OK, NULL_POINTER, INVALID_ARGUMENT, UNSUPPORTED, DEVICE_UNAVAILABLE, DEVICE, OUT_OF_MEMORY, CORRUPT_STATE, PANIC, IO, NON_FINITE, COMM, \
    ROUND_OPEN = range(13)
STATUS_NAMES = ["LION_OK", "LION_ERROR_NULL_POINTER", "LION_ERROR_INVALID_ARGUMENT", "LION_ERROR_UNSUPPORTED",
                "LION_ERROR_DEVICE_UNAVAILABLE", "LION_ERROR_DEVICE", "LION_ERROR_OUT_OF_MEMORY",
                "LION_ERROR_CORRUPT_STATE", "LION_ERROR_PANIC", "LION_ERROR_IO", "LION_ERROR_NON_FINITE",
                "LION_ERROR_COMM", "LION_ERROR_ROUND_OPEN"]
DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_Q8 = 0, 1, 2, 3
DIST_SHARDED, DIST_VOTE = 1, 2
VOTE_AUTO, VOTE_SUMS, VOTE_GATHER = 0, 1, 2
COMM_F32, COMM_F16, COMM_BF16, COMM_I8, COMM_U8, COMM_U64 = range(6)
NCCL_UNIQUE_ID_BYTES = 128
DEVICE_CPU, DEVICE_CUDA = 0, 1
DECAY_STANDARD, DECAY_DECOUPLED, DECAY_CORRECTED = 0, 1, 2


class LionError(RuntimeError):
    """A failed liblion call; `status` is the LionStatus value."""

    def __init__(self, status, message):
        name = STATUS_NAMES[status] if 0 <= status < len(STATUS_NAMES) else f"status {status}"
        super().__init__(f"{name}: {message}")
        self.status, self.message = status, message

    def __reduce__(self):  # pickled as its two arguments (process pools send exceptions back)
        return type(self), (self.status, self.message)


class LionValueError(LionError, ValueError):
    """An invalid argument (or NULL pointer) refused by liblion."""


# MIRROR(abi-structs): include/lion.h LionConfig; checked by bindings/python/tests/test_layout.py
class Config(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("lr", ctypes.c_float), ("beta1", ctypes.c_float),
                ("beta2", ctypes.c_float), ("weight_decay", ctypes.c_float), ("decay_mode", ctypes.c_uint32),
                ("cautious_factor", ctypes.c_float), ("cautious_weight_decay", ctypes.c_bool),
                ("device", ctypes.c_uint32), ("device_index", ctypes.c_int32), ("state_dtype", ctypes.c_uint32),
                ("stochastic_rounding", ctypes.c_bool), ("seed", ctypes.c_uint64), ("num_threads", ctypes.c_uint32)]


# MIRROR(abi-structs): include/lion.h LionTensorDesc; checked by bindings/python/tests/test_layout.py
class TensorDesc(ctypes.Structure):
    _fields_ = [("numel", ctypes.c_uint64), ("param_dtype", ctypes.c_uint32), ("grad_dtype", ctypes.c_uint32),
                ("lr_scale", ctypes.c_float), ("weight_decay_scale", ctypes.c_float)]


# MIRROR(abi-structs): include/lion.h LionStepOptions; checked by bindings/python/tests/test_layout.py
class StepOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("grad_scale", ctypes.c_float),
                ("found_inf", ctypes.c_void_p), ("lr", ctypes.c_void_p), ("check_finite", ctypes.c_bool)]


# The caller's collectives: int (*)(void *context, const void *send, void *recv, size_t count,
# LionCommDType dtype, void *stream), 0 on success.
COLLECTIVE = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_size_t, ctypes.c_uint32, ctypes.c_void_p)


# MIRROR(abi-structs): include/lion.h LionCollectives; checked by bindings/python/tests/test_layout.py
class Collectives(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("context", ctypes.c_void_p),
                ("all_reduce_sum", ctypes.c_void_p), ("reduce_scatter_sum", ctypes.c_void_p),
                ("all_gather", ctypes.c_void_p)]


# MIRROR(abi-structs): include/lion.h LionDistConfig; checked by bindings/python/tests/test_layout.py
class DistConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("mode", ctypes.c_uint32), ("rank", ctypes.c_int32),
                ("world_size", ctypes.c_int32), ("collectives", ctypes.c_void_p), ("nccl_comm", ctypes.c_void_p),
                ("nccl_unique_id", ctypes.c_void_p), ("nccl_library", ctypes.c_char_p),
                ("vote_exchange", ctypes.c_uint32)]


def _candidates():
    here = Path(__file__).resolve().parent
    yield here / "liblion.so"  # the bundled copy, which `pip install ./bindings/python` builds
    for parent in here.parents:  # the repository's build, when run from a checkout
        yield parent / "target" / "release" / "liblion.so"
    found = ctypes.util.find_library("lion")
    if found:
        yield Path(found)
    yield Path("liblion.so")  # the system loader's search path


# The ABI these bindings declare (include/lion.h LION_ABI_VERSION; the SONAME's number):
# another major version may differ in any struct or call, so its library is refused.
ABI_VERSION = 1


def _open(path):
    lib = ctypes.CDLL(str(path))
    if not hasattr(lib, "lion_abi_version"):
        raise OSError("no symbol lion_abi_version: not liblion")
    lib.lion_abi_version.restype = ctypes.c_uint32
    abi = lib.lion_abi_version()
    if abi != ABI_VERSION:
        raise OSError(f"liblion's ABI version is {abi}, these bindings declare version {ABI_VERSION}: "
                      "install lion_ffi of that liblion, or name a liblion of ABI 1")
    return lib


def _load():
    env = os.environ.get("LION_LIBRARY")
    if env:
        # Exactly this file: falling through to another liblion would hide the mistake.
        if not os.path.exists(env):
            raise OSError(f"LION_LIBRARY={env}: no such file")
        try:
            return _open(os.path.abspath(env))  # a path, never a name for the loader to search
        except OSError as e:
            raise OSError(f"LION_LIBRARY={env} could not be loaded: {e}") from None
    tried = []
    for path in _candidates():
        if path.parent != Path(".") and not path.exists():
            tried.append(str(path))
            continue
        try:
            return _open(path)
        except OSError as e:
            tried.append(f"{path} ({e})")
    raise OSError("liblion was not found: set LION_LIBRARY to the path of liblion.so. Tried: " + "; ".join(tried))


lib = _load()
# The file that was loaded: LION_LIBRARY's, the bundled one, a checkout's, or the loader's pick.
library_path = lib._name
P = ctypes.c_void_p
# array.array's code for a pointer-sized unsigned int (None: none is; ctypes arrays then).
_WORD = next((c for c in "QLI" if array.array(c).itemsize == ctypes.sizeof(P)), None)


def _address_of(buffer):
    """A ctypes array as it is; an array.array as the address of its first element."""
    return buffer if isinstance(buffer, ctypes.Array) else buffer.buffer_info()[0]


lib.lion_config_default.restype = Config
lib.lion_tensor_desc.restype = TensorDesc
lib.lion_tensor_desc.argtypes = [ctypes.c_uint64, ctypes.c_uint32]
lib.lion_step_options_default.restype = StepOptions
lib.lion_create.argtypes = [ctypes.POINTER(Config), ctypes.POINTER(TensorDesc), ctypes.c_size_t, ctypes.POINTER(P)]
lib.lion_step.argtypes = [P, P, P, ctypes.c_size_t, P]
lib.lion_step_with_options.argtypes = [P, P, P, ctypes.c_size_t, P, ctypes.POINTER(StepOptions)]
lib.lion_destroy.argtypes = [P]
lib.lion_destroy.restype = None
lib.lion_set_lr.argtypes = [P, ctypes.c_float]
lib.lion_get_lr.argtypes = [P, ctypes.POINTER(ctypes.c_float)]
lib.lion_step_count.argtypes = [P, ctypes.POINTER(ctypes.c_uint64)]
lib.lion_state_size.argtypes = [P, ctypes.POINTER(ctypes.c_size_t)]
lib.lion_state_save.argtypes = [P, P, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
lib.lion_state_load.argtypes = [P, P, ctypes.c_size_t]
lib.lion_last_error.restype = ctypes.c_char_p
lib.lion_version.restype = ctypes.c_char_p
if hasattr(lib, "lion_create_distributed"):  # an older liblion named by LION_LIBRARY may lack them
    lib.lion_dist_config_default.restype = DistConfig
    lib.lion_create_distributed.argtypes = [ctypes.POINTER(Config), ctypes.POINTER(TensorDesc), ctypes.c_size_t,
                                            ctypes.POINTER(DistConfig), ctypes.POINTER(P)]
    lib.lion_create_distributed.restype = ctypes.c_int
    lib.lion_nccl_unique_id.argtypes = [ctypes.c_char_p, P, ctypes.c_size_t]
    lib.lion_nccl_unique_id.restype = ctypes.c_int
for name in ["lion_create", "lion_step", "lion_step_with_options", "lion_set_lr", "lion_get_lr", "lion_step_count",
             "lion_state_size", "lion_state_save", "lion_state_load"]:
    getattr(lib, name).restype = ctypes.c_int
if hasattr(lib, "lion_state_save_file"):  # as above
    # c_char_p: a str passed without them went as a wchar_t* (liblion saw its first letter).
    lib.lion_state_save_file.argtypes = [P, ctypes.c_char_p]
    lib.lion_state_save_file.restype = ctypes.c_int
    lib.lion_state_load_file.argtypes = [P, ctypes.c_char_p]
    lib.lion_state_load_file.restype = ctypes.c_int
if hasattr(lib, "lion_step_tensors"):  # as above: an older liblion may lack them
    lib.lion_step_tensors.argtypes = [P, ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t, P, P, P,
                                      ctypes.POINTER(StepOptions)]
    lib.lion_step_tensors.restype = ctypes.c_int
    lib.lion_round_finish.argtypes = [P, P]
    lib.lion_round_finish.restype = ctypes.c_int


def check(status, what):
    if status != OK:
        message = f"{what}: {lib.lion_last_error().decode(errors='replace')}"
        raise (LionValueError if status in (INVALID_ARGUMENT, NULL_POINTER) else LionError)(status, message)


class Handle:
    """An optimizer handle with the calls every front end needs; destroyed with the object."""

    def __init__(self, config, descs, dist=None):
        """`dist`: None, or a lion_ffi.dist.Group (this rank of a distributed optimizer)."""
        self.n = len(descs)
        self._last = [None, None]  # see _pointer_array
        self._lr_given = None  # see set_lr
        arr = (TensorDesc * self.n)(*descs)
        self.ptr = P()
        self.dist = dist  # its callbacks must outlive the handle
        if dist is None:
            check(lib.lion_create(ctypes.byref(config), arr, self.n, ctypes.byref(self.ptr)), "lion_create")
        else:
            check(lib.lion_create_distributed(ctypes.byref(config), arr, self.n, ctypes.byref(dist.config),
                                              ctypes.byref(self.ptr)), "lion_create_distributed")

    # lion_destroy bound here: at interpreter exit a module's globals (`lib`) may be None
    # before the last handles are collected.
    def __del__(self, _destroy=lib.lion_destroy):
        ptr = getattr(self, "ptr", None)
        if ptr:
            _destroy(ptr)
            self.ptr = None

    def pointers(self, addresses):
        """A ctypes array of `addresses`, reusable across steps while they do not change."""
        return (P * self.n)(*addresses)

    def _pointer_array(self, addresses, slot):
        """`addresses` for one call, as `pointers` gives them (missing ones NULL, extra ones an
        IndexError): an array.array of machine words where they are all ints, built in one C
        loop (a ctypes array of 148 took 13 us, a tenth of a GPT-2 step's Python time). A list
        equal to the one last seen in `slot` (0 params, 1 grads) gets last time's array again:
        building one of 148 words took 3 us, and a parameter's address rarely changes."""
        if isinstance(addresses, ctypes.Array):
            return addresses
        if isinstance(addresses, array.array) and addresses.typecode == _WORD and len(addresses) == self.n:
            return addresses  # made here (or alike) already
        if not self.n or _WORD is None:  # an empty array.array's address may be NULL
            return self.pointers(addresses)
        if not isinstance(addresses, (list, tuple)):
            addresses = list(addresses)  # read once: the fallback below must see every item
        last = self._last[slot]
        if last is not None and type(addresses) is list and addresses == last[0]:
            return last[1]
        try:
            words = array.array(_WORD, addresses)
        except (TypeError, OverflowError):  # None or another pointer-like value: ctypes converts it
            return self.pointers(addresses)
        if len(words) > self.n:
            raise IndexError(f"{len(words)} addresses for an optimizer of {self.n} tensors")
        words.extend([0] * (self.n - len(words)))
        if type(addresses) is list:
            self._last[slot] = (list(addresses), words)  # a copy: the caller may change theirs
        return words

    def step(self, param_ptrs, grad_ptrs, stream=None, options=None):
        """One step; the pointers as lists of addresses or as arrays from `pointers`."""
        params, grads = self._pointer_array(param_ptrs, 0), self._pointer_array(grad_ptrs, 1)
        p, g = _address_of(params), _address_of(grads)  # `params` and `grads` live until the call returns
        if options is None:
            check(lib.lion_step(self.ptr, p, g, self.n, stream), "lion_step")
        else:
            check(lib.lion_step_with_options(self.ptr, p, g, self.n, stream, ctypes.byref(options)),
                  "lion_step_with_options")

    def refuse_step(self, stream=None):
        """Takes part in a distributed step as a rank that refuses it (a step without buffers,
        which liblion refuses on every rank: nothing is written), for a front end that found
        this rank's tensors wrong; the other ranks would otherwise wait for it."""
        lib.lion_step(self.ptr, None, None, self.n, stream)  # LION_ERROR_NULL_POINTER, as meant

    def step_tensors(self, indices, param_ptrs, grad_ptrs, stream=None, options=None):
        """Steps the tensors `indices` (their places at creation), whose buffers are at
        `param_ptrs` and `grad_ptrs` (lists of addresses, in the same order): one call of a
        round of `lion_step_tensors`. Every tensor once, in any order and grouping, is one
        step, bit for bit as `step`."""
        k = len(indices)
        if len(param_ptrs) != k or len(grad_ptrs) != k:  # ctypes would fill the rest with NULL
            raise ValueError(f"{k} indices, {len(param_ptrs)} parameter and {len(grad_ptrs)} gradient addresses")
        idx = (ctypes.c_uint32 * k)(*indices)
        params, grads = (P * k)(*param_ptrs), (P * k)(*grad_ptrs)
        opts = ctypes.byref(options) if options is not None else None
        check(lib.lion_step_tensors(self.ptr, idx, k, params, grads, stream, opts), "lion_step_tensors")

    def finish_round(self, stream=None):
        """Ends an open round of `step_tensors`: the tensors it did not step keep their values
        and momentum, and the round counts as a step. Nothing happens without an open round."""
        check(lib.lion_round_finish(self.ptr, stream), "lion_round_finish")

    @property
    def lr(self):
        out = ctypes.c_float()
        check(lib.lion_get_lr(self.ptr, ctypes.byref(out)), "lion_get_lr")
        return out.value

    @lr.setter
    def lr(self, value):
        check(lib.lion_set_lr(self.ptr, float(value)), "lion_set_lr")
        # A number is remembered as given; a tensor or an array may change in place: not it.
        self._lr_given = value if isinstance(value, (float, int)) else None

    def set_lr(self, value):
        """Sets the lr where `value` differs from the one last set here: liblion keeps it as
        f32, so a front end comparing a value like 1e-4 with `lr` (lion_get_lr) found them
        different on every step and made two calls a step (3 us of a torch step's Python)."""
        if value != self._lr_given:
            self.lr = value

    @property
    def step_count(self):
        out = ctypes.c_uint64()
        check(lib.lion_step_count(self.ptr, ctypes.byref(out)), "lion_step_count")
        return out.value

    def save(self):
        size = ctypes.c_size_t()
        check(lib.lion_state_size(self.ptr, ctypes.byref(size)), "lion_state_size")
        try:
            buf = ctypes.create_string_buffer(size.value)
        except MemoryError:
            if self.dist is not None:  # a sharded save is collective: take part without the bytes
                lib.lion_state_save(self.ptr, None, size.value, None)  # LION_ERROR_NULL_POINTER, as meant
                self.dist.error = None
            raise
        written = ctypes.c_size_t()
        try:
            check(lib.lion_state_save(self.ptr, buf, size.value, ctypes.byref(written)), "lion_state_save")
        except LionError as e:
            cause = self.dist.error if self.dist is not None else None
            if cause is not None:  # the collective's own exception
                self.dist.error = None
                raise e from cause
            raise
        return buf.raw[: written.value]

    def save_file(self, path):
        """Writes the checkpoint to the file `path` (str, bytes or os.PathLike), so that a crash
        or a full disk leaves the previous file whole (`lion_state_save_file`). Collective in
        sharded mode: a path liblion cannot take still takes part, then raises."""
        encoded = _c_path(path)
        if encoded is None:
            if self.dist is not None:  # a sharded save is collective: take part, refused
                lib.lion_state_save_file(self.ptr, None)  # LION_ERROR_NULL_POINTER, as meant
                self.dist.error = None
            raise ValueError(f"path {path!r} holds a NUL byte")
        check(lib.lion_state_save_file(self.ptr, encoded), "lion_state_save_file")

    def load_file(self, path):
        """Loads a checkpoint file (`save_file`'s, or `save`'s bytes in a file)."""
        encoded = _c_path(path)
        if encoded is None:
            raise ValueError(f"path {path!r} holds a NUL byte")
        check(lib.lion_state_load_file(self.ptr, encoded), "lion_state_load_file")
        self._lr_given = None  # the file's lr is liblion's now

    def load(self, blob):
        if isinstance(blob, (int, str)):  # bytes(5) is five zero bytes; a str has no bytes
            raise TypeError(f"a checkpoint is bytes (lion_state_save's), got {type(blob).__name__}")
        blob = bytes(blob)
        check(lib.lion_state_load(self.ptr, blob, len(blob)), "lion_state_load")
        self._lr_given = None  # the blob's lr is liblion's now


def _c_path(path):
    """A path as the bytes C reads (the file system's encoding), None where it holds a NUL
    (C would read it cut short: liblion then refuses NULL, in a collective save on every
    rank)."""
    encoded = os.fsencode(path)
    return None if b"\0" in encoded else encoded


def _set_int(struct, field, value, name=None):
    """Sets an integer field, refusing what its C type cannot hold (ctypes would wrap it)."""
    name = name or field
    try:
        value = operator.index(value)  # no silent truncation of 2.5 either
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    ctype = dict(type(struct)._fields_)[field]
    bits = 8 * ctypes.sizeof(ctype)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if ctype(-1).value < 0 else (0, (1 << bits) - 1)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    setattr(struct, field, value)


def make_config(lr, betas, weight_decay, decoupled_weight_decay=False, decay_mode=None, cautious_factor=1.0,
                cautious_weight_decay=False, device=DEVICE_CPU, device_index=0, state_dtype=DTYPE_F32,
                stochastic_rounding=False, seed=0, num_threads=0):
    """A Config from Python values; raises ValueError/TypeError on what the C struct cannot hold."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    c = lib.lion_config_default()
    c.lr, c.beta1, c.beta2, c.weight_decay = float(lr), float(beta1), float(beta2), float(weight_decay)
    if decay_mode is None:
        decay_mode = DECAY_DECOUPLED if decoupled_weight_decay else DECAY_STANDARD
    c.cautious_factor, c.cautious_weight_decay = float(cautious_factor), bool(cautious_weight_decay)
    c.stochastic_rounding = bool(stochastic_rounding)
    for field, value in [("decay_mode", decay_mode), ("device", device), ("device_index", device_index),
                         ("state_dtype", state_dtype), ("seed", seed), ("num_threads", num_threads)]:
        _set_int(c, field, value)
    return c
