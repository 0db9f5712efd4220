#!/usr/bin/env bash
# On the GPU machine's host (16 cores): our CPU benchmark beside its same-bytes loop, then the
# CPU peers, in one run. Expects the bench binary in .gpu-bundle/bench/ and peer wheels in
# .whl/ (see BENCHMARKS.md for how both are made).
set -uo pipefail
nproc; lscpu | grep -E "Model name|Socket|NUMA node\(s\)|^CPU\(s\)" || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz >/dev/null 2>&1 || echo "deepspeed did not install"
export PYTHONPATH=/tmp/site
LION_BENCH_QUICK=0 .gpu-bundle/bench/cpu_step --summary
python3 benches/peers/cpu_peers.py 25 26
