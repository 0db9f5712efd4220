"""lion_ffi.torch.Lion against lion-pytorch 0.2.5 over 100 steps of a small real training loop
(CPU, and CUDA where there is a GPU), its cautious variant, state_dict, and GradScaler; and, on
given gradients, step by step: parameters without a gradient skipped, state moved to and from
lion-pytorch, hyperparameters changed mid-run. Skipped where torch or lion-pytorch is missing
(they run on the GPU machine)."""
import copy
import pickle

import pytest

torch = pytest.importorskip("torch")
lion_pytorch = pytest.importorskip("lion_pytorch")
from lion_pytorch.cautious_lion import Lion as CautiousLion  # noqa: E402

import lion_ffi.torch as lt  # noqa: E402

# The CUDA cases are reported as skipped where there is no GPU, not left out.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def model_and_data(device, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(device)
    x = torch.randn(256, 16, device=device)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return model, x, y


def train(model, opt, x, y, steps=100, start=0):
    losses = []
    for i in range(start, start + steps):
        idx = torch.arange(i * 64 % 256, i * 64 % 256 + 64, device=x.device) % 256
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["plain", "decoupled", "cautious", "cautious_wd"])
def test_parity_with_lion_pytorch(device, variant):
    model, x, y = model_and_data(device)
    ours = copy.deepcopy(model)
    kw = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    if variant == "plain":
        ref_opt, our_opt = lion_pytorch.Lion(model.parameters(), **kw), lt.Lion(ours.parameters(), **kw)
    elif variant == "decoupled":
        kw.update(weight_decay=1e-4, decoupled_weight_decay=True)
        ref_opt, our_opt = lion_pytorch.Lion(model.parameters(), **kw), lt.Lion(ours.parameters(), **kw)
    else:
        kw.update(cautious_factor=0.0, cautious_wd=variant == "cautious_wd")
        ref_opt, our_opt = CautiousLion(model.parameters(), **kw), lt.Lion(ours.parameters(), **kw)
    ref_losses = train(model, ref_opt, x, y)
    our_losses = train(ours, our_opt, x, y)
    # Same function: rounding differences may flip sign(c) where c is ~0, so allow a few lr.
    for a, b in zip(model.parameters(), ours.parameters()):
        assert (a - b).abs().max().item() < 20 * kw["lr"]
    assert abs(ref_losses[-1] - our_losses[-1]) < 0.05 * ref_losses[0]
    assert our_losses[-1] < 0.8 * our_losses[0], "the loss did not fall"


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_and_lr_schedule(device):
    model, x, y = model_and_data(device)
    opt = lt.Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    for _ in range(3):
        train(model, opt, x, y, steps=10)
        sched.step()
    state = opt.state_dict()
    clone = copy.deepcopy(model)
    other = lt.Lion(clone.parameters(), lr=1e-3, weight_decay=0.1)
    other.load_state_dict(state)
    assert other.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    train(model, opt, x, y, steps=5)
    train(clone, other, x, y, steps=5)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GradScaler's found_inf path needs CUDA")
