"""The Julia package as far as it can be checked without Julia (none can be installed here):
every `ccall` of bindings/julia/LionOptim against the prototypes of include/lion.h (function name,
return type, argument types, argument count), the .jl files parsed by tree-sitter's Julia grammar,
and the package's Project.toml against its sources, its extension and the BinaryBuilder recipe
(bindings/julia/build_tarballs.jl). The structs and constants are test_layout.py's."""
import hashlib
import re
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HEADER = ROOT / "include" / "lion.h"
JULIA = ROOT / "bindings" / "julia"
PACKAGE = JULIA / "LionOptim"
SOURCE = PACKAGE / "src" / "LionOptim.jl"
RECIPE = JULIA / "build_tarballs.jl"


# --- include/lion.h's prototypes -------------------------------------------------------------

def header_code():
    """The header without comments and preprocessor lines."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def c_type(decl):
    """'const struct LionConfig *config' -> ('LionConfig', 1); the name, if any, dropped."""
    decl = re.sub(r"\b(const|struct|enum)\b", " ", decl)
    stars = decl.count("*")
    words = decl.replace("*", " ").split()
    assert words, f"cannot read the C declaration {decl!r}"
    if len(words) == 2:
        words = words[:1]  # a parameter's name
    assert len(words) == 1 or words == ["unsigned", "int"], f"cannot read the C declaration {decl!r}"
    return " ".join(words), stars


def parse_header():
    """{function: ((return base, stars), [(param base, stars), ...])} and {typedef: base}."""
    code = header_code()
    typedefs = dict((new, old) for old, new in re.findall(r"typedef (\w+) (\w+);", code))
    functions = {}
    for ret, name, params in re.findall(r"(?:^|(?<=[;{}]))\s*([^;{}()]*?)\b(lion_\w+)\s*\(([^()]*)\)\s*;", code):
        params = " ".join(params.split())
        args = [] if params == "void" else [c_type(p) for p in params.split(",")]
        functions[name] = (c_type(ret), args)
    assert len(functions) > 10, f"too few prototypes parsed from {HEADER}: {sorted(functions)}"
    return functions, typedefs


# The Julia types that pass each C scalar (C's enum is int-sized; its values fit either sign).
SCALARS = {
    "LionStatus": {"Cint", "Int32", "Cuint", "UInt32"},
    "uint32_t": {"UInt32", "Cuint"}, "int32_t": {"Int32", "Cint"}, "uint64_t": {"UInt64"}, "int64_t": {"Int64"},
    "size_t": {"Csize_t", "UInt"}, "float": {"Float32", "Cfloat"}, "double": {"Float64", "Cdouble"},
    "bool": {"Bool"}, "void": {"Cvoid", "Nothing"}, "char": {"UInt8", "Cchar", "Int8"},
    "LionOptimizer": {"Cvoid", "LionOptimizer"},  # opaque: only behind a pointer
}


def julia_types(base, stars, typedefs, returned=False):
    """Every Julia type spelling that passes (or, `returned`, receives) this C type in a ccall."""
    base = typedefs.get(base, base)
    if stars == 0:
        if base in SCALARS:
            return SCALARS[base]
        assert base.startswith("Lion"), f"no Julia mapping for the C type {base}"
        return {base}  # a struct by value: its mirror, whose layout test_layout.py checks
    if (base, stars) == ("char", 1):
        return {"Cstring", "Ptr{UInt8}", "Ptr{Cchar}"}
    pointee = {"Cvoid", "UInt8"} if (base, stars) == ("void", 1) else julia_types(base, stars - 1, typedefs)
    pointers = {f"Ptr{{{t}}}" for t in pointee}
    if not returned and "Cvoid" not in pointee:
        pointers |= {f"Ref{{{t}}}" for t in pointee}  # Ref: Julia passes a pointer to its value
    return pointers


# --- the Julia sources' ccalls ---------------------------------------------------------------

def split_top_level(text):
    """Splits at the commas outside brackets and strings."""
    parts, depth, start, quote = [], 0, 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote and text[i - 1] != "\\" else quote
        elif ch == '"':
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def ccalls(source):
    """[(line, [arguments])] of every `ccall(...)` in a Julia source."""
    code = re.sub(r"#[^\n]*", "", source)  # comments (no '#' sits inside this package's strings)
    found = []
    for m in re.finditer(r"\bccall\(", code):
        depth, i = 1, m.end()
        while depth:
            assert i < len(code), f"unclosed ccall at line {code.count(chr(10), 0, m.start()) + 1}"
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        found.append((code.count("\n", 0, m.start()) + 1, split_top_level(code[m.end():i - 1])))
    return found


def symbols_tuple(source):
    m = re.search(r"^const SYMBOLS = \((.*?)\)", source, re.M | re.S)
    assert m, "LionOptim.jl has no `const SYMBOLS = (...)`, the functions it looks up"
    return re.findall(r":(\w+)", m.group(1))


def ccall_problems(source, functions, typedefs):
    """What is wrong with a source's ccalls, one line each (empty when all match the header)."""
    problems, called = [], set()
    for line, args in ccalls(source):
        where = f"line {line}"
        names = re.findall(r":(lion_\w+)", args[0])
        if len(names) != 1:
            problems.append(f"{where}: cannot tell which lion_ function {args[0]!r} is")
            continue
        name = names[0]
        called.add(name)
        if name not in functions:
            problems.append(f"{where}: {name} is not declared in include/lion.h")
            continue
        (ret, ret_stars), params = functions[name]
        if len(args) < 3 or not (args[2].startswith("(") and args[2].endswith(")")):
            problems.append(f"{where}: {name}: no argument-type tuple")
            continue
        returned = args[1]
        if returned not in julia_types(ret, ret_stars, typedefs, returned=True):
            problems.append(f"{where}: {name} returns {'*' * ret_stars}{ret}, declared as {returned}")
        inner = args[2][1:-1].strip()
        types = [t for t in split_top_level(inner) if t] if inner else []
        if len(types) != len(params):
            problems.append(f"{where}: {name} takes {len(params)} arguments, the tuple has {len(types)}")
            continue
        for k, (jt, (base, stars)) in enumerate(zip(types, params)):
            ok = julia_types(base, stars, typedefs)
            if jt not in ok:
                problems.append(f"{where}: {name} argument {k + 1} is {base}{' ' + '*' * stars if stars else ''}, "
                                f"declared as {jt} (expected one of {sorted(ok)})")
        if len(args) - 3 != len(params):
            problems.append(f"{where}: {name} is passed {len(args) - 3} values for {len(params)} arguments")
    return problems, called


