//! examples/flat_buffer.c, the README's flat-buffer pattern: one optimizer, one tensor per
//! parameter inside one float buffer (no decay on biases and norm gains), `float *` pointer
//! arrays passed with the casts, and a plain C Lion loop that must match liblion bit for bit
//! when built without FMA contraction (-ffp-contract=off), as the README says.

mod native;

use std::process::Command;

use native::*;

#[test]
fn flat_buffer_example_matches_its_own_loop() {
    let lib = lib_dir();
    let exe = std::env::temp_dir().join(format!("lion-flat-buffer-{}", std::process::id()));
    let mut cc = compiler(false, "c99");
    cc.arg("-O2")
        .arg("-ffp-contract=off")
        .arg(repo().join("examples").join("flat_buffer.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib)
        .arg("-llion")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lm");
    run_ok(
        &mut cc,
        "compiling examples/flat_buffer.c (warnings are errors)",
    );
    let out = run_ok(&mut Command::new(&exe), "examples/flat_buffer");
    let _ = std::fs::remove_file(&exe);
    assert!(out.contains("flat_buffer: 3 passed, 0 failed"), "{out}");
}
