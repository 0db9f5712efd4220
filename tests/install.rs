//! The install step: scripts/install.sh into a fresh prefix (the versioned library and its
//! SONAME links), then a C program built with pkg-config's flags and a CMake project using
//! find_package(lion CONFIG), both run and both recording `NEEDED liblion.so.1`.

mod native;

use std::path::{Path, PathBuf};
use std::process::Command;

use native::*;

/// The ELF dynamic section's entries of one kind (NEEDED, SONAME, RPATH, RUNPATH), by readelf.
fn dynamic(file: &Path, kind: &str) -> Vec<String> {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("readelf (binutils, installed with gcc) could not run: {e}"));
    assert!(out.status.success(), "readelf -d {}", file.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("({kind})")))
        .filter_map(|l| Some(l.split_once('[')?.1.trim_end_matches(']').to_string()))
        .collect()
}

/// The ABI's major version, from the header: the SONAME's number.
fn abi_major() -> String {
    let header = std::fs::read_to_string(repo().join("include").join("lion.h")).unwrap();
    header
        .lines()
        .find_map(|l| l.strip_prefix("#define LION_ABI_VERSION "))
        .expect("LION_ABI_VERSION in include/lion.h")
        .trim()
        .to_string()
}

fn assert_needs_soname(exe: &Path) {
    let soname = format!("liblion.so.{}", abi_major());
    let needed = dynamic(exe, "NEEDED");
    assert!(
        needed.contains(&soname) && !needed.iter().any(|n| n == "liblion.so"),
        "{} should record NEEDED {soname} (not the unversioned liblion.so): {needed:?}",
        exe.display()
    );
}

