"""lion_ffi.torch.Lion against lion-pytorch 0.2.5 over 100 steps of a small real training loop
(CPU, and CUDA where there is a GPU), its cautious variant, state_dict, and GradScaler. Skipped
where torch or lion-pytorch is missing (they run on the GPU machine)."""
import copy

import pytest

torch = pytest.importorskip("torch")
lion_pytorch = pytest.importorskip("lion_pytorch")
from lion_pytorch.cautious_lion import Lion as CautiousLion  # noqa: E402

import lion_ffi.torch as lt  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def model_and_data(device, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(device)
    x = torch.randn(256, 16, device=device)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return model, x, y


def train(model, opt, x, y, steps=100):
    losses = []
    for i in range(steps):
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


@pytest.mark.parametrize("device", DEVICES)
def test_parameter_changed_since_the_first_step_is_refused(device):
    model, x, y = model_and_data(device)
    opt = lt.Lion(model.parameters(), lr=1e-3)
    train(model, opt, x, y, steps=1)
    w = model[0].weight  # 64 x 16
    before = w.detach().clone()
    w.grad = torch.ones(16, 64, device=device).t()  # the right shape, not contiguous
    with pytest.raises(ValueError, match="parameter 0 of group 0 is now"):
        opt.step()
    assert torch.equal(w, before)
    w.data = torch.zeros(128, 16, device=device)  # a larger tensor: liblion would write 1024 of it
    w.grad = torch.ones(128, 16, device=device)
    with pytest.raises(ValueError, match="its optimizer was created for"):
        opt.step()
    assert torch.all(w == 0)
