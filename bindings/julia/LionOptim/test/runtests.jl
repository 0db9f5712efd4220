# Not run where it was written (no Julia runtime there): see the package's docstring.
using Test, Optimisers, LionOptim

@testset "LionOptim" begin
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
end
