"""The ABI's mirrors against include/lion.h as the C compiler lays it out: the ctypes structs and
constants of lion_ffi/_lib.py, and the Julia structs and constants of LionOptim.jl (no Julia here:
its layout is computed from the field types, as Julia lays out an immutable isbits struct, which is
C's). A mirror is found by its `MIRROR(abi-structs): include/lion.h NAME` tag; the header's fields
and constants by parsing it, and every offset, size and value by compiling a program against it."""
import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lion_ffi import _lib

ROOT = Path(__file__).resolve().parents[3]
HEADER = ROOT / "include" / "lion.h"
JULIA = ROOT / "bindings" / "julia" / "LionOptim" / "src" / "LionOptim.jl"
# Versions, not mirrored: the bindings ask the library (lion_version, lion_abi_version).
NOT_MIRRORED = re.compile(r"LION_VERSION_\w+|LION_ABI_VERSION")
TAG = r"^# MIRROR\(abi-structs\): include/lion\.h (\w+);[^\n]*\n(?:#[^\n]*\n)*"


def parse_header():
    """{struct: [(C type, field)]} and [constant names] from the header's text."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    structs = {}
    for name, body in re.findall(r"typedef struct (\w+) \{(.*?)\} \1;", text, re.S):
        decls = body.split(";")
        assert not decls[-1].strip(), f"{name}: text after the last field: {decls[-1]!r}"
        fields = []
        for decl in decls[:-1]:
            m = re.fullmatch(r"\s*(.+?[\s*])(\w+)\s*", decl)
            assert m and "[" not in decl and "(" not in decl, f"{name}: cannot parse the field {decl.strip()!r}"
            fields.append((m.group(1).strip(), m.group(2)))
        structs[name] = fields
    constants = [c for _, body in re.findall(r"typedef enum (\w+) \{(.*?)\} \1;", text, re.S)
                 for c in re.findall(r"\b(LION_\w+)\s*=", body)]
    constants += [c for c in re.findall(r"^#define (LION_\w+) -?\d+$", text, re.M) if not NOT_MIRRORED.fullmatch(c)]
    assert structs and constants, "nothing parsed from include/lion.h"
    return structs, constants


# A field's kind, so that a float mirrored as a uint32 (same size) is caught too:
# b(ool), f(loat), i(signed int), u(nsigned int), p(ointer).
KIND_C = "#define KIND(T) ((T)2 == (T)1 ? 'b' : (T)0.5 != (T)0 ? 'f' : (T)-1 < (T)0 ? 'i' : 'u')\n"


@pytest.fixture(scope="module")
def header(tmp_path_factory):
    """What the compiler says: {struct: (size, align, [(field, offset, size, kind)])}, {constant: value}."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        pytest.skip("no C compiler to read include/lion.h's layout with")
    structs, constants = parse_header()
    # Function-pointer typedefs (LionCollectiveFn) are pointers too.
    fn_types = set(re.findall(r"typedef [^;(]*\(\*(\w+)\)", HEADER.read_text()))
    lines = ["#include <stdio.h>", '#include "lion.h"', KIND_C, "int main(void) {"]
    for s, fields in structs.items():
        lines.append(f'printf("struct {s} %zu %zu\\n", sizeof(struct {s}), _Alignof(struct {s}));')
        for ctype, f in fields:
            kind = "'p'" if "*" in ctype or ctype in fn_types else f"KIND({ctype})"
            lines.append(f'printf("field {s} {f} %zu %zu %c\\n", offsetof(struct {s}, {f}), '
                         f"sizeof(((struct {s} *)0)->{f}), {kind});")
    lines += [f'printf("const {c} %lld\\n", (long long){c});' for c in constants]
    lines.append("return 0; }")
    d = tmp_path_factory.mktemp("layout")
    (d / "layout.c").write_text("\n".join(lines) + "\n")
    build = subprocess.run([cc, "-std=c11", "-I", str(HEADER.parent), "-o", str(d / "layout"), str(d / "layout.c")],
                           capture_output=True, text=True)
    assert build.returncode == 0, f"the layout program does not compile against include/lion.h:\n{build.stderr}"
    out = subprocess.run([str(d / "layout")], capture_output=True, text=True, check=True).stdout
    layouts, values = {}, {}
    for word, *rest in map(str.split, out.splitlines()):
        if word == "struct":
            layouts[rest[0]] = (int(rest[1]), int(rest[2]), [])
        elif word == "field":
            layouts[rest[0]][2].append((rest[1], int(rest[2]), int(rest[3]), rest[4]))
        else:
            values[rest[0]] = int(rest[1])
    return layouts, values