@pytest.fixture(scope="module")
def header():
    return parse_header()


def test_header_parse(header):
    functions, typedefs = header
    assert functions["lion_create"] == (("LionStatus", 0), [("LionConfig", 1), ("LionTensorDesc", 1),
                                                           ("size_t", 0), ("LionOptimizer", 2)])
    assert functions["lion_last_error"] == (("char", 1), [])
    assert typedefs["LionDType"] == "uint32_t"
    declared = set(re.findall(r"\b(lion_\w+)\s*\(", header_code()))
    assert set(functions) == declared, "a prototype the parser missed"


def jl_files():
    return sorted(JULIA.rglob("*.jl"))


def test_every_ccall_matches_the_header(header):
    functions, typedefs = header
    problems, called = [], set()
    for path in jl_files():
        found, names = ccall_problems(path.read_text(), functions, typedefs)
        problems += [f"{path.relative_to(ROOT)} {p}" for p in found]
        called |= names
    assert not problems, "ccalls that do not match include/lion.h:\n" + "\n".join(problems)
    assert len(called) >= 10, f"only {sorted(called)} found: did the ccall parser miss some?"
    # fn(name) looks names up in the table opened from SYMBOLS: each called one must be in it.
    symbols = symbols_tuple(SOURCE.read_text())
    assert set(symbols) <= set(functions), f"SYMBOLS names what lion.h lacks: {set(symbols) - set(functions)}"
    assert set(symbols) == called, (f"SYMBOLS and the ccalls differ: not looked up {called - set(symbols)}, "
                                    f"never called {set(symbols) - called}")


