//! Generates include/lion.h with cbindgen.
//!
//! The fresh header always goes to $OUT_DIR/lion.h; the committed include/lion.h is only
//! rewritten when LION_BLESS_HEADER=1 (or when it is missing), so that the test
//! `header_is_current` can catch a header that was not regenerated after an ABI change.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=LION_BLESS_HEADER");

    // The C tests compile with the `cc` crate, which needs the target triple.
    println!(
        "cargo:rustc-env=LION_BUILD_TARGET={}",
        env::var("TARGET").unwrap()
    );

    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let mut config =
        cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let version = |part: &str| env::var(format!("CARGO_PKG_VERSION_{part}")).unwrap();
    config.after_includes = Some(format!(
        "\n#define LION_VERSION_MAJOR {}\n#define LION_VERSION_MINOR {}\n#define LION_VERSION_PATCH {}\n#define LION_VERSION_STRING \"{}\"",
        version("MAJOR"),
        version("MINOR"),
        version("PATCH"),
        env::var("CARGO_PKG_VERSION").unwrap()
    ));
    let bindings = cbindgen::Builder::new()
        .with_crate(&root)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate lion.h");
    bindings.write_to_file(out.join("lion.h"));

    let committed = root.join("include").join("lion.h");
    if env::var_os("LION_BLESS_HEADER").is_some_and(|v| v == "1") || !committed.exists() {
        bindings.write_to_file(&committed);
    }
}
