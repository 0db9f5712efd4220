//! The committed header: current, consistent with Cargo.toml, and standalone as C and C++.

mod native;

use native::*;

#[test]
fn header_is_current() {
    let fresh = include_str!(concat!(env!("OUT_DIR"), "/lion.h"));
    let committed = std::fs::read_to_string(include_dir().join("lion.h")).unwrap();
    assert!(
        committed == fresh,
        "include/lion.h differs from what cbindgen generates now: run `LION_BLESS_HEADER=1 cargo build` and commit it"
    );
}

#[test]
fn version_macros_match_the_crate() {
    let header = std::fs::read_to_string(include_dir().join("lion.h")).unwrap();
    for (part, value) in [
        ("MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("PATCH", env!("CARGO_PKG_VERSION_PATCH")),
    ] {
        assert!(
            header.contains(&format!("#define LION_VERSION_{part} {value}\n")),
            "LION_VERSION_{part}"
        );
    }
    let version = unsafe { std::ffi::CStr::from_ptr(lion::lion_version()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    assert_eq!(lion::lion_abi_version(), 1);
}

/// Everything the header declares at its top level is liblion's: functions `lion_`, macros
/// `LION_`, types `Lion`. (cbindgen also writes the `extern "C"` blocks of the crate's own
/// imports, such as a libc function it declares for itself, which then clashed with the
/// system's declaration in a host's build: cbindgen.toml excludes them.)
#[test]
fn header_declares_only_liblions_names() {
    let header = std::fs::read_to_string(include_dir().join("lion.h")).unwrap();
    for (i, line) in header.lines().enumerate() {
        let at = || format!("include/lion.h:{}: {line}", i + 1);
        if let Some(name) = line.strip_prefix("#define ") {
            let name = name.split_whitespace().next().unwrap_or("");
            assert!(name.starts_with("LION_"), "a macro not liblion's: {}", at());
        } else if line.starts_with("typedef")
            || line.starts_with("struct ")
            || line.starts_with("enum ")
        {
            assert!(line.contains("Lion"), "a type not liblion's: {}", at());
        } else if !line.starts_with(char::is_whitespace) && !line.starts_with("//") {
            if let Some(open) = line.find('(') {
                let name = line[..open].split_whitespace().last().unwrap_or("");
                let name = name.trim_start_matches('*');
                assert!(
                    name.starts_with("lion_"),
                    "a function not liblion's: {}",
                    at()
                );
            }
        }
    }
}

#[test]
fn header_compiles_standalone() {
    let header = include_dir().join("lion.h");
    for (cpp, std) in [
        (false, "c99"),
        (false, "c11"),
        (true, "c++11"),
        (true, "c++17"),
    ] {
        let mut cmd = compiler(cpp, std);
        cmd.args(["-fsyntax-only", "-x", if cpp { "c++" } else { "c" }])
            .arg(&header);
        run_ok(&mut cmd, &format!("lion.h as {std}"));
    }
    // The C++ wrapper, alone, as C++17 and C++20.
    let wrapper = repo().join("bindings").join("cpp").join("lion.hpp");
    for std in ["c++17", "c++20"] {
        let mut cmd = compiler(true, std);
        cmd.args(["-fsyntax-only", "-x", "c++"]).arg(&wrapper);
        run_ok(&mut cmd, &format!("lion.hpp as {std}"));
    }
}

/// The contract (docs/ABI.md) names every function lion.h declares, with a call's
/// parenthesis, and every constant with its value; and it names no ABI constant that lion.h
/// lacks. (Both are read at compile time: nothing to carry to another machine.)
#[test]
fn abi_document_covers_the_header() {
    let header = include_str!("../include/lion.h");
    let doc = include_str!("../docs/ABI.md");
    let mut missing = Vec::new();
    // Functions: each declaration's name, as in `enum LionStatus lion_step(`.
    for line in header
        .lines()
        .filter(|l| !l.trim_start().starts_with("//") && l.contains('('))
    {
        let Some(name) = identifiers(line).find(|w| w.starts_with("lion_")) else {
            continue;
        };
        if line.contains(&format!("{name}(")) && !doc.contains(&format!("{name}(")) {
            missing.push(format!("function {name}"));
        }
    }
    // Constants with values: `#define LION_X V` and the status enum's `LION_X = V,`. The
    // version macros are the crate's (version_macros_match_the_crate).
    let constants = header.lines().filter_map(|line| {
        let line = line.trim().trim_end_matches(',');
        let (name, value) = match line.strip_prefix("#define ") {
            Some(rest) => rest.split_once(' ')?,
            None => line.split_once(" = ")?,
        };
        let versioned = name.starts_with("LION_VERSION_");
        (name.starts_with("LION_") && !versioned).then(|| (name, value.trim_matches('"')))
    });
    // `NAME = V`, a table's `| NAME | V |`, `NAME (V)` or `V, as NAME`, backquoted or not.
    let plain = doc.replace('`', "");
    for (name, value) in constants {
        let forms = [
            format!("{name} = {value}"),
            format!("{name} | {value} |"),
            format!("{name} ({value})"),
            format!("{value}, as {name}"),
        ];
        if !forms.iter().any(|f| plain.contains(f.as_str())) {
            missing.push(format!("constant {name} = {value}"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/ABI.md lacks: {}",
        missing.join(", ")
    );
    // The other way: no constant of the ABI's families that the header does not define.
    let families = [
        "LION_OK",
        "LION_ERROR_",
        "LION_DEVICE_",
        "LION_DTYPE_",
        "LION_DECAY_",
        "LION_DIST_",
        "LION_VOTE_",
        "LION_COMM_",
    ];
    let unknown: Vec<&str> = identifiers(doc)
        .filter(|w| families.iter().any(|f| w.starts_with(f)))
        .filter(|w| !identifiers(header).any(|h| h == *w))
        .collect();
    assert!(
        unknown.is_empty(),
        "docs/ABI.md names constants lion.h does not define: {unknown:?}"
    );
}

/// The C identifiers of `text`, in order.
fn identifiers(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
}
