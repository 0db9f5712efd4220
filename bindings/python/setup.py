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
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build import build
from setuptools.command.sdist import sdist
from setuptools_rust import Binding, RustExtension, build_rust

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:
    from wheel.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent


# An sdist carries the crate here (`sdist_with_crate`): what `cargo rustc --lib` needs.
SDIST_CRATE = "liblion-crate"
CRATE_FILES = ["Cargo.toml", "Cargo.lock", "build.rs", "cbindgen.toml", "LICENSE",
               "benches/cpu_step.rs",  # Cargo.toml names it ([[bench]]): cargo wants it to exist
               "tests/c/emu_cuda.h"]  # src/cuda/prelude.rs includes it
CRATE_DIRS = ["src", "include"]


def crate_manifest():
    """The crate's Cargo.toml, as an absolute path: in an unpacked sdist, its copy
    (SDIST_CRATE); in a checkout, the repository's root (../..), which pip >= 21.3 builds in
    place. LION_CRATE_DIR names it for builds from another copy."""
    default = HERE / SDIST_CRATE if (HERE / SDIST_CRATE).is_dir() else HERE.parents[1]
    crate = Path(os.environ.get("LION_CRATE_DIR") or default).resolve()
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


class sdist_with_crate(sdist):
    """An sdist that builds: the package's files, and the crate's (SDIST_CRATE)."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        root, into = Path(crate_manifest()).parent, Path(base_dir) / SDIST_CRATE
        for name in CRATE_FILES:
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, into / name)
        for name in CRATE_DIRS:
            shutil.copytree(root / name, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


class build_afresh(build):
    """Builds the package from an empty build/lib/lion_ffi: setuptools copies files into it
    and never removes any, so a module deleted from the source stayed in later wheels."""

    def run(self):
        shutil.rmtree(Path(self.build_lib) / "lion_ffi", ignore_errors=True)
        super().run()


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
    cmdclass={"build_rust": build_rust_into_package, "bdist_wheel": bdist_wheel_any_python,
              "sdist": sdist_with_crate, "build": build_afresh},
    zip_safe=False,
)
