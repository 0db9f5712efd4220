#!/usr/bin/env bash
# On the GPU machine's host (16 cores): our CPU benchmark beside its same-bytes loop (the
# summary twice, the in-cache cost per core, the flat-size sweep), then the CPU peers, in one
# run. Expects the bench binary in .gpu-bundle/bench/ and peer wheels in .whl/ (see
# BENCHMARKS.md for how both are made).
set -uo pipefail
nproc; lscpu | grep -E "Model name|Socket|NUMA node\(s\)|^CPU\(s\)|L2 cache|L3 cache" || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz >/dev/null 2>&1 || echo "deepspeed did not install"
export PYTHONPATH=/tmp/site
bench=.gpu-bundle/bench/cpu_step
LION_BENCH_QUICK=0 $bench --summary
LION_BENCH_QUICK=0 $bench --summary
$bench --in-cache
$bench --sweep
python3 benches/peers/cpu_peers.py 25 26