@pytest.mark.parametrize("mutation", [
    ("(Ref{LionConfig}, Ptr{LionTensorDesc}, Csize_t,", "(Ref{LionConfig}, Ptr{LionTensorDesc}, UInt32,"),
    ("ccall(fn(:lion_version), Cstring, ())", "ccall(fn(:lion_version), Float32, ())"),
    ("(Ptr{Cvoid}, Float32), h.ptr, Float32(lr))", "(Ptr{Cvoid}, Float64), h.ptr, Float32(lr))"),
    ("(Ptr{Cvoid}, Ref{UInt64}), h.ptr, out)", "(Ptr{Cvoid}, Ref{UInt32}), h.ptr, out)"),
    ("(Ptr{Cvoid}, Cstring), h.ptr, path), \"lion_state_save_file\"",
     "(Ptr{Cvoid}, Cstring, Cint), h.ptr, path, 0), \"lion_state_save_file\""),
    ("(Ptr{Cvoid},), h.ptr)", "(Ptr{Cvoid},), h.ptr, h.ptr)"),
    ("ccall(fn(:lion_version)", "ccall(fn(:lion_versions)"),
])
def test_the_check_catches_a_wrong_ccall(header, mutation):
    source = SOURCE.read_text()
    old, new = mutation
    assert old in source, f"the mutation's text is no longer in LionOptim.jl: {old!r}"
    problems, _ = ccall_problems(source.replace(old, new, 1), *header)
    assert problems, f"a wrong ccall went unnoticed: {new!r}"


# --- the grammar ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def julia_parser():
    tree_sitter = pytest.importorskip("tree_sitter")
    grammar = pytest.importorskip("tree_sitter_julia")
    return tree_sitter.Parser(tree_sitter.Language(grammar.language()))