def test_grad_scaler_skips_inf_steps():
    model, x, y = model_and_data("cuda")
    opt = lt.Lion(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.mse_loss(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b), "a step with inf gradients must be skipped"
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_arguments_the_c_struct_cannot_hold_are_refused_at_construction():
    model, _, _ = model_and_data("cpu")
    with pytest.raises(ValueError, match="betas must be a pair"):
        lt.Lion(model.parameters(), betas=(0.9, 0.99, 0.5))
    for name, bad in [("num_threads", 2**32), ("seed", -1)]:
        with pytest.raises(ValueError, match=rf"{name} must be in \[0, \d+\], got {bad}"):
            lt.Lion(model.parameters(), **{name: bad})


@pytest.fixture(params=["guard", "quick"])
def per_step_check(request, monkeypatch):
    """Each of the per-step checks (lt._Checked): dynamo's TensorGuards where this torch has
    it, and _quick's reads without it."""
    if request.param == "quick":
        monkeypatch.setattr(lt, "_TensorGuards", None)
    elif lt._TensorGuards is None:
        pytest.skip("this torch has no torch._C._dynamo.guards.TensorGuards")
    return request.param


@pytest.mark.parametrize("device", DEVICES)
def test_parameter_changed_since_the_first_step_is_refused(device, per_step_check):
    model, x, y = model_and_data(device)
    opt = lt.Lion(model.parameters(), lr=1e-3)
    train(model, opt, x, y, steps=1)
    checked = opt._blocks[0].blocks[0].checked
    assert (checked.guard is not None) == (per_step_check == "guard")
    w = model[0].weight  # 64 x 16
    before = w.detach().clone()
    w.grad = torch.ones(16, 64, device=device).t()  # the right shape, not contiguous
    with pytest.raises(ValueError, match="parameter 0 of group 0 is now"):
        opt.step()
    assert torch.equal(w, before)
    w.grad = torch.ones(64, 16, device=device)
    w.data = w.data.t()  # the same address and size, not contiguous: the full check runs again
    with pytest.raises(ValueError, match="parameter 0 of group 0 is now"):
        opt.step()
    w.data = w.data.t()
    assert torch.equal(w, before)
    w.grad.data = w.grad.data.bfloat16()  # re-viewed in place (not through the .grad setter)
    with pytest.raises(ValueError, match="parameter 0 of group 0 is now"):
        opt.step()
    assert torch.equal(w, before)
    w.data = torch.zeros(128, 16, device=device)  # a larger tensor: liblion would write 1024 of it
    w.grad = torch.ones(128, 16, device=device)
    with pytest.raises(ValueError, match="its optimizer was created for"):
        opt.step()
    assert torch.all(w == 0)


def test_a_tensor_reshaped_in_place_is_checked_again_and_stepped(per_step_check):
    # The guard rejects what _quick accepts (the same bytes in another shape): the full check
    # runs again, accepts, and the step is the same as without the change.
    w0 = torch.randn(6, 4)
    ws = [w0.clone().requires_grad_() for _ in range(2)]
    opts = [lt.Lion([w], lr=1e-2, weight_decay=0.1) for w in ws]
    g = torch.randn(6, 4)
    for step in range(3):
        for w, opt in zip(ws, opts):
            w.grad = g.clone().view_as(w)
            opt.step()
        ws[1].data = ws[1].data.view(4, 6) if step % 2 == 0 else ws[1].data.view(6, 4)
        ws[1].grad = None
    assert torch.equal(ws[0], ws[1].view(6, 4))


# On given gradients: every run below sees the same ones, so runs can be compared step by step.
# lion-pytorch and liblion round a few operations differently (liblion keeps lr in f32 and may
# fuse a multiply-add), which moves values by a few ulp, never by a step of lr: CLOSE tells the
# two apart. EXACT comparisons are between runs of liblion alone.
SHAPES = [(64, 16), (64,), (1, 64), (7,)]
KW = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
CLOSE = dict(rtol=0, atol=1e-5)


def make_params(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES]


def make_grads(device, have, dtype=torch.float32, seed=1):
    """One list of gradients per step: None where the step's entry of `have` lacks the position."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=g).to(device=device, dtype=dtype) if i in step else None
             for i, s in enumerate(SHAPES)] for step in have]


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def run_steps(opt, params, grads):
    for step in grads:
        for p, g in zip(params, step):
            p.grad = None if g is None else g.clone()
        opt.step()


def exp_avgs(opt, params):
    """The momentum per parameter (None where it has none), from lion-pytorch's state or ours."""
    if isinstance(opt, lt.Lion):
        state = opt.state_dict_lion_pytorch()["state"]
        return [state[i]["exp_avg"] if i in state else None for i in range(len(params))]
    return [opt.state.get(p, {}).get("exp_avg") for p in params]


def assert_same(a, b, exact):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x is None) == (y is None), f"tensor {i}: {x} vs {y}"
        if x is not None:
            if exact:
                assert x.dtype == y.dtype and torch.equal(x, y), f"tensor {i} differs"
            else:
                torch.testing.assert_close(x, y, **CLOSE, msg=lambda m: f"tensor {i}: {m}")


ALL = {0, 1, 2, 3}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first", [ALL, {0, 2}], ids=["all-first", "some-first"])
def test_parameters_without_a_gradient_are_skipped(device, first):
    # One group: its single liblion optimizer is split as gradients go missing. Against
    # lion-pytorch (which skips them), and bit for bit against one group per parameter.
    have = [first, ALL, {0, 1, 3}, {0, 1, 3}, {2}, set(), ALL, {1}, {0, 3}, ALL]
    params = make_params(device)
    ours, ref, alone = clone(params), clone(params), clone(params)
    opt = lt.Lion(ours, **KW)
    ref_opt = lion_pytorch.Lion(ref, **KW)
    alone_opt = lt.Lion([{"params": [p]} for p in alone], **KW)
    for step in make_grads(device, have):
        before, momentum_before = clone(ours), exp_avgs(opt, ours)
        for opt_, params_ in [(opt, ours), (ref_opt, ref), (alone_opt, alone)]:
            run_steps(opt_, params_, [step])
        momentum = exp_avgs(opt, ours)
        for i, g in enumerate(step):
            if g is None:
                assert torch.equal(ours[i], before[i]), f"parameter {i} moved without a gradient"
                assert_same([momentum[i]], [momentum_before[i]], exact=True)
        assert_same(ours, alone, exact=True)
        assert_same(momentum, exp_avgs(alone_opt, alone), exact=True)
        assert_same(ours, ref, exact=False)
        assert_same(momentum, exp_avgs(ref_opt, ref), exact=False)
    assert any(not torch.equal(a, b) for a, b in zip(ours, params))


