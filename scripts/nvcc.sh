#!/usr/bin/env bash
# Installs nvcc, NVIDIA's CUDA C++ compiler (CUDA 13.0, as the GPU machines have), from its
# PyPI wheels (the compiler, its NVVM back end, the runtime's headers and crt; no driver or GPU
# needed) under target/nvcc, once, and prints the folder of nvcc for PATH. scripts/test.sh
# compiles the GPU-only benchmark sources (benches/cuda/*.cu) with it, so that one that does not
# compile is found here rather than in a GPU machine's minutes:
#   PATH=$(bash scripts/nvcc.sh):$PATH nvcc -O2 -arch=sm_90 -c benches/cuda/launch_cost.cu -o /tmp/x.o
set -euo pipefail
cd "$(dirname "$0")/.."
version=13.0.88  # the GPU machines' nvcc 13.0 (and scripts/nvrtc.sh's NVRTC)
dir="target/nvcc/$version"
bin="$dir/nvidia/cu13/bin"
if [ ! -x "$bin/nvcc" ] || [ ! -x "$dir/nvidia/cu13/nvvm/bin/cicc" ]; then
  rm -rf "$dir.part" && mkdir -p "$dir.part"
  python3 -m pip download -q --disable-pip-version-check --no-deps -d "$dir.part" \
    "nvidia-cuda-nvcc==$version" "nvidia-nvvm==$version" "nvidia-cuda-crt==$version" \
    "nvidia-cuda-runtime==13.0.*" 2>&1 | grep -v "as the 'root' user" >&2 || true
  [ "$(ls "$dir.part"/*.whl 2>/dev/null | wc -l)" = 4 ] || { echo "could not download nvcc $version's wheels" >&2; exit 1; }
  # Wheels are zip files, whose extraction here drops the executable bits.
  python3 -c 'import glob, sys, zipfile
for w in glob.glob(sys.argv[1] + "/*.whl"):
    zipfile.ZipFile(w).extractall(sys.argv[1])' "$dir.part"
  chmod +x "$dir.part/nvidia/cu13/bin/"* "$dir.part/nvidia/cu13/nvvm/bin/"*
  rm -f "$dir.part"/*.whl && rm -rf "$dir" && mv "$dir.part" "$dir"
fi
echo "$PWD/$bin"
