#!/usr/bin/env bash
# The whole test suite: formatting and lints, then the Rust tests (which also build and run
# the C and C++ tests against the built library), in debug and release, then the example.
# Ends with one line: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "== cargo fmt --check"; cargo fmt --check
echo "== cargo clippy"; cargo clippy --all-targets --quiet -- -D warnings
# The C tests link the shared library, which `cargo test` alone does not build.
echo "== debug build and tests"; cargo build --quiet
cargo test --quiet 2>&1 | tee -a "$log"
# The C tests again under valgrind: no invalid access, no definite leak (issue: sanitizers).
echo "== C tests under valgrind"
valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite \
  target/tmp/test_api | tail -1
echo "== release build and tests"; cargo build --release --quiet
cargo test --release --quiet 2>&1 | tee -a "$log"
echo "== the example trains"; bash scripts/example.sh | tail -1
passed=$(grep -oE '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -oE '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
