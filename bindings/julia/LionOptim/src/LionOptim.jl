"""
    LionOptim

liblion (the Lion optimizer with a C ABI) from Julia: `ccall`s for the ABI, and an
Optimisers.jl rule, so that `Optimisers.setup(LionOptim.Lion(1e-4), model)` works on Arrays of
Float32 (each array gets its own liblion optimizer, stepped on the CPU).

The library, in this order:
1. `ENV["LION_LIBRARY"]`, the path of liblion.so, when it is set before `using LionOptim`:
   exactly that file (an error if it cannot be opened, never a fall-through to another);
2. else Liblion_jll's, once it is loaded (`using LionOptim, Liblion_jll`: the package extension
   `LionOptimLiblionJllExt` hands its library over);
3. else `LionOptim.use_library!(path)`. Until one of these, every call raises an error that
   says so.

NOTE: this package has not been run: no Julia runtime could be installed where it was
written. It follows include/lion.h field for field and call for call (checked by
bindings/python/tests/test_layout.py and test_julia_ccalls.py); treat it as a reviewed draft.
"""
module LionOptim

import Optimisers
using Libdl

# MIRROR(abi-constants): include/lion.h LionStatus, LION_DTYPE_*, LION_DEVICE_*; checked by bindings/python/tests/test_layout.py
const LION_OK = Int32(0)
const ABI_VERSION = UInt32(1)  # the ABI this package was written for (lion_abi_version())
const LION_DTYPE_F32 = UInt32(0)
const LION_DTYPE_Q8 = UInt32(3)  # 8-bit momentum: a state_dtype only (docs/ABI.md)
const LION_DEVICE_CPU = UInt32(0)

# LionConfig, field for field; `Bool` is a C `bool` (one byte). Immutable, so that ccall can
# return it by value.
# MIRROR(abi-structs): include/lion.h LionConfig; checked by bindings/python/tests/test_layout.py
struct LionConfig
    struct_size::UInt32
    lr::Float32
    beta1::Float32
    beta2::Float32
    weight_decay::Float32
    decay_mode::UInt32
    cautious_factor::Float32
    cautious_weight_decay::Bool
    device::UInt32
    device_index::Int32
    state_dtype::UInt32
    stochastic_rounding::Bool
    seed::UInt64
    num_threads::UInt32
end

# MIRROR(abi-structs): include/lion.h LionTensorDesc; checked by bindings/python/tests/test_layout.py
struct LionTensorDesc
    numel::UInt64
    param_dtype::UInt32
    grad_dtype::UInt32
    lr_scale::Float32
    weight_decay_scale::Float32
end

# Every liblion function this package calls, looked up once when the library is opened.
# (bindings/python/tests/test_julia_ccalls.py checks each ccall against include/lion.h, and
# that it names one of these.)
const SYMBOLS = (:lion_abi_version, :lion_config_default, :lion_create, :lion_step, :lion_destroy,
                 :lion_set_lr, :lion_get_lr, :lion_step_count, :lion_state_save_file,
                 :lion_state_load_file, :lion_last_error, :lion_version)

# The opened library: its path, and its functions' addresses (replaced whole, never mutated).
const LIBRARY = Ref{String}("")
const FUNCTIONS = Ref{Dict{Symbol,Ptr{Cvoid}}}(Dict{Symbol,Ptr{Cvoid}}())
const LOAD_LOCK = ReentrantLock()

"""
    use_library!(path)

Opens liblion at `path` for every later call: checks that it is liblion of ABI version 1 and
looks up its functions. Called by `__init__` with `ENV["LION_LIBRARY"]` and by the
Liblion_jll extension. A second call with another path is an error: optimizers made by one
library must be stepped and freed by it.
"""
function use_library!(path::AbstractString)
    lock(LOAD_LOCK) do
        if !isempty(LIBRARY[])
            LIBRARY[] == path && return nothing
            error("LionOptim: already using liblion at $(LIBRARY[]), not switching to $path")
        end
        handle = Libdl.dlopen(path)  # throws, with the path and the loader's reason
        abi = ccall(Libdl.dlsym(handle, :lion_abi_version), UInt32, ())
        abi == ABI_VERSION || error("LionOptim: $path implements ABI $abi, this package ABI $ABI_VERSION")
        FUNCTIONS[] = Dict{Symbol,Ptr{Cvoid}}(name => Libdl.dlsym(handle, name) for name in SYMBOLS)
        LIBRARY[] = path
    end
    return nothing
end

"""The path of the liblion in use ("" before one is opened)."""
library_path() = LIBRARY[]

function __init__()
    # LION_LIBRARY wins over Liblion_jll: the extension only opens its library when this did not.
    path = get(ENV, "LION_LIBRARY", "")
    isempty(path) || use_library!(path)
end

function fn(name::Symbol)
    table = FUNCTIONS[]
    isempty(table) && error("LionOptim: no liblion opened: set ENV[\"LION_LIBRARY\"] to the path of " *
                            "liblion.so before `using LionOptim`, or `using Liblion_jll`, or call " *
                            "LionOptim.use_library!(path)")
    return table[name]
end

