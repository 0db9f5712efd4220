//! Generates include/lion.h with cbindgen.
//!
//! The fresh header always goes to $OUT_DIR/lion.h; the committed include/lion.h is only
//! rewritten when LION_BLESS_HEADER=1 (or when it is missing), so that the test
//! `header_is_current` can catch a header that was not regenerated after an ABI change.

use std::env;
use std::path::{Path, PathBuf};

/// The ABI's major version (LION_ABI_VERSION), the SONAME's number: liblion.so.1.
/// tests/symbols.rs checks that the built library's SONAME matches the header's.
const ABI_MAJOR: u32 = 1;

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
    soname(&out);
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

/// Gives the cdylib the SONAME liblion.so.<ABI major> on ELF targets, so that programs linked
/// with -llion record `NEEDED liblion.so.1` and a future ABI 2 can be installed beside it.
/// Cargo has no setting for it (rust-lang/cargo#5045); a cdylib link arg touches only the
/// cdylib. Such programs then look for liblion.so.1 at run time, so the build folder
/// (target/<profile>/) gets the link liblion.so.1 -> liblion.so, as an installed prefix has.
fn soname(out: &Path) {
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap();
    let elf = matches!(
        os.as_str(),
        "linux" | "android" | "freebsd" | "netbsd" | "openbsd" | "dragonfly"
    );
    if !elf {
        return; // Mach-O has its install name (set by rustc), Windows has no SONAME
    }
    let name = format!("liblion.so.{ABI_MAJOR}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{name}");
    // OUT_DIR is <profile dir>/build/lion-<hash>/out, where <profile dir> also gets the
    // library itself; with a separate build-dir (cargo's build.build-dir) it is not, and the
    // link is skipped: link with an installed copy (scripts/install.sh) then.
    let Some(profile_dir) = out.ancestors().nth(3) else {
        return;
    };
    if out.ancestors().nth(2).and_then(Path::file_name) != Some("build".as_ref()) {
        return;
    }
    let link = profile_dir.join(&name);
    if std::fs::symlink_metadata(&link).is_err() {
        // Relative, so that the folder can be moved or copied with `cp -a`; it dangles only
        // until cargo puts liblion.so beside it, later in this same build.
        #[cfg(unix)]
        let _ = std::os::unix::fs::symlink("liblion.so", &link);
    }
}
