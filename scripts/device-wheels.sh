#!/usr/bin/env bash
# The Python packages the device scripts (benches/device_*.sh) install on a GPU machine, which
# has torch but no network: downloaded here into .whl/ (gitignored), carried there with the
# bundle (`carry: [".carry", ".whl"]`). lion-pytorch (the peer and the tests' reference),
# pytest for the Python tests, and DeepSpeed's sdist for its FusedLion (its own dependencies,
# pydantic among them, are left out: it reports "did not install" without them).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl lion-pytorch==0.2.5 pytest iniconfig pluggy packaging
python3 -m pip download -q --no-deps --no-binary :all: -d .whl deepspeed 2>/dev/null ||
  echo "deepspeed's sdist did not download (optional)"
ls .whl
