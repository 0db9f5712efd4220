#!/usr/bin/env bash
# Builds liblion (release) and every test executable here, and gathers them with what the
# tests read at run time into one folder, to run on a machine with an NVIDIA GPU and no Rust:
#
#   bash scripts/gpu-bundle.sh [DIR] [-- extra cargo test arguments]
#
# (DIR: .gpu-bundle, relative to the repository; it is emptied first)
#
# DIR holds:
#   bin/            every test executable (named after its target; `lion` is the unit tests)
#   liblion.so, liblion.a, include/
#   the files the tests compile or run (C and C++ sources, the install script and its
#   templates, the CMake consumer): tests that build C run the machine's cc, c++, cmake
#   and pkg-config there, and tests/mpi.rs its mpicc and mpirun
#   run-tests.sh    runs every executable, the GPU tests included
#   bench/cpu_step  the CPU benchmark (benches/device_cpu.sh runs it there)
#   bench/cuda_host_time  examples/cuda_host_time.rs (benches/device_gpu.sh host runs it)
#
# There (or here, to check the bundle):
#
#   bash DIR/run-tests.sh [--skip-gpu] [TEST ARGS...]
#
# prints one line per executable and a final "N passed, N failed, N skipped" line, and exits
# non-zero iff a test failed. The GPU tests are #[ignore]d (skipped by a plain `cargo test`);
# run-tests.sh passes --include-ignored, so on a machine without a GPU they fail. --skip-gpu
# leaves the ignored tests out (reported as skipped): the rest of the bundle, checked on a
# machine without a GPU. TEST ARGS go to every executable (libtest's, e.g. a name filter).
set -euo pipefail
dir="${1:-.gpu-bundle}"
shift || true
[ "${1:-}" = "--" ] && shift
cd "$(dirname "$0")/.."
top=$PWD
case "$dir" in /*) ;; *) dir="$top/$dir" ;; esac

# Read by the tests at run time, relative to the repository (tests/native/mod.rs: repo()).
sources=(include bindings/cpp tests/c tests/cpp tests/host tests/cmake_consumer examples
  scripts/install.sh packaging Cargo.toml README.md)

# "name<TAB>path" of each executable of kind $1 (test: test harnesses; example) that cargo
# built for the rest of the arguments (this build's, not stale ones).
executables() {
  local kind=$1
  shift
  "$@" --quiet --message-format=json | python3 -c '
import json, sys
kind = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if m["profile"]["test"] if kind == "test" else kind in m["target"]["kind"]:
        print(m["target"]["name"] + "\t" + m["executable"])
' "$kind"
}
cargo build --release --quiet
tests=$(executables test cargo test --release --no-run "$@")
[ -n "$tests" ] || { echo "gpu-bundle: cargo reported no test executables" >&2; exit 1; }
# The CPU benchmark too, for benches/device_cpu.sh on the GPU machine's host; and the CUDA
# host-time example, for benches/device_gpu.sh host.
benches=$(executables test cargo bench --no-run --bench cpu_step)
benches+=$'\n'$(executables example cargo build --release --example cuda_host_time)

rm -rf "$dir"
mkdir -p "$dir/bin" "$dir/bench"
while IFS=$'\t' read -r name exe; do cp "$exe" "$dir/bin/$name"; done <<<"$tests"
while IFS=$'\t' read -r name exe; do cp "$exe" "$dir/bench/$name"; done <<<"$benches"
# liblion.so.1 (the SONAME link) too: programs linked against the bundle look for it.
cp -a target/release/liblion.so* target/release/liblion.a "$dir/"
for s in "${sources[@]}"; do
  mkdir -p "$dir/$(dirname "$s")"
  cp -r "$s" "$dir/$s"
done

cat >"$dir/run-tests.sh" <<'RUN'
#!/usr/bin/env bash
# Runs every test executable of this bundle (made by liblion's scripts/gpu-bundle.sh, whose
# header says more), the GPU tests included:
#   bash run-tests.sh [--skip-gpu] [TEST ARGS...]
# One line per executable, then "N passed, N failed, N skipped"; exits non-zero iff a test
# failed (an executable that fails without a test result counts as one failed test).
# --skip-gpu: without --include-ignored, so the GPU tests are skipped (a machine without one).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ignored=(--include-ignored)
if [ "${1:-}" = "--skip-gpu" ]; then ignored=(); shift; fi
# Tests named *two_gpus* need two devices: left out (counted as skipped) on fewer.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -lt 2 ]; then ignored+=(--skip two_gpus); fi
# The offline compile check is CI's (scripts/test.sh): here the GPU tests compile every kernel
# anyway, and it would cost half a minute of device time (left out: skipped).
ignored+=(--skip without_a_gpu)
# The mirror tags' check reads the build tree's sources, which are not here: CI's too.
ignored+=(--skip every_mirror_tag_names_a_twin)
# The tests find the library and the sources they compile here, not in a build tree.
export LION_LIB_DIR="$here" LION_TEST_ROOT="$here"
export LD_LIBRARY_PATH="$here${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for tool in cc c++ cmake pkg-config mpicc mpirun; do
  command -v "$tool" >/dev/null || echo "warning: no $tool here: the tests that use it will fail"
done
passed=0 failed=0 skipped=0
for t in "$here"/bin/*; do
  out=$("$t" "${ignored[@]}" "$@" 2>&1)
  r=$?
  line=$(grep -E '^test result:' <<<"$out" | tail -1)
  p=$(grep -oE '[0-9]+ passed' <<<"$line" | grep -oE '[0-9]+' || echo 0)
  f=$(grep -oE '[0-9]+ failed' <<<"$line" | grep -oE '[0-9]+' || echo 0)
  s=$(grep -oE '[0-9]+ ignored' <<<"$line" | grep -oE '[0-9]+' || echo 0)
  # Tests left out by --skip two_gpus (or a caller's filter) were not run: skipped.
  s=$((s + $(grep -oE '[0-9]+ filtered out' <<<"$line" | grep -oE '[0-9]+' || echo 0)))
  if [ "$r" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  echo "$(basename "$t"): $p passed, $f failed, $s skipped"
  if [ "$r" -ne 0 ]; then tail -40 <<<"$out" | sed 's/^/    /'; fi
  passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
done
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
RUN
chmod +x "$dir/run-tests.sh"
# The device tool carries at most 64 MiB: a compressed copy in .carry/ (gitignored) travels;
# there, `tar -xJf .carry/gpu-bundle.tar.xz` restores DIR.
mkdir -p .carry
tar -C "$(dirname "$dir")" -cJf .carry/gpu-bundle.tar.xz "$(basename "$dir")"
echo "bundle: $dir ($(du -sh "$dir" | cut -f1); .carry/gpu-bundle.tar.xz $(du -sh .carry/gpu-bundle.tar.xz | cut -f1)); run there: bash $dir/run-tests.sh"
