"""lion_ffi.torch.DistributedLion over torch.distributed's NCCL: both modes, both ways of
joining (borrowing the process group's communicator, or liblion's own from a unique id).

With one GPU (a world of one rank), each mode must equal the single-process `Lion` bit for bit
(sharded on one rank is one process on the mean gradient; a vote of one is sign(c)). With two
GPUs, two processes train a small model on different batches: the ranks' parameters stay
identical and the loss falls. Skipped without CUDA and NCCL (a CPU machine reports them skipped).
"""
import datetime
import os
import socket
import sys
import tempfile
import traceback

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from lion_ffi.torch import DistributedLion, Lion  # noqa: E402

needs_nccl = pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                                reason="needs CUDA and torch.distributed's NCCL")


def _model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(37, 61), torch.nn.Tanh(), torch.nn.Linear(61, 5)).cuda().to(dtype)


def _batches(seed, n, rank=0):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return [(torch.randn(16, 37, generator=g).cuda(), torch.randn(16, 5, generator=g).cuda()) for _ in range(n)]


@pytest.fixture
def world_of_one():
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("nccl", init_method=f"file://{d}/store", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
        try:
            yield
        finally:
            dist.destroy_process_group()


@needs_nccl
@pytest.mark.parametrize("mode", ["sharded", "vote"])
@pytest.mark.parametrize("join", ["borrow", "unique_id"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 2])
def test_a_world_of_one_is_the_single_process_lion(world_of_one, mode, join, dtype, groups):
    a, b = _model(1, dtype), _model(1, dtype)
    kw = dict(lr=3e-3, weight_decay=0.1, stochastic_rounding=dtype == torch.bfloat16, seed=5)

    def params(model):  # two groups: one liblion optimizer each, on one communicator
        if groups == 1:
            return model.parameters()
        return [{"params": [p for p in model.parameters() if p.dim() >= 2]},
                {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]

    one = Lion(params(a), **kw)
    many = DistributedLion(params(b), mode=mode, join=join, **kw)
    for x, y in _batches(2, 6):
        for model, opt in [(a, one), (b, many)]:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
            opt.step()
    torch.cuda.synchronize()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.view(torch.int16) if dtype == torch.bfloat16 else p,
                           q.view(torch.int16) if dtype == torch.bfloat16 else q)
    assert all(many.step_count(i) == 6 for i in range(groups))
    # A checkpoint round trip, then both go on alike.
    saved = many.state_dict()
    again = DistributedLion(params(b), mode=mode, join=join, **kw)
    again.load_state_dict(saved)
    assert again.step_count() == 6


@needs_nccl
@pytest.mark.parametrize("mode", ["sharded", "vote"])
def test_a_gradient_or_parameter_changed_since_creation_is_refused(world_of_one, mode):
    model = _model(1)
    opt = DistributedLion(model.parameters(), lr=3e-3, mode=mode)
    x, y = _batches(2, 1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    torch.cuda.synchronize()
    w = model[0].weight  # 61 x 37
    before = w.detach().clone()
    w.grad = torch.ones(1, 1, device="cuda").expand(61, 37)  # the right shape, one element of memory
    with pytest.raises(ValueError, match="parameter 0 of group 0 is now"):
        opt.step()
    w.grad = torch.ones(61, 37, device="cuda")
    w.data = torch.zeros(4, device="cuda")  # a smaller parameter: liblion would write 2257 elements
    with pytest.raises(ValueError, match="parameter 0 of group 0 is now"):
        opt.step()
    w.data = before.clone()
    opt.step()  # as made for again
    torch.cuda.synchronize()
    assert opt.step_count() == 2


@needs_nccl
@pytest.mark.parametrize("mode", ["sharded", "vote"])
def test_hyperparameters_changed_after_the_first_step_are_refused(world_of_one, mode):
    """liblion takes betas and weight decay at creation: a change after the first step raises
    (the step skipped), where it was silently ignored; loading a state_dict makes the group anew
    with its hyperparameters."""
    p = torch.nn.Parameter(torch.ones(64, device="cuda"))
    opt = DistributedLion([p], lr=0.1, mode=mode)
    p.grad = torch.zeros_like(p)
    opt.step()
    opt.param_groups[0]["weight_decay"] = 0.5
    with pytest.raises(ValueError, match="changed since its first step"):
        opt.step()
    torch.cuda.synchronize()
    assert torch.equal(p.detach(), torch.ones_like(p)) and opt.step_count() == 1
    state = opt.state_dict()  # weight_decay 0.5 in its group
    fresh = DistributedLion([p], lr=0.1, mode=mode)
    p.grad = torch.zeros_like(p)
    fresh.step()  # made with weight_decay 0
    fresh.load_state_dict(state)  # made anew with 0.5, the momentum and count loaded
    fresh.step()
    torch.cuda.synchronize()
    assert fresh.step_count() == 2
    assert torch.equal(p.detach(), torch.full_like(p, 1 - 0.1 * 0.5))


@needs_nccl
@pytest.mark.parametrize("mode", ["sharded", "vote"])
def test_a_state_dict_from_before_the_first_step_resets_the_group(world_of_one, mode):
    """A group without momentum in the state_dict starts anew, as Lion's does, where its
    momentum and step count were kept."""
    p = torch.nn.Parameter(torch.zeros(64, device="cuda"))
    opt = DistributedLion([p], lr=0.1, mode=mode)
    before = opt.state_dict()
    p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    opt.load_state_dict(before)
    p.grad = torch.zeros_like(p)
    moved = p.detach().clone()
    opt.step()  # no momentum: a zero gradient does not move it
    torch.cuda.synchronize()
    assert torch.equal(p.detach(), moved) and opt.step_count() == 1


@needs_nccl
def test_vote_with_q8_momentum_is_the_single_process_lion(world_of_one):
    """8-bit momentum in vote mode: a vote of one rank is one process's q8 step. The first
    layer's 37 x 130 weights (4810) are quantized, with a partial last block of 256; the
    others keep f32 momentum. The sharded mode refuses q8 at its first step."""
    def model():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(37, 130), torch.nn.Tanh(), torch.nn.Linear(130, 5)).cuda()

    a, b = model(), model()
    kw = dict(lr=3e-3, weight_decay=0.1, state_dtype="q8")
    one = Lion(a.parameters(), **kw)
    many = DistributedLion(b.parameters(), mode="vote", **kw)
    for x, y in _batches(2, 6):
        for m, opt in [(a, one), (b, many)]:
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    torch.cuda.synchronize()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="state_dtype"):
        DistributedLion(model().parameters(), mode="vote", state_dtype="q4")
    c = model()
    sharded = DistributedLion(c.parameters(), mode="sharded", lr=3e-3, state_dtype="q8")
    x, y = _batches(2, 1)[0]
    torch.nn.functional.mse_loss(c(x), y).backward()
    with pytest.raises(Exception, match="8-bit momentum"):
        sharded.step()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_rank(rank, world, port, mode, out):
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank), timeout=datetime.timedelta(minutes=3))
    try:
        model = _model(3)
        opt = DistributedLion(model.parameters(), lr=3e-3, weight_decay=0.01, mode=mode)
        losses = []
        target = torch.nn.Linear(37, 5).cuda()
        for x, _ in _batches(4, 40, rank):
            with torch.no_grad():
                y = target(x)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        torch.save({"losses": losses, "same": all(torch.equal(g, flat) for g in gathered)}, f"{out}/{rank}.pt")
    except BaseException:
        # Not destroy_process_group: since torch 2.6 it waits for this rank's collectives,
        # which the other ranks may never join. Exiting makes mp.spawn end them.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


@needs_nccl
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("mode", ["sharded", "vote"])
def test_two_ranks_stay_identical_and_the_loss_falls(mode):
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_train_rank, args=(2, _free_port(), mode, out), nprocs=2, join=True)
        for rank in range(2):
            r = torch.load(f"{out}/{rank}.pt")
            assert r["same"], f"rank {rank}'s parameters differ from the others'"
            first, last = sum(r["losses"][:5]) / 5, sum(r["losses"][-5:]) / 5
            assert last < 0.7 * first, (mode, rank, r["losses"])
