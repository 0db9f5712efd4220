//! Checkpoint files survive crashes: a writer killed mid-save, or a disk that fills up, leaves
//! the previous checkpoint whole and loadable.
//!
//! The writers are this test binary run again as a child process (LION_TEST_ROLE, read before
//! the harness starts), so that a kill or a file-size limit hits a real process and not the
//! test harness.

mod common;

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use lion::*;

const BIG: u64 = 4 << 20; // 16 MB of f32 momentum: a save takes a while

/// A fresh, empty folder for one test (under the system's temp folder when the build tree is
/// not there, as in a GPU bundle).
fn dir(name: &str) -> PathBuf {
    let mut base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    if !base.exists() {
        base = std::env::temp_dir();
    }
    let d = base.join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cpath(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

/// An optimizer of `BIG` elements after `steps` steps (so its checkpoints differ by step).
fn trained(steps: usize) -> (Opt, Vec<Buf>) {
    let t = [lion_tensor_desc(BIG, LION_DTYPE_F32)];
    let opt = Opt::new(
        LionConfig {
            lr: 0.01,
            ..lion_config_default()
        },
        &t,
    )
    .unwrap();
    let mut rng = Rng::new(1);
    let mut p = random_params(&t, &mut rng);
    for _ in 0..steps {
        let mut g = random_grads(&t, 1.0, &mut rng);
        assert_eq!(opt.step(&mut p, &mut g), LionStatus::LION_OK);
    }
    (opt, p)
}

fn load_file(opt: &Opt, path: &Path) -> (LionStatus, String) {
    let st = unsafe { lion_state_load_file(opt.raw, cpath(path).as_ptr()) };
    (st, last_error())
}

fn save_file(opt: &Opt, path: &Path) -> (LionStatus, String) {
    let st = unsafe { lion_state_save_file(opt.raw, cpath(path).as_ptr()) };
    (st, last_error())
}

/// The child's side, when this binary runs with LION_TEST_ROLE set: save forever (role
/// "writer") or once under a small file-size limit (role "full-disk"), then exit. It runs
/// before the test harness starts (an `.init_array` entry, as a C constructor would), so it
/// is not a test: a plain run neither counts it nor skips it.
#[used]
#[link_section = ".init_array"]
static CHILD_ENTRY: extern "C" fn() = child_entry;

extern "C" fn child_entry() {
    let (Ok(role), Ok(path)) = (
        std::env::var("LION_TEST_ROLE"),
        std::env::var("LION_TEST_PATH"),
    ) else {
        return; // the test binary itself: on to the harness
    };
    // A failed assertion exits non-zero (the parent reports it) instead of unwinding out of
    // an extern "C" function (an abort).
    let ok = std::panic::catch_unwind(|| child_role(&role, Path::new(&path))).is_ok();
    std::process::exit(if ok { 0 } else { 101 });
}

fn child_role(role: &str, path: &Path) {
    match role {
        "writer" => {
            // Another checkpoint than the parent's first, and a mark once one save is whole.
            let (opt, _) = trained(2);
            let mark = saved_mark(path);
            loop {
                assert_eq!(save_file(&opt, path).0, LionStatus::LION_OK);
                if !mark.exists() {
                    std::fs::write(&mark, b"").unwrap();
                }
            }
        }
        "full-disk" => {
            // A 1 MB file-size limit: writing the 16 MB checkpoint fails like a full disk.
            unsafe {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit {
                    rlim_cur: 1 << 20,
                    rlim_max: 1 << 20,
                };
                assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
            }
            let (opt, _) = trained(2);
            let (st, msg) = save_file(&opt, path);
            assert_eq!(st, LionStatus::LION_ERROR_IO, "{msg}");
            println!("full-disk save refused: {msg}");
        }
        other => panic!("unknown role {other}"),
    }
}

/// The file by which a writer says that one of its saves completed.
fn saved_mark(path: &Path) -> PathBuf {
    path.with_extension("saved")
}

fn child(role: &str, path: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("LION_TEST_ROLE", role).env("LION_TEST_PATH", path);
    cmd
}

#[test]
fn files_round_trip_and_report_errors() {
    let d = dir("files-roundtrip");
    let path = d.join("opt.ckpt");
    let (a, _) = trained(3);
    assert_eq!(save_file(&a, &path).0, LionStatus::LION_OK);
    assert_eq!(std::fs::read(&path).unwrap(), a.save());
    let (b, _) = trained(0);
    assert_eq!(load_file(&b, &path).0, LionStatus::LION_OK);
    assert_eq!(b.step_count(), 3);
    assert!(b.save() == a.save());
    // No temporary files are left behind.
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);

    let (st, msg) = load_file(&b, &d.join("missing.ckpt"));
    assert_eq!(st, LionStatus::LION_ERROR_IO);
    assert!(msg.contains("missing.ckpt"), "{msg}");
    let (st, msg) = save_file(&a, &d.join("no-such-folder").join("x.ckpt"));
    assert_eq!(st, LionStatus::LION_ERROR_IO);
    assert!(msg.contains("no-such-folder"), "{msg}");
    // A truncated file is a corrupt checkpoint; the optimizer is untouched.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(d.join("short.ckpt"), &bytes[..bytes.len() / 2]).unwrap();
    let (fresh, _) = trained(0);
    assert_eq!(
        load_file(&fresh, &d.join("short.ckpt")).0,
        LionStatus::LION_ERROR_CORRUPT_STATE
    );
    assert_eq!(fresh.step_count(), 0);
    unsafe {
        assert_eq!(
            lion_state_save_file(a.raw, std::ptr::null()),
            LionStatus::LION_ERROR_NULL_POINTER
        );
        assert_eq!(
            lion_state_load_file(std::ptr::null_mut(), cpath(&path).as_ptr()),
            LionStatus::LION_ERROR_NULL_POINTER
        );
        assert_eq!(
            lion_state_save_file(a.raw, c"".as_ptr()),
            LionStatus::LION_ERROR_INVALID_ARGUMENT
        );
    }
}

/// A name of 255 bytes (NAME_MAX on Linux file systems, which open(2) takes) saves and loads:
/// the temporary file beside it is named after the name's start, where the whole name plus
/// its suffix was too long for any file system (ENAMETOOLONG: such a checkpoint could never
/// be saved). Multi-byte characters at the cut stay whole.
#[test]
fn a_file_name_of_the_longest_length_saves() {
    let d = dir("files-long-name");
    let (a, _) = trained(2);
    for name in ["c".repeat(255), format!("{}.ckpt", "é".repeat(125))] {
        let path = d.join(&name);
        assert!(
            std::fs::write(&path, b"").is_ok(),
            "this file system takes the name"
        );
        assert_eq!(save_file(&a, &path), (LionStatus::LION_OK, String::new()));
        let (b, _) = trained(0);
        assert_eq!(load_file(&b, &path).0, LionStatus::LION_OK);
        assert_eq!(b.save(), a.save());
    }
    assert_eq!(
        std::fs::read_dir(&d).unwrap().count(),
        2,
        "no temporary file left"
    );
}

#[test]
fn a_writer_killed_mid_save_leaves_a_whole_checkpoint() {
    let d = dir("files-kill");
    let path = d.join("opt.ckpt");
    let (reader, _) = trained(0);
    let (first, _) = trained(1);
    let (second, _) = trained(2); // what the writer saves
    let mark = saved_mark(&path);
    for round in 0..6 {
        assert_eq!(save_file(&first, &path).0, LionStatus::LION_OK);
        let _ = std::fs::remove_file(&mark);
        let mut writer = child("writer", &path).spawn().unwrap();
        // From the writer's first whole save on, it is saving again and again: a kill a
        // while later most likely lands in the middle of one.
        let ready = (0..12_000).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            mark.exists()
        });
        if !ready {
            writer.kill().unwrap();
            writer.wait().unwrap();
            panic!("round {round}: the writer completed no save in 60 s");
        }
        std::thread::sleep(Duration::from_millis(3 + 7 * round));
        writer.kill().unwrap(); // SIGKILL: no destructor, no flush
        let status = writer.wait().unwrap();
        assert!(
            status.code().is_none(),
            "round {round}: the writer ended by itself: {status}"
        );
        let (st, msg) = load_file(&reader, &path);
        assert_eq!(
            st,
            LionStatus::LION_OK,
            "round {round}: the checkpoint was damaged: {msg}"
        );
        // The whole save before the kill, not the parent's older file nor a mixture.
        assert!(
            reader.save() == second.save(),
            "round {round}: the file is not the writer's last whole checkpoint"
        );
    }
}

