#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian or Ubuntu machine (idempotent,
# quiet when everything is there already): a C and C++ compiler, valgrind, cmake, pkg-config,
# pip and venv for python3, Open MPI (mpicc and mpirun, for tests/mpi.rs), rustfmt and clippy.
#   bash scripts/setup.sh [--example | --dev]
# --example: only the C compiler (scripts/example.sh); --dev: rustfmt and clippy too.
# apt-get runs as root, through sudo when this user is not root.
set -euo pipefail
need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
if [ "${1:-}" != "--example" ]; then
  command -v c++ >/dev/null || need_apt+=(g++)
  command -v make >/dev/null || need_apt+=(make)
  command -v valgrind >/dev/null || need_apt+=(valgrind)
  command -v cmake >/dev/null || need_apt+=(cmake)
  command -v pkg-config >/dev/null || need_apt+=(pkg-config)
  # tests/mpi.rs builds examples/distributed_mpi.c with mpicc and runs it with mpirun.
  command -v mpicc >/dev/null && command -v mpirun >/dev/null || need_apt+=(openmpi-bin libopenmpi-dev)
  if command -v python3 >/dev/null; then
    # scripts/test.sh and test_wheel.sh make venvs (Debian's python3 needs python3-venv for
    # that: ensurepip); scripts/nvrtc.sh downloads NVIDIA's wheel with pip.
    python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
    python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
  else
    need_apt+=(python3 python3-venv python3-pip)
  fi
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  as_root=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
      echo "scripts/setup.sh: missing ${need_apt[*]}; install them as root (apt-get install)" >&2
      exit 1
    fi
    as_root=(sudo)
  fi
  "${as_root[@]}" apt-get update -qq && "${as_root[@]}" apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Cargo.toml's rust-version: an older rustc (a distribution's own) fails at the build with
# errors that do not say so.
want=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$(dirname "$0")/../Cargo.toml")
have=$(rustc --version 2>/dev/null | awk '{print $2}')
if [ -z "$have" ] || [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -1)" != "$want" ]; then
  echo "scripts/setup.sh: liblion needs Rust $want or newer (found: ${have:-no rustc});" \
    "install it with rustup: https://rustup.rs" >&2
  exit 1
fi
if [ "${1:-}" = "--dev" ]; then
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi
