"""lion_ffi.dist: the distributed modes from Python, with ranks as threads of this process and
collectives in shared memory (sums in rank order, as the reference computes them)."""
import threading

import numpy as np
import pytest

import lion_ffi
from lion_ffi.dist import Collectives, Group

SIZES = [37, 1000, 5, 4099]


class ThreadCollectives(Collectives):
    """W ranks as threads: each collective meets at a barrier and reads every rank's input."""

    def __init__(self, shared, rank):
        self.shared, self.rank = shared, rank

    def _meet(self, send):
        s = self.shared
        s["inputs"][self.rank] = send.copy()
        s["barrier"].wait()
        inputs = list(s["inputs"])
        s["barrier"].wait()  # nobody overwrites an input before all have read them
        return inputs

    def _sum(self, arrays):
        total = arrays[0].copy()
        for a in arrays[1:]:
            total = (total + a).astype(total.dtype)  # each partial rounded to the dtype
        return total

    def all_reduce_sum(self, send, recv):
        recv[:] = self._sum(self._meet(send))

    def reduce_scatter_sum(self, send, recv):
        n = recv.size
        recv[:] = self._sum([a[self.rank * n:(self.rank + 1) * n] for a in self._meet(send)])

    def all_gather(self, send, recv):
        recv[:] = np.concatenate(self._meet(send))


def run_ranks(world, body, timeout=None):
    shared = {"barrier": threading.Barrier(world, timeout=timeout), "inputs": [None] * world}
    results, errors = [None] * world, []

    def run(rank):
        try:
            results[rank] = body(rank, ThreadCollectives(shared, rank))
        except BaseException as e:  # a failed rank must not leave the others at the barrier
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def grads_for(rank, step):
    rng = np.random.default_rng(1000 * step + rank)
    return [rng.standard_normal(n).astype(np.float32) for n in SIZES]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_equals_one_process_on_the_mean_gradient(world):
    start = [np.random.default_rng(7).standard_normal(n).astype(np.float32) for n in SIZES]
    kw = dict(lr=1e-2, weight_decay=0.1, num_threads=1)

    def rank_body(rank, coll):
        params = [p.copy() for p in start]
        opt = lion_ffi.Lion(params, dist=Group("sharded", rank, world, coll), **kw)
        for step in range(3):
            opt.step(grads_for(rank, step))
        return params, opt.save()

    results = run_ranks(world, rank_body)
    ref = [p.copy() for p in start]
    single = lion_ffi.Lion(ref, **kw)
    for step in range(3):
        per_rank = [grads_for(r, step) for r in range(world)]
        # Summed in rank order, as the collectives do.
        mean_sum = []
        for t in range(len(SIZES)):
            acc = per_rank[0][t].copy()
            for g in per_rank[1:]:
                acc = (acc + g[t]).astype(np.float32)
            mean_sum.append(acc)
        single.step(mean_sum, grad_scale=float(np.float32(1.0 / world)))
    for params, blob in results:
        for p, r in zip(params, ref):
            assert p.tobytes() == r.tobytes()
        assert blob == single.save()


@pytest.mark.parametrize("exchange", ["sums", "gather"])
def test_vote_keeps_every_rank_identical(exchange):
    world = 3
    start = [np.random.default_rng(3).standard_normal(n).astype(np.float32) for n in SIZES]

    def rank_body(rank, coll):
        params = [p.copy() for p in start]
        opt = lion_ffi.Lion(params, lr=1e-2, num_threads=1,
                            dist=Group("vote", rank, world, coll, vote_exchange=exchange))
        for step in range(3):
            opt.step(grads_for(rank, step))
        return params

    results = run_ranks(world, rank_body)
    for params in results[1:]:
        for p, q in zip(params, results[0]):
            assert p.tobytes() == q.tobytes()
    assert any(not np.array_equal(p, s) for p, s in zip(results[0], start)), "nothing moved"


def test_an_exception_in_a_collective_fails_the_step_with_it_chained():
    class Broken(Collectives):
        def all_reduce_sum(self, send, recv):
            raise RuntimeError("the network is down")

        def reduce_scatter_sum(self, send, recv):
            raise RuntimeError("the network is down")

        def all_gather(self, send, recv):
            raise RuntimeError("the network is down")

    p = np.ones(10, np.float32)
    opt = lion_ffi.Lion([p], lr=1e-2, dist=Group("sharded", 0, 1, Broken()))
    with pytest.raises(lion_ffi.LionError) as info:
        opt.step([np.ones(10, np.float32)])
    assert "all_reduce_sum" in str(info.value)  # the first collective: the ranks agreeing
    assert isinstance(info.value.__cause__, RuntimeError)
    assert (p == 1).all()
    # With two ranks, constructing is collective too (its check that the ranks were created
    # alike): the exception comes from there, chained, and is not left on the group.
    group = Group("sharded", 0, 2, Broken())
    with pytest.raises(lion_ffi.LionError) as info:
        lion_ffi.Lion([p], lr=1e-2, dist=group)
    assert "all_reduce_sum" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert group.error is None


def test_bad_groups_are_refused():
    coll = Collectives()
    with pytest.raises(ValueError):
        Group("both", 0, 1, coll)
    with pytest.raises(ValueError):
        Group("vote", 0, 1, coll, vote_exchange="telepathy")
    with pytest.raises(TypeError):
        Group("vote", 0, 1, object())
    with pytest.raises(ValueError):
        Group("vote", 0, 2**31, coll)
    with pytest.raises(lion_ffi.LionValueError):
        lion_ffi.Lion([np.ones(4, np.float32)], dist=Group("vote", 2, 2, coll))


