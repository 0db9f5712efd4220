#!/usr/bin/env bash
# On a machine with several GPUs (nvidia-h200-x2 / -x4 / -x8), after `tar -xJf
# .carry/gpu-bundle.tar.xz` (scripts/gpu-bundle.sh; carry .whl/ too, scripts/device-wheels.sh):
# everything issues 13 and 14 ask of it, one sub-command per device call (each is bounded to
# fit one call's 600 s). NCCL_NVLS_ENABLE stays 0.
#   bash benches/device_dist.sh check|train|bench|sockets
#   check:   the bundle's multi-GPU tests (tests/nccl.rs's *two_gpus*; the rest of the bundle
#            runs on one GPU, benches/device_gpu.sh), then benches/dist_check.py (sharded
#            bit-identical to one GPU over 50 steps of GPT-2 small; vote ranks identical and
#            equal to a reference) at W = 2 .. every GPU (powers of two)
#   train:   bindings/python/tests/test_torch_dist.py (two ranks train: identical, loss falls),
#            then benches/dist_train.py (GPT-2 small, 300 steps: one GPU, then sharded and vote at
#            the two largest powers of two up to every GPU, W = 2 alone on two; curves in
#            $OUT/dist_train, or ./dist_train without $OUT)
#   bench:   benches/dist_bench.py over NVLink at W = 2 .. every GPU (powers of two)
#   sockets: the same with NCCL forced onto TCP sockets (a stand-in for nodes on Ethernet)
# Each program runs under `timeout` (it ends the spawned ranks too): a hang in a collective
# costs its share of the call, not the call.
set -uo pipefail
# pytest and lion-pytorch from .whl/ (scripts/device-wheels.sh), where carried.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export NCCL_NVLS_ENABLE=0 PYTHONPATH=/tmp/site:$PWD/bindings/python LION_LIBRARY=$PWD/.gpu-bundle/liblion.so
# The libnccl torch loaded (the Rust tests load it by this path; the Python ones borrow torch's).
torch_nccl() {
  python3 -c 'import torch.distributed
print(next((l.split()[-1] for l in open("/proc/self/maps") if "libnccl" in l), ""))'
}
[ -n "${LION_NCCL_LIBRARY:-}" ] || LION_NCCL_LIBRARY=$(torch_nccl)
export LION_NCCL_LIBRARY
gpus=$(nvidia-smi --list-gpus | wc -l)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1
echo "GPUs: $gpus; NCCL library: ${LION_NCCL_LIBRARY:-none, torch loaded no libnccl}"
[ -f "$LION_LIBRARY" ] || { echo "no $LION_LIBRARY: untar .carry/gpu-bundle.tar.xz first"; exit 2; }
worlds() { local w=2; while [ "$w" -le "$gpus" ]; do echo "$w"; w=$((w * 2)); done; }
bounded() { local s=$1; shift; timeout -k 10 "$s" "$@"; local r=$?; [ "$r" -eq 124 ] && echo "TIMED OUT after $s s: $*"; return "$r"; }
case "${1:-}" in
  check)
    bounded 240 bash .gpu-bundle/run-tests.sh two_gpus | tail -60
    n=$(worlds | wc -l)
    for w in $(worlds); do bounded $((300 / n)) python3 benches/dist_check.py --world "$w" --steps 50; done ;;
  train)
    bounded 150 python3 -m pytest -q bindings/python/tests/test_torch_dist.py 2>&1 | tail -60
    bounded 420 python3 benches/dist_train.py --world "$(worlds | tail -2 | paste -sd,)" --steps 300 \
      --out "${OUT:-.}/dist_train" 2>&1 | grep -v -i warn
    echo "dist_train.py exit status: ${PIPESTATUS[0]}" ;;
  bench)
    n=$(worlds | wc -l)
    for w in $(worlds); do bounded $((540 / n)) python3 benches/dist_bench.py --world "$w"; done ;;
  sockets)
    n=$(worlds | wc -l)
    for w in $(worlds); do
      NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 \
        bounded $((540 / n)) python3 benches/dist_bench.py --world "$w" --layouts gpt2 --steps 5 --warmup 2
    done ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
