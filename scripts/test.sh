#!/usr/bin/env bash
# The whole test suite: formatting and lints, then the Rust tests (which also build and run
# the C and C++ tests, the examples and the install step against the built library), in debug
# and release, the C tests under valgrind, the main example, and the Python bindings' tests.
# Then the CUDA kernels are compiled by NVRTC (scripts/nvrtc.sh installs it; no GPU needed),
# the GPU-only benchmark sources by nvcc (scripts/nvcc.sh), and the GPU tests run with their kernels emulated on the CPU (scripts/cuda_on_cpu.sh; the q8
# ones twice, the second time with q8's ring off; their count on a line of its own). Ends with
# one line: "tests: N passed, N failed, N skipped" (skipped: cargo's ignored tests, such as
# the GPU tests on a machine without one, and pytest's skips); exits non-zero iff any test
# failed. A failing stage does not stop the later ones: a stage that fails without a failed
# test of its own (a build error, valgrind's finding, a crash) counts as one failure. Only the
# setup, formatting and lints stop it at once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
log=$(mktemp)
trap 'rm -f "$log"' EXIT
stage_failures=0
# Runs one stage, its output shown and added to the log that the counts are read from.
counted() {
  run_stage "$log" "$@"
}
# Runs one stage whose tests are counted elsewhere (the C tests again, under valgrind): its
# output is shown, not counted; its failure is.
uncounted() {
  run_stage /dev/null "$@"
}
run_stage() {
  local into=$1 out status
  shift
  out=$(mktemp)
  set +e
  "$@" 2>&1 | tee "$out"
  status=${PIPESTATUS[0]}
  set -e
  cat "$out" >> "$into"
  # A failed test in a counted stage is in the log; anything else is counted here.
  if [ "$status" -ne 0 ] && { [ "$into" = /dev/null ] || ! grep -qE '(^|[^0-9])[1-9][0-9]* failed' "$out"; }; then
    stage_failures=$((stage_failures + 1))
    echo "(this stage failed with status $status: counted as one failure)"
  fi
  rm -f "$out"
}
echo "== cargo fmt --check"; cargo fmt --check
echo "== cargo clippy"; cargo clippy --all-targets --quiet -- -D warnings
# The C tests link the shared library, which `cargo test` alone does not build.
echo "== debug build and tests"; cargo build --quiet
# The offline CUDA check runs once, below, with its NVRTC (left out here, not counted twice).
counted cargo test --quiet --no-fail-fast -- --skip without_a_gpu
# The C tests again under valgrind: no invalid access, no definite leak (issue: sanitizers).
echo "== C tests under valgrind"
uncounted valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite \
  target/tmp/test_api
# The host-life programs (tests/host) too. The fork test without leak checks: a child of
# fork() leaves the parent's pool behind on purpose (its threads do not exist there).
uncounted valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite \
  target/tmp/host_teardown_cpp
uncounted valgrind -q --error-exitcode=1 --leak-check=no target/tmp/host_fork_c
uncounted valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite \
  target/tmp/host_cancel_c
echo "== release build and tests"; cargo build --release --quiet
counted cargo test --release --quiet --no-fail-fast -- --skip without_a_gpu
# The CUDA kernels compile, with NVRTC from NVIDIA's wheel: no GPU needed (src/cuda/module.rs).
echo "== the CUDA kernels compile (NVRTC, no GPU)"
nvrtc_lib=$(bash scripts/nvrtc.sh)
nvrtc_before=$(grep -c "test result: ok. 1 passed" "$log" || true)
LD_LIBRARY_PATH="$nvrtc_lib" counted cargo test --release --quiet --lib without_a_gpu -- --ignored
# A run that compiled nothing (the test renamed or gated off) must not pass unseen.
if [ "$(grep -c "test result: ok. 1 passed" "$log" || true)" -le "$nvrtc_before" ]; then
  echo "the NVRTC compile check ran no test: counted as one failure"
  stage_failures=$((stage_failures + 1))
