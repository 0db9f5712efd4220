//! The shared library as the system's loader sees it: it exports exactly the functions that
//! include/lion.h declares (no more, no fewer), carries the SONAME liblion.so.<ABI version>,
//! needs nothing beyond the C runtime, and the build folder has the liblion.so.1 link that
//! programs linked against it look for.

mod native;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use native::*;

/// A binutils tool's output (binutils comes with gcc, which scripts/setup.sh installs).
fn tool(name: &str, args: &[&str], file: &Path) -> String {
    let out = Command::new(name)
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("{name} (binutils) could not run: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn header() -> String {
    std::fs::read_to_string(include_dir().join("lion.h")).unwrap()
}

/// The functions the header declares: every `lion_name(` outside comments is a prototype.
fn declared_functions() -> BTreeSet<String> {
    let text = header();
    let mut code = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("/*") {
        code.push_str(&rest[..start]);
        rest = &rest[start..][rest[start..].find("*/").expect("unclosed comment") + 2..];
    }
    code.push_str(rest);
    let code: String = code
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices("lion_") {
        let ident: String = code[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let before = code[..at].chars().next_back();
        let is_word_start = !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if is_word_start && code[at + ident.len()..].trim_start().starts_with('(') {
            names.insert(ident);
        }
    }
    assert!(
        names.len() > 10,
        "too few prototypes parsed from lion.h: {names:?}"
    );
    names
}

fn abi_major() -> String {
    header()
        .lines()
        .find_map(|l| l.strip_prefix("#define LION_ABI_VERSION "))
        .expect("LION_ABI_VERSION in include/lion.h")
        .trim()
        .to_string()
}

/// `readelf -d` entries of one kind (NEEDED, SONAME, RPATH, RUNPATH).
fn dynamic(kind: &str) -> Vec<String> {
    tool("readelf", &["-d"], &lib_dir().join("liblion.so"))
        .lines()
        .filter(|l| l.contains(&format!("({kind})")))
        .filter_map(|l| Some(l.split_once('[')?.1.trim_end_matches(']').to_string()))
        .collect()
}

#[test]
fn exports_exactly_the_headers_functions() {
    let lib = lib_dir().join("liblion.so");
    let mut functions = BTreeSet::new();
    let mut other = Vec::new();
    // "ADDRESS TYPE NAME"; with --defined-only every line is something the library provides.
    for line in tool("nm", &["-D", "--defined-only"], &lib).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "T", name] => {
                functions.insert(name.to_string());
            }
            [_, kind, name] => other.push(format!("{kind} {name}")),
            _ => other.push(line.to_string()),
        }
    }
    let declared = declared_functions();
    let extra: Vec<_> = functions.difference(&declared).collect();
    let missing: Vec<_> = declared.difference(&functions).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{} exports functions that include/lion.h does not declare: {extra:?}; \
         declared but not exported: {missing:?}",
        lib.display()
    );
    // Rust exports no data; a symbol version node (type A) would be the only harmless kind.
    assert!(
        other.iter().all(|s| s.starts_with("A ")),
        "{} exports symbols that are not the ABI's functions: {other:?}",
        lib.display()
    );
}

#[test]
fn soname_is_the_abi_major_version() {
    assert_eq!(dynamic("SONAME"), [format!("liblion.so.{}", abi_major())]);
}

#[test]
fn needs_only_the_c_runtime() {
    // glibc's libraries and libgcc_s (Rust's unwinder), present on every glibc system and
    // allowed by the manylinux policies; CUDA's libraries are dlopen'ed, never linked.
    let allowed = |n: &str| {
        [
            "libc.so",
            "libm.so",
            "libdl.so",
            "libpthread.so",
            "librt.so",
            "libutil.so",
        ]
        .iter()
        .chain(&["libgcc_s.so", "ld-linux"])
        .any(|p| n.starts_with(p))
    };
    let needed = dynamic("NEEDED");
    assert!(!needed.is_empty(), "readelf found no NEEDED entry at all");
    let odd: Vec<_> = needed.iter().filter(|n| !allowed(n)).collect();
    assert!(odd.is_empty(), "liblion.so needs {odd:?} (all: {needed:?})");
    let paths = [dynamic("RPATH"), dynamic("RUNPATH")].concat();
    assert!(
        paths.is_empty(),
        "liblion.so carries a search path: {paths:?}"
    );
}

#[test]
fn the_build_folder_has_the_soname_link() {
    // Programs linked against target/<profile>/liblion.so look for liblion.so.1 there.
    let dir = lib_dir();
    let link = dir.join(format!("liblion.so.{}", abi_major()));
    let same = std::fs::canonicalize(&link)
        .unwrap_or_else(|e| panic!("{} does not resolve: {e}", link.display()));
    assert_eq!(same, std::fs::canonicalize(dir.join("liblion.so")).unwrap());
}

#[test]
fn readme_abi_in_brief_lists_every_function() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split_once("## The ABI in brief")
        .expect("README.md has no section \"The ABI in brief\"")
        .1;
    let block = section
        .split_once("```c\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("no C block in \"The ABI in brief\"")
        .0;
    let listed: BTreeSet<String> = block
        .match_indices("lion_")
        .map(|(at, _)| &block[at..])
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest[name.len()..].starts_with('(').then_some(name)
        })
        .collect();
    let declared = declared_functions();
    assert_eq!(
        listed, declared,
        "README's \"The ABI in brief\" and include/lion.h list different functions"
    );
}
