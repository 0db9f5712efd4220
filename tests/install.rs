//! The install step: scripts/install.sh into a fresh prefix, then a C program built with
//! pkg-config's flags and a CMake project using find_package(lion CONFIG), both run.

mod native;

use std::process::Command;

use native::*;

fn installed_prefix(name: &str) -> std::path::PathBuf {
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
fn pkg_config_builds_a_c_program() {
    let prefix = installed_prefix("pc");
    let flags = run_ok(
        Command::new("pkg-config")
            .args(["--cflags", "--libs", "lion"])
            .env("PKG_CONFIG_PATH", prefix.join("lib").join("pkgconfig")),
        "pkg-config lion",
    );
    assert!(flags.contains("-llion"), "{flags}");
    let exe = std::env::temp_dir().join(format!("lion-pc-{}", std::process::id()));
    let mut cc = compiler(false, "c99");
    cc.arg(repo().join("tests").join("c").join("link_static.c"))
        .arg("-o")
        .arg(&exe)
        .args(flags.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()));
    run_ok(&mut cc, "compiling against the installed tree");
    let out = run_ok(&mut Command::new(&exe), "the pkg-config program");
    assert!(out.contains("passed, 0 failed"), "{out}");
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
    let out = run_ok(
        &mut Command::new(build.join("consumer")),
        "the CMake consumer",
    );
    assert!(out.contains("1 passed, 0 failed"), "{out}");
}
