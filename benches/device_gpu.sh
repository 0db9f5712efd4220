#!/usr/bin/env bash
# On the GPU machine: the GPU tests (the bundle's and the Python ones), then the GPU benchmark
# beside its peers and optax, q8's speed (benches/q8_gpu_speed.py), one lion_step's host time
# from Rust (examples/cuda_host_time.rs), the torch step's Python time, and the driver calls a
# step's host time is made of (benches/cuda/launch_cost.cu, built here with nvcc).
#   bash benches/device_gpu.sh [tests|bench|speed|host|regs|tune|taper|ring|tables|profile|waves|all]...
#   (none: all, that is tests and bench; speed: bench without the host times; taper: tune's
#   tapers alone; ring: q8's ring, its tests and speed, about 6 minutes; tables: the kernels
#   with and without pointer tables; profile: the four rows with launches hidden, and ncu on
#   bf16 steps; waves: GPT-2 small bf16 under chunk lengths that fill its last wave of blocks
#   more or less; several run in order, in one call: `tests ring speed`)
# tune: liblion alone, the four rows and q8's speed under src/cuda/tuning.rs' defaults and
# around them (LION_CUDA_MIN_BLOCKS, LION_CUDA_UNROLL, LION_CUDA_Q8_AHEAD, LION_CUDA_CHUNK,
# LION_CUDA_TAPER),
# the defaults first and last, to check them on a card they were not measured on (about 6
# minutes; LION_LIBRARY picks another build than the bundle's).
# regs: each kernel's registers and spills, compiled by this machine's NVRTC for sm_90 (the
# offline check of src/cuda/module.rs, about 35 s), to compare with CI's NVRTC 13.0.88.
# Expects the bundle in .gpu-bundle/ (scripts/gpu-bundle.sh) and wheels in .whl/
# (scripts/device-wheels.sh); carry [".carry", ".whl"] and untar .carry/gpu-bundle.tar.xz first.
set -uo pipefail
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The NVRTC liblion will load (its version sets the kernels' registers: CI compiles with 13.0.88).
python3 - <<'PY'
import ctypes
for name in ("libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"):
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        continue
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    print(f"NVRTC {major.value}.{minor.value} ({name})")
    break
else:
    print("NVRTC: none found by name")
# What src/cuda/driver.rs `card` reads: the memory bandwidth per multiprocessor from which
# src/cuda/tuning.rs `q8_min_blocks` picks q8's launch-bounds minimum (not restated here).
cuda = ctypes.CDLL("libcuda.so.1")
cuda.cuInit(0)
value = ctypes.c_int()
attrs = {}
for attr, what in ((16, "multiprocessors"), (36, "memory clock kHz"), (37, "bus bits")):
    rc = cuda.cuDeviceGetAttribute(ctypes.byref(value), attr, 0)
    attrs[what] = value.value if rc == 0 else 0
if all(attrs.values()):
    per_sm = 2 * attrs["memory clock kHz"] * 1e3 * attrs["bus bits"] / 8 / attrs["multiprocessors"]
    print(f"{attrs}: {per_sm / 1e9:.1f} GB/s per multiprocessor")
else:
    print(f"{attrs}: not all reported (tuning.rs takes the reference card's values)")
PY
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz >/dev/null 2>&1 || echo "deepspeed did not install"
export PYTHONPATH=/tmp/site:$PWD/bindings/python TORCH_CUDA_ARCH_LIST=9.0
tests() {
  bash .gpu-bundle/run-tests.sh
  # The Python tests with torch, lion-pytorch and CUDA (CI has no torch: they skip there).
  LION_LIBRARY=$PWD/.gpu-bundle/liblion.so python3 -m pytest -q -p no:cacheprovider bindings/python/tests 2>&1 | tail -40
}
host_time() {
  # One lion_step's host time from Rust (148 tensors), on the legacy and on a created stream,
  # with its pointers in a table (the default) and by value (LION_CUDA_POINTER_TABLES=0).
  # Each lion_step grouped with the driver's own calls of either path, behind running steps, so
  # that liblion's part (the groups' differences) stands apart from the host's moods.
  for tables in 1 0; do
    for stream in legacy created; do
      LION_CUDA_POINTER_TABLES=$tables LION_STREAM=$stream .gpu-bundle/bench/cuda_host_time
    done
  done
  LION_LIBRARY=$PWD/.gpu-bundle/liblion.so python3 benches/torch_step_time.py
  nvcc -O2 -o /tmp/launch_cost benches/cuda/launch_cost.cu -lcuda && /tmp/launch_cost
}
speed() {
  LION_LIBRARY=$PWD/.gpu-bundle/liblion.so python3 benches/peers/gpu_bench.py
  # The same with each launch hidden behind a spin of the card (the card's time alone).
  LION_BENCH_LAUNCH=hidden LION_LIBRARY=$PWD/.gpu-bundle/liblion.so python3 benches/peers/gpu_bench.py 2>&1 |
    grep -E "^\| |timing|copy"
  python3 benches/peers/optax_bench.py
  LION_LIBRARY=$PWD/.gpu-bundle/liblion.so python3 benches/q8_gpu_speed.py
}
# liblion alone (LION_LIBRARY, else the bundle's), under each setting given ("": the defaults;
# a setting is one or more NAME=VALUE words): the four rows, or q8's speed.
four_rows() {
  local setting
  for setting in "$@"; do
    echo "== four rows, ${setting:-the defaults}"
    env LION_LIBRARY=${LION_LIBRARY:-$PWD/.gpu-bundle/liblion.so} LION_BENCH_ONLY_OURS=1 $setting \
      python3 benches/peers/gpu_bench.py 2>&1 | grep -E "^\| [fG]|copy|rror"
  done
}
q8_rows() {
  local setting
  for setting in "$@"; do
    echo "== q8, ${setting:-the defaults}"
    env LION_LIBRARY=${LION_LIBRARY:-$PWD/.gpu-bundle/liblion.so} LION_BENCH_STATES=q8 $setting \
      python3 benches/q8_gpu_speed.py 2>&1 | grep -E "\| q8 |rror"
  done
}
tune() {
  four_rows "" LION_CUDA_MIN_BLOCKS=0,0,0 LION_CUDA_MIN_BLOCKS=2,0,1 LION_CUDA_UNROLL=2,4 LION_CUDA_UNROLL=4,8 \
    LION_CUDA_CHUNK=4096 LION_CUDA_CHUNK=16384 LION_CUDA_TAPER=256,4096 LION_CUDA_TAPER=1024,4096 \
    LION_CUDA_TAPER=1024,2048 LION_CUDA_TAPER=4096,4096 ""
  q8_rows "" LION_CUDA_MIN_BLOCKS=1,0,0 LION_CUDA_Q8_AHEAD=0 "LION_CUDA_MIN_BLOCKS=1,0,0 LION_CUDA_Q8_AHEAD=0" \
    "LION_CUDA_MIN_BLOCKS=1,0,0 LION_CUDA_Q8_AHEAD=2" LION_CUDA_Q8_AHEAD=2 LION_CUDA_CHUNK=131072 \
    LION_CUDA_TAPER=256,16384 LION_CUDA_TAPER=1024,8192 ""
}
taper() {
  # The end of a launch in shorter chunks (LION_CUDA_TAPER=CHUNKS,ELEMENTS, src/cuda/plan.rs),
  # for GPT-2 small bf16's tail on the H200 (93-94% of the copy ceiling, goal 97%): the four
  # rows, the defaults first and last (about 2 minutes).
  four_rows "" LION_CUDA_TAPER=256,4096 LION_CUDA_TAPER=512,2048 LION_CUDA_TAPER=1024,4096 \
    LION_CUDA_TAPER=1024,2048 LION_CUDA_TAPER=2048,2048 LION_CUDA_TAPER=4096,4096 \
    LION_CUDA_TAPER=512,1024 ""
}
tables() {
  # The kernels' time with the pointers in a table (the default) and by value
  # (LION_CUDA_POINTER_TABLES=0, src/cuda/pointer_tables.rs), alternating: the four rows and
  # q8's (about 3 minutes).
  four_rows "" LION_CUDA_POINTER_TABLES=0 "" LION_CUDA_POINTER_TABLES=0
  q8_rows "" LION_CUDA_POINTER_TABLES=0
}
profile() {
  # Where GPT-2 small bf16's 3-4% below a copy of its own bytes goes (BENCHMARKS.md, twentieth
  # session): the four rows with each launch hidden behind a spin of the card (the kernels'
  # time alone, beside same-bytes copies timed alike), then ncu on one bf16 step of flat 2^28
  # and one of GPT-2 small, after their warm-up (each row's first step launches by value,
  # lion_update_bf16; the rest with a table, lion_update_table_bf16: 34 of them a row).
  LION_BENCH_ONLY_OURS=1 LION_BENCH_LAUNCH=hidden LION_LIBRARY=$PWD/.gpu-bundle/liblion.so \
    python3 benches/peers/gpu_bench.py 2>&1 | grep -E "^\| [fG]|copy|rror"
  local skip
  for skip in 5 39; do
    echo "== ncu, lion_update_table_bf16 launch $((skip + 1)) ($([ $skip = 5 ] && echo flat 2^28 || echo GPT-2 small))"
    LION_BENCH_ONLY_OURS=1 LION_LIBRARY=$PWD/.gpu-bundle/liblion.so ncu --kernel-name regex:lion_update_table_bf16 \
      --launch-skip $skip --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section WarpStateStats python3 benches/peers/gpu_bench.py 2>&1 |
      grep -E "Duration|Throughput|Busy|Grid Size|Registers|Occupancy|Waves|Stall|Warp Cycles|Elapsed Cycles|L2 Hit|Block Limit"
  done
}
waves() {
  # GPT-2 small bf16's last, partial wave of blocks (BENCHMARKS.md, twentieth session: 10,216
  # blocks of 12 Ki elements, 15.5 waves of 660 resident blocks, 5 a multiprocessor on an H100
  # or H200): chunk lengths whose blocks end on a fuller last wave (11 Ki: 16.9 waves, 14 Ki:
  # 13.3) beside emptier ones (12 Ki, the default: 15.5; 10 Ki: 18.6; 13 Ki: 14.3), in turn,
  # twice with the launches counted, once hidden (about 5 minutes). The f32 rows take the
  # same chunks (their default is 8 Ki): read the bf16 rows.
  local round chunks="LION_CUDA_CHUNK=11264 LION_CUDA_CHUNK=14336 LION_CUDA_CHUNK=10240 LION_CUDA_CHUNK=13312"
  for round in 1 2; do
    # shellcheck disable=SC2086 # one setting a word
    four_rows "" $chunks
  done
  local hidden=() c
  for c in "" $chunks; do hidden+=("LION_BENCH_LAUNCH=hidden $c"); done
  four_rows "${hidden[@]}"
}
ring() {
  # q8's ring (LION_CUDA_Q8_STAGES, lion.cu's q8_ring; 4 stages by default): the bundle's q8
  # tests without it and with it (those of the cuda executable step on the card, bit for bit
  # against the CPU; the filter takes some CPU tests of other executables too, seconds), then
  # q8's speed at other depths, the defaults first and last (about 6 minutes in all).
  # MIN_BLOCKS 1,0,0 and 1,0,1 set q8's minimum to 0 and 1 whatever the card.
  local stages
  for stages in 0 4; do
    echo "== q8 tests, LION_CUDA_Q8_STAGES=$stages"
    LION_CUDA_Q8_STAGES=$stages bash .gpu-bundle/run-tests.sh q8_ | grep -vE ": 0 passed, 0 failed"
  done
  q8_rows "" LION_CUDA_Q8_STAGES=0 LION_CUDA_Q8_STAGES=3 LION_CUDA_Q8_STAGES=5 LION_CUDA_Q8_STAGES=6 \
    LION_CUDA_MIN_BLOCKS=1,0,0 LION_CUDA_MIN_BLOCKS=1,0,1 LION_CUDA_Q8_AHEAD=0 LION_CUDA_Q8_AHEAD=2 ""
}
for what in "${@:-all}"; do
  case "$what" in
    tests) tests ;;
    bench) speed; host_time ;;
    speed) speed ;;
    host) host_time ;;
    tune) tune ;;
    taper) taper ;;
    ring) ring ;;
    tables) tables ;;
    profile) profile ;;
    waves) waves ;;
    regs) .gpu-bundle/bin/lion --ignored without_a_gpu --nocapture 2>&1 | grep -E "registers|lion_|test result" ;;
    all) tests; speed; host_time ;;
    *) echo "device_gpu.sh: no sub-command '$what' (tests bench speed host tune taper ring tables profile waves regs all)" >&2; exit 2 ;;
  esac
done
