#!/usr/bin/env bash
# Installs liblion under a prefix, for C and C++ builds:
#   PREFIX/include/lion.h, lion.hpp
#   PREFIX/lib/liblion.so.1.MINOR.PATCH        the library (SONAME liblion.so.1)
#   PREFIX/lib/liblion.so.1 -> liblion.so.1.MINOR.PATCH   what programs load (NEEDED liblion.so.1)
#   PREFIX/lib/liblion.so -> liblion.so.1        what -llion finds when linking
#   PREFIX/lib/liblion.a
#   PREFIX/lib/pkgconfig/lion.pc                 (pkg-config --cflags --libs lion)
#   PREFIX/lib/cmake/lion/lionConfig.cmake       (find_package(lion CONFIG) -> lion::lion, lion::lion_static)
#
# The file name's rule: liblion.so.<ABI version>.<crate minor>.<crate patch>, e.g. crate 0.1.0
# with ABI 1 -> liblion.so.1.1.0. The first number is the SONAME's, the ABI's major version
# (LION_ABI_VERSION in include/lion.h), which changes only when the ABI breaks; the rest tell
# installed builds apart. An older liblion.so.1.* in the prefix is removed (ldconfig would
# otherwise pick whichever name sorts highest).
#
#   bash scripts/install.sh [PREFIX]        (default /usr/local; builds the release library first)
# LION_LIB_DIR=dir installs the libraries found there instead of building.
set -euo pipefail
# A relative PREFIX or LION_LIB_DIR is the caller's, resolved before leaving its folder.
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
prefix=$(absolute "${1:-/usr/local}")
[ -n "${LION_LIB_DIR:-}" ] && LION_LIB_DIR=$(absolute "$LION_LIB_DIR")
cd "$(dirname "$0")/.."
if [ -z "${LION_LIB_DIR:-}" ]; then
  cargo build --release --quiet
  # Where cargo put it: target/, or CARGO_TARGET_DIR (or a config's target-dir).
  target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  [ -n "$target" ] || { echo "install.sh: cargo metadata named no target directory" >&2; exit 1; }
  LION_LIB_DIR=$target/release
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
abi=$(sed -n 's/^#define LION_ABI_VERSION \([0-9][0-9]*\)$/\1/p' include/lion.h)
[ -n "$abi" ] || { echo "install.sh: no LION_ABI_VERSION in include/lion.h" >&2; exit 1; }
soname="liblion.so.$abi"
real="$soname.${version#*.}"   # 0.1.0 -> liblion.so.1.1.0
# A library built before the SONAME was set would install as a file no program can find.
if command -v readelf >/dev/null; then
  got=$(readelf -d "$LION_LIB_DIR/liblion.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
  if [ "$got" != "$soname" ]; then
    echo "install.sh: $LION_LIB_DIR/liblion.so has the SONAME '${got:-(none)}', not $soname: rebuild it (cargo build --release)" >&2
    exit 1
  fi
fi
install -d "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/lion"
install -m 644 include/lion.h bindings/cpp/lion.hpp "$prefix/include/"
rm -f "$prefix/lib/$soname".* "$prefix/lib/liblion.so"
install -m 755 "$LION_LIB_DIR/liblion.so" "$prefix/lib/$real"
ln -sfn "$real" "$prefix/lib/$soname"
ln -sfn "$soname" "$prefix/lib/liblion.so"
# The static library where this build has one; an older one is not left beside the new .so.
rm -f "$prefix/lib/liblion.a"
[ -f "$LION_LIB_DIR/liblion.a" ] && install -m 644 "$LION_LIB_DIR/liblion.a" "$prefix/lib/"
sed -e "s|@VERSION@|$version|g" packaging/lion.pc.in > "$prefix/lib/pkgconfig/lion.pc"
install -m 644 packaging/lionConfig.cmake "$prefix/lib/cmake/lion/"
sed -e "s|@VERSION@|$version|g" packaging/lionConfigVersion.cmake.in > "$prefix/lib/cmake/lion/lionConfigVersion.cmake"
echo "installed liblion $version ($real, SONAME $soname) under $prefix"