@pytest.mark.parametrize("device", DEVICES)
def test_a_split_group_saves_loads_and_honours_found_inf(device):
    have = [ALL, {0, 2}, {1}, ALL, ALL, {3}]
    grads = make_grads(device, have)
    ours = make_params(device)
    opt = lt.Lion(ours, **KW)
    run_steps(opt, ours, grads[:3])
    assert isinstance(opt.state_dict()["liblion"][0], list), "the group should be split by now"
    other = clone(ours)
    other_opt = lt.Lion(other, **KW)
    other_opt.load_state_dict(opt.state_dict())
    run_steps(opt, ours, grads[3:])
    run_steps(other_opt, other, grads[3:])
    assert_same(ours, other, exact=True)
    before = clone(ours)
    opt.grad_scale, opt.found_inf = None, torch.ones(1, device=device)  # as GradScaler hands them over
    run_steps(opt, ours, grads[:1])
    assert_same(ours, before, exact=True)
    opt.found_inf = torch.zeros(1, device=device)
    run_steps(opt, ours, grads[:1])
    assert all(not torch.equal(a, b) for a, b in zip(ours, before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cautious", [False, True])
def test_lion_pytorch_state_moves_in_and_out_bit_for_bit(device, dtype, cautious):
    # Parameter 3 never has a gradient: lion-pytorch keeps no exp_avg for it, nor do we.
    Ref = CautiousLion if cautious else lion_pytorch.Lion
    kw = dict(KW, cautious_factor=0.5) if cautious else KW
    grads = make_grads(device, [{0, 1, 2}] * 10, dtype=dtype)
    ref = make_params(device, dtype)
    ref_opt = Ref(ref, **kw)
    run_steps(ref_opt, ref, grads[:5])
    saved = copy.deepcopy(ref_opt.state_dict())  # lion-pytorch's state_dict holds its live tensors
    ours = clone(ref)
    opt = lt.Lion(ours, **kw)
    opt.load_state_dict(saved)
    back = opt.state_dict_lion_pytorch()
    assert sorted(back["state"]) == sorted(saved["state"]) == [0, 1, 2]
    for i, s in saved["state"].items():
        assert back["state"][i]["exp_avg"].dtype == dtype and back["state"][i]["exp_avg"].device == ref[i].device
        assert torch.equal(back["state"][i]["exp_avg"], s["exp_avg"])
    # lion-pytorch goes on from the round trip exactly as from its own state.
    resumed = clone(ref)
    resumed_opt = Ref(resumed, **kw)
    resumed_opt.load_state_dict(back)
    run_steps(ref_opt, ref, grads[5:])
    run_steps(resumed_opt, resumed, grads[5:])
    assert_same(resumed, ref, exact=True)
    # And liblion, from lion-pytorch's state to ours and back into liblion, as if never moved.
    run_steps(opt, ours, grads[5:7])
    again = clone(ours)
    again_opt = lt.Lion(again, **kw)
    again_opt.load_state_dict(opt.state_dict_lion_pytorch())
    run_steps(opt, ours, grads[7:])
    run_steps(again_opt, again, grads[7:])
    assert_same(again, ours, exact=True)


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_moves_from_lion_pytorch_to_lion_ffi_and_back(device):
    # The training loop of the parity test, 50 steps with one and 50 with the other, against
    # lion-pytorch throughout; the same tolerance as the parity test.
    kw = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    model, x, y = model_and_data(device)
    throughout = copy.deepcopy(model)
    train(throughout, lion_pytorch.Lion(throughout.parameters(), **kw), x, y, steps=100)
    for first, second in [(lion_pytorch.Lion, lt.Lion), (lt.Lion, lion_pytorch.Lion)]:
        moved = copy.deepcopy(model)
        opt = first(moved.parameters(), **kw)
        train(moved, opt, x, y, steps=50)
        state = opt.state_dict_lion_pytorch() if first is lt.Lion else copy.deepcopy(opt.state_dict())
        opt = second(moved.parameters(), **kw)
        opt.load_state_dict(state)
        train(moved, opt, x, y, steps=50, start=50)
        for a, b in zip(throughout.parameters(), moved.parameters()):
            assert (a - b).abs().max().item() < 20 * kw["lr"], f"{first.__module__} then {second.__module__}"


CHANGES = [dict(weight_decay=2.0), dict(betas=(0.5, 0.9)), dict(cautious_factor=0.0), dict(cautious_wd=True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change", CHANGES, ids=lambda c: next(iter(c)))
def test_hyperparameters_changed_after_the_first_step_are_honoured(device, change):
    # CautiousLion with cautious_factor 1 and cautious_wd off is plain Lion, and it reads every
    # hyperparameter of the group at every step.
    kw = dict(KW, cautious_factor=1.0, cautious_wd=False)
    grads = make_grads(device, [ALL] * 6)
    params = make_params(device)
    ours, ref, ignored = clone(params), clone(params), clone(params)
    opt, ref_opt, ignored_opt = lt.Lion(ours, **kw), CautiousLion(ref, **kw), lt.Lion(ignored, **kw)
    for opt_, params_ in [(opt, ours), (ref_opt, ref), (ignored_opt, ignored)]:
        run_steps(opt_, params_, grads[:3])
        if opt_ is not ignored_opt:
            opt_.param_groups[0].update(change)
        run_steps(opt_, params_, grads[3:])
    assert_same(ours, ref, exact=False)
    assert_same(exp_avgs(opt, ours), exp_avgs(ref_opt, ref), exact=False)
    # The test can fail: a run that keeps the old value is far from lion-pytorch.
    with pytest.raises(AssertionError):
        assert_same(ours + exp_avgs(opt, ours), ignored + exp_avgs(ignored_opt, ignored), exact=False)


@pytest.mark.parametrize("device", DEVICES)
def test_a_hyperparameter_change_liblion_refuses_names_the_group_and_writes_nothing(device):
    params = make_params(device)
    opt = lt.Lion([{"params": params[:2]}, {"params": params[2:]}], **KW)
    grads = make_grads(device, [ALL] * 2)
    run_steps(opt, params, grads[:1])
    before = clone(params)
    opt.param_groups[1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="group 1"):
        run_steps(opt, params, grads[1:])
    assert_same(params, before, exact=True)
    opt.param_groups[1]["betas"] = (0.9,)
    with pytest.raises(ValueError, match="group 1: betas must be a pair"):
        run_steps(opt, params, grads[1:])
    opt.param_groups[1]["betas"] = (0.9, 0.9)
    run_steps(opt, params, grads[1:])
    assert all(not torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("state_dtype", ["f32", "bf16", "q8"])
def test_state_dtype_is_chosen_explicitly(state_dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
    x = torch.randn(256, 64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    opt = lt.Lion(model.parameters(), lr=3e-3, weight_decay=0.1, state_dtype=state_dtype)
    losses = train(model, opt, x, y)
    assert losses[-1] < 0.8 * losses[0], "the loss did not fall"
    _, code = opt._blocks[0].momentum()
    assert code == {"f32": 0, "bf16": 2, "q8": 3}[state_dtype]
    # lion-pytorch's form decodes it, and it loads back.
    exported = opt.state_dict_lion_pytorch()
    again = lt.Lion(model.parameters(), lr=3e-3, weight_decay=0.1, state_dtype=state_dtype)
    again.load_state_dict(exported)
    train(model, again, x, y, steps=2)
    with pytest.raises(ValueError, match="state_dtype"):
        lt.Lion(model.parameters(), lr=1e-3, state_dtype="int8")


def test_distributed_lions_check_refuses_what_liblion_would_overrun():
    # DistributedLion's per-step check (its steps need CUDA and NCCL; the check is plain torch).
    def with_grad(p, g):
        p.grad = g
        return p

    p = torch.zeros(6, 4)
    no_grad_yet = lt._layout(p)
    made_for = [lt._layout(with_grad(p, torch.zeros(6, 4)))]
    lt._check_dist_layouts(0, made_for, made_for)
    assert [no_grad_yet] == made_for  # no gradient yet: the parameter's dtype
    for q, g in [(torch.zeros(6, 4), torch.zeros(1, 1).expand(6, 4)),  # one element of memory
                 (torch.zeros(6, 4).t(), torch.zeros(4, 6)),  # re-viewed, not contiguous
                 (torch.zeros(5, 4), torch.zeros(5, 4)),  # smaller
                 (torch.zeros(6, 4, dtype=torch.bfloat16), torch.zeros(6, 4, dtype=torch.bfloat16))]:
        with pytest.raises(ValueError, match="parameter 0 of group 3 is now"):
            lt._check_dist_layouts(3, [lt._layout(with_grad(q, g))], made_for)


@pytest.mark.parametrize("device", DEVICES)
def test_a_block_over_every_parameter_in_another_order_steps_each_its_own(device):
    # A saved block may list a group's positions in any order (here (1, 0)): its handle's
    # tensors follow that order, and so must the pointers.
    big, small = [torch.randn(n, device=device).requires_grad_() for n in (300, 5)]
    source = lt.Lion([big, small], **KW)
    big.grad, small.grad = torch.randn(300, device=device), torch.randn(5, device=device)
    source.step()
    blob = source.state_dict()["liblion"][0]
    grads = [torch.randn(5, device=device), torch.randn(300, device=device)]
    runs = []
    for saved in ({0: [((1, 0), blob)]}, None):
        a, b = small.detach().clone().requires_grad_(), big.detach().clone().requires_grad_()
        if saved is None:  # the same momentum, loaded the usual way, in the source's order
            opt = lt.Lion([b, a], **KW)
            opt.load_state_dict(source.state_dict())
        else:
            opt = lt.Lion([a, b], **KW)
            state = opt.state_dict()
            state["liblion"] = saved
            opt.load_state_dict(state)
        a.grad, b.grad = grads[0].clone(), grads[1].clone()
        opt.step()
        runs.append((a.detach(), b.detach()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_distributed_lion_refuses_a_changed_group_and_steps_the_others(monkeypatch):
    # DistributedLion.step's control flow on the CPU, with liblion's handles replaced by
    # recorders (its collectives need CUDA and NCCL): a group whose tensors changed since
    # creation takes part in its step as a refusing rank (so the other ranks skip it instead
    # of waiting), the other groups step, and the error is raised after.
    class Recorder:
        def __init__(self, params, hyper):
            self.device, self.lr, self.calls, self.hyper = torch.device("cpu"), 1e-3, [], hyper
            self.made_for, self.checked = [lt._layout(p) for p in params], None
            self.owners = list(params)

        def step(self, params, grads, stream=None, options=None):
            self.calls.append(("step", len(params), len(grads)))

        def refuse_step(self, stream=None):
            self.calls.append(("refuse",))

        def set_lr(self, value):
            self.lr = value

        def _pointer_array(self, addresses, slot):
            return addresses

    class Stream:
        cuda_stream = None

    groups = [[torch.nn.Parameter(torch.randn(6, 4))], [torch.nn.Parameter(torch.randn(3))]]
    opt = lt.DistributedLion([{"params": g} for g in groups], lr=1e-3)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    handles = {i: Recorder(g, lt._hyper(opt.param_groups[i])) for i, g in enumerate(groups)}
    monkeypatch.setattr(opt, "_handle", lambda index, group: handles[index])
    for g in groups:
        g[0].grad = torch.zeros_like(g[0])
    opt.step()
    assert [h.calls for h in handles.values()] == [[("step", 1, 1)], [("step", 1, 1)]]
    groups[0][0].grad = torch.zeros(1, 1).expand(6, 4)  # the right shape, one element of memory
    with pytest.raises(ValueError, match="parameter 0 of group 0 is now"):
        opt.step()
    assert handles[0].calls[1:] == [("refuse",)] and handles[1].calls[1:] == [("step", 1, 1)]
    # A group that gained a parameter since creation: refused alike, before any array is made.
    groups[0][0].grad = torch.zeros(6, 4)
    opt.param_groups[1]["params"].append(torch.nn.Parameter(torch.randn(2)))
    opt.param_groups[1]["params"][1].grad = torch.zeros(2)
    with pytest.raises(ValueError, match="group 1 now has 2 parameters"):
        opt.step()
    assert handles[0].calls[2:] == [("step", 1, 1)] and handles[1].calls[2:] == [("refuse",)]
    # Another tensor of the same layout in the group's place: its momentum is not that one's.
    other = torch.nn.Parameter(torch.randn(3))
    other.grad = torch.zeros(3)
    opt.param_groups[1]["params"][:] = [other]
    with pytest.raises(ValueError, match="parameter 0 of group 1 is not the tensor its momentum belongs to"):
        opt.step()
    assert handles[0].calls[3:] == [("step", 1, 1)] and handles[1].calls[3:] == [("refuse",)]
    # A hyperparameter that liblion took at creation, changed: refused alike (it was ignored).
    opt.param_groups[1]["params"][:] = groups[1]
    opt.param_groups[0]["weight_decay"] = 0.5
    with pytest.raises(ValueError, match="group 0: its betas, weight_decay.*changed since its first step"):
        opt.step()
    assert handles[0].calls[4:] == [("refuse",)] and handles[1].calls[4:] == [("step", 1, 1)]


def test_distributed_lion_refusing_a_group_still_takes_part_in_making_it(monkeypatch):
    # DistributedLion._handle on the CPU with the joins replaced by recorders: a group this rank
    # refuses (here: parameters not on a CUDA device) still joins the group's communicator and
    # makes a liblion optimizer of no tensors (which liblion refuses on every rank), then raises.
    calls = []

    def join(device):
        calls.append(("join", device.type))
        return "group"

    class Refused(lt.LionError):
        pass

    def handle(config, descs, dist=None):
        calls.append(("create", len(descs), dist))
        raise Refused(2, "n_tensors must be at least 1")

    params = [torch.nn.Parameter(torch.randn(3))]
    opt = lt.DistributedLion(params, lr=1e-3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(opt, "_nccl_group", join)
    monkeypatch.setattr(lt, "Handle", handle)
    with pytest.raises(ValueError, match="group 0: every parameter must be on this rank's one CUDA device"):
        opt._handle(0, opt.param_groups[0])
    assert calls == [("join", "cuda"), ("create", 0, "group")]


@pytest.mark.parametrize("device", DEVICES)
def test_the_step_reads_the_current_stream_as_torch_gives_it(device):
    assert lt._stream_of(torch.device("cpu")) is None
    if device != "cuda":
        return
    side = torch.cuda.Stream()
    for dev in (torch.device("cuda"), torch.device("cuda", torch.cuda.current_device())):
        assert lt._stream_of(dev) == torch.cuda.current_stream(dev).cuda_stream
        with torch.cuda.stream(side):
            assert lt._stream_of(dev) == side.cuda_stream


def test_a_nested_parameter_steps_on_the_check_without_the_guard():
    # dynamo's TensorGuards ends the process on a nested tensor (it cannot give its sizes in
    # C++): _Checked keeps such tensors on _quick. A dense parameter beside it is stepped too.
    q = torch.nn.Parameter(torch.nested.nested_tensor([torch.randn(2, 5), torch.randn(3, 5)]))
    w = torch.nn.Parameter(torch.randn(7))
    (q * 2.0).backward(torch.nested.nested_tensor([torch.ones(2, 5), torch.ones(3, 5)]))
    w.grad = torch.ones(7)
    before = [t.detach().clone() for t in (q.values(), w)]
    opt = lt.Lion([q, w], lr=0.1)
    for _ in range(2):
        opt.step()
    assert opt._blocks[0].blocks[0].checked.guard is None
    for now, then in zip((q.values(), w), before):  # two steps of -lr * sign(positive)
        assert torch.allclose(now, then - 0.2, atol=1e-6)


def test_a_gradient_re_viewed_to_another_size_is_refused():
    """torch checks a gradient's size where `.grad` is assigned, not where it is re-viewed in
    place; liblion reads as many gradient elements as the parameter has (before: stepped from
    memory past the gradient)."""
    for steps_before in (0, 1):
        p = torch.nn.Parameter(torch.zeros(6))
        opt = lt.Lion([p], lr=0.1)
        for _ in range(steps_before):
            p.grad = torch.ones(6)
            opt.step()
        p.grad = torch.zeros(6)
        p.grad.data = torch.ones(2)
        before = p.detach().clone()
        with pytest.raises(ValueError, match="has 6 elements on cpu, its gradient 2 on cpu"):
            opt.step()
        assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("split", [False, True])
def test_momentum_stays_with_its_tensors_when_groups_move(split):
    """Momentum belongs to the parameters it was made for: a group removed from before
    another is refused, not stepped with the removed group's momentum, also where the same
    step splits the group's block (a parameter without a gradient)."""
    a, b, c, d = (torch.nn.Parameter(torch.zeros(4)) for _ in range(4))
    opt = lt.Lion([{"params": [a, b]}, {"params": [c, d]}], lr=0.1)
    for p, g in ((a, 10.0), (b, 10.0), (c, -1.0), (d, -1.0)):
        p.grad = torch.full((4,), g)
    opt.step()
    opt.param_groups.pop(0)
    c.grad = torch.full((4,), 0.05)
    d.grad = None if split else torch.full((4,), 0.05)
    before = c.detach().clone()
    with pytest.raises(ValueError, match="parameter 0 of group 0 is not the tensor its momentum belongs to"):
        opt.step()
    assert torch.equal(c.detach(), before)
    del a, b  # freed: a new tensor may take an old one's id, and is refused all the same
    opt.param_groups[0]["params"][:] = [torch.nn.Parameter(torch.zeros(4)), d]
    opt.param_groups[0]["params"][0].grad = torch.ones(4)
    with pytest.raises(ValueError, match="is not the tensor its momentum belongs to"):
        opt.step()


def test_a_state_dict_refuses_momentum_whose_tensor_moved_to_another_group():
    """Momentum is saved by group index: after a group removed from before another, the
    momentum saved as group 0's would be the removed group's, and would load into the other
    group's parameters. Refused by state_dict, copies and the lion-pytorch export, until the
    groups are put back; a group removed from the end only leaves its momentum out."""
    a, b, c, d = (torch.nn.Parameter(torch.zeros(4)) for _ in range(4))
    opt = lt.Lion([{"params": [a, b]}, {"params": [c, d]}], lr=0.1)
    for p, g in ((a, 10.0), (b, 10.0), (c, -1.0), (d, -1.0)):
        p.grad = torch.full((4,), g)
    opt.step()
    first = opt.param_groups.pop(0)
    for save in (opt.state_dict, lambda: copy.deepcopy(opt), lambda: pickle.dumps(opt), opt.state_dict_lion_pytorch):
        with pytest.raises(ValueError, match="parameter 0 of group 1 belongs to the tensor now at parameter 0 of group 0"):
            save()
    opt.param_groups.insert(0, first)
    saved = opt.state_dict()
    last = opt.param_groups.pop(1)
    assert opt.state_dict()["liblion"] == {0: saved["liblion"][0]}
    opt.param_groups.append(last)
    # A state dict whose keys are no longer group indexes (a JSON round trip) is refused.
    mangled = dict(saved, liblion={str(k): v for k, v in saved["liblion"].items()})
    with pytest.raises(ValueError, match="not by group indexes"):
        lt.Lion([{"params": [a, b]}, {"params": [c, d]}], lr=0.1).load_state_dict(mangled)


def test_a_distributed_state_dict_refuses_momentum_whose_tensor_moved_to_another_group():
    # DistributedLion.state_dict on the CPU with liblion's handles replaced by stand-ins (their
    # collectives need CUDA and NCCL): refused on every rank alike, before the collective save.
    class Saved:
        def __init__(self, params):
            self.owners = list(params)

        def save(self):
            return b"blob"

    groups = [[torch.nn.Parameter(torch.randn(3))], [torch.nn.Parameter(torch.randn(3))]]
    opt = lt.DistributedLion([{"params": g} for g in groups], lr=1e-3)
    opt._handles = {i: Saved(g) for i, g in enumerate(groups)}
    assert opt.state_dict()["liblion"] == {0: b"blob", 1: b"blob"}
    opt.param_groups.pop(0)
    with pytest.raises(ValueError, match="parameter 0 of group 1 belongs to the tensor now at parameter 0 of group 0"):
        opt.state_dict()


def test_distributed_lion_marks_its_parameters_and_refuses_a_state_dict_that_lost_the_momentum(monkeypatch):
    # DistributedLion on the CPU with liblion's optimizer and communicator replaced by
    # stand-ins: once made, its parameters have state entries (torch.distributed.checkpoint
    # otherwise reads it as never stepped, and steps it with zero gradients, decaying the
    # momentum), and a state dict without its "liblion" key (what that tool keeps) is refused.
    class Made:
        def __init__(self, config, descs, dist=None):
            self.loaded = None

        def save(self):
            return b"blob"

        def load(self, blob):
            self.loaded = blob

    params = [torch.nn.Parameter(torch.randn(3))]
    opt = lt.DistributedLion(params, lr=1e-3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(opt, "_nccl_group", lambda device: "group")
    monkeypatch.setattr(opt, "_descs", lambda params, device: [])
    monkeypatch.setattr(lt, "Handle", Made)
    handle = opt._handle(0, opt.param_groups[0])
    assert opt.state[params[0]] == {lt._MARK: True}
    saved = opt.state_dict()
    assert saved["state"] == {0: {lt._MARK: True}} and saved["liblion"] == {0: b"blob"}
    lost = {k: v for k, v in saved.items() if k != "liblion"}
    with pytest.raises(ValueError, match="lost liblion's momentum"):
        opt.load_state_dict(lost)
    assert handle.loaded is None
    opt.load_state_dict(saved)
    assert handle.loaded == b"blob"


def test_an_lr_liblion_refuses_raises_naming_its_group():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    opt = lt.Lion([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()
    opt.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lion_ffi.torch.Lion: group 1: .*lr"):
        opt.step()


def test_a_parameter_without_memory_of_its_own_is_refused_by_name():
    p = torch.nn.Parameter(torch.zeros(4, device="meta"))  # as a DTensor's data_ptr(): 0
    p.grad = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="parameter 0 of group 0 has no memory of its own"):
        lt.Lion([p], lr=0.1).step()


@pytest.mark.parametrize("case", ["twice in a group", "views across groups"])
def test_parameters_that_share_memory_are_refused_before_any_group_steps(case):
    """liblion refuses tensors that overlap within one call, which came after the groups before
    it had stepped (a retry stepped them twice), and could not see an overlap across groups."""
    a = torch.nn.Parameter(torch.zeros(4))
    base = torch.zeros(8)
    if case == "twice in a group":
        with pytest.warns(UserWarning):  # torch's own warning for a duplicate
            opt = lt.Lion([{"params": [a]}, {"params": [base.requires_grad_(), base]}], lr=0.1)
        match = "parameter 1 of group 1 shares memory with parameter 0 of group 1"
    else:
        first, second = torch.nn.Parameter(base[:5]), torch.nn.Parameter(base[3:])
        opt = lt.Lion([{"params": [a, first]}, {"params": [second]}], lr=0.1)
        match = "parameter 0 of group 1 shares memory with parameter 1 of group 0"
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    for _ in range(2):  # refused again: nothing was accepted
        with pytest.raises(ValueError, match=match):
            opt.step()
        assert torch.count_nonzero(a) == 0 and torch.count_nonzero(base) == 0


def test_module_to_with_swapped_tensors_still_steps():
    """torch.utils.swap_tensors (Module.to under swap_module_params_on_conversion) refuses a
    tensor that has a weak reference: the optimizer keeps none."""
    model = torch.nn.Linear(4, 3)
    opt = lt.Lion(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float32)
        model.load_state_dict(copy.deepcopy(model.state_dict()))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert opt.state_dict()["liblion"]


def test_a_refused_load_state_dict_changes_nothing():
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    opt = lt.Lion([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(5), torch.ones(5)
    opt.step()
    good = opt.state_dict_lion_pytorch()
    bad = {"state": {0: {"exp_avg": torch.full((5,), -7.0)}, 1: {"exp_avg": torch.full((3,), -7.0)}},
           "param_groups": [dict(g, lr=0.5) for g in good["param_groups"]]}
    with pytest.raises(ValueError, match=r"exp_avg is \(3,\)"):
        opt.load_state_dict(bad)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    after = opt.state_dict_lion_pytorch()
    for i in (0, 1):
        assert torch.equal(after["state"][i]["exp_avg"], good["state"][i]["exp_avg"])


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_bumps_the_parameters_versions_as_torch_in_place_updates_do(device):
    # A backward through weights saved before the step must raise, as with lion-pytorch or
    # AdamW, instead of using the stepped weights silently.
    for cls in (lion_pytorch.Lion, lt.Lion):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 4, device=device))
        opt = cls([w], lr=0.1)
        x = torch.randn(2, 4, device=device, requires_grad=True)
        loss = (x @ w).pow(2).sum()  # saves w for its backward
        w.grad = torch.ones_like(w)
        version = w._version
        opt.step()
        assert w._version > version, cls
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_param_groups_draw_their_own_stochastic_rounding_bits():
    # Tensors at the same place in two groups, with the same values and gradients: each
    # element moves with probability 1/4, independently of the other group's.
    n = 4096

    def agreement(groups):
        a = torch.nn.Parameter(torch.full((n,), 1.5, dtype=torch.bfloat16))
        b = torch.nn.Parameter(a.detach().clone())
        opt = lt.Lion([{"params": [a]}, {"params": [b]}] if groups else [a, b], lr=2**-9,
                      stochastic_rounding=True, seed=1)
        a.grad = torch.ones(n, dtype=torch.bfloat16)
        b.grad = a.grad.clone()
        opt.step()
        return ((a != 1.5) == (b != 1.5)).float().mean().item()

    # Independent draws agree on 1/16 + 9/16 = 62.5% of the elements.
    for groups in (False, True):
        assert 0.58 < agreement(groups) < 0.67, groups


def test_group_0_keeps_the_optimizers_seed():
    def stepped(another_group):
        p = torch.nn.Parameter(torch.full((999,), 1.5, dtype=torch.bfloat16))
        groups = [{"params": [p]}] + ([{"params": [torch.nn.Parameter(torch.zeros(3))]}] if another_group else [])
        opt = lt.Lion(groups, lr=2**-9, stochastic_rounding=True, seed=5)
        p.grad = torch.ones_like(p)
        opt.step()
        return p

    assert torch.equal(stepped(False), stepped(True))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_or_pickled_optimizer_carries_its_momentum(how):
    import io
    model, x, y = model_and_data("cpu")
    opt = lt.Lion(model.parameters(), lr=1e-2, weight_decay=0.1, state_dtype="bf16")
    train(model, opt, x, y, steps=5)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.state_dict()["liblion"] == opt.state_dict()["liblion"]
    train(model, opt, x, y, steps=5, start=5)
    train(model2, opt2, x, y, steps=5, start=5)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["liblion"] == opt.state_dict()["liblion"]


def test_torch_distributed_checkpoints_state_dict_neither_decays_nor_silently_drops_the_momentum():
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    model, x, y = model_and_data("cpu")
    opt = lt.Lion(model.parameters(), lr=1e-2)
    train(model, opt, x, y, steps=3)
    opt.zero_grad()  # no gradients: what makes torch's tool step an optimizer whose state is empty
    before = opt.state_dict()["liblion"]
    saved = dcp.get_optimizer_state_dict(model, opt)
    assert opt.state_dict()["liblion"] == before  # no zero-gradient step taken
    fresh = lt.Lion(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="lost liblion's momentum"):
        dcp.set_optimizer_state_dict(model, fresh, saved)
    # The optimizer's own state dict, and lion-pytorch's form, still load.
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state_dict()["liblion"] == before
    again = lt.Lion(model.parameters(), lr=1e-2)
    again.load_state_dict(opt.state_dict_lion_pytorch())
    lion_pytorch.Lion(model.parameters(), lr=1e-2).load_state_dict(opt.state_dict_lion_pytorch())


def test_a_sparse_gradient_is_refused_as_sparse():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = lt.Lion(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_a_state_dict_of_other_sizes_is_refused_at_load_and_changes_nothing():
    # The same number of elements, split otherwise: refused by load_state_dict, not at the
    # next step (when the momentum it replaced would be gone).
    a = [torch.nn.Parameter(torch.zeros(6)), torch.nn.Parameter(torch.zeros(4))]
    b = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(6))]
    opts = [lt.Lion(ps, lr=0.1) for ps in (a, b)]
    for ps, opt in zip((a, b), opts):
        for p in ps:
            p.grad = torch.randn(p.shape)
        opt.step()
    before = opts[1].state_dict()
    with pytest.raises(ValueError, match="another model"):
        opts[1].load_state_dict(opts[0].state_dict())
    assert opts[1].state_dict()["liblion"] == before["liblion"]
    # lion-pytorch's form: an exp_avg of the parameter's numel but another shape.
    m = torch.nn.Parameter(torch.zeros(2, 3))
    opt = lt.Lion([m], lr=0.1)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict({"state": {0: {"exp_avg": torch.zeros(3, 2)}},
                             "param_groups": [dict(opt.param_groups[0], params=[0])]})
    for p in b:
        p.grad = torch.randn(p.shape)
    opts[1].step()  # still steps


@pytest.mark.parametrize("how", ["load_state_dict", "unpickle"])
def test_a_damaged_blob_is_refused_at_load_even_where_the_next_step_splits_it(how):
    # A split reads a blob's momentum and writes it back under a new checksum: a damaged one
    # must be refused when it comes in, not laundered (unpickling carried blobs unchecked).
    def two():
        a, b = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(7))
        return (a, b), lt.Lion([a, b], lr=0.1)

    (a, b), opt = two()
    a.grad, b.grad = torch.ones(5), torch.ones(7)
    opt.step()
    sd = opt.state_dict() if how == "load_state_dict" else opt.__getstate__()
    blob = bytearray(sd["liblion"][0])
    blob[88 + 48 + 3] ^= 0x40  # an exponent bit of tensor 0's first momentum element
    sd["liblion"] = {0: bytes(blob)}
    (a, b), fresh = two()
    before = fresh.state_dict()
    from lion_ffi._lib import LionError
    with pytest.raises(LionError, match="checksum"):
        if how == "load_state_dict":
            fresh.load_state_dict(sd)
        else:
            lt.Lion.__new__(lt.Lion).__setstate__(sd)
    assert fresh.state_dict()["liblion"] == before["liblion"]


def test_a_saved_lr_this_optimizers_config_refuses_is_refused_at_load_and_changes_nothing():
    # Decoupled decay divides by the initial lr: a blob saved at lr 1e-3 makes a decay factor
    # of 10 with an initial lr of 1e-5. Checked at load against this optimizer's config, not a
    # plain one (then every later step refused it, its own momentum gone).
    a = torch.nn.Parameter(torch.zeros(10))
    saving = lt.Lion([a], lr=1e-3, weight_decay=0.1)
    a.grad = torch.ones(10)
    saving.step()
    b = torch.nn.Parameter(torch.zeros(10))
    opt = lt.Lion([b], lr=1e-5, weight_decay=0.1, decoupled_weight_decay=True)
    b.grad = torch.ones(10)
    opt.step()
    before = opt.state_dict()
    from lion_ffi._lib import LionError
    with pytest.raises(LionError, match="decay factor"):
        opt.load_state_dict(saving.state_dict())
    assert opt.state_dict()["liblion"] == before["liblion"]
    opt.step()  # still steps


def test_state_dict_after_a_parameter_is_replaced():
    # The module's docstring's recovery: a replaced parameter is refused at the next step, and
    # the state dict (taken after the change) loads into a new optimizer.
    m = torch.nn.Linear(8, 2)
    opt = lt.Lion(m.parameters(), lr=1e-3)
    m(torch.randn(3, 8)).sum().backward()
    opt.step()
    m.weight = torch.nn.Parameter(m.weight.detach().clone())
    opt.param_groups[0]["params"][0] = m.weight
    saved = opt.state_dict()
    fresh = lt.Lion(m.parameters(), lr=1e-3)
    fresh.load_state_dict(saved)
    assert fresh.state_dict()["liblion"] == saved["liblion"]
