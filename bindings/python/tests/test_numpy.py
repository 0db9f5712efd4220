"""lion_ffi's numpy front end: the update against a float64 reference, options, checkpoints,
and refusals that write nothing."""
import numpy as np
import pytest

import lion_ffi


def reference_step(p, g, m, lr, b1, b2, wd):
    c = b1 * m + (1 - b1) * g
    p = p * (1 - lr * wd) - lr * np.sign(c)
    return p, b2 * m + (1 - b2) * g


def test_matches_float64_reference_over_steps():
    rng = np.random.default_rng(0)
    shapes = [(33, 7), (5,), (1000,)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ref = [p.astype(np.float64) for p in params]
    moms = [np.zeros(s) for s in shapes]
    opt = lion_ffi.Lion(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(5):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.step(grads)
        for i, g in enumerate(grads):
            ref[i], moms[i] = reference_step(ref[i], g.astype(np.float64), moms[i], 1e-2, 0.9, 0.99, 0.1)
            np.testing.assert_allclose(params[i], ref[i], rtol=1e-5, atol=1e-6)
    assert opt.step_count == 5


def test_lr_checkpoint_and_options():
    rng = np.random.default_rng(1)
    p = rng.standard_normal(100).astype(np.float32)
    opt = lion_ffi.Lion([p], lr=1e-3, weight_decay=0.5, decoupled_weight_decay=True, cautious_factor=0.0,
                        cautious_weight_decay=True, state_dtype="bfloat16", stochastic_rounding=True, seed=3)
    assert opt.lr == pytest.approx(1e-3)
    opt.lr = 5e-4
    assert opt.lr == pytest.approx(5e-4)
    opt.step([rng.standard_normal(100).astype(np.float32)])
    blob = opt.save()
    assert isinstance(blob, bytes) and blob[:8] == b"LIONCKPT"
    q = p.copy()
    other = lion_ffi.Lion([q], lr=1e-3, weight_decay=0.5, decoupled_weight_decay=True, cautious_factor=0.0,
                          cautious_weight_decay=True, state_dtype="bfloat16", stochastic_rounding=True, seed=3)
    other.load(blob)
    assert other.step_count == 1 and other.lr == pytest.approx(5e-4)
    g = rng.standard_normal(100).astype(np.float32)
    opt.step([g])
    other.step([g])
    np.testing.assert_array_equal(p, q)
    bad = bytearray(blob)
    bad[50] ^= 1
    with pytest.raises(lion_ffi.LionError) as e:
        other.load(bytes(bad))
    assert "CORRUPT_STATE" in str(e.value)
    for wrong in (len(blob), "LIONCKPT"):  # bytes(n) would be n zero bytes, "truncated"
        with pytest.raises(TypeError, match="a checkpoint is bytes"):
            other.load(wrong)


def test_float16_parameters():
    p = np.linspace(-1, 1, 64, dtype=np.float16)
    before = p.astype(np.float32)
    opt = lion_ffi.Lion([p], lr=0.0625)
    opt.step([np.ones(64, dtype=np.float16)])
    np.testing.assert_allclose(p.astype(np.float32), before - 0.0625, atol=1e-3)


def test_bfloat16_parameters_where_ml_dtypes_is_installed():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    p = np.ones(10, dtype=ml_dtypes.bfloat16)
    opt = lion_ffi.Lion([p], lr=0.5)
    opt.step([np.ones(10, dtype=ml_dtypes.bfloat16)])
    assert np.all(p.astype(np.float32) == 0.5)


def test_refusals_write_nothing():
    p = np.ones(10, dtype=np.float32)
    opt = lion_ffi.Lion([p], lr=0.1)
    with pytest.raises(ValueError, match="10 elements|has 9"):
        opt.step([np.ones(9, dtype=np.float32)])
    with pytest.raises(ValueError, match="C-contiguous"):
        opt.step([np.ones(20, dtype=np.float32)[::2]])
    with pytest.raises(TypeError, match="float64"):
        opt.step([np.ones(10, dtype=np.float64)])
    with pytest.raises(TypeError, match="created for gradients"):
        opt.step([np.ones(10, dtype=np.float16)])
    with pytest.raises(ValueError, match="expected 1"):
        opt.step([])
    g = np.ones(10, dtype=np.float32)
    g[3] = np.nan
    with pytest.raises(lion_ffi.LionError, match="grads\\[0\\]\\[3\\]"):
        opt.step([g], check_finite=True)
    assert np.all(p == 1) and opt.step_count == 0
    with pytest.raises(ValueError, match="lr"):
        opt.lr = float("nan")
    with pytest.raises(ValueError, match="beta1"):
        lion_ffi.Lion([p], betas=(1.5, 0.9))
    with pytest.raises(TypeError):
        lion_ffi.Lion([np.ones(3, dtype=np.int32)])
    with pytest.raises(ValueError, match="read-only"):
        ro = np.ones(3, dtype=np.float32)
        ro.flags.writeable = False
        lion_ffi.Lion([ro])
    assert lion_ffi.version().count(".") == 2


def test_parameter_made_read_only_after_construction_is_refused_at_step():
    p = np.ones(10, dtype=np.float32)
    opt = lion_ffi.Lion([np.ones(3, dtype=np.float32), p], lr=0.1)
    p.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[1\] is read-only"):
        opt.step([np.ones(3, dtype=np.float32), np.ones(10, dtype=np.float32)])
    assert np.all(p == 1) and opt.step_count == 0
    p.flags.writeable = True
    opt.step([np.ones(3, dtype=np.float32), np.ones(10, dtype=np.float32)])
    assert np.all(p < 1) and opt.step_count == 1
    p.resize(20, refcheck=False)  # a new, larger buffer: liblion would write only its first 10
    with pytest.raises(ValueError, match=r"params\[1\] is now 20 x float32, the optimizer was created for 10"):
        opt.step([np.ones(3, dtype=np.float32), np.ones(20, dtype=np.float32)])


def test_betas_must_be_a_pair():
    p = np.ones(4, dtype=np.float32)
    for betas in [(0.9, 0.99, 0.5), (0.9,), 0.9]:
        with pytest.raises(ValueError, match=r"betas must be a pair \(beta1, beta2\)"):
            lion_ffi.Lion([p], betas=betas)


def test_per_tensor_lists_need_one_entry_per_parameter():
    params = [np.ones(4, dtype=np.float32), np.ones(2, dtype=np.float32)]
    for name in ["lr_scales", "weight_decay_scales"]:
        for values in [[1.0], [1.0, 1.0, 1.0]]:
            with pytest.raises(ValueError, match=rf"{name} has {len(values)} entries, expected 2"):
                lion_ffi.Lion(params, **{name: values})
        lion_ffi.Lion(params, **{name: np.array([1.0, 0.5])})  # any sequence of the right length


def test_integer_options_are_range_checked_not_wrapped():
    p = np.ones(4, dtype=np.float32)
    for name, bad in [("num_threads", 2**32), ("num_threads", -1), ("seed", 2**64), ("seed", -1),
                      ("decay_mode", 2**32), ("decay_mode", -1)]:
        with pytest.raises(ValueError, match=rf"{name} must be in \[0, \d+\], got {bad}"):
            lion_ffi.Lion([p], **{name: bad})
    with pytest.raises(TypeError, match="num_threads must be an integer"):
        lion_ffi.Lion([p], num_threads=2.5)
    from lion_ffi._lib import make_config
    for bad in [2**31, -2**31 - 1]:
        with pytest.raises(ValueError, match=rf"device_index must be in \[-2147483648, 2147483647\], got {bad}"):
            make_config(1e-4, (0.9, 0.99), 0.0, device_index=bad)
    for name in ["device", "state_dtype"]:
        with pytest.raises(ValueError, match=rf"{name} must be in \[0, 4294967295\], got -1"):
            make_config(1e-4, (0.9, 0.99), 0.0, **{name: -1})
    # The extremes that fit go through unchanged.
    c = make_config(1e-4, (0.9, 0.99), 0.0, seed=2**64 - 1, num_threads=2**32 - 1, device_index=-2**31)
    assert (c.seed, c.num_threads, c.device_index) == (2**64 - 1, 2**32 - 1, -2**31)
    assert lion_ffi.Lion([p], seed=np.uint64(2**64 - 1), num_threads=np.int64(1)).step_count == 0


def test_q8_momentum_trains_saves_and_converts():
    rng = np.random.default_rng(7)
    shapes = [(64, 100), (5,)]  # 6400 elements: 8-bit momentum; 5: small, f32 momentum
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ref = [p.astype(np.float64) for p in params]
    moms = [np.zeros(s) for s in shapes]
    opt = lion_ffi.Lion(params, lr=1e-2, weight_decay=0.1, state_dtype="q8")
    full = lion_ffi.Lion([p.copy() for p in params], lr=1e-2, weight_decay=0.1, state_dtype="f32")
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.step(grads)
        full.step(grads)
        for i, g in enumerate(grads):
            ref[i], moms[i] = reference_step(ref[i], g.astype(np.float64), moms[i], 1e-2, 0.9, 0.99, 0.1)
    # The first step's update is sign(g) whatever the momentum; later ones may differ where c is
    # near 0 (q8 momentum is an approximation), by 2 lr at most per step.
    for p, r in zip(params, ref):
        assert np.abs(p - r).max() <= 4 * 1e-2 + 1e-5
        assert np.mean(np.abs(p - r) < 1e-5) > 0.95
    blob, blob32 = opt.save(), full.save()
    # About 1.016 bytes of momentum per element of the large tensor, 4 for the small one.
    assert len(blob) - (88 + 24 * 2 + 16) == 6400 + 25 * 4 + 5 * 4
    assert len(blob) < 0.3 * len(blob32)
    # Checkpoints convert between q8, bf16 and f32 on load.
    q8 = lion_ffi.Lion([p.copy() for p in params], lr=1e-2, weight_decay=0.1, state_dtype="q8")
    q8.load(blob32)
    bf = lion_ffi.Lion([p.copy() for p in params], lr=1e-2, weight_decay=0.1, state_dtype="bf16")
    bf.load(blob)
    q8.load(blob)
    assert q8.save() == blob and q8.step_count == 3


def test_q8_is_a_state_dtype_only():
    p = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="q8"):
        lion_ffi.Lion([p], state_dtype="int8")
    for name, code in [("f32", 0), ("bf16", 2), ("q8", 3)]:
        assert lion_ffi._state_code(name) == code


def test_state_dtype_forms_and_an_array_for_params():
    p = np.zeros(8, np.float32)
    for form in ("float32", "f32", np.float32, np.dtype("float32"), 0):
        assert lion_ffi.Lion([p], state_dtype=form).save() == lion_ffi.Lion([p]).save(), form
    for bad in (1, 0.0, True, np.float64, np.dtype("float16"), "f16"):  # 1: f16, not a state dtype
        with pytest.raises(ValueError, match="state_dtype must be"):
            lion_ffi.Lion([p], state_dtype=bad)
    with pytest.raises(TypeError, match="params must be a list of arrays"):
        lion_ffi.Lion(np.zeros((3, 4), np.float32))  # not three tensors of four


def test_lion_errors_survive_pickling():
    import pickle
    from lion_ffi._lib import LionError, LionValueError
    for cls in (LionError, LionValueError):
        e = pickle.loads(pickle.dumps(cls(7, "checksum mismatch")))
        assert type(e) is cls and e.status == 7 and e.message == "checksum mismatch"
        assert str(e) == str(cls(7, "checksum mismatch"))


def test_checkpoint_files_take_str_bytes_and_paths(tmp_path):
    # lion_state_save_file had no ctypes prototype: a str went as a wchar_t*, and liblion saved
    # to a file named after its first letter, reporting success.
    p = np.linspace(-1, 1, 37, dtype=np.float32)
    opt = lion_ffi.Lion([p], lr=1e-2)
    opt.step([np.ones_like(p)])
    for path in [str(tmp_path / "a.lion"), tmp_path / "b.lion", bytes(tmp_path / "c.lion")]:
        opt.save_file(path)
        again = lion_ffi.Lion([p.copy()], lr=1e-2)  # the same lr0 (a load keeps its own)
        again.load_file(path)
        assert again.step_count == 1 and again.save() == opt.save()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.lion", "b.lion", "c.lion"]
    with pytest.raises(ValueError, match="NUL"):
        opt.save_file(str(tmp_path / "d\0e.lion"))
    with pytest.raises(lion_ffi.LionError, match="missing"):
        opt.load_file(tmp_path / "missing.lion")


def test_step_tensors_needs_an_address_per_index():
    p = np.zeros(8, dtype=np.float32)
    g = np.ones(8, dtype=np.float32)
    opt = lion_ffi.Lion([p, p.copy()], lr=1e-2)
    with pytest.raises(ValueError, match="2 indices, 1 parameter"):
        opt._handle.step_tensors([0, 1], [p.ctypes.data], [g.ctypes.data, g.ctypes.data])
