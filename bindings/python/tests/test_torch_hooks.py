"""lion_ffi's optimizer-step wrapper (`_torch_hooks.step_with_hooks`) against its twin, torch's
own (`Optimizer.profile_hook_step`): the same hooks in the same order with the same
arguments, pre-hooks that replace the arguments, a subclass's own step, and the profiler's
range; and the step under torch.compile (`eager_under_compile`): run eagerly, the same bits as
without compile. Skipped where torch is missing."""
import pytest

torch = pytest.importorskip("torch")
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook  # noqa: E402

import lion_ffi.torch as lt  # noqa: E402
from lion_ffi._torch_hooks import AVAILABLE, step_with_hooks  # noqa: E402


def recording_optimizers(log):
    """Two optimizers whose step logs its arguments: one wrapped by torch, one by lion_ffi."""
    def step(self, closure=None, scale=1):
        log.append(("step", type(self).__name__, closure, scale))
        return scale

    def _optimizer_step_code(self):
        log.append(("step_code", type(self).__name__))

    body = {"step": step, "_optimizer_step_code": _optimizer_step_code}
    by_torch = type("ByTorch", (torch.optim.Optimizer,), dict(body))
    ours = type("Ours", (torch.optim.Optimizer,), dict(body, step=step_with_hooks(step)))
    p = torch.nn.Parameter(torch.zeros(1))
    return by_torch([p], {"lr": 1.0}), ours([p], {"lr": 1.0})


def register_hooks(opt, log):
    def pre(o, args, kwargs):
        log.append(("pre", type(o).__name__, len(args), dict(kwargs)))
        return (args, dict(kwargs, scale=3))  # replaces the arguments

    def post(o, args, kwargs):
        log.append(("post", type(o).__name__, len(args), dict(kwargs)))

    def global_pre(o, args, kwargs):
        log.append(("global_pre", type(o).__name__, len(args), dict(kwargs)))

    def global_post(o, args, kwargs):
        log.append(("global_post", type(o).__name__, len(args), dict(kwargs)))

    return [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post),
            register_optimizer_step_pre_hook(global_pre), register_optimizer_step_post_hook(global_post)]


def test_hooks_run_as_torchs_own_wrapper_runs_them():
    logs = {}
    for which in (0, 1):
        log = logs[which] = []
        opt = recording_optimizers(log)[which]
        handles = register_hooks(opt, log)
        try:
            assert opt.step(None, scale=2) == 3  # the pre-hook's arguments reached the step
        finally:
            for h in handles:
                h.remove()
    name = lambda entry: entry[:1] + entry[2:]  # noqa: E731 (the class names differ)
    assert [name(e) for e in logs[1]] == [name(e) for e in logs[0]]
    assert [e[0] for e in logs[1]] == ["global_pre", "pre", "step", "step_code", "post", "global_post"]


def test_a_pre_hook_returning_something_else_is_refused_as_by_torch():
    for opt in recording_optimizers([]):
        handle = opt.register_step_pre_hook(lambda o, args, kwargs: "neither None nor a pair")
        try:
            with pytest.raises(RuntimeError, match="must return None or a tuple"):
                opt.step()
        finally:
            handle.remove()


def test_lion_is_not_wrapped_again_by_torch_and_runs_its_hooks_once():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    opt = lt.Lion([p], lr=0.1)
    if AVAILABLE:
        assert getattr(type(opt).step, "__wrapped__", None) is not None and type(opt).step.hooked
        assert type(opt).step.__wrapped__.__name__ == "step"  # not torch's wrapper around ours
    calls = []
    handle = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o))
    opt.step()
    handle.remove()
    assert calls == [opt]
    assert torch.equal(p.detach(), torch.full((3,), -0.1))


def hooks_around_one_step(optimizer_class):
    """The hooks that one step of `optimizer_class` over a parameter of zeros (gradient ones,
    lr 0.1) ran, after checking that the step itself happened."""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    opt = optimizer_class([p], lr=0.1)
    calls = []
    handles = [opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre")),
               opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))]
    opt.step()
    for h in handles:
        h.remove()
    assert torch.equal(p.detach(), torch.full((3,), -0.1))
    return calls


def test_a_subclass_with_its_own_step_runs_the_hooks_once():
    class Mine(lt.Lion):
        def step(self, closure=None):
            return super().step(closure)

    assert hooks_around_one_step(Mine) == ["pre", "post"]


def test_the_profiler_sees_the_step_by_torchs_name():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    opt = lt.Lion([p], lr=0.1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.key for e in prof.key_averages()]
    assert "Optimizer.step#Lion.step" in names


def test_an_lr_scheduler_sees_the_steps():
    import warnings
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    opt = lt.Lion([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" if unseen
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), -0.15))


@pytest.mark.parametrize("decorate", ["no_grad", "functools.wraps"])
def test_a_subclass_that_re_decorates_the_inherited_step_runs_the_hooks_once(decorate):
    import functools
    if decorate == "no_grad":
        class Mine(lt.Lion):
            step = torch.no_grad()(lt.Lion.step)
    else:
        class Mine(lt.Lion):
            @functools.wraps(lt.Lion.step)
            def step(self, closure=None):
                return super().step(closure)

    assert hooks_around_one_step(Mine) == ["pre", "post"]


def _train_linear(compile_with, steps=3, in_backward=False):
    """A small model trained `steps` steps through a training step compiled by dynamo with
    `compile_with` (None: not compiled); the weights, and the post-hook calls."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = lt.Lion(model.parameters(), lr=0.1, weight_decay=0.01)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    if in_backward:
        opt.register_step_in_backward()

    def train(x):
        loss = (model(x) ** 2).sum()
        loss.backward()
        if not in_backward:
            opt.step()
            opt.zero_grad()
        return loss

    if compile_with is not None:
        train = torch.compile(train, backend=compile_with)
    for i in range(steps):
        train(torch.arange(12.0).reshape(3, 4) - i)
    return model.weight.detach().clone(), calls


@pytest.mark.parametrize("in_backward", [False, True])
def test_a_compiled_training_step_runs_the_optimizer_eagerly(in_backward):
    eager, eager_calls = _train_linear(None, in_backward=in_backward)
    compiled, calls = _train_linear("eager", in_backward=in_backward)
    assert calls == eager_calls == ([] if in_backward else ["post"] * 3)
    assert torch.equal(compiled, eager)
    assert not torch.equal(eager, _train_linear(None, steps=0, in_backward=in_backward)[0])


def test_a_fullgraph_region_cannot_hold_the_step():
    model = torch.nn.Linear(4, 2)
    opt = lt.Lion(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()

    def step_only():
        opt.step()

    with pytest.raises(Exception, match="disable"):  # dynamo's words, and on torch 2.11 lion_ffi's reason
        torch.compile(step_only, backend="eager", fullgraph=True)()