fn installed_prefix(name: &str) -> PathBuf {
    let prefix = std::env::temp_dir().join(format!("lion-install-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&prefix);
    run_ok(
        Command::new("bash")
            .arg(repo().join("scripts").join("install.sh"))
            .arg(&prefix)
            .env("LION_LIB_DIR", lib_dir()),
        "scripts/install.sh",
    );
    prefix
}

#[test]
fn the_library_is_installed_with_its_soname_links() {
    let prefix = installed_prefix("links");
    let lib = prefix.join("lib");
    let version = env!("CARGO_PKG_VERSION");
    let soname = format!("liblion.so.{}", abi_major());
    let real = format!("{soname}.{}", version.split_once('.').unwrap().1);
    let meta = std::fs::symlink_metadata(lib.join(&real))
        .unwrap_or_else(|e| panic!("{real} was not installed: {e}"));
    assert!(
        meta.file_type().is_file(),
        "{real} should be the file itself"
    );
    let link = |name: &str| std::fs::read_link(lib.join(name)).map(|t| t.display().to_string());
    assert_eq!(link(&soname).ok(), Some(real.clone()), "{soname} -> {real}");
    assert_eq!(
        link("liblion.so").ok(),
        Some(soname.clone()),
        "liblion.so -> {soname}"
    );
    assert_eq!(dynamic(&lib.join(&real), "SONAME"), [soname.as_str()]);

    // A reinstall over an older build removes it: ldconfig would pick the highest name.
    let stale = lib.join(format!("{soname}.99.0"));
    std::fs::copy(lib.join(&real), &stale).unwrap();
    run_ok(
        Command::new("bash")
            .arg(repo().join("scripts").join("install.sh"))
            .arg(&prefix)
            .env("LION_LIB_DIR", lib_dir()),
        "scripts/install.sh, again",
    );
    assert!(!stale.exists(), "the older {} was left", stale.display());
    assert_eq!(link(&soname).ok(), Some(real));

    // A library without the SONAME (built before it was set) is refused, not installed.
    let old = prefix.join("old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(
        old.join("old.c"),
        "int lion_abi_version(void) { return 1; }\n",
    )
    .unwrap();
    let mut cc = compiler(false, "c99");
    cc.args(["-shared", "-fPIC"])
        .arg(old.join("old.c"))
        .arg("-o")
        .arg(old.join("liblion.so"));
    run_ok(&mut cc, "a shared library without a SONAME");
    let out = Command::new("bash")
        .arg(repo().join("scripts").join("install.sh"))
        .arg(prefix.join("other"))
        .env("LION_LIB_DIR", &old)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("SONAME"),
        "install.sh should refuse a library without the SONAME: {err}"
    );
    let _ = std::fs::remove_dir_all(&prefix);
}

#[test]
fn pkg_config_builds_a_c_program() {
    // From a prefix moved after the install: lion.pc finds it where it lies.
    let installed = installed_prefix("pc");
    let prefix = installed.with_file_name(format!("lion-moved-pc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&prefix);
    std::fs::rename(&installed, &prefix).unwrap();
    let flags = run_ok(
        Command::new("pkg-config")
            .args(["--cflags", "--libs", "lion"])
            .env("PKG_CONFIG_PATH", prefix.join("lib").join("pkgconfig")),
        "pkg-config lion",
    );
    assert!(flags.contains("-llion"), "{flags}");
    // The rpath hint the .pc file carries (pkg-config has no standard field for it).
    let rpath = run_ok(
        Command::new("pkg-config")
            .args(["--variable=rpath", "lion"])
            .env("PKG_CONFIG_PATH", prefix.join("lib").join("pkgconfig")),
        "pkg-config --variable=rpath lion",
    );
    let dir = rpath
        .trim()
        .strip_prefix("-Wl,-rpath,")
        .unwrap_or_else(|| panic!("{rpath}"));
    assert_eq!(
        Path::new(dir).canonicalize().ok(),
        prefix.join("lib").canonicalize().ok(),
        "{rpath}"
    );
    let exe = std::env::temp_dir().join(format!("lion-pc-{}", std::process::id()));
    let mut cc = compiler(false, "c99");
    cc.arg(repo().join("tests").join("c").join("link_static.c"))
        .arg("-o")
        .arg(&exe)
        .args(flags.split_whitespace())
        .arg(rpath.trim());
    run_ok(&mut cc, "compiling against the installed tree");
    assert_needs_soname(&exe);
    // No LD_LIBRARY_PATH: the rpath and the liblion.so.1 link find the library.
    let out = run_ok(
        Command::new(&exe).env_remove("LD_LIBRARY_PATH"),
        "the pkg-config program",
    );
    assert_checks_passed(&out, "the pkg-config program");
    let _ = std::fs::remove_dir_all(&prefix);
}

/// A relative PREFIX and LION_LIB_DIR are the caller's: installed there, not under the
/// repository (install.sh works from the repository's root).
#[test]
fn a_relative_prefix_is_the_callers() {
    let here = std::env::temp_dir().join(format!("lion-relative-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&here);
    std::fs::create_dir_all(here.join("built")).unwrap();
    for name in ["liblion.so", "liblion.a"] {
        if lib_dir().join(name).exists() {
            std::fs::copy(lib_dir().join(name), here.join("built").join(name)).unwrap();
        }
    }
    run_ok(
        Command::new("bash")
            .arg(repo().join("scripts").join("install.sh"))
            .arg("rel-prefix")
            .current_dir(&here)
            .env("LION_LIB_DIR", "built"),
        "scripts/install.sh rel-prefix",
    );
    assert!(
        here.join("rel-prefix/lib/liblion.so").exists(),
        "not installed in the caller's folder"
    );
    assert!(
        !repo().join("rel-prefix").exists(),
        "installed under the repository"
    );
    let _ = std::fs::remove_dir_all(&here);
}

#[test]
fn cmake_finds_the_installed_package() {
    if Command::new("cmake").arg("--version").output().is_err() {
        panic!("cmake is not installed: scripts/setup.sh installs it");
    }
    let prefix = installed_prefix("cmake");
    let build = prefix.join("consumer-build");
    run_ok(
        Command::new("cmake")
            .arg("-S")
            .arg(repo().join("tests").join("cmake_consumer"))
            .arg("-B")
            .arg(&build)
            .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display())),
        "cmake configure",
    );
    run_ok(
        Command::new("cmake").arg("--build").arg(&build),
        "cmake build",
    );
    assert_needs_soname(&build.join("consumer"));
    let out = run_ok(
        Command::new(build.join("consumer")).env_remove("LD_LIBRARY_PATH"),
        "the CMake consumer",
    );
    assert!(out.contains("1 passed, 0 failed"), "{out}");
}
