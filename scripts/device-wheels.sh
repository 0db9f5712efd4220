#!/usr/bin/env bash
# The Python packages the device scripts (benches/device_*.sh) install on a GPU machine, which
# has torch but no network: downloaded here into .whl/ (gitignored), carried there with the
# bundle (`carry: [".carry", ".whl"]`). lion-pytorch (the peer and the tests' reference),
# pytest for the Python tests, and DeepSpeed's sdist for its FusedLion with the packages it
# imports that the GPU machine's torch environment lacks (binary wheels for its Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl lion-pytorch==0.2.5 pytest iniconfig pluggy packaging
python3 -m pip download -q --no-deps --no-binary :all: -d .whl deepspeed 2>/dev/null ||
  echo "deepspeed's sdist did not download (optional)"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 -d .whl pydantic hjson py-cpuinfo msgpack einops ninja psutil tqdm ||
  echo "DeepSpeed's dependencies did not download (optional)"
ls .whl
