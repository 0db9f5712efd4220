"""Distributed Lion from Python. On the CPU engine: one `lion_ffi.Lion` per rank, joined through
your own collectives (mpi4py, torch.distributed's gloo, anything that can sum and gather).
On CUDA, through NCCL: `NcclGroup`, for torch users through `lion_ffi.torch.DistributedLion`,
which makes one from a torch.distributed process group (`lion_ffi.Lion` steps host memory: it
is a CPU optimizer, and takes a `Group`, not an `NcclGroup`).

    class MyCollectives(lion_ffi.dist.Collectives):
        def all_reduce_sum(self, send, recv): ...      # numpy arrays; recv[:] = sum over ranks
        def reduce_scatter_sum(self, send, recv): ...  # send: W blocks; recv = sum of my block
        def all_gather(self, send, recv): ...          # recv: W blocks, block r = rank r's send

    group = lion_ffi.dist.Group("sharded", rank, world_size, MyCollectives())   # or "vote"
    opt = lion_ffi.Lion(params, lr=1e-4, dist=group)
    opt.step(grads)              # collective: every rank steps, with its own gradients

The semantics are liblion's (docs/ABI.md, "Distributed modes"): sharded is bit-identical to one
process stepping on the mean gradient, and its checkpoints (`save`, collective) are the
single-process one; vote keeps every rank's parameters identical. The collectives run on the
thread that constructs the optimizer (with more than one rank: one all-reduce, to check that
every rank was created alike, and one all-gather of the ranks' numbers) and that calls `step` (or `save`, in sharded mode). An exception
raised in one fails the call with LionError (LION_ERROR_COMM), the exception chained. The group
is then broken (docs/ABI.md): a collective that failed on some ranks only leaves the others
waiting, or pairing with another call. Make no further call on any rank's optimizer, and
rebuild from a checkpoint; collectives should fail on every rank together (mpi4py's default
error handler aborts every process) or end the process.
"""
import ctypes

import numpy as np

from ._lib import (COLLECTIVE, NCCL_UNIQUE_ID_BYTES, COMM_BF16, COMM_F16, COMM_F32, COMM_I8, COMM_U8, COMM_U64, DIST_SHARDED, DIST_VOTE,
                   VOTE_AUTO, VOTE_GATHER, VOTE_SUMS, Collectives as _CCollectives, lib, _set_int)

__all__ = ["Collectives", "Group", "NcclGroup", "nccl_unique_id"]


def _numpy_dtype(code):
    if code == COMM_BF16:
        try:
            import ml_dtypes
            return np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            return np.dtype(np.uint16)  # the bits; a sum needs ml_dtypes
    return np.dtype({COMM_F32: np.float32, COMM_F16: np.float16, COMM_I8: np.int8, COMM_U8: np.uint8,
                     COMM_U64: np.uint64}[code])


class Collectives:
    """Subclass and implement the three collectives over numpy arrays (views of liblion's
    buffers: write `recv` in place). Sums are element-wise in the arrays' dtype; blocks are in
    rank order."""

    def all_reduce_sum(self, send: np.ndarray, recv: np.ndarray) -> None:
        raise NotImplementedError

    def reduce_scatter_sum(self, send: np.ndarray, recv: np.ndarray) -> None:
        raise NotImplementedError

    def all_gather(self, send: np.ndarray, recv: np.ndarray) -> None:
        raise NotImplementedError