def syntax_errors(parser, source):
    """Each ERROR or MISSING node as 'line:column what'."""
    errors, stack = [], [parser.parse(source.encode()).root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            line, col = node.start_point
            errors.append(f"{line + 1}:{col + 1} {'missing ' + node.type if node.is_missing else 'syntax error'}")
        stack.extend(node.children)
    return sorted(errors)


def test_julia_sources_parse(julia_parser):
    files = jl_files()
    assert len(files) >= 4, files
    bad = {str(f.relative_to(ROOT)): e for f in files if (e := syntax_errors(julia_parser, f.read_text()))}
    assert not bad, f"tree-sitter-julia finds syntax errors: {bad}"


@pytest.mark.parametrize("broken", ["function f(x)\n    x +\n", "struct S\n    a::Int\n", "f(x = (1, 2)\n",
                                    "if x\n  y = [1, 2\nend\n"])
def test_the_parser_catches_errors(julia_parser, broken):
    assert syntax_errors(julia_parser, broken), f"no syntax error found in {broken!r}"


# --- Project.toml, the extension and the recipe ---------------------------------------------

def bb_jll_uuid(name):
    """BinaryBuilder's uuid for NAME_jll (JLLTools.jll_uuid: a sha1 of a fixed namespace uuid's
    bytes and "NAME_jll_jll"). Gives Zlib_jll's 83775a58-1f1d-513f-b197-d71354ab007a."""
    namespace = uuid.UUID("cfb74b52-ec16-5bb7-a574-95d9e393895e").int.to_bytes(16, "little")
    value = int.from_bytes(hashlib.sha1(namespace + f"{name}_jll_jll".encode()).digest()[:16], "little")
    value = (value & 0xffffffffffff0fff3fffffffffffffff) | 0x00000000000050008000000000000000
    return str(uuid.UUID(int=value))


@pytest.fixture(scope="module")
def project():
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((PACKAGE / "Project.toml").read_text())


def imported(source):
    """Top-level package names of `using`/`import` lines."""
    names = set()
    for line in re.sub(r"#[^\n]*", "", source).splitlines():
        m = re.match(r"\s*(?:using|import)\s+(.*)", line)
        if m:
            for item in m.group(1).split(":")[0].split(","):
                names.add(item.strip().split(".")[0])
    return names - {"", "Base", "Core"}


def test_project_declares_what_the_sources_load(project):
    deps, weak, extras = set(project["deps"]), set(project.get("weakdeps", {})), set(project.get("extras", {}))
    src = imported(SOURCE.read_text())
    assert src <= deps, f"LionOptim.jl loads {src - deps}, not in [deps] (stdlibs such as Libdl need listing too)"
    tests = imported((PACKAGE / "test" / "runtests.jl").read_text())
    assert tests <= deps | extras | {project["name"]}, f"runtests.jl loads {tests - deps - extras}"
    assert set(project["targets"]["test"]) <= extras


def test_extension_is_wired(project):
    extensions = project.get("extensions", {})
    assert extensions, "no [extensions]: Liblion_jll would never be used"
    for ext, triggers in extensions.items():
        triggers = [triggers] if isinstance(triggers, str) else triggers
        assert set(triggers) <= set(project["weakdeps"]), f"{ext}'s triggers are not all [weakdeps]"
        path = PACKAGE / "ext" / f"{ext}.jl"
        assert path.is_file(), f"[extensions] names {ext}, but there is no {path.relative_to(ROOT)}"
        source = path.read_text()
        assert re.search(rf"^module {ext}\b", source, re.M), f"{path.name} does not define module {ext}"
        loads = imported(source)
        assert loads <= set(triggers) | {project["name"]} | set(project["deps"]), loads
        assert "use_library!" in source and re.search(r"^function use_library!\(", SOURCE.read_text(), re.M)


def test_jll_matches_the_recipe(project):
    recipe = RECIPE.read_text()
    name = re.search(r'^name = "(\w+)"', recipe, re.M).group(1)
    version = re.search(r'^version = v"([\d.]+)"', recipe, re.M).group(1)
    crate = re.search(r'^version = "([\d.]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    assert version == crate, f"build_tarballs.jl builds {version}, Cargo.toml says {crate}"
    jll = f"{name}_jll"
    assert project["weakdeps"].get(jll) == bb_jll_uuid(name), (
        f"[weakdeps] {jll} should have BinaryBuilder's uuid {bb_jll_uuid(name)}")
    major, minor = crate.split(".")[:2]
    assert project["compat"].get(jll) == (f"{major}.{minor}" if major == "0" else major), "[compat] for the jll"
    # The extension reads the product the recipe declares: LibraryProduct(["liblion"], :liblion).
    product = re.search(r"LibraryProduct\(\[\"(\w+)\"\], :(\w+)\)", recipe)
    assert product and product.group(1) == "liblion", "the recipe's LibraryProduct"
    ext = (PACKAGE / "ext" / "LionOptimLiblionJllExt.jl").read_text()
    assert f"{jll}.{product.group(2)}_path" in ext, f"the extension should use {jll}.{product.group(2)}_path"
    assert re.search(r"compilers\s*=\s*\[:c, :rust\]", recipe), "a Rust recipe needs compilers=[:c, :rust]"


def test_bb_uuid_rule():
    # Known registered jlls: the rule above is BinaryBuilder's.
    assert bb_jll_uuid("Zlib") == "83775a58-1f1d-513f-b197-d71354ab007a"
    assert bb_jll_uuid("OpenSSL") == "458c3c95-2e84-50aa-8efc-19380b2a3a95"
