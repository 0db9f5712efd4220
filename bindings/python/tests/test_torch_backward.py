"""lion_ffi.torch.Lion.register_step_in_backward (each parameter stepped by liblion's
lion_step_tensors as its gradient is accumulated) against the plain `backward(); step()` of the
same class, bit for bit: every dtype, stochastic rounding, cautious Lion, two param groups, an lr
schedule, state_dict; parameters unused in some passes skipped as the plain step skips them.
CPU, and CUDA where there is a GPU. Skipped where torch is missing (as in CI)."""
import copy

import pytest

torch = pytest.importorskip("torch")

import lion_ffi.torch as lt  # noqa: E402
from lion_ffi._lib import ROUND_OPEN, LionError  # noqa: E402

# The CUDA cases are reported as skipped where there is no GPU, not left out.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


class Net(torch.nn.Module):
    """Two layers and a branch used only on even passes (`use_branch`)."""

    def __init__(self, dtype):
        super().__init__()
        self.a = torch.nn.Linear(16, 33, dtype=dtype)
        self.b = torch.nn.Linear(33, 1, dtype=dtype)
        self.branch = torch.nn.Linear(16, 33, dtype=dtype)

    def forward(self, x, use_branch):
        h = self.a(x)
        if use_branch:
            h = h + self.branch(x)
        return self.b(torch.tanh(h))


def setup(device, dtype, seed=0, **kw):
    torch.manual_seed(seed)
    model = Net(dtype).to(device)
    other = copy.deepcopy(model)

    def groups(m):
        decay = [p for n, p in m.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in m.named_parameters() if n.endswith("bias")]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    opts = [lt.Lion(groups(m), lr=3e-3, weight_decay=0.1, **kw) for m in (model, other)]
    x = torch.randn(64, 16, device=device, dtype=dtype)
    y = torch.sin(x.float().sum(dim=1, keepdim=True)).to(dtype)
    return (model, opts[0]), (other, opts[1]), x, y


def loss_of(model, x, y, i, branch_every):
    use = branch_every is not None and i % branch_every == 0
    return torch.nn.functional.mse_loss(model(x, use).float(), y.float())


def assert_same(a, b, what):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{what}: {n} differs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["plain", "stochastic", "cautious"])
def test_stepping_in_backward_matches_the_plain_step(device, dtype, variant):
    kw = {"plain": {}, "stochastic": dict(stochastic_rounding=True, seed=5),
          "cautious": dict(cautious_factor=0.0, cautious_wd=True)}[variant]
    (plain, plain_opt), (ours, our_opt), x, y = setup(device, dtype, **kw)
    handle = our_opt.register_step_in_backward()
    sched = torch.optim.lr_scheduler.StepLR(plain_opt, step_size=3, gamma=0.5)
    our_sched = torch.optim.lr_scheduler.StepLR(our_opt, step_size=3, gamma=0.5)
    for i in range(8):
        plain_opt.zero_grad()
        loss_of(plain, x, y, i, 1).backward()  # the branch every pass: every parameter steps
        plain_opt.step()
        sched.step()
        loss_of(ours, x, y, i, 1).backward()
        assert all(p.grad is None for p in ours.parameters()), "the hooks free the gradients"
        our_opt.step()  # nothing left to do
        our_sched.step()
        assert_same(plain, ours, f"pass {i}")
    # The same liblion state: checkpoints equal, and either resumes the other.
    a, b = plain_opt.state_dict()["liblion"], our_opt.state_dict()["liblion"]
    assert a == b
    handle.remove()
    plain_opt.zero_grad()
    loss_of(plain, x, y, 9, 1).backward()
    plain_opt.step()
    loss_of(ours, x, y, 9, 1).backward()
    our_opt.step()  # the hooks are gone: a plain step again
    assert_same(plain, ours, "after remove()")


@pytest.mark.parametrize("device", DEVICES)
def test_parameters_without_a_gradient_are_skipped(device):
    # No stochastic rounding: the plain step splits its liblion optimizer where gradients go
    # missing (its step counts, and so its rounding keys, then differ); the values do not.
    (plain, plain_opt), (ours, our_opt), x, y = setup(device, torch.float32, seed=1)
    our_opt.register_step_in_backward(free_grads=False)
    for i in range(7):
        plain_opt.zero_grad(set_to_none=True)
        loss_of(plain, x, y, i, 3).backward()
        plain_opt.step()
        our_opt.zero_grad(set_to_none=True)
        loss_of(ours, x, y, i, 3).backward()
        assert ours.branch.weight.grad is None or i % 3 == 0
        assert_same(plain, ours, f"pass {i}")
    # Each pass ended its round: lr changes and checkpoints work between passes.
    for g in our_opt.param_groups:
        g["lr"] = 1e-3
    state = our_opt.state_dict()
    assert state["liblion"]
    loss_of(ours, x, y, 7, 3).backward()