class Group:
    """This process's place in a group of ranks: `mode` 'sharded' or 'vote', `rank` in
    [0, world_size), and the `collectives` that join them. `vote_exchange`: 'auto', 'sums' or
    'gather'. Keep it alive as long as the optimizer made with it (`Lion` holds it)."""

    _MODES = {"sharded": DIST_SHARDED, "vote": DIST_VOTE}
    _EXCHANGES = {"auto": VOTE_AUTO, "sums": VOTE_SUMS, "gather": VOTE_GATHER}

    def __init__(self, mode: str, rank: int, world_size: int, collectives: Collectives,
                 vote_exchange: str = "auto") -> None:
        if mode not in self._MODES:
            raise ValueError(f"mode must be 'sharded' or 'vote', got {mode!r}")
        if vote_exchange not in self._EXCHANGES:
            raise ValueError(f"vote_exchange must be 'auto', 'sums' or 'gather', got {vote_exchange!r}")
        if not isinstance(collectives, Collectives):
            raise TypeError("collectives must be a lion_ffi.dist.Collectives")
        self.collectives = collectives
        self.world_size = world_size
        self.error = None  # the last exception a collective raised
        # The C callbacks, kept alive with the group.
        self._fns = [COLLECTIVE(self._adapter(name, kind)) for name, kind in
                     [("all_reduce_sum", "same"), ("reduce_scatter_sum", "scatter"), ("all_gather", "gather")]]
        self._table = _CCollectives(ctypes.sizeof(_CCollectives), None,
                                    *[ctypes.cast(f, ctypes.c_void_p) for f in self._fns])
        self.config = lib.lion_dist_config_default()
        self.config.mode = self._MODES[mode]
        _set_int(self.config, "rank", rank)
        _set_int(self.config, "world_size", world_size)
        self.config.collectives = ctypes.cast(ctypes.pointer(self._table), ctypes.c_void_p)
        self.config.vote_exchange = self._EXCHANGES[vote_exchange]

    def _adapter(self, name, kind):
        method = getattr(self.collectives, name)

        def call(_context, send, recv, count, dtype, _stream):
            try:
                d = _numpy_dtype(dtype)
                n_send = count * self.world_size if kind == "scatter" else count
                n_recv = count * self.world_size if kind == "gather" else count
                s = np.frombuffer((ctypes.c_char * (n_send * d.itemsize)).from_address(send), dtype=d)
                s.flags.writeable = False  # const in C: it may be the caller's gradient
                r = np.frombuffer((ctypes.c_char * (n_recv * d.itemsize)).from_address(recv), dtype=d)
                method(s, r)
                return 0
            except BaseException as e:  # never unwind through C
                self.error = e
                return 1
        return call


def nccl_unique_id(nccl_library=None) -> bytes:
    """A new ncclUniqueId (NCCL_UNIQUE_ID_BYTES bytes), for `NcclGroup(unique_id=...)`: make it on
    one rank and send it to every rank. `nccl_library`: None (the libnccl.so.2 this process has
    loaded, e.g. torch's, else the loader's search) or the library's path."""
    out = (ctypes.c_uint8 * NCCL_UNIQUE_ID_BYTES)()
    path = None if nccl_library is None else str(nccl_library).encode()
    from ._lib import check
    check(lib.lion_nccl_unique_id(path, out, NCCL_UNIQUE_ID_BYTES), "lion_nccl_unique_id")
    return bytes(out)


class NcclGroup:
    """This process's place in a group of CUDA ranks joined by NCCL, for a CUDA optimizer
    (`lion_ffi.torch.DistributedLion` makes one): `mode`
    'sharded' or 'vote', `rank` in [0, world_size), and exactly one of `comm` (the address of an
    existing ncclComm_t of the libnccl this process loaded, e.g. torch's; it must outlive the
    optimizer) or `unique_id` (`nccl_unique_id()`'s bytes, the same on every rank: liblion makes
    its own communicator, collectively, when the optimizer is made, and destroys it with it).
    `nccl_library`: None or the path of libnccl.so.2. `vote_exchange`: 'auto', 'sums', 'gather'."""

    def __init__(self, mode: str, rank: int, world_size: int, *, comm=None, unique_id=None, nccl_library=None,
                 vote_exchange: str = "auto") -> None:
        if mode not in Group._MODES:
            raise ValueError(f"mode must be 'sharded' or 'vote', got {mode!r}")
        if vote_exchange not in Group._EXCHANGES:
            raise ValueError(f"vote_exchange must be 'auto', 'sums' or 'gather', got {vote_exchange!r}")
        if (comm is None) == (unique_id is None):
            raise ValueError("give exactly one of comm (an ncclComm_t address) and unique_id (bytes)")
        self.world_size = world_size
        self.error = None  # as Group's (NCCL raises no Python exceptions)
        self.config = lib.lion_dist_config_default()
        self.config.mode = Group._MODES[mode]
        _set_int(self.config, "rank", rank)
        _set_int(self.config, "world_size", world_size)
        self.config.vote_exchange = Group._EXCHANGES[vote_exchange]
        if comm is not None:
            if not isinstance(comm, int) or comm == 0:
                raise ValueError(f"comm must be a non-zero ncclComm_t address, got {comm!r}")
            self.config.nccl_comm = comm
        else:
            unique_id = bytes(unique_id)
            if len(unique_id) != NCCL_UNIQUE_ID_BYTES:
                raise ValueError(f"unique_id has {len(unique_id)} bytes, an ncclUniqueId {NCCL_UNIQUE_ID_BYTES}")
            self._id = (ctypes.c_uint8 * NCCL_UNIQUE_ID_BYTES).from_buffer_copy(unique_id)  # kept alive
            self.config.nccl_unique_id = ctypes.addressof(self._id)
        if nccl_library is not None:
            self._library = str(nccl_library).encode()  # kept alive
            self.config.nccl_library = self._library
