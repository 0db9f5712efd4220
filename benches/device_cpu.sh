#!/usr/bin/env bash
# On the GPU machine's host (16 cores): our CPU benchmark beside its same-bytes loop (the
# summary twice, the in-cache cost per core, the flat-size sweep), then the CPU peers, in one
# run. Expects the bench binary in .gpu-bundle/bench/ and peer wheels in .whl/
# (scripts/gpu-bundle.sh, scripts/device-wheels.sh).
#   bash benches/device_cpu.sh [q8]   (q8: only the 8-bit momentum rows, one thread: the
#                                      prefetch settings in alternating rounds, then in cache)
set -uo pipefail
nproc; lscpu | grep -E "Model name|Socket|NUMA node\(s\)|^CPU\(s\)|L2 cache|L3 cache" || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz >/dev/null 2>&1 || echo "deepspeed did not install"
export PYTHONPATH=/tmp/site
bench=.gpu-bundle/bench/cpu_step
if [ "${1:-}" = q8 ]; then
  # Issue 11: q8 at 0.9x of the same-bytes loop. On the H200 machine's host one thread ran flat
  # 2^25 at 0.69x with an interquartile range of 0.66-1.07 (a noisy host): three rounds of each
  # setting, alternating, so that the host's moods fall on all of them. q8 prefetches 4 KiB of
  # f32 ahead into L1 on Intel (src/cpu/prefetch.rs); into L2 (t1) was better on AMD.
  for round in 1 2 3; do
    for setting in "" "LION_CPU_PREFETCH_HINT=t1" "LION_CPU_PREFETCH=8192" "LION_CPU_PREFETCH=0"; do
      echo "== round $round: ${setting:-the defaults}"
      env $setting LION_BENCH_QUICK=1 LION_BENCH_THREADS=1 LION_BENCH_ONLY="(q8" $bench --summary
    done
  done
  LION_BENCH_ONLY=q8 $bench --in-cache
  exit
fi
LION_BENCH_QUICK=0 $bench --summary
LION_BENCH_QUICK=0 $bench --summary
$bench --in-cache
$bench --sweep
python3 benches/peers/cpu_peers.py 25 26
