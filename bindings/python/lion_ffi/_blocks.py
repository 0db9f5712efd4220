"""Momentum in and out of liblion's checkpoint blobs, and a group of tensors kept in blocks.

liblion steps every tensor of an optimizer at once, and a tensor without a gradient at a step
must keep its value and its momentum (a zero gradient would still move it). So a group's
tensors live in blocks, one liblion optimizer each: one block over all of them while every step
brings every gradient (one call a step), split at the first step where some of a block's
tensors have a gradient and others none, each part taking its tensors' momentum along. The
blocks only ever get finer: a mixture of experts settles into one block for the shared
parameters and one per expert.

liblion has no call that sets momentum, and a blob carries liblion's checksum, so blobs with a
given momentum are written by liblion itself (`momentum_blob`).
"""
import hashlib
import struct

import numpy as np

from ._lib import DTYPE_BF16, DTYPE_F32, DTYPE_Q8, Handle, lib, make_config

_MAGIC, _VERSION, _HEADER, _ROW, _CHECKSUM = b"LIONCKPT", 1, 88, 24, 16  # docs/checkpoint-format.md
_Q8_BLOCK, _Q8_MIN_NUMEL = 256, 4096  # 8-bit momentum: a scale per 256 elements, tensors from 4096


def _q8_bytes(numel):
    """Bytes of one tensor's q8 momentum (docs/checkpoint-format.md)."""
    return numel + 4 * -(-numel // _Q8_BLOCK) if numel >= _Q8_MIN_NUMEL else 4 * numel


# MIRROR(q8): src/numerics/q8.rs decode (k*|k| * (scale / 16129), in float32)
def _q8_decode(data, numel):
    if numel < _Q8_MIN_NUMEL:
        return np.frombuffer(data, np.float32, count=numel).copy()
    k = np.frombuffer(data, np.int8, count=numel).astype(np.int32)
    scales = np.frombuffer(data, np.float32, count=-(-numel // _Q8_BLOCK), offset=numel)
    units = (scales / np.float32(16129.0)).astype(np.float32)
    return ((k * np.abs(k)).astype(np.float32) * np.repeat(units, _Q8_BLOCK)[:numel]).astype(np.float32)


def blob_numels(blob):
    """The state dtype code and each tensor's element count that a checkpoint blob's header and
    table give (ValueError for what is no version 1 blob); the rest is liblion's to check."""
    if len(blob) < _HEADER + _CHECKSUM or blob[:8] != _MAGIC or struct.unpack_from("<I", blob, 8)[0] != _VERSION:
        raise ValueError("not a liblion checkpoint blob (version 1)")
    (state,), (n,) = struct.unpack_from("<I", blob, 44), struct.unpack_from("<Q", blob, 80)
    if len(blob) < _HEADER + _ROW * n + _CHECKSUM:
        raise ValueError(f"liblion checkpoint blob of {len(blob)} bytes is too short for {n} tensors")
    return state, [struct.unpack_from("<Q", blob, _HEADER + _ROW * i)[0] for i in range(n)]


def _length(state, numels):
    """The length of a blob of `numels` tensors under state dtype code `state`
    (docs/checkpoint-format.md), None for a code that liblion does not write."""
    start = _HEADER + _ROW * len(numels) + _CHECKSUM
    if state == DTYPE_Q8:
        return start + sum(_q8_bytes(numel) for numel in numels)
    if state in (DTYPE_F32, DTYPE_BF16):
        return start + sum(numels) * (4 if state == DTYPE_F32 else 2)
    return None


def verify(blob, config=None):
    """Refuses a blob that liblion would not load (LionError, CORRUPT_STATE for a damaged one):
    it is loaded into a scratch CPU optimizer made from its own table, with `config` (the
    LionConfig of the optimizer it is meant for, on the CPU: liblion checks the saved lr
    against its hyperparameters) or a plain one. A blob kept without a handle may be read here
    (a split, lion-pytorch's form) and its momentum written back under a new checksum
    (`momentum_blob`), so it is checked when it comes in. Its length is checked against its
    own header first: the scratch optimizer holds the momentum the header claims. Returns each
    tensor's element count."""
    blob = bytes(blob)
    state, numels = blob_numels(blob)
    if not numels:
        raise ValueError("a liblion checkpoint blob of no tensors")
    length = _length(state, numels)
    if length is not None and len(blob) != length:
        raise ValueError(f"liblion checkpoint blob of {len(blob)} bytes does not hold the momentum its header "
                         f"claims ({length} bytes)")
    descs = []
    for i, numel in enumerate(numels):
        param, grad = struct.unpack_from("<II", blob, _HEADER + _ROW * i + 8)
        d = lib.lion_tensor_desc(numel, param)
        d.grad_dtype = grad
        descs.append(d)
    if config is None:
        config = make_config(1.0, (0.9, 0.99), 0.0, state_dtype=state, num_threads=1)
    Handle(config, descs).load(blob)
    return numels


def read_momentum(blob):
    """The momentum in a checkpoint blob: (state dtype code, one array per tensor), float32, or
    for bf16 state the bfloat16 bits as uint16; q8 momentum is decoded into float32. The
    checksum is liblion's to check (on load)."""
    blob = bytes(blob)
    state, numels = blob_numels(blob)
    start = _HEADER + _ROW * len(numels)
    if len(blob) != _length(state, numels):
        raise ValueError(f"liblion checkpoint blob of {len(blob)} bytes does not hold its momentum")
    if state == DTYPE_Q8:
        offsets = np.cumsum([start] + [_q8_bytes(numel) for numel in numels])
        return state, [_q8_decode(blob[a:b], numel) for a, b, numel in zip(offsets[:-1], offsets[1:], numels)]
    dtype = np.uint16 if state == DTYPE_BF16 else np.float32
    data = np.frombuffer(blob, dtype, count=sum(numels), offset=start)
    offsets = np.cumsum([0] + numels)
    return state, [data[a:b].copy() for a, b in zip(offsets[:-1], offsets[1:])]


def momentum_blob(momenta, state_dtype, lr, seed=0):
    """A checkpoint blob whose momentum is `momenta`, (address, numel, dtype code) of host
    buffers, one per tensor; its step count is 1, its lr `lr` (> 0). A fresh CPU optimizer with
    beta2 = 0 takes each buffer as the gradient of one step, after which its momentum is
    0*0 + 1*g = g exactly (rounded to nearest even where bf16 state holds f32 values, encoded
    where the state is q8), and saves."""
    descs = []
    for _, numel, code in momenta:
        d = lib.lion_tensor_desc(numel, DTYPE_BF16)  # the parameters are scratch
        d.grad_dtype = code
        descs.append(d)
    scratch = [np.zeros(numel, np.uint16) for _, numel, _ in momenta]
    handle = Handle(make_config(lr, (0.0, 0.0), 0.0, state_dtype=state_dtype, seed=seed), descs)
    handle.step([s.ctypes.data for s in scratch], [address for address, _, _ in momenta])
    return handle.save()


class Block:
    """Some tensors of a group (`positions`) with one liblion optimizer: `handle` once it is
    made, else `blob`, the momentum (and step count, lr) it starts from, or None for zeros.
    `made_for` is the front end's record of what the handle was made for, `checked` its record
    of what it last checked the tensors against."""

    def __init__(self, positions, seed, blob=None):
        self.positions, self.seed, self.blob = tuple(positions), seed, blob
        self.handle = self.made_for = self.checked = None

    def save(self):
        return self.handle.save() if self.handle is not None else self.blob

    def release(self):
        """Keeps the optimizer's state as a blob and drops it, to be made anew (new
        hyperparameters: loading restores momentum, step count and lr, not them)."""
        if self.handle is not None:
            self.blob, self.handle, self.made_for = self.handle.save(), None, None

    def make(self, create):
        """The handle, made with `create(positions, seed)` and loaded from the blob if needed."""
        if self.handle is None:
            handle = create(self.positions, self.seed)
            if self.blob is not None:
                handle.load(self.blob)
            self.handle, self.blob = handle, None
        return self.handle


def _derived(*key):
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")


def group_seed(seed, index):
    """The seed of param group `index`'s stochastic rounding: the optimizer's `seed` for group
    0 (as before groups had their own), one derived from it for the others, so that tensors at
    the same place in two groups never draw the same bits."""
    return seed if index == 0 else _derived(seed, index, None)


class Blocks:
    """The `n` tensors of one group in blocks. A block over all of them has the group's seed
    (`group_seed(seed, salt)`, `salt` being the group's index); a smaller one a seed derived
    from `seed`, `salt` and its positions (a set of positions is a block at most once in a
    run, so stochastic rounding never draws the same bits twice).
    `owners` is the front end's record of the tensor at each position whose momentum the blocks
    hold (None until a block over it is made), kept across splits."""

    def __init__(self, n, seed, salt):
        self.n, self.seed, self.salt, self.blocks = n, seed, salt, []
        self.owners = [None] * n

    def seed_of(self, positions):
        if len(positions) == self.n:
            return group_seed(self.seed, self.salt)
        return _derived(self.seed, self.salt, tuple(positions))

    def arrange(self, have, lr):
        """Splits every block holding tensors both with and without a gradient (`have`: the
        positions with one, None for all; `lr`, the group's, goes into the new blobs), gives the
        tensors with a gradient and no block yet (no momentum: zeros) a new one, and returns the
        blocks to step."""
        if have is None:
            if sum(len(b.positions) for b in self.blocks) == self.n:  # every tensor has a block
                return list(self.blocks)
            have = range(self.n)
        have = set(have)
        blocks = []
        for block in self.blocks:
            inside = [i for i in block.positions if i in have]
            if 0 < len(inside) < len(block.positions):
                outside = [i for i in block.positions if i not in have]
                blocks += self._split(block, [inside, outside], lr)
            else:
                blocks.append(block)
        fresh = sorted(have.difference(*(b.positions for b in blocks)))
        if fresh:
            blocks.append(Block(fresh, self.seed_of(fresh)))
        self.blocks = blocks
        return [b for b in blocks if b.positions[0] in have]

    def _split(self, block, parts, lr):
        blob = block.save()
        if blob is None:  # never stepped: nothing to carry
            return [Block(p, self.seed_of(p)) for p in parts]
        state, momenta = read_momentum(blob)
        of = dict(zip(block.positions, momenta))
        return [self.with_momentum(p, [of[i] for i in p], state, lr) for p in parts]

    def with_momentum(self, positions, arrays, state, lr):
        """A block over `positions` whose momentum is `arrays` (host buffers with
        `.ctypes.data` / `.size`, or (address, numel, dtype code) triples), held as `state`."""
        code = DTYPE_F32 if state == DTYPE_Q8 else state  # q8 momentum is read as float32
        triples = [a if isinstance(a, tuple) else (a.ctypes.data, a.size, code) for a in arrays]
        seed = self.seed_of(positions)
        return Block(positions, seed, momentum_blob(triples, state, lr, seed))

    def momentum(self):
        """{position: array} (see `read_momentum`) for every tensor that has momentum, and the
        state dtype code (DTYPE_F32 when there is none)."""
        out, state = {}, DTYPE_F32
        for block in self.blocks:
            blob = block.save()
            if blob is not None:
                state, momenta = read_momentum(blob)
                out.update(zip(block.positions, momenta))
        return out, state

    def save(self):
        """The blob of the one block over every tensor, as before any split; else a list of
        (positions, blob) (blob None: a block that never stepped)."""
        if len(self.blocks) == 1 and len(self.blocks[0].positions) == self.n and self.blocks[0].save() is not None:
            return self.blocks[0].save()
        return [(b.positions, b.save()) for b in self.blocks]

    def load(self, saved, what, numels=None, config=None):
        """Replaces the blocks with those of `save()`'s value; `what` names the group in errors.
        With `numels` (each position's element count), a blob whose tensors are not its
        positions' sizes, or that liblion would not load (`verify`, with `config`), is refused
        here, not at the next step, when the momentum it replaces would be gone."""
        if isinstance(saved, (bytes, bytearray)):
            saved = [(range(self.n), bytes(saved))]
        seen = []
        for positions, _ in saved:
            seen += positions
        if len(seen) != len(set(seen)) or not all(0 <= i < self.n for i in seen):
            raise ValueError(f"{what}: the saved blocks' positions {sorted(seen)} are not distinct positions "
                             f"of its {self.n} parameters")
        if numels is not None:
            for positions, blob in saved:
                if blob is None:
                    continue
                sizes = blob_numels(blob)[1]  # before verify, which makes an optimizer of them
                if sizes == [numels[i] for i in positions]:
                    verify(blob, config)
                else:
                    raise ValueError(f"{what}: a saved block's tensors have {sizes} elements, its parameters "
                                     f"{[numels[i] for i in positions]}: a state dict of another model")
        self.blocks = [Block(p, self.seed_of(p), blob) for p, blob in saved]
        self.owners = [None] * self.n  # the momentum loaded is the present tensors' now
