"""Builds liblion, the Rust crate at the repository's root, into the lion_ffi package.

`pip install ./bindings/python` (or `pip wheel`) runs `cargo rustc --release` through
setuptools-rust and puts the library in the package as lion_ffi/liblion.so, where _lib.py looks
first. Metadata is in pyproject.toml; only the Rust part is here.

Why setuptools-rust rather than maturin: lion_ffi is plain Python that loads a C-ABI cdylib with
ctypes. setuptools-rust's Binding.NoBinding builds the crate's cdylib as it is and copies it into
an ordinary setuptools package. maturin builds a Python extension module (pyo3), a cffi module
generated from a header, or an executable, none of which is a library for ctypes to load.
"""
import os
from pathlib import Path

from setuptools import setup
from setuptools_rust import Binding, RustExtension, build_rust

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:
    from wheel.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent


def crate_manifest():
    """The crate's Cargo.toml, as an absolute path: the crate is outside this folder (../..),
    which pip >= 21.3 builds in place. LION_CRATE_DIR names it for builds from a copy."""
    crate = Path(os.environ.get("LION_CRATE_DIR") or HERE.parents[1]).resolve()
    manifest = crate / "Cargo.toml"
    if not (manifest.is_file() and (crate / "include" / "lion.h").is_file()):
        raise SystemExit(
            f"lion_ffi builds liblion from the repository, but {crate} is not its root (no Cargo.toml "
            "and include/lion.h there). Build from a checkout (pip >= 21.3: pip install ./bindings/python), "
            "or set LION_CRATE_DIR to the repository's root.")
    return str(manifest)


class build_rust_into_package(build_rust):
    def get_dylib_ext_path(self, ext, target_fname):
        # The library keeps its own name: it is not a Python extension module (no PyInit_, no
        # Python ABI), and _lib.py loads lion_ffi/liblion.so by that name.
        path = super().get_dylib_ext_path(ext, target_fname)
        return os.path.join(os.path.dirname(path), "liblion.so")


class bdist_wheel_any_python(bdist_wheel):
    def get_tag(self):
        # ctypes needs no Python ABI, so one wheel per platform serves every Python 3; the
        # platform part stays (linux_x86_64...): the wheel holds machine code.
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    rust_extensions=[
        RustExtension("lion_ffi.liblion", path=crate_manifest(), binding=Binding.NoBinding,
                      debug=False, py_limited_api=False),  # release even for `pip install -e`
    ],
    cmdclass={"build_rust": build_rust_into_package, "bdist_wheel": bdist_wheel_any_python},
    zip_safe=False,
)
