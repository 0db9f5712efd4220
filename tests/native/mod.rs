//! Compiling and running C and C++ programs against the built library, from Rust tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository, or what the tests read of it: LION_TEST_ROOT (a GPU bundle's run-tests.sh
/// sets it: the bundle carries those files, see scripts/gpu-bundle.sh), else where it was
/// built, else the current folder.
pub fn repo() -> PathBuf {
    if let Some(dir) = std::env::var_os("LION_TEST_ROOT") {
        return dir.into();
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.join("tests").exists() {
        built
    } else {
        std::env::current_dir().unwrap()
    }
}

/// Where liblion.so/.a are: beside the test's deps/ folder (target/<profile>/), or beside the
/// tests/ folder of a GPU bundle.
pub fn lib_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LION_LIB_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    assert!(
        dir.join("liblion.so").exists(),
        "no liblion.so in {}: run `cargo build` (same profile) before the tests, or set LION_LIB_DIR",
        dir.display()
    );
    dir
}

pub fn include_dir() -> PathBuf {
    repo().join("include")
}

fn tool(cpp: bool) -> cc::Tool {
    let target = env!("LION_BUILD_TARGET");
    cc::Build::new()
        .cpp(cpp)
        .target(target)
        .host(target)
        .opt_level(1)
        .cargo_metadata(false)
        .cargo_warnings(false)
        .out_dir(std::env::temp_dir())
        .get_compiler()
}

/// A compiler command (C or C++) with warnings as errors and the library's include paths.
pub fn compiler(cpp: bool, std: &str) -> Command {
    let mut cmd = tool(cpp).to_command();
    cmd.args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-g"])
        .arg(format!("-std={std}"))
        .arg("-I")
        .arg(include_dir())
        .arg("-I")
        .arg(repo().join("tests").join("c"))
        .arg("-I")
        .arg(repo().join("bindings").join("cpp"));
    cmd
}

pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Builds `sources` into an executable linked against the shared (or static) library.
pub fn build(sources: &[&Path], cpp: bool, std: &str, link_static: bool, name: &str) -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    if !dir.exists() {
        dir = std::env::temp_dir(); // a GPU bundle, run away from the build tree
    }
    let exe = dir.join(name);
    let lib = lib_dir();
    let mut cmd = compiler(cpp, std);
    cmd.args(sources).arg("-o").arg(&exe);
    if link_static {
        cmd.arg(lib.join("liblion.a")).args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ]);
    } else {
        cmd.arg("-L")
            .arg(&lib)
            .arg("-llion")
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .arg("-lm");
    }
    run_ok(&mut cmd, &format!("compiling {name}"));
    exe
}

/// Runs a test program; it must exit 0 and print "N passed, 0 failed" with N > 0.
pub fn run_program(exe: &Path, what: &str) -> String {
    let mut cmd = Command::new(exe);
    cmd.env("LD_LIBRARY_PATH", lib_dir());
    let text = run_ok(&mut cmd, what);
    assert_checks_passed(&text, what);
    print!("{text}");
    text
}

/// `text` has a summary "N passed, 0 failed" with N > 0 (a program that checked nothing
/// must not pass).
pub fn assert_checks_passed(text: &str, what: &str) {
    let passed = text.lines().find_map(|line| {
        let (count, _) = line.rsplit_once(" passed, 0 failed")?;
        count.rsplit(' ').next()?.parse::<u64>().ok()
    });
    match passed {
        Some(n) if n > 0 => {}
        Some(_) => panic!("{what} passed no check:\n{text}"),
        None => panic!("{what} printed no summary \"N passed, 0 failed\":\n{text}"),
    }
}