def test_a_round_left_open_refuses_what_needs_whole_steps():
    (_, _), (ours, our_opt), x, y = setup("cpu", torch.float32, seed=2)
    our_opt.register_step_in_backward(free_grads=False)
    loss_of(ours, x, y, 0, 1).backward()  # builds the liblion optimizers
    handle = next(b.handle for b in our_opt._blocks[0].blocks)
    p = our_opt.param_groups[0]["params"][0]
    handle.step_tensors([0], [p.data_ptr()], [p.grad.data_ptr()])
    with pytest.raises(LionError) as e:
        handle.save()
    assert e.value.status == ROUND_OPEN, e.value
    with pytest.raises(LionError, match="already stepped"):
        handle.step_tensors([0], [p.data_ptr()], [p.grad.data_ptr()])
    handle.finish_round()
    handle.save()


class Boom(torch.autograd.Function):
    """Identity forward; a backward that raises, as a bad custom op or anomaly mode can."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("boom")


def failed_pass(a, b):
    """A backward pass that steps `a`, then raises before `b`'s gradient: its end never runs."""
    with pytest.raises(RuntimeError, match="boom"):
        (Boom.apply(b * 3).sum() + (a * 2).sum()).backward()


def test_a_backward_pass_that_raised_leaves_no_stale_pass():
    """The next pass checks the tensors anew and takes the group's new lr, and a state_dict can
    be saved: as after a pass that ended (before: the failed pass stayed open, the lr was
    ignored and a parameter re-viewed smaller was stepped past its end)."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(4))
    opt = lt.Lion([a, b], lr=0.1)
    opt.register_step_in_backward()
    failed_pass(a, b)
    opt.state_dict()  # the failed pass's round is ended: no LION_ERROR_ROUND_OPEN
    opt.param_groups[0]["lr"] = 1e-3
    a0, b0 = a.detach().clone(), b.detach().clone()
    (a.sum() - b.sum()).backward()
    # Gradients +1 and -1: each element moves by the lr, against the gradient's sign.
    assert torch.allclose(a0 - a.detach(), torch.full_like(a0, 1e-3), atol=1e-6)
    assert torch.allclose(b.detach() - b0, torch.full_like(b0, 1e-3), atol=1e-6)
    failed_pass(a, b)
    big = torch.zeros(8)
    a.data = big[:2]
    with pytest.raises(ValueError, match="parameter 0 of group 0 is now"):
        (a.sum() + b.sum()).backward()
    assert torch.equal(big, torch.zeros(8)), "liblion wrote past the parameter"


def test_a_group_added_after_registering_is_stepped_in_backward():
    torch.manual_seed(0)
    a, c = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = lt.Lion([a], lr=0.1)
    opt.register_step_in_backward()
    opt.add_param_group({"params": [c]})
    c0 = c.detach().clone()
    for _ in range(3):
        (a.sum() + c.sum()).backward()
    assert torch.allclose(c0 - c.detach(), torch.full_like(c0, 0.3), atol=1e-6)
    assert c.grad is None  # freed by its hook, as the other groups' are


def test_frozen_parameters_are_left_out_of_the_hooks_and_refused_once_unfrozen():
    a = torch.nn.Parameter(torch.zeros(3))
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    opt = lt.Lion([a, frozen], lr=0.1)
    registration = opt.register_step_in_backward(free_grads=False)
    for _ in range(3):
        opt.zero_grad()
        a.sum().backward()
        opt.step()
    assert torch.allclose(a, torch.full((3,), -0.3))  # stepped once a pass, not twice
    assert torch.equal(frozen, torch.zeros(3))
    frozen.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no hook"):
        (a.sum() + frozen.sum()).backward()  # refused at the pass's first hook, before any step
    assert torch.allclose(a, torch.full((3,), -0.3))
    frozen.grad = torch.ones(3)  # and by step() where it has a gradient
    with pytest.raises(RuntimeError, match="no hook"):
        opt.step()
    registration.remove()
    opt.zero_grad()
    opt.register_step_in_backward(free_grads=False)
    (a.sum() + frozen.sum()).backward()
    opt.step()
    assert torch.allclose(frozen, torch.full((3,), -0.1))


def test_a_registration_that_fails_leaves_no_hook():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = lt.Lion([a, b], lr=0.1)
    calls = []
    real = torch.Tensor.register_post_accumulate_grad_hook

    def failing(self, hook):
        if self is b:
            raise RuntimeError("no hook for b")
        calls.append(self)
        return real(self, hook)

    torch.Tensor.register_post_accumulate_grad_hook = failing
    try:
        with pytest.raises(RuntimeError, match="no hook for b"):
            opt.register_step_in_backward()
    finally:
        torch.Tensor.register_post_accumulate_grad_hook = real
    assert calls == [a]
    a.sum().backward()  # no hook left on a: nothing stepped in the pass
    assert torch.equal(a, torch.zeros(3))
    opt.register_step_in_backward(free_grads=False)  # and registering again works
    opt.zero_grad()
    a.sum().backward()
    assert torch.allclose(a, torch.full((3,), -0.1))


@pytest.mark.parametrize("head_inside", [True, False])
def test_reentrant_checkpointing_is_refused_and_the_non_reentrant_kind_steps_as_the_plain_step(head_inside):
    from torch.utils.checkpoint import checkpoint

    def run(in_backward, reentrant):
        torch.manual_seed(0)
        shared, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
        opt = lt.Lion([*shared.parameters(), *head.parameters()], lr=0.1)
        if in_backward:
            opt.register_step_in_backward()
        x = torch.randn(2, 4, requires_grad=True)
        for _ in range(2):
            h = x
            for _ in range(3):  # the shared layer in three segments
                h = checkpoint(lambda t: torch.tanh(shared(t)), h, use_reentrant=reentrant)
            out = checkpoint(head, h, use_reentrant=reentrant) if head_inside else head(h)
            out.sum().backward()
            if not in_backward:
                opt.step()
                opt.zero_grad()
        return [p.detach().clone() for p in (*shared.parameters(), *head.parameters())]

    with pytest.raises(RuntimeError, match="nested backward pass"):
        run(True, reentrant=True)
    for a, b in zip(run(False, reentrant=False), run(True, reentrant=False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("head_inside", [True, False])
def test_a_nested_pass_of_a_custom_function_is_refused(head_inside):
    # DeepSpeed's and fairscale's checkpointing: an autograd Function whose backward runs a
    # backward pass over its segment.
    class Segment(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, layer):
            ctx.layer = layer
            ctx.save_for_backward(x)
            with torch.no_grad():
                return torch.tanh(layer(x))

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                out = torch.tanh(ctx.layer(x))
            torch.autograd.backward(out, grad)
            return x.grad, None

    torch.manual_seed(0)
    shared, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    opt = lt.Lion([*shared.parameters(), *head.parameters()], lr=0.1)
    opt.register_step_in_backward()
    h = torch.randn(2, 4, requires_grad=True)
    for _ in range(3):
        h = Segment.apply(h, shared)
    out = Segment.apply(h, head) if head_inside else head(h)
    with pytest.raises(RuntimeError, match="nested backward pass"):
        out.sum().backward()


def test_load_state_dict_keeps_the_hooks_registered():
    def run(register_first):
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 1)
        opt = lt.Lion(m.parameters(), lr=0.1)
        m(torch.ones(2, 4)).sum().backward()
        opt.step()
        saved = opt.state_dict()
        opt.zero_grad()
        registration = opt.register_step_in_backward(free_grads=False) if register_first else None
        opt.load_state_dict(saved)
        if not register_first:
            registration = opt.register_step_in_backward(free_grads=False)
        for _ in range(2):
            m(torch.ones(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
        registration.remove()
        return [p.detach().clone() for p in m.parameters()]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_a_parameter_frozen_with_a_leftover_gradient_does_not_stop_the_steps():
    a, frozen = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = lt.Lion([a, frozen], lr=0.1)
    (a.sum() + frozen.sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # frozen keeps a (zero) gradient
    frozen.requires_grad_(False)
    opt.register_step_in_backward(free_grads=False)
    a.sum().backward()
    opt.step()  # no refusal: frozen still does not require a gradient
    assert torch.allclose(a, torch.full((3,), -0.2))


def test_a_hooked_parameter_moved_since_registration_is_refused_and_nothing_written():
    """A hook steps its parameter in the slot of the place it was registered at: where another
    tensor (here one of 1000 elements) now holds that place, stepping it there would read and
    write 1000 elements at a 2-element tensor's address. Refused, before the first pass too,
    when no momentum records the tensors yet."""
    base = torch.zeros(1000)
    a = torch.nn.Parameter(base[:2])  # a view: the memory past it is base's
    c = torch.nn.Parameter(torch.zeros(1000))
    opt = lt.Lion([{"params": [a]}, {"params": [c]}], lr=0.5)
    opt.register_step_in_backward()
    opt.param_groups.pop(0)
    with pytest.raises(ValueError, match="no longer parameter 0 of group 0"):
        (a * 1).sum().backward()
    assert torch.count_nonzero(base) == 0 and torch.count_nonzero(c) == 0
    with pytest.raises(ValueError, match="no longer parameter 0 of group 1"):
        (c * 1).sum().backward()  # its group is now group 0: the hook's place is gone
    assert torch.count_nonzero(c) == 0


def test_parameters_that_share_memory_are_refused_at_the_first_hook():
    """As by `step()`: two hooked views of one buffer would each be stepped on the other's values."""
    base = torch.zeros(8)
    first, second = torch.nn.Parameter(base[:5]), torch.nn.Parameter(base[3:])
    opt = lt.Lion([{"params": [first]}, {"params": [second]}], lr=0.1)
    opt.register_step_in_backward()
    with pytest.raises(ValueError, match="parameter 0 of group 1 shares memory with parameter 0 of group 0"):
        (first.sum() + second.sum()).backward()
    assert torch.count_nonzero(base) == 0