def natural_layout(fields):
    """Offsets and size of a C struct of (size, align) fields, as C lays it out."""
    offsets, end, align = [], 0, 1
    for size, a in fields:
        offsets.append(-(-end // a) * a)
        end, align = offsets[-1] + size, max(align, a)
    return offsets, -(-end // align) * align


def test_header_parse_is_complete(header):
    # Fields packed at natural alignment end exactly at sizeof: no field was missed (or invented).
    for name, (size, _, fields) in header[0].items():
        offsets, total = natural_layout([(fsize, fsize) for _, _, fsize, _ in fields])
        assert (offsets, total) == ([off for _, off, _, _ in fields], size), name


def ctypes_kind(t):
    if t is ctypes.c_bool:
        return "b"
    if t in (ctypes.c_float, ctypes.c_double):
        return "f"
    if t in (ctypes.c_void_p, ctypes.c_char_p) or issubclass(t, ctypes._Pointer):
        return "p"
    return "i" if t(-1).value < 0 else "u"


def test_python_structs_match_the_header(header):
    layouts = header[0]
    source = Path(_lib.__file__).read_text()
    tagged = dict(re.findall(TAG + r"class (\w+)\(ctypes\.Structure\)", source, re.M))
    defined = [n for n, v in vars(_lib).items() if isinstance(v, type) and issubclass(v, ctypes.Structure)]
    assert sorted(tagged.values()) == sorted(defined), "a ctypes.Structure in _lib.py without its MIRROR tag"
    assert sorted(tagged) == sorted(layouts), "the header's structs and _lib.py's tagged mirrors differ"
    for c_name, py_name in tagged.items():
        struct = getattr(_lib, py_name)
        size, align, fields = layouts[c_name]
        mirror = [(f, getattr(struct, f).offset, ctypes.sizeof(t), ctypes_kind(t)) for f, t in struct._fields_]
        assert mirror == fields, f"{py_name} drifted from {c_name} (field, offset, size, kind)"
        assert (ctypes.sizeof(struct), ctypes.alignment(struct)) == (size, align), f"{py_name} size/alignment"


def test_python_constants_match_the_header(header):
    values = header[1]
    for c, value in values.items():
        py = c.removeprefix("LION_").removeprefix("ERROR_")  # LION_ERROR_IO -> IO, LION_DTYPE_F32 -> DTYPE_F32
        assert getattr(_lib, py, None) == value, f"_lib.{py} should be {c} = {value}"
    status = sorted((v, c) for c, v in values.items() if c == "LION_OK" or c.startswith("LION_ERROR_"))
    assert _lib.STATUS_NAMES == [c for _, c in status] and [v for v, _ in status] == list(range(len(status)))


PTR = ctypes.sizeof(ctypes.c_void_p)
JULIA_TYPES = {  # (size, kind); a scalar's alignment is its size
    "Bool": (1, "b"), "Float32": (4, "f"), "Float64": (8, "f"), "Cfloat": (4, "f"), "Cdouble": (8, "f"),
    "Int8": (1, "i"), "Int16": (2, "i"), "Int32": (4, "i"), "Int64": (8, "i"), "Cint": (4, "i"),
    "UInt8": (1, "u"), "UInt16": (2, "u"), "UInt32": (4, "u"), "UInt64": (8, "u"), "Cuint": (4, "u"),
    "Csize_t": (PTR, "u"), "Cstring": (PTR, "p"),
}


def julia_type(t):
    if re.fullmatch(r"Ptr\{.+\}", t):
        return PTR, "p"
    assert t in JULIA_TYPES, f"LionOptim.jl: no C layout known for the Julia type {t}"
    return JULIA_TYPES[t]


def test_julia_structs_match_the_header(header):
    layouts = header[0]
    source = JULIA.read_text()
    blocks = re.findall(TAG + r"struct (\w+)\n(.*?)^end\b", source, re.M | re.S)
    assert blocks, "LionOptim.jl has no tagged mirror of a header struct"
    untagged = set(re.findall(r"^struct (\w+)$", source, re.M)) & set(layouts) - {b[1] for b in blocks}
    assert not untagged, f"LionOptim.jl mirrors {untagged} without a MIRROR tag"
    for c_name, jl_name, body in blocks:
        assert c_name in layouts, f"LionOptim.jl's {jl_name} names {c_name}, not a struct of include/lion.h"
        fields = []
        for line in body.splitlines():
            line = line.split("#")[0].strip()
            if line:
                m = re.fullmatch(r"(\w+)::(\S+)", line)
                assert m, f"LionOptim.jl {jl_name}: cannot parse the field line {line!r}"
                fields.append((m.group(1), *julia_type(m.group(2))))
        offsets, total = natural_layout([(size, size) for _, size, _ in fields])
        mirror = [(f, off, size, kind) for (f, size, kind), off in zip(fields, offsets)]
        size, _, expected = layouts[c_name]
        assert mirror == expected, f"LionOptim.jl {jl_name} drifted from {c_name} (field, offset, size, kind)"
        assert total == size, f"LionOptim.jl {jl_name} is {total} bytes, {c_name} {size}"


def test_julia_constants_match_the_header(header):
    values = header[1]
    found = re.findall(r"^const (LION_\w+) = (?:\w+\()?(-?\d+)\)?\s*$", JULIA.read_text(), re.M)
    assert found, "LionOptim.jl defines no LION_ constant"
    for name, value in found:
        assert values.get(name) == int(value), f"LionOptim.jl {name} = {value}, include/lion.h says {values.get(name)}"


def test_every_function_python_calls_with_arguments_has_its_prototype():
    """Each lion_ function of the header that takes arguments has ctypes argtypes of the
    header's count in _lib (without them ctypes converts by the Python value: a str went to
    lion_state_save_file as a wchar_t*, and liblion saw its first letter as the path)."""
    from test_julia_ccalls import parse_header as parse_prototypes

    functions, _ = parse_prototypes()
    problems = []
    for name, (_, params) in sorted(functions.items()):
        if not params or not hasattr(_lib.lib, name):
            continue  # nothing to convert, or a function this liblion lacks
        argtypes = getattr(_lib.lib, name).argtypes
        if argtypes is None:
            problems.append(f"{name}: no argtypes")
        elif len(argtypes) != len(params):
            problems.append(f"{name}: {len(argtypes)} argtypes, {len(params)} parameters in lion.h")
    assert not problems, "\n".join(problems)
