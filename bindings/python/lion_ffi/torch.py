"""`lion_ffi.torch.Lion`: a torch.optim.Optimizer backed by liblion, a drop-in for
`lion_pytorch.Lion` (same arguments, plus lion-pytorch's cautious variant's `cautious_factor`
and `cautious_wd`). CPU and CUDA tensors (the step is enqueued on the current stream), param
groups, state_dict / load_state_dict, and GradScaler (found_inf skips the step on the device).

Each param group gets one liblion optimizer, created at its first step: every parameter of a
group must then have a gradient at every step (a group where none has one is skipped), and all
of a group's parameters must live on one device. Momentum is f32, or bf16 when every
parameter of the group is bf16 (lion-pytorch keeps it in the parameter's dtype).
"""
import torch

from ._lib import DEVICE_CPU, DEVICE_CUDA, DTYPE_BF16, DTYPE_F16, DTYPE_F32, Handle, lib, make_config

_CODES = {torch.float32: DTYPE_F32, torch.float16: DTYPE_F16, torch.bfloat16: DTYPE_BF16}


def _layout(p):
    return p.device, p.numel(), p.dtype, p.grad.dtype, p.is_contiguous() and p.grad.is_contiguous()


class Lion(torch.optim.Optimizer):
    # GradScaler hands over `grad_scale` and `found_inf` instead of unscaling the gradients.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, use_triton=False,
                 decoupled_weight_decay=False, cautious_factor=1.0, cautious_wd=False, *,
                 stochastic_rounding=False, seed=0, num_threads=0):
        if not lr > 0.0:
            raise ValueError(f"lr must be > 0, got {lr}")
        extra = dict(stochastic_rounding=stochastic_rounding, seed=seed, num_threads=num_threads)
        # Refuse here, not at the first step, what cannot go into the C struct (betas not a pair,
        # integers out of range); groups with their own betas are checked at their first step.
        make_config(lr, betas, weight_decay, decoupled_weight_decay, cautious_factor=cautious_factor,
                    cautious_weight_decay=cautious_wd, **extra)
        if not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1], got {betas}")
        del use_triton  # liblion has its own kernels
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, cautious_factor=cautious_factor,
                        cautious_wd=cautious_wd)
        super().__init__(params, defaults)
        self._init_lr = lr
        self._decoupled = decoupled_weight_decay
        self._extra = extra
        self._handles = {}
        self._pending = {}

    def _handle(self, index, group):
        if index in self._handles:
            return self._handles[index]
        params = group["params"]
        device = params[0].device
        if any(p.device != device for p in params):
            raise ValueError("lion_ffi.torch.Lion: all parameters of a group must be on one device")
        descs = []
        for p in params:
            if p.dtype not in _CODES or p.grad.dtype not in _CODES:
                raise TypeError(f"lion_ffi.torch.Lion: dtype {p.dtype} / grad {p.grad.dtype} is not supported")
            if not p.is_contiguous() or not p.grad.is_contiguous():
                raise ValueError("lion_ffi.torch.Lion: parameters and gradients must be contiguous")
            d = lib.lion_tensor_desc(p.numel(), _CODES[p.dtype])
            d.grad_dtype = _CODES[p.grad.dtype]
            descs.append(d)
        state = DTYPE_BF16 if all(p.dtype == torch.bfloat16 for p in params) else DTYPE_F32
        cuda = device.type == "cuda"
        config = make_config(self._init_lr, group["betas"], group["weight_decay"], self._decoupled,
                             cautious_factor=group["cautious_factor"], cautious_weight_decay=group["cautious_wd"],
                             device=DEVICE_CUDA if cuda else DEVICE_CPU,
                             device_index=(device.index or 0) if cuda else 0, state_dtype=state, **self._extra)
        handle = Handle(config, descs)
        if index in self._pending:
            handle.load(self._pending.pop(index))
        self._handles[index] = (handle, device, [_layout(p) for p in params])
        return self._handles[index]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for index, group in enumerate(self.param_groups):
            with_grad = [p.grad is not None for p in group["params"]]
            if not any(with_grad):
                continue
            if not all(with_grad):
                raise ValueError("lion_ffi.torch.Lion: every parameter of a group needs a gradient at each step "
                                 "(or none); put parameters that may lack one in their own group")
            handle, device, layouts = self._handle(index, group)
            if len(group["params"]) != len(layouts):
                raise ValueError(f"lion_ffi.torch.Lion: group {index} now has {len(group['params'])} parameters, "
                                 f"its optimizer was created for {len(layouts)}")
            for i, p in enumerate(group["params"]):
                # liblion writes layouts[i]'s numel through the pointer: a parameter swapped for
                # another size, dtype or device (or made non-contiguous) since then is refused.
                if _layout(p) != layouts[i]:
                    raise ValueError(f"lion_ffi.torch.Lion: parameter {i} of group {index} is now {_layout(p)}, "
                                     f"its optimizer was created for {layouts[i]} (device, numel, dtype, "
                                     "grad dtype, contiguous)")
            if handle.lr != group["lr"]:
                handle.lr = group["lr"]
            options, keep = None, []
            if grad_scale is not None or found_inf is not None:
                options = lib.lion_step_options_default()
                if grad_scale is not None:
                    options.grad_scale = 1.0 / float(grad_scale)  # the scaler multiplied the loss by it
                if found_inf is not None:
                    flag = found_inf.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()
                    keep.append(flag)
                    options.found_inf = flag.data_ptr()
            stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
            handle.step([p.data_ptr() for p in group["params"]], [p.grad.data_ptr() for p in group["params"]],
                        stream=stream, options=options)
        return loss

    def state_dict(self):
        state = super().state_dict()
        blobs = {i: h.save() for i, (h, _, _) in self._handles.items()}
        blobs.update({i: b for i, b in self._pending.items() if i not in blobs})
        state["liblion"] = blobs
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        blobs = state_dict.pop("liblion", {})
        super().load_state_dict(state_dict)
        for index, blob in blobs.items():
            if index in self._handles:
                self._handles[index][0].load(blob)
            else:
                self._pending[index] = blob
