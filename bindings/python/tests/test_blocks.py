"""lion_ffi._blocks, which the torch front end steps groups through, on numpy arrays: momentum
written into and read out of liblion's blobs exactly, and tensors without a gradient skipped
(value and momentum unchanged) with the others bit-identical to one optimizer per tensor."""
import ctypes

import numpy as np
import pytest

import lion_ffi
from lion_ffi._blocks import Blocks, momentum_blob, read_momentum
from lion_ffi._lib import DTYPE_BF16, DTYPE_F16, DTYPE_F32, Handle, lib, make_config

SIZES = [33, 5, 1000, 1]
KW = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)


def specials(n, rng):
    a = rng.standard_normal(n).astype(np.float32)
    a[:6] = [np.nan, np.inf, -np.inf, -0.0, 1e-40, 3e38]
    return a


def pairs(want, got):
    """zip(want, got), once their lengths are equal (read_momentum's lists are under test: a
    short one must fail, not shorten the loop)."""
    want, got = list(want), list(got)
    assert len(want) == len(got), f"{len(got)} tensors, {len(want)} expected"
    return zip(want, got)


def handle(numels, state_dtype=DTYPE_F32, seed=0, **kw):
    config = make_config(**dict(KW, **kw), state_dtype=state_dtype, seed=seed)
    return Handle(config, [lib.lion_tensor_desc(n, DTYPE_F32) for n in numels])


def test_a_blob_holds_the_momentum_it_was_given_exactly_and_liblion_loads_it():
    rng = np.random.default_rng(0)
    f32 = [specials(n, rng) if n > 6 else rng.standard_normal(n).astype(np.float32) for n in SIZES]
    blob = momentum_blob([(a.ctypes.data, a.size, DTYPE_F32) for a in f32], DTYPE_F32, lr=0.25, seed=7)
    state, back = read_momentum(blob)
    assert state == DTYPE_F32
    for a, b in pairs(f32, back):
        np.testing.assert_array_equal(a, b)  # NaN where NaN, and every other value (-0 as 0)
    h = handle(SIZES)
    h.load(blob)
    assert h.step_count == 1 and h.lr == 0.25
    for a, b in pairs(read_momentum(h.save())[1], back):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    # float16 momentum into f32 state widens exactly; bf16 bits into bf16 state stay as they are.
    f16 = [rng.standard_normal(n).astype(np.float16) for n in SIZES]
    _, back = read_momentum(momentum_blob([(a.ctypes.data, a.size, DTYPE_F16) for a in f16], DTYPE_F32, 1e-3))
    for a, b in pairs(f16, back):
        np.testing.assert_array_equal(a.astype(np.float32), b)
    bits = [rng.integers(0, 0x7F80, n, dtype=np.uint16) | rng.integers(0, 2, n, dtype=np.uint16) << 15 for n in SIZES]
    blob = momentum_blob([(a.ctypes.data, a.size, DTYPE_BF16) for a in bits], DTYPE_BF16, 1e-3)
    state, back = read_momentum(blob)
    assert state == DTYPE_BF16
    for a, b in pairs(bits, back):
        np.testing.assert_array_equal(a, b)
    handle(SIZES, state_dtype=DTYPE_BF16).load(blob)


def test_read_momentum_refuses_what_is_not_a_blob():
    blob = handle([4]).save()
    for bad in [b"", b"X" + blob[1:], blob[:-1]]:
        with pytest.raises(ValueError, match="liblion checkpoint blob"):
            read_momentum(bad)


