#!/usr/bin/env bash
# Installs liblion under a prefix, for C and C++ builds:
#   PREFIX/include/lion.h, lion.hpp
#   PREFIX/lib/liblion.so, liblion.a
#   PREFIX/lib/pkgconfig/lion.pc                 (pkg-config --cflags --libs lion)
#   PREFIX/lib/cmake/lion/lionConfig.cmake       (find_package(lion CONFIG) -> lion::lion, lion::lion_static)
#
#   bash scripts/install.sh [PREFIX]        (default /usr/local; builds the release library first)
# LION_LIB_DIR=dir installs the libraries found there instead of building.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-/usr/local}"
if [ -z "${LION_LIB_DIR:-}" ]; then
  cargo build --release --quiet
  LION_LIB_DIR=target/release
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
install -d "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/lion"
install -m 644 include/lion.h bindings/cpp/lion.hpp "$prefix/include/"
install -m 755 "$LION_LIB_DIR/liblion.so" "$prefix/lib/"
[ -f "$LION_LIB_DIR/liblion.a" ] && install -m 644 "$LION_LIB_DIR/liblion.a" "$prefix/lib/"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" packaging/lion.pc.in > "$prefix/lib/pkgconfig/lion.pc"
install -m 644 packaging/lionConfig.cmake "$prefix/lib/cmake/lion/"
sed -e "s|@VERSION@|$version|g" packaging/lionConfigVersion.cmake.in > "$prefix/lib/cmake/lion/lionConfigVersion.cmake"
echo "installed liblion $version under $prefix"
