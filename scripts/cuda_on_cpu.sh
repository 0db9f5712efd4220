#!/usr/bin/env bash
# The CUDA engine's GPU tests (tests/cuda.rs, tests/cuda_dist.rs) with its kernels run on the
# CPU: the fake driver and NVRTC of tests/c/fake_cuda.c in run mode build lion.cu with the
# host's C++ compiler over tests/c/emu_cuda.h and run each launch thread by thread. This
# checks the CUDA C as written (its logic, its indexing, its bits against the CPU engine's)
# on any machine; what NVRTC makes of it, and timing, need a GPU (benches/device_gpu.sh).
# The fake has one device; created streams run their work at once, and record it while they
# capture a graph, which cuGraphLaunch runs again. The legacy stream's cuMemsetD8 is held
# until something orders it, so that a non-blocking stream's work can run before it.
# Usage: bash scripts/cuda_on_cpu.sh [extra cargo test arguments after --]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for lib in libcuda.so libnvrtc.so; do
  define=""
  [ "$lib" = libnvrtc.so ] && define="-DFAKE_NVRTC"
  cc -std=c11 -shared -fPIC -O1 -Wl,-soname,$lib $define \
    -DLION_EMU_HEADER="\"$PWD/tests/c/emu_cuda.h\"" tests/c/fake_cuda.c -o "$dir/$lib"
  ln -sf "$lib" "$dir/$lib.1"
done
# NCCL as one rank on host memory (the fake of tests/nccl_fake.rs): what the one-rank NCCL
# test needs.
cc -std=c99 -shared -fPIC -O1 -Wl,-soname,libnccl.so.2 -DFAKE_VERSION=22105 \
  tests/c/fake_nccl.c -o "$dir/libnccl.so.2"
export LION_NCCL_LIBRARY="$dir/libnccl.so.2"
LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" LION_FAKE_CUDA_RUN=1 \
  cargo test --release --quiet --no-fail-fast --test cuda --test cuda_dist -- --ignored \
  "$@"
