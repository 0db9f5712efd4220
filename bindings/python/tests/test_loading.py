"""LION_LIBRARY, when set, is the library loaded, or the import fails naming it: never a silent
fall-through to another liblion (the checkout's target/release is one)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def import_with(library):
    env = dict(os.environ, LION_LIBRARY=str(library), PYTHONPATH=str(PACKAGE_ROOT))
    return subprocess.run([sys.executable, "-c", "import lion_ffi; print(lion_ffi.version())"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_library_named_is_the_one_loaded():
    if not os.environ.get("LION_LIBRARY"):
        pytest.skip("LION_LIBRARY is not set")
    result = import_with(os.environ["LION_LIBRARY"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(".") == 2


def test_missing_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-liblion.so"
    result = import_with(missing)
    assert result.returncode != 0, "imported although LION_LIBRARY names a missing file"
    assert "OSError" in result.stderr and f"LION_LIBRARY={missing}" in result.stderr
    assert "no such file" in result.stderr


def test_garbage_file_is_an_error_naming_it_and_why(tmp_path):
    garbage = tmp_path / "liblion.so"
    garbage.write_bytes(b"this is not a shared library\n" * 10)
    result = import_with(garbage)
    assert result.returncode != 0, "imported although LION_LIBRARY names a garbage file"
    assert "OSError" in result.stderr and f"LION_LIBRARY={garbage}" in result.stderr
    assert "could not be loaded: " in result.stderr
    assert "ELF" in result.stderr or "too short" in result.stderr  # the loader's reason


def test_a_shared_library_that_is_not_liblion_is_an_error(tmp_path):
    import _ctypes  # a real shared object, without lion_ symbols
    other = getattr(_ctypes, "__file__", None)
    if not other:
        pytest.skip("_ctypes is built into this Python")
    result = import_with(other)
    assert result.returncode != 0
    assert "OSError" in result.stderr and f"LION_LIBRARY={other}" in result.stderr
    assert "lion_abi_version" in result.stderr


def test_a_liblion_of_another_abi_version_is_refused(tmp_path):
    """A library whose lion_abi_version() is not the one the bindings declare (their structs
    and calls could all differ) is refused at import, saying both versions."""
    import shutil
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler to build a stand-in library")
    source = tmp_path / "abi2.c"
    source.write_text("unsigned lion_abi_version(void) { return 2; }\n")
    other = tmp_path / "liblion.so"
    subprocess.run([cc, "-shared", "-fPIC", str(source), "-o", str(other)], check=True)
    result = import_with(other)
    assert result.returncode != 0, "imported a liblion of ABI 2"
    assert f"LION_LIBRARY={other}" in result.stderr and "ABI version is 2" in result.stderr, result.stderr