fi
# The GPU-only benchmark sources, which the GPU machines build with their nvcc 13.0, compile
# with the same nvcc here: one that does not costs no device time.
echo "== the CUDA benchmark sources compile (nvcc, no GPU)"
nvcc_bin=$(bash scripts/nvcc.sh)
for cu in benches/cuda/*.cu; do
  PATH="$nvcc_bin:$PATH" counted nvcc -O2 -arch=sm_90 -c "$cu" -o "target/nvcc/$(basename "$cu" .cu).o"
done
# Unit tests of instruction sets a CPU may lack are #[ignore]d (counted as skipped above):
# they run here where this CPU has what they need.
echo "== unit tests of this CPU's instruction sets"
isa_tests=()
grep -qw f16c /proc/cpuinfo && grep -qw avx512f /proc/cpuinfo && isa_tests+=(cpu::f16c::tests::)
grep -qw avx512_bf16 /proc/cpuinfo && isa_tests+=(cpu::avx512bf16::tests::)
if [ ${#isa_tests[@]} -gt 0 ]; then
  counted cargo test --release --quiet --lib -- --ignored "${isa_tests[@]}"
else
  echo "none: this CPU has neither F16C with AVX-512F nor AVX512-BF16"
fi
# The GPU tests again, their kernels run on the CPU (scripts/cuda_on_cpu.sh): counted on
# their own line below, not as passed GPU tests.
echo "== the CUDA engine's GPU tests, kernels emulated on the CPU"
emulated=$(mktemp)
trap 'rm -f "$log" "$emulated"' EXIT
set +e
timeout 1800 bash scripts/cuda_on_cpu.sh > "$emulated" 2>&1
emu_status=$?
# q8's ring (src/cuda/tuning.rs Q8_STAGES) is on by default, so the run above checks it (the
# emulator's cp.async lands only at the wait that retires it: the ring's waits and slots are
# checked too); the q8 tests again without it, the path of cards before sm_80 and of cards
# whose blocks get too little shared memory. Counted with the rest; a run of no test fails.
no_ring=$(mktemp)
LION_CUDA_Q8_STAGES=0 timeout 900 bash scripts/cuda_on_cpu.sh q8_ > "$no_ring" 2>&1
no_ring_status=$?
no_ring_passed=$(grep -oE '[0-9]+ passed' "$no_ring" | awk '{s+=$1} END {print s+0}')
[ "$no_ring_passed" -eq 0 ] && [ "$no_ring_status" -eq 0 ] && no_ring_status=1
[ "$no_ring_status" -ne 0 ] && emu_status=$no_ring_status
cat "$no_ring" >> "$emulated"
rm -f "$no_ring"
set -e
grep -E "test result|FAILED|panicked|error" "$emulated" || true
echo "== the example trains"; counted bash scripts/example.sh
# Python: the numpy tests run here; the torch ones skip unless torch and lion-pytorch are there;
# tree-sitter-julia parses the Julia package (bindings/python/tests/test_julia_ccalls.py).
# In a venv (a system Python may refuse pip's installs: PEP 668) that sees the system's
# packages (torch, where there is one); a failed install stops the script.
echo "== Python bindings"
py=target/py-tests/bin/python
[ -x "$py" ] || python3 -m venv --system-site-packages target/py-tests
"$py" -m pip install -q --disable-pip-version-check numpy pytest ml_dtypes tree-sitter tree-sitter-julia
PYTHONPATH=bindings/python LION_LIBRARY="$PWD/target/release/liblion.so" \
  counted "$py" -m pytest -q -p no:cacheprovider bindings/python/tests
counted bash scripts/test_wheel.sh # the wheel and the sdist in a fresh venv, run from /tmp
PYTHONPATH=bindings/python counted "$py" examples/train_mlp.py
passed=$(grep -oE '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -oE '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
skipped=$(grep -oE '[0-9]+ (ignored|skipped)' "$log" | awk '{s+=$1} END {print s+0}')
emu_passed=$(grep -oE '[0-9]+ passed' "$emulated" | awk '{s+=$1} END {print s+0}')
emu_failed=$(grep -oE '[0-9]+ failed' "$emulated" | awk '{s+=$1} END {print s+0}')
# A run that ran no test, or ended otherwise than by its tests' failures (a build error, a
# crash, the timeout), counts as a failure.
if [ "$emu_passed" -eq 0 ] || { [ "$emu_status" -ne 0 ] && [ "$emu_failed" -eq 0 ]; }; then
  emu_failed=$((emu_failed + 1))
fi
echo "CUDA tests with kernels emulated on the CPU: $emu_passed passed, $emu_failed failed"
failed=$((failed + emu_failed + stage_failures))
echo "tests: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
