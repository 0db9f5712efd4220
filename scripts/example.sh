#!/usr/bin/env bash
# The main job: builds liblion (release) and trains a small MLP in C through it, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --example
cargo build --release --quiet
mkdir -p build
cc -O2 -std=c99 -Wall -Wextra -Werror examples/train_mlp.c -I include \
  -L target/release -llion -Wl,-rpath,"$PWD/target/release" -lm -o build/train_mlp
./build/train_mlp
