#!/usr/bin/env bash
# Installs NVRTC, NVIDIA's runtime compiler, from its PyPI wheel (no driver, GPU or CUDA
# toolkit needed) under target/nvrtc, once, and prints the folder of libnvrtc.so.13 for
# LD_LIBRARY_PATH. With it, src/cuda/module.rs's nvrtc_compiles_every_kernel_without_a_gpu
# compiles liblion's kernels on any x86-64 or aarch64 Linux machine (scripts/test.sh runs it):
#   LD_LIBRARY_PATH=$(bash scripts/nvrtc.sh) cargo test --lib without_a_gpu -- --ignored --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."
version=13.0.88  # CUDA 13.0, the version cudarc's cuda-13000 feature builds against (Cargo.toml)
dir="target/nvrtc/$version"
lib="$dir/nvidia/cu13/lib"
if [ ! -e "$lib/libnvrtc.so.13" ]; then
  rm -rf "$dir.part" && mkdir -p "$dir.part"
  python3 -m pip download -q --disable-pip-version-check --no-deps -d "$dir.part" \
    "nvidia-cuda-nvrtc==$version" 2>&1 | grep -v "as the 'root' user" >&2 || true
  ls "$dir.part"/*.whl >/dev/null 2>&1 || { echo "could not download nvidia-cuda-nvrtc==$version" >&2; exit 1; }
  python3 -c 'import glob, sys, zipfile; zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0]).extractall(sys.argv[1])' "$dir.part"
  rm -f "$dir.part"/*.whl && rm -rf "$dir" && mv "$dir.part" "$dir"
fi
echo "$PWD/$lib"
