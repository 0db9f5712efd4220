#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh machine (idempotent, quiet when
# everything is there already): a C and C++ compiler, valgrind, cmake, pkg-config, python3-venv,
# Open MPI (mpicc and mpirun, for tests/mpi.rs), rustfmt and clippy.
set -euo pipefail
need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
command -v c++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || need_apt+=(make)
command -v valgrind >/dev/null || need_apt+=(valgrind)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# tests/mpi.rs builds examples/distributed_mpi.c with mpicc and runs it with mpirun.
command -v mpicc >/dev/null && command -v mpirun >/dev/null || need_apt+=(openmpi-bin libopenmpi-dev)
# scripts/test_wheel.sh makes a venv; Debian's python3 needs python3-venv for that (ensurepip).
command -v python3 >/dev/null && ! python3 -c 'import ensurepip' 2>/dev/null && need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ "${1:-}" = "--dev" ]; then
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi
