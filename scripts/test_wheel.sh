#!/usr/bin/env bash
# The Python package as a user installs it: in a fresh venv, `pip wheel ./bindings/python`
# (it compiles liblion in release through setuptools-rust, into the repository's target/ or
# $CARGO_TARGET_DIR, so a fresh release build is reused: only the lion crate is compiled again,
# as a cdylib alone) and `pip install` of that wheel; the sdist (`python -m build --sdist`) and
# a wheel built from it; then scripts/wheel_smoke.py from a folder outside the checkout, with
# no LION_LIBRARY and no PYTHONPATH.
# Ends with "wheel: N passed, N failed, N skipped" (counted by scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! python3 -m venv "$tmp/venv" >/dev/null 2>&1; then
  echo "wheel: 0 passed, 0 failed, 1 skipped (python3 -m venv does not work: install python3-venv)"
  exit 0
fi
py="$tmp/venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "as the 'root' user" || true; }
fail() { echo "wheel: 0 passed, 1 failed, 0 skipped ($1)"; exit 1; }

start=$SECONDS
pip wheel --no-deps -w "$tmp/dist" ./bindings/python
wheel=$(ls "$tmp"/dist/lion_ffi-*.whl 2>/dev/null | head -1 || true)
[ -n "$wheel" ] || fail "pip wheel ./bindings/python built no wheel"
echo "pip wheel: $(basename "$wheel") in $((SECONDS - start)) s"
start=$SECONDS
pip install "$wheel"  # the wheel just built, as a user installs a downloaded one
"$py" -c "import importlib.metadata as m; m.version('lion-ffi')" 2>/dev/null \
  || fail "pip install $(basename "$wheel") did not install lion-ffi"
echo "pip install: $((SECONDS - start)) s"
# The sdist, as `python -m build` makes it, and a wheel built from it alone (it carries the
# crate): liblion's dependencies come from the repository's target directory, already built.
start=$SECONDS
pip install build
sdist_wheel=""
if "$py" -m build --sdist --outdir "$tmp/sdist" ./bindings/python >"$tmp/sdist.log" 2>&1; then
  sdist=$(ls "$tmp"/sdist/*.tar.gz | head -1 || true)
  target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  CARGO_TARGET_DIR=${target:-$repo/target} pip wheel --no-deps -w "$tmp/sdist-dist" "$sdist"
  sdist_wheel=$(ls "$tmp"/sdist-dist/lion_ffi-*.whl 2>/dev/null | head -1 || true)
else
  tail -20 "$tmp/sdist.log"
fi
echo "sdist and its wheel: $((SECONDS - start)) s"
pip install auditwheel  # optional: the smoke test skips its check without it
mkdir "$tmp/elsewhere"
cd "$tmp/elsewhere"
env -u LION_LIBRARY -u PYTHONPATH "$py" "$repo/scripts/wheel_smoke.py" "$wheel" "$sdist_wheel"