#[test]
fn a_full_disk_leaves_the_previous_checkpoint() {
    let d = dir("files-full");
    let path = d.join("opt.ckpt");
    let (old, _) = trained(1);
    assert_eq!(save_file(&old, &path).0, LionStatus::LION_OK);
    let before = std::fs::read(&path).unwrap();
    let out = child("full-disk", &path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("full-disk save refused"),
        "the child ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the previous checkpoint changed"
    );
    assert_eq!(
        std::fs::read_dir(&d).unwrap().count(),
        1,
        "a temporary file was left behind"
    );
}

/// A file saved with any state dtype loads into an optimizer of any other, as
/// `lion_state_load` of the same bytes does (converted): the file is read up to the largest
/// checkpoint the optimizer could load (f32 momentum), not up to its own size. A file longer
/// than that is refused, naming the bound.
#[test]
fn a_file_of_any_state_dtype_loads_as_its_bytes_do() {
    let d = dir("files-state-dtypes");
    // q8: quantized tensors (5000, 4096) and small ones that keep f32 (77), and an empty one.
    let t: Vec<LionTensorDesc> = [5000u64, 0, 77, 4096]
        .iter()
        .map(|&n| lion_tensor_desc(n, LION_DTYPE_F32))
        .collect();
    let states = [LION_DTYPE_F32, LION_DTYPE_BF16, LION_DTYPE_Q8];
    let make = |state_dtype| {
        let config = LionConfig {
            lr: 0.01,
            weight_decay: 0.1,
            state_dtype,
            ..lion_config_default()
        };
        Opt::new(config, &t).unwrap()
    };
    let mut rng = Rng::new(7);
    let start = random_params(&t, &mut rng);
    for from in states {
        let saver = make(from);
        let mut p = start.clone();
        for _ in 0..2 {
            let mut g = random_grads(&t, 1.0, &mut rng);
            assert_eq!(saver.step(&mut p, &mut g), LionStatus::LION_OK);
        }
        let path = d.join(format!("{}.ckpt", dtype_name(from)));
        assert_eq!(save_file(&saver, &path).0, LionStatus::LION_OK);
        let bytes = std::fs::read(&path).unwrap();
        for to in states {
            let what = format!("{} file into {} state", dtype_name(from), dtype_name(to));
            let (by_file, by_blob) = (make(to), make(to));
            let (st, msg) = load_file(&by_file, &path);
            assert_eq!(st, LionStatus::LION_OK, "{what}: {msg}");
            assert_eq!(by_blob.load(&bytes), LionStatus::LION_OK, "{what}");
            assert!(
                by_file.save() == by_blob.save(),
                "{what}: the states differ"
            );
            assert_eq!(by_file.step_count(), 2, "{what}");
            // And the next step is the same.
            let (mut pa, mut pb) = (p.clone(), p.clone());
            let mut g = random_grads(&t, 1.0, &mut rng);
            let mut gb = g.clone();
            assert_eq!(by_file.step(&mut pa, &mut g), LionStatus::LION_OK);
            assert_eq!(by_blob.step(&mut pb, &mut gb), LionStatus::LION_OK);
            assert!(pa == pb, "{what}: the next step differs");
            assert!(by_file.save() == by_blob.save(), "{what}");
        }
    }
    // The f32 checkpoint is the largest; one byte more is larger than any checkpoint of a q8
    // (or any) optimizer of these tensors, and the message says so.
    let mut longer = std::fs::read(d.join("f32.ckpt")).unwrap();
    let largest = longer.len();
    longer.push(0);
    let path = d.join("longer.ckpt");
    std::fs::write(&path, &longer).unwrap();
    for to in states {
        let opt = make(to);
        let (st, msg) = load_file(&opt, &path);
        assert_eq!(st, LionStatus::LION_ERROR_CORRUPT_STATE, "{msg}");
        assert!(
            msg.contains("larger than any checkpoint") && msg.contains(&largest.to_string()),
            "{msg}"
        );
        assert_eq!(opt.step_count(), 0);
    }
    // A huge (sparse) file is refused on its length, unread.
    let huge = d.join("huge.ckpt");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let (st, msg) = load_file(&make(LION_DTYPE_Q8), &huge);
    assert_eq!(st, LionStatus::LION_ERROR_CORRUPT_STATE, "{msg}");
    assert!(msg.contains("larger than any checkpoint"), "{msg}");
    std::fs::remove_file(&huge).unwrap();
    // A q8 checkpoint with a byte more is shorter than the bound: lion_state_load's check
    // refuses it, with the same message as for the bytes.
    let mut q8_longer = std::fs::read(d.join("q8.ckpt")).unwrap();
    q8_longer.push(0);
    std::fs::write(&path, &q8_longer).unwrap();
    let opt = make(LION_DTYPE_Q8);
    let (st, msg) = load_file(&opt, &path);
    assert_eq!(st, LionStatus::LION_ERROR_CORRUPT_STATE, "{msg}");
    assert_eq!(opt.load(&q8_longer), LionStatus::LION_ERROR_CORRUPT_STATE);
    assert!(msg.ends_with(&last_error()), "{msg}");
}
