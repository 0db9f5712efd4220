# BinaryBuilder recipe for Liblion_jll, in Yggdrasil's layout (it would live at
# L/Liblion/build_tarballs.jl there). Not run here (no Julia); where Julia exists:
#   julia --project=@BinaryBuilder build_tarballs.jl --verbose --debug x86_64-linux-gnu
# builds one platform's tarball; Yggdrasil builds them all and registers the jll.
# LionOptim (bindings/julia/LionOptim) uses the jll when it is loaded: `using Liblion_jll`.
using BinaryBuilder, Pkg

name = "Liblion"
version = v"0.1.0"  # the crate's version (Cargo.toml); Liblion_jll gets this version

# PLACEHOLDER, fill in both before building: the repository's public URL, and the full commit
# hash of the release tag (git rev-parse v0.1.0^{commit}); Yggdrasil takes no tag names.
sources = [
    GitSource("https://github.com/PLACEHOLDER-OWNER/liblion.git",
              "0000000000000000000000000000000000000000"),
]

script = raw"""
cd ${WORKSPACE}/srcdir/liblion

# musl targets default to a static C runtime, with which rustc drops the cdylib (a warning,
# not an error); liblion is loaded into a musl Julia, so link musl dynamically.
if [[ "${target}" == *-musl* ]]; then
    export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=-crt-static"
fi
# The CUDA engine (cargo's default `cuda` feature) dlopens libcuda at run time, so a build
# with it runs on machines without a GPU; NVIDIA's driver exists for Linux only.
features=()
if [[ "${target}" != *-linux-* ]]; then
    features=(--no-default-features)
fi
# Only the cdylib (the crate also builds a staticlib and an rlib, not shipped here). build.rs
# gives it the SONAME liblion.so.1 on ELF targets.
cargo rustc --release --locked --lib --crate-type=cdylib --target="${rust_target}" "${features[@]}"

if [[ "${target}" == *-apple-* ]]; then
    install -Dvm755 "target/${rust_target}/release/liblion.${dlext}" "${libdir}/liblion.${dlext}"
else
    # ELF: the file under its SONAME, and the development link, as scripts/install.sh does.
    install -Dvm755 "target/${rust_target}/release/liblion.${dlext}" "${libdir}/liblion.${dlext}.1"
    ln -sf "liblion.${dlext}.1" "${libdir}/liblion.${dlext}"
fi
install -Dvm644 include/lion.h "${includedir}/lion.h"
install -Dvm644 bindings/cpp/lion.hpp "${includedir}/lion.hpp"
install_license LICENSE
"""

platforms = supported_platforms()
# liblion is Unix-only (std::os::unix, dlopen, pthread_atfork): no Windows.
filter!(p -> !Sys.iswindows(p), platforms)
# 64-bit only: liblion has been built and tested on x86_64 alone, 32-bit never.
filter!(p -> nbits(p) == 64, platforms)
# Linux on x86_64 and aarch64 only: the contract's host-life and arithmetic guarantees are
# built there alone (thread cancellation held off per call and the fork handler registered at
# load: Linux; the standard floating-point environment: x86_64 and aarch64). macOS, FreeBSD
# and powerpc64le would build, without them.
filter!(p -> Sys.islinux(p) && arch(p) in ("x86_64", "aarch64"), platforms)

products = [
    LibraryProduct(["liblion"], :liblion),
    FileProduct("include/lion.h", :lion_h),
]

# Nothing but the C runtime: CUDA is dlopen'ed by liblion itself when asked for.
dependencies = Dependency[]

build_tarballs(ARGS, name, version, sources, script, platforms, products, dependencies;
               compilers=[:c, :rust], julia_compat="1.6",
               # At least the crate's rust-version (1.89): the oldest shard BinaryBuilder has
               # past it. Raising rust-version above the newest shard makes this unbuildable.
               preferred_rust_version=v"1.94")