abi_version() = ccall(fn(:lion_abi_version), UInt32, ())
last_error() = unsafe_string(ccall(fn(:lion_last_error), Cstring, ()))
version() = unsafe_string(ccall(fn(:lion_version), Cstring, ()))

check(status, what) = status == LION_OK || error("$what failed ($status): $(last_error())")

"""A liblion optimizer handle, destroyed by a finalizer; `numels` are its tensors' sizes,
which liblion reads and writes at every step whatever the arrays passed."""
mutable struct Handle
    ptr::Ptr{Cvoid}
    numels::Vector{UInt64}
    function Handle(config::LionConfig, tensors::Vector{LionTensorDesc})
        out = Ref{Ptr{Cvoid}}(C_NULL)
        check(ccall(fn(:lion_create), Int32, (Ref{LionConfig}, Ptr{LionTensorDesc}, Csize_t, Ref{Ptr{Cvoid}}),
                    config, tensors, length(tensors), out), "lion_create")
        h = new(out[], UInt64[t.numel for t in tensors])
        finalizer(h -> ccall(fn(:lion_destroy), Cvoid, (Ptr{Cvoid},), h.ptr), h)
        return h
    end
end

default_config() = ccall(fn(:lion_config_default), LionConfig, ())

function set_lr!(h::Handle, lr)
    check(ccall(fn(:lion_set_lr), Int32, (Ptr{Cvoid}, Float32), h.ptr, Float32(lr)), "lion_set_lr")
end

function get_lr(h::Handle)
    out = Ref{Float32}(0)
    check(ccall(fn(:lion_get_lr), Int32, (Ptr{Cvoid}, Ref{Float32}), h.ptr, out), "lion_get_lr")
    return out[]
end

function step_count(h::Handle)
    out = Ref{UInt64}(0)
    check(ccall(fn(:lion_step_count), Int32, (Ptr{Cvoid}, Ref{UInt64}), h.ptr, out), "lion_step_count")
    return out[]
end

"""Writes `h`'s checkpoint to the file `path` (atomically: a crash leaves the previous file)."""
function save_file(h::Handle, path::AbstractString)
    check(ccall(fn(:lion_state_save_file), Int32, (Ptr{Cvoid}, Cstring), h.ptr, path), "lion_state_save_file")
end

"""Restores `h`'s momentum, step count and lr from a file of `save_file`."""
function load_file(h::Handle, path::AbstractString)
    check(ccall(fn(:lion_state_load_file), Int32, (Ptr{Cvoid}, Cstring), h.ptr, path), "lion_state_load_file")
end

"""Steps `x` in place from `dx` (both dense Float32 arrays of the length `h` was made for)."""
function step!(h::Handle, x::Array{Float32}, dx::Array{Float32})
    length(h.numels) == 1 || throw(ArgumentError("step! steps a handle of one tensor; this one has $(length(h.numels))"))
    # liblion reads and writes numel elements at each address: a shorter array would be
    # written past its end.
    length(x) == h.numels[1] || throw(DimensionMismatch("the parameter has $(length(x)) elements; the handle was made for $(h.numels[1])"))
    length(dx) == length(x) || throw(DimensionMismatch("gradient and parameter differ in length"))
    params = Ptr{Cvoid}[pointer(x)]
    grads = Ptr{Cvoid}[pointer(dx)]
    GC.@preserve x dx params grads begin
        check(ccall(fn(:lion_step), Int32, (Ptr{Cvoid}, Ptr{Ptr{Cvoid}}, Ptr{Ptr{Cvoid}}, Csize_t, Ptr{Cvoid}),
                    h.ptr, params, grads, 1, C_NULL), "lion_step")
    end
    return x
end

"""
    Lion(eta = 1e-4, beta = (0.9, 0.99), lambda = 0.0; cautious_factor = 1.0)

An Optimisers.jl rule whose update is liblion's, for `Array{Float32}` parameters.
"""
struct Lion <: Optimisers.AbstractRule
    eta::Float64
    beta::Tuple{Float64,Float64}
    lambda::Float64
    cautious_factor::Float64
end
Lion(eta = 1e-4, beta = (0.9, 0.99), lambda = 0.0; cautious_factor = 1.0) = Lion(eta, beta, lambda, cautious_factor)

function Optimisers.init(o::Lion, x::Array{Float32})
    d = default_config()
    c = LionConfig(d.struct_size, Float32(o.eta), Float32(o.beta[1]), Float32(o.beta[2]), Float32(o.lambda),
                   d.decay_mode, Float32(o.cautious_factor), d.cautious_weight_decay, d.device, d.device_index,
                   d.state_dtype, d.stochastic_rounding, d.seed, UInt32(1))  # one thread per small array
    return Handle(c, [LionTensorDesc(length(x), LION_DTYPE_F32, LION_DTYPE_F32, 1f0, 1f0)])
end

# liblion updates `x` in place; Optimisers applies `x .- dx`, so the update returned is zero.
function Optimisers.apply!(o::Lion, state::Handle, x::Array{Float32}, dx)
    set_lr!(state, o.eta)
    step!(state, x, convert(Array{Float32}, dx))
    return state, zero(x)
end

end # module
