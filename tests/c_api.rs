//! The C tests (tests/c/test_*.c) and the C++ wrapper's test (tests/cpp): built with the `cc`
//! crate's compiler, linked against the built liblion.so (and liblion.a), and run.

mod native;

use native::*;

#[test]
fn c_api_tests_pass() {
    let dir = repo().join("tests").join("c");
    let mut found = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("test_") && name.ends_with(".c") {
            let exe = build(&[&path], false, "c99", false, name.trim_end_matches(".c"));
            run_program(&exe, &name);
            found += 1;
        }
    }
    assert!(found >= 1, "no C tests in {}", dir.display());
}

#[test]
fn the_cpp_wrapper_works() {
    let src = repo().join("tests").join("cpp").join("test_wrapper.cpp");
    let exe = build(&[&src], true, "c++17", false, "test_wrapper");
    run_program(&exe, "test_wrapper.cpp");
}

#[test]
fn options_in_the_streams_place_do_not_compile() {
    let src = repo()
        .join("tests")
        .join("cpp")
        .join("options_in_stream_place.cpp");
    let check = |bad: Option<u32>| {
        let mut cmd = compiler(true, "c++17");
        cmd.arg("-fsyntax-only").arg(&src);
        if let Some(bad) = bad {
            cmd.arg(format!("-DBAD={bad}"));
        }
        cmd.output().unwrap()
    };
    let good = check(None);
    assert!(
        good.status.success(),
        "the calls that must compile:\n{}",
        String::from_utf8_lossy(&good.stderr)
    );
    for bad in 1..=4 {
        let out = check(Some(bad));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "BAD={bad} compiled");
        assert!(err.contains("delete"), "BAD={bad} failed otherwise:\n{err}");
    }
}

#[test]
fn the_c_and_cpp_examples_train() {
    for (src, cpp, std) in [
        ("train_mlp.c", false, "c99"),
        ("train_mlp.cpp", true, "c++17"),
        ("step_in_backward.cpp", true, "c++17"),
    ] {
        let path = repo().join("examples").join(src);
        let exe = build(
            &[&path],
            cpp,
            std,
            false,
            &format!("example_{}", src.replace('.', "_")),
        );
        let mut cmd = std::process::Command::new(&exe);
        cmd.env("LD_LIBRARY_PATH", lib_dir());
        let out = run_ok(&mut cmd, src);
        assert!(out.contains("mean loss"), "{src}:\n{out}");
    }
}

#[test]
fn the_static_archive_links_alone() {
    // `cargo build` writes liblion.a beside liblion.so (crate-type staticlib) and the GPU
    // bundle carries both: a missing archive is a failure, not a reason to skip.
    let archive = lib_dir().join("liblion.a");
    assert!(archive.exists(), "no {}", archive.display());
    let src = repo().join("tests").join("c").join("link_static.c");
    let exe = build(&[&src], false, "c99", true, "link_static");
    run_program(&exe, "link_static.c");
}