def outcome(call):
    """The exception `call` raised (None if none), as a rank's result."""
    try:
        call()
    except Exception as e:  # noqa: BLE001
        return e
    return None


@pytest.mark.parametrize("mode", ["sharded", "vote"])
def test_a_rank_refusing_in_python_refuses_on_every_rank(mode):
    """A step or a creation that this front end refuses before calling liblion (a gradient of
    another size, a parameter not contiguous) takes part as a refusing rank: the other ranks
    are refused too instead of waiting in the collectives (which time out here after 10 s)."""

    def rank_body(rank, coll):
        group = Group(mode, rank, 2, coll)
        params = [np.zeros(16, np.float32)]
        opt = lion_ffi.Lion(params, lr=1e-2, num_threads=1, dist=group)
        grads = [np.ones(15 if rank == 0 else 16, np.float32)]
        refused_step = outcome(lambda: opt.step(grads))
        untouched = np.array_equal(params[0], np.zeros(16, np.float32))
        bad = np.zeros((16, 2), np.float32)[:, 0] if rank == 0 else np.zeros(16, np.float32)
        refused_creation = outcome(lambda: lion_ffi.Lion([bad], num_threads=1, dist=Group(mode, rank, 2, coll)))
        return refused_step, untouched, refused_creation

    (step0, untouched0, create0), (step1, untouched1, create1) = run_ranks(2, rank_body, timeout=10)
    assert isinstance(step0, ValueError) and "grads[0] has 15 elements" in str(step0)
    assert isinstance(step1, lion_ffi.LionValueError) and "another rank refused" in str(step1), step1
    assert untouched0 and untouched1
    assert isinstance(create0, ValueError) and "not C-contiguous" in str(create0)
    assert isinstance(create1, lion_ffi.LionValueError) and "another rank refused" in str(create1), create1


def test_collectives_get_their_input_read_only():
    """`send` is const in C, and may be the caller's own gradient (sharded mode reduce-scatters
    a flat gradient in place): a collective writing to it fails the step (LION_ERROR_COMM)
    instead of changing the caller's array."""

    class Scribbling(ThreadCollectives):
        def reduce_scatter_sum(self, send, recv):
            send += 1
            recv[:] = send

    def rank_body(rank, coll):
        opt = lion_ffi.Lion([np.zeros(16, np.float32)], num_threads=1, dist=Group("sharded", 0, 1, coll))
        g = np.ones(16, np.float32)
        g.setflags(write=False)
        return outcome(lambda: opt.step([g])), g.copy()

    [(error, g)] = run_ranks(1, lambda rank, coll: rank_body(rank, Scribbling(coll.shared, rank)))
    assert isinstance(error, lion_ffi.LionError) and "reduce_scatter_sum" in str(error)
    assert np.array_equal(g, np.ones(16, np.float32))


def test_a_refusal_in_python_leaves_no_collective_error_behind():
    """The refusing rank's collectives may raise (here: every one of them): that exception is
    not the cause of a later, unrelated error; and a `dist` that is no group leaves the
    caller's own error standing."""

    class GoesDown(ThreadCollectives):
        down = False

        def all_reduce_sum(self, send, recv):
            if self.down:
                raise RuntimeError("the network is down")
            super().all_reduce_sum(send, recv)

    def rank_body(rank, coll):
        coll = GoesDown(coll.shared, rank)
        group = Group("sharded", 0, 1, coll)
        opt = lion_ffi.Lion([np.zeros(8, np.float32)], num_threads=1, dist=group)
        coll.down = True
        first = outcome(lambda: opt.step([np.ones(7, np.float32)]))
        return first, group.error

    [(first, left)] = run_ranks(1, rank_body)
    assert isinstance(first, ValueError) and left is None
    with pytest.raises(ValueError, match="params is empty"):
        lion_ffi.Lion([], dist=object())


def test_a_rank_without_memory_for_its_checkpoint_still_takes_part(monkeypatch):
    """A sharded save is collective: a rank whose checkpoint buffer cannot be made raises
    MemoryError after taking part, so the other ranks get their checkpoint instead of
    waiting for it."""
    import ctypes
    from lion_ffi import _lib
    no_memory = threading.local()
    make = ctypes.create_string_buffer

    def create_string_buffer(*args):
        if getattr(no_memory, "on", False):
            raise MemoryError("no memory (test)")
        return make(*args)

    monkeypatch.setattr(_lib.ctypes, "create_string_buffer", create_string_buffer)
    start = [np.random.default_rng(8).standard_normal(n).astype(np.float32) for n in SIZES]

    def body(rank, collectives):
        params = [p.copy() for p in start]
        opt = lion_ffi.Lion(params, lr=1e-2, num_threads=1, dist=Group("sharded", rank, 2, collectives))
        opt.step(grads_for(rank, 0))
        no_memory.on = rank == 1
        try:
            return opt.save()
        except MemoryError:
            return "MemoryError"
        finally:
            no_memory.on = False

    got = run_ranks(2, body, timeout=20)
    assert got[1] == "MemoryError"
    assert isinstance(got[0], bytes) and len(got[0]) > 0
