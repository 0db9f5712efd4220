# Not run where it was written (no Julia runtime there): see the package's docstring.
# The library: LION_LIBRARY=/path/to/liblion.so julia --project -e 'using Pkg; Pkg.test()'
# (or add Liblion_jll to the environment and load it before these tests).
using Test, Optimisers, LionOptim

@testset "LionOptim" begin
    @test !isempty(LionOptim.library_path())
    @test LionOptim.abi_version() == 1
    @test occursin(".", LionOptim.version())
    x = Float32[1, -1, 0.5]
    state = Optimisers.setup(LionOptim.Lion(0.5), x)
    state, x = Optimisers.update(state, x, Float32[1, -1, 0])
    @test x ≈ Float32[0.5, -0.5, 0.5]
    model = (w = randn(Float32, 4, 3), b = zeros(Float32, 4))
    state = Optimisers.setup(LionOptim.Lion(1e-3, (0.9, 0.99), 0.1), model)
    grads = (w = randn(Float32, 4, 3), b = randn(Float32, 4))
    state, model2 = Optimisers.update(state, model, grads)
    # Each element moves by lr (sign step) plus its decay lr*wd*|w|, no more.
    @test all(abs.(model2.w .- model.w) .<= 1f-3 .+ 1f-4 .* abs.(model.w) .+ 1f-6)

    # A checkpoint file: the step count and lr come back into a fresh optimizer.
    h = Optimisers.init(LionOptim.Lion(0.25), zeros(Float32, 8))
    LionOptim.step!(h, zeros(Float32, 8), ones(Float32, 8))
    @test LionOptim.step_count(h) == 1
    path = joinpath(mktempdir(), "lion.ckpt")
    LionOptim.save_file(h, path)
    h2 = Optimisers.init(LionOptim.Lion(0.5), zeros(Float32, 8))
    LionOptim.load_file(h2, path)
    @test LionOptim.step_count(h2) == 1
    @test LionOptim.get_lr(h2) == 0.25f0
    # An array of another length than the handle's tensor is refused before liblion is called
    # (liblion would read and write 8 elements at its address).
    @test_throws DimensionMismatch LionOptim.step!(h, zeros(Float32, 4), ones(Float32, 4))
    @test LionOptim.step_count(h) == 1
    # A failed call raises with liblion's message.
    @test_throws ErrorException LionOptim.load_file(h2, joinpath(mktempdir(), "missing"))
end