def run(patterns, seed=0):
    """Steps 4 tensors through Blocks, with gradients for the positions in each pattern, and
    the same tensors through one numpy Lion each (stepped only when it has a gradient); checks
    after each step that the values and momentum are the same bits. Returns the Blocks."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    ref_params = [p.copy() for p in params]
    refs = [lion_ffi.Lion([p], **KW) for p in ref_params]
    blocks = Blocks(len(SIZES), seed=0, salt=0)
    for have in patterns:
        grads = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
        before = [p.copy() for p in params]
        for block in blocks.arrange(have, KW["lr"]):
            h = block.make(lambda positions, seed: handle([SIZES[i] for i in positions], seed=seed))
            h.step([params[i].ctypes.data for i in block.positions], [grads[i].ctypes.data for i in block.positions])
        for i in have:
            refs[i].step([grads[i]])
        momentum, _ = blocks.momentum()
        for i in range(len(SIZES)):
            np.testing.assert_array_equal(params[i], ref_params[i])
            if i not in have:
                np.testing.assert_array_equal(params[i], before[i])
            if i in momentum:
                np.testing.assert_array_equal(momentum[i], read_momentum(refs[i].save())[1][0])
            else:
                assert refs[i].step_count == 0
    return blocks


@pytest.mark.parametrize("state", ["float32", "bfloat16", "q8"])
def test_verify_refuses_a_blob_shorter_than_its_header_says_before_making_an_optimizer(state):
    # A 2^32-element table entry in a small blob: verify made (and zeroed) the momentum the
    # header claimed, 16 GiB, before liblion found the length wrong.
    import resource
    import struct
    from lion_ffi._blocks import verify
    blob = bytearray(lion_ffi.Lion([np.zeros(100, np.float32)], state_dtype=state, num_threads=1).save())
    struct.pack_into("<Q", blob, 88, 1 << 32)  # tensor 0's numel
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="does not hold the momentum its header claims"):
        verify(bytes(blob))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 256 * 1024  # KiB


def test_tensors_without_a_gradient_keep_value_and_momentum_the_others_step_as_alone():
    all4 = [0, 1, 2, 3]
    blocks = run([all4, all4, [0, 1, 3], all4, [2], [0, 1], [1, 3], all4])
    assert sorted(b.positions for b in blocks.blocks) == [(0,), (1,), (2,), (3,)]
    # A tensor first seen with a gradient after others gets its own block, with zero momentum.
    blocks = run([[1, 2], [1, 2], all4, [0, 3], all4])
    assert sorted(b.positions for b in blocks.blocks) == [(0, 3), (1, 2)]


def test_every_step_with_every_gradient_keeps_one_block_over_all():
    blocks = run([[0, 1, 2, 3]] * 3)
    assert len(blocks.blocks) == 1 and blocks.blocks[0].handle.step_count == 3
    assert blocks.save() == blocks.blocks[0].handle.save()  # the group's blob, as before splits


def test_split_blocks_save_and_load():
    blocks = run([[0, 1, 2, 3], [0, 2]])
    saved = blocks.save()
    assert sorted(p for p, _ in saved) == [(0, 2), (1, 3)]
    other = Blocks(4, seed=0, salt=0)
    other.load(saved, "group 0")
    assert [(b.positions, b.seed, b.blob) for b in other.blocks] == [(b.positions, b.seed, b.save())
                                                                   for b in blocks.blocks]
    with pytest.raises(ValueError, match="group 0: the saved blocks' positions"):
        other.load([((0, 1), saved[0][1]), ((1, 2), saved[1][1])], "group 0")


def test_release_then_make_keeps_momentum_and_step_count_with_new_hyperparameters():
    blocks = run([[0, 1, 2, 3]] * 2)
    block = blocks.blocks[0]
    before = read_momentum(block.save())
    block.release()
    assert block.handle is None
    h = block.make(lambda positions, seed: handle(SIZES, weight_decay=0.5, betas=(0.5, 0.9)))
    assert h.step_count == 2
    after = read_momentum(h.save())
    assert after[0] == before[0] and all(np.array_equal(a, b) for a, b in pairs(after[1], before[1]))


def test_seeds():
    blocks = Blocks(4, seed=9, salt=0)
    assert blocks.seed_of(range(4)) == 9
    seeds = {blocks.seed_of(p) for p in [(0,), (1,), (0, 1), (2, 3)]} | {Blocks(4, 9, 1).seed_of((0,))}
    assert len(seeds) == 5 and 9 not in seeds


def test_handle_step_takes_lists_arrays_and_refuses_what_ctypes_would():
    # Lists of addresses go to liblion as an array.array: the same step as a ctypes array.
    rng = np.random.default_rng(3)
    start = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    grads = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    a, b = [x.copy() for x in start], [x.copy() for x in start]
    ha, hb = handle(SIZES), handle(SIZES)
    ha.step([x.ctypes.data for x in a], [g.ctypes.data for g in grads])
    hb.step(hb.pointers([x.ctypes.data for x in b]), hb.pointers([g.ctypes.data for g in grads]))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))
    assert not isinstance(ha._pointer_array([x.ctypes.data for x in a], 0), ctypes.Array)  # the array.array path
    # Missing addresses are NULL (liblion refuses them, writing nothing), extra ones an IndexError,
    # None a NULL as ctypes makes it.
    before = [x.copy() for x in a]
    with pytest.raises(lion_ffi.LionError, match="NULL"):
        ha.step([x.ctypes.data for x in a[:-1]], [g.ctypes.data for g in grads])
    with pytest.raises(IndexError):
        ha.step([x.ctypes.data for x in a] + [0], [g.ctypes.data for g in grads])
    with pytest.raises(lion_ffi.LionError, match="NULL"):
        ha.step([x.ctypes.data for x in a[:-1]] + [None], [g.ctypes.data for g in grads])
    # An iterator is read once, wholly: a None in it is a NULL in its own place, not a shift.
    with pytest.raises(lion_ffi.LionError, match=r"params\[1\] is NULL"):
        ha.step(iter([a[0].ctypes.data, None] + [x.ctypes.data for x in a[2:]]), [g.ctypes.data for g in grads])
    for x, y in zip(a, before):
        np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))


def test_handle_step_reuses_its_array_only_for_equal_addresses():
    # An equal list gets last step's array again; a list the caller changed in place (the same
    # object) gets a new one: the step goes to the buffers it names now.
    rng = np.random.default_rng(4)
    a = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    other = a[0].copy()
    grads = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    h = handle(SIZES)
    addresses = [x.ctypes.data for x in a]
    words = h._pointer_array(addresses, 0)
    assert h._pointer_array(list(addresses), 0) is words
    assert h._pointer_array(addresses, 1) is not words  # the gradients' slot is its own
    h.step(addresses, [g.ctypes.data for g in grads])
    first, untouched = a[0].copy(), other.copy()
    addresses[0] = other.ctypes.data
    h.step(addresses, [g.ctypes.data for g in grads])
    np.testing.assert_array_equal(a[0].view(np.uint32), first.view(np.uint32))
    assert not np.array_equal(other, untouched)


def test_set_lr_calls_liblion_only_for_a_new_value(monkeypatch):
    """`Handle.set_lr` (each torch step's lr) skips the call for the value it last set, sets a
    changed one, and sets again after a load (the blob's lr) and for any non-number lr (a
    tensor may change in place)."""
    h = handle([4], lr=1e-4)
    calls = []
    real = lib.lion_set_lr
    monkeypatch.setattr(lib, "lion_set_lr", lambda ptr, value: calls.append(value) or real(ptr, value))
    h.set_lr(1e-4)  # not yet given through this handle: set once
    h.set_lr(1e-4)  # f32(1e-4) != 1e-4, but it is the value last given: no call
    assert len(calls) == 1 and h.lr == np.float32(1e-4)
    h.set_lr(2e-4)
    assert len(calls) == 2 and h.lr == np.float32(2e-4)
    h.load(handle([4], lr=0.5).save())  # the blob's lr is liblion's now
    assert h.lr == 0.5
    h.set_lr(2e-4)
    assert len(calls) == 3 and h.lr == np.float32(2e-4)
    h.set_lr(np.float64(3e-4))  # a float
    h.set_lr(np.float64(3e-4))
    assert len(calls) == 4
    boxed = np.array(4e-4)  # not a float or an int (may change in place): never remembered
    h.set_lr(boxed)
    h.set_lr(boxed)
    assert len(calls) == 6 and h.lr == np.float32(4e-4)
    with pytest.raises(ValueError):
        h.set_lr(-1.0)  # refused: the lr stays, and so does what was last given
    h.set_lr(2e-4)
    assert len(calls) == 8 and h.lr == np.float32(2e-4)
