#!/usr/bin/env bash
# On a machine with several GPUs (nvidia-h200-x2 / -x4 / -x8), after `tar -xJf
# .carry/gpu-bundle.tar.xz` (scripts/gpu-bundle.sh): everything issues 13 and 14 ask of it, in
# one command. NCCL_NVLS_ENABLE stays 0.
#   bash benches/device_dist.sh [check|train|bench|sockets|all]
#   check:   the bundle's tests (tests/nccl.rs's two-GPU one included), then benches/dist_check.py
#            (sharded bit-identical to one GPU over 50 steps of GPT-2 small; vote ranks identical
#            and equal to a reference) at W = every GPU
#   train:   bindings/python/tests/test_torch_dist.py (two ranks train: identical, loss falls),
#            then benches/dist_train.py (GPT-2 small, 300 steps: one GPU, then sharded and vote at
#            the two largest powers of two up to every GPU, W = 2 alone on two; curves in
#            $OUT/dist_train, or ./dist_train without $OUT)
#   bench:   benches/dist_bench.py over NVLink at W = 2 .. every GPU (powers of two)
#   sockets: the same with NCCL forced onto TCP sockets (a stand-in for nodes on Ethernet)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD/bindings/python LION_LIBRARY=$PWD/.gpu-bundle/liblion.so
export LION_NCCL_LIBRARY=${LION_NCCL_LIBRARY:-$(find / -name "libnccl.so.2*" -not -path "/proc/*" 2>/dev/null | head -1)}
gpus=$(nvidia-smi --list-gpus | wc -l)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1
echo "GPUs: $gpus; NCCL library: $LION_NCCL_LIBRARY"
worlds() { local w=2; while [ "$w" -le "$gpus" ]; do echo "$w"; w=$((w * 2)); done; }
what="${1:-all}"
if [ "$what" = check ] || [ "$what" = all ]; then
  bash .gpu-bundle/run-tests.sh | tail -3
  python3 benches/dist_check.py --world "$gpus" --steps 50
fi
if [ "$what" = train ] || [ "$what" = all ]; then
  python3 -m pytest -q bindings/python/tests/test_torch_dist.py 2>&1 | tail -3
  train_worlds=$(worlds | tail -2 | paste -sd,)
  timeout 540 python3 benches/dist_train.py --world "$train_worlds" --steps 300 --out "${OUT:-.}/dist_train" 2>&1 | grep -v -i warn
  echo "dist_train.py exit status: ${PIPESTATUS[0]}"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for w in $(worlds); do python3 benches/dist_bench.py --world "$w"; done
fi
if [ "$what" = sockets ] || [ "$what" = all ]; then
  for w in $(worlds); do
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 python3 benches/dist_bench.py --world "$w" --layouts gpt2 --steps 5 --warmup 2
  done
fi
