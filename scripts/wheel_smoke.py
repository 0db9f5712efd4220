"""The installed lion_ffi as a user gets it, run from outside the checkout by scripts/test_wheel.sh:
    python wheel_smoke.py WHEEL [WHEEL_FROM_THE_SDIST]
checks the wheel's tag and contents (the package's modules as the source has them, no more),
the wheel built from the sdist, the bundled library's dynamic section, that `import lion_ffi`
loads the bundled file with no LION_LIBRARY, that a step moves an array, and that LION_LIBRARY
still overrides. Ends with "wheel: N passed, N failed, N skipped"."""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

results = {"passed": 0, "failed": 0, "skipped": 0}


def check(name, fn):
    try:
        note = fn()
    except Skip as s:
        results["skipped"] += 1
        print(f"SKIP {name}: {s}")
    except Exception as e:  # every failure is reported, and the rest still run
        results["failed"] += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}")
    else:
        results["passed"] += 1
        print(f"ok   {name}" + (f" ({note})" if note else ""))


class Skip(Exception):
    pass


wheel = Path(sys.argv[1])
from_sdist = Path(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] else None
SOURCE = Path(__file__).resolve().parents[1] / "bindings" / "python" / "lion_ffi"


def wheel_tag():
    # name-version-python-abi-platform.whl: any Python 3, no Python ABI (ctypes), this platform.
    python, abi, plat = wheel.stem.split("-")[-3:]
    assert (python, abi) == ("py3", "none"), f"{wheel.name}: expected py3-none-PLATFORM"
    assert plat != "any" and re.match(r"(many)?linux_?.*_(x86_64|aarch64|i686|ppc64le|s390x|armv7l)$", plat) \
        or plat.startswith("macosx"), f"{wheel.name}: not a platform wheel"
    return wheel.name


def contents_of(built):
    names = set(zipfile.ZipFile(built).namelist())
    for needed in ["lion_ffi/__init__.py", "lion_ffi/_lib.py", "lion_ffi/liblion.so", "lion_ffi/py.typed"]:
        assert needed in names, f"{needed} is not in {built.name}: {sorted(names)}"
    # The modules as the source has them: none that was deleted since an earlier build.
    modules = {n for n in names if n.startswith("lion_ffi/") and n.endswith(".py")}
    source = {f"lion_ffi/{p.name}" for p in SOURCE.glob("*.py")}
    assert modules == source, f"{built.name}: modules {sorted(modules ^ source)} differ from {SOURCE}'s"


def wheel_contents():
    contents_of(wheel)


def sdist_builds():
    assert from_sdist is not None and from_sdist.is_file(), \
        "no wheel was built from the sdist (python -m build --sdist, then pip wheel of it)"
    contents_of(from_sdist)
    return from_sdist.name


def dynamic_section():
    import lion_ffi
    so = Path(lion_ffi.__file__).parent / "liblion.so"
    if not shutil.which("readelf"):
        raise Skip("no readelf")
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    entries = re.findall(r"\((\w+)\)\s+[^\[]*\[([^\]]*)\]", out)
    needed = [v for k, v in entries if k == "NEEDED"]
    # glibc's libraries and libgcc_s (Rust's unwinder): on every glibc system, and allowed by
    # manylinux. CUDA is dlopen'ed by liblion itself, never linked.
    system = ("libc.so", "libm.so", "libdl.so", "libpthread.so", "librt.so", "libutil.so", "libgcc_s.so", "ld-linux")
    assert needed and all(n.startswith(system) for n in needed), f"the bundled library needs {needed}"
    assert not [v for k, v in entries if k in ("RPATH", "RUNPATH")], f"it carries a search path: {entries}"
    assert ("SONAME", "liblion.so.1") in entries, f"SONAME: {entries}"
    return "NEEDED " + " ".join(needed)


def bundled_library_loaded():
    assert "LION_LIBRARY" not in os.environ
    import lion_ffi
    from lion_ffi import _lib
    bundled = Path(lion_ffi.__file__).parent / "liblion.so"
    assert bundled.is_file(), f"no {bundled}"
    assert Path(_lib.library_path).samefile(bundled), f"loaded {_lib.library_path}, not {bundled}"
    assert "site-packages" in str(bundled), bundled
    assert _lib.lib.lion_abi_version() == 1
    return f"lion {lion_ffi.version()} from {bundled}"


def a_step_moves_the_array():
    import numpy as np
    import lion_ffi
    w = np.ones(8, dtype=np.float32)
    g = np.arange(-4, 4, dtype=np.float32)
    opt = lion_ffi.Lion([w], lr=0.5)
    opt.step([g])
    # First step from zero momentum: c = (1 - b1) g, so w moves by -lr * sign(g).
    expected = (np.float32(1) - np.float32(0.5) * np.sign(g)).astype(np.float32)
    assert np.array_equal(w, expected), f"{w} != {expected}"


def lion_library_still_overrides():
    missing = Path.cwd() / "no-such-liblion.so"
    env = dict(os.environ, LION_LIBRARY=str(missing))
    r = subprocess.run([sys.executable, "-c", "import lion_ffi"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and f"LION_LIBRARY={missing}" in r.stderr, r.stderr[-500:]


def manylinux_policy():
    # auditwheel reads the glibc symbol versions and the NEEDED list: which manylinux the
    # wheel could be (auditwheel repair would retag it; not needed to install it here).
    tool = Path(sys.executable).parent / "auditwheel"
    if not tool.exists():
        raise Skip("auditwheel is not installed")
    out = subprocess.run([str(tool), "show", str(wheel)], capture_output=True, text=True)
    text = " ".join((out.stdout + out.stderr).split())
    m = re.search(r"consistent with the following platform tag: \"?(manylinux_\w+)", text)
    assert m, f"auditwheel finds no manylinux policy for it: {text[-600:]}"
    return m.group(1)


check("the wheel is tagged py3-none-<platform>", wheel_tag)
check("the wheel holds the package as its source is, liblion.so and py.typed", wheel_contents)
check("the sdist builds a wheel alike", sdist_builds)
check("the bundled liblion.so needs only the C runtime", dynamic_section)
check("import lion_ffi loads the bundled liblion.so", bundled_library_loaded)
check("a step moves a numpy array", a_step_moves_the_array)
check("LION_LIBRARY still overrides (a missing file fails)", lion_library_still_overrides)
check("auditwheel: a manylinux policy fits", manylinux_policy)
print(f"wheel: {results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped")
sys.exit(1 if results["failed"] else 0)
