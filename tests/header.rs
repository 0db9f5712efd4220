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
