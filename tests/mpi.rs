//! examples/distributed_mpi.c, the distributed modes over MPI: built with mpicc against the
//! built liblion.so (-Wall -Wextra -Werror -pedantic) and run with mpirun on 2 and 3 ranks.
//! The example checks the collectives, the loss, the parameters on every rank, and the sharded
//! mode against one process (bit for bit, checkpoints included, where the sums are added in
//! one order); this test checks that it ran and passed.
//!
//! Open MPI comes from scripts/setup.sh (openmpi-bin, libopenmpi-dev): without mpicc or mpirun
//! this test fails, it does not skip.

mod native;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use native::*;

/// Runs `tool --version`; None if it cannot be run.
fn version(tool: &str) -> Option<String> {
    let out = Command::new(tool).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn build_example() -> PathBuf {
    assert!(
        version("mpicc").is_some(),
        "no mpicc: install Open MPI (`bash scripts/setup.sh` does: openmpi-bin libopenmpi-dev)"
    );
    let mut dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    if !dir.exists() {
        dir = std::env::temp_dir(); // a GPU bundle, run away from the build tree
    }
    let exe = dir.join("distributed_mpi");
    let lib = lib_dir();
    let mut cmd = Command::new("mpicc");
    cmd.args([
        "-std=c99",
        "-pedantic",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
    ])
    .arg(repo().join("examples").join("distributed_mpi.c"))
    .arg("-I")
    .arg(include_dir())
    .arg("-L")
    .arg(&lib)
    .arg("-llion")
    .arg(format!("-Wl,-rpath,{}", lib.display()))
    .arg("-lm")
    .arg("-o")
    .arg(&exe);
    run_ok(&mut cmd, "compiling examples/distributed_mpi.c with mpicc");
    exe
}

/// `mpirun -np <ranks> exe`, with what Open MPI needs here: root is allowed, more ranks than
/// cores, and no single-copy (CMA) transfers between processes, which containers often forbid.
/// A rank that hangs is killed after 120 s (MPIEXEC_TIMEOUT, read by Open MPI and MPICH).
fn mpirun(ranks: usize, exe: &Path) -> String {
    let Some(about) = version("mpirun") else {
        panic!("no mpirun: install Open MPI (`bash scripts/setup.sh` does: openmpi-bin)")
    };
    let mut cmd = Command::new("mpirun");
    if about.contains("Open MPI") || about.contains("OpenRTE") {
        cmd.args(["--allow-run-as-root", "--oversubscribe"])
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            .env("OMPI_MCA_btl_sm_single_copy_mechanism", "none");
    }
    cmd.args(["-np", &ranks.to_string()])
        .arg(exe)
        .env("MPIEXEC_TIMEOUT", "120")
        .env("LD_LIBRARY_PATH", lib_dir());
    let start = Instant::now();
    let out = run_ok(&mut cmd, &format!("mpirun -np {ranks} distributed_mpi"));
    println!(
        "{out}\nmpirun -np {ranks}: {:.1} s",
        start.elapsed().as_secs_f64()
    );
    out
}

/// The example's "N passed, N failed" line: (passed, failed).
fn summary(out: &str) -> (u32, u32) {
    let line = (out.lines())
        .find(|l| l.starts_with("distributed_mpi.c ("))
        .unwrap_or_else(|| panic!("no summary line:\n{out}"));
    let count = |word: &str| {
        let before = line.split(word).next().unwrap().trim_end();
        before.rsplit([' ', ':']).next().unwrap().parse().unwrap()
    };
    (count(" passed"), count(" failed"))
}

#[test]
fn the_mpi_example_trains_and_checks_on_2_and_3_ranks() {
    let exe = build_example();
    for ranks in [2, 3] {
        let out = mpirun(ranks, &exe);
        assert!(
            out.contains(&format!("distributed_mpi.c ({ranks} ranks,")),
            "not {ranks} ranks:\n{out}"
        );
        let (passed, failed) = summary(&out);
        // 36 checks of the collectives, 4 sharded runs and 2 vote runs.
        assert!(
            passed >= 60 && failed == 0,
            "{passed} passed, {failed} failed:\n{out}"
        );
        assert!(
            out.contains("the collectives: 36 checks passed, 0 failed"),
            "{out}"
        );
        // Every run trained (the example checks that the loss fell by half).
        assert_eq!(out.matches("mean loss: first 20 steps").count(), 6, "{out}");
        // The sharded checkpoints equal one process's: all four on 2 ranks (a + b = b + a),
        // the two with rank-order sums on 3.
        let equal = out.matches("bytes, equal to one process's").count();
        let want = if ranks <= 2 { 4 } else { 2 };
        assert!(
            equal >= want,
            "{equal} checkpoints equal to one process's, want {want}:\n{out}"
        );
    }
}
