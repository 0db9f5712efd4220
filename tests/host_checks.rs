//! Values that pass every check alone but not together, checkpoint fields that a checksum
//! cannot vouch for, lengths that lie, checkpoint files in awkward folders, and the thread
//! pool's bounds and teardown (the "liblion inside real hosts" issue).

mod common;

use std::ffi::{c_void, CString};
use std::os::unix::fs::PermissionsExt;

use common::*;
use lion::*;
use xxhash_rust::xxh3::xxh3_128;

fn config(lr: f32, weight_decay: f32) -> LionConfig {
    LionConfig {
        lr,
        weight_decay,
        num_threads: 1,
        ..lion_config_default()
    }
}

fn one_tensor(lr_scale: f32, weight_decay_scale: f32) -> Vec<LionTensorDesc> {
    let mut t = lion_tensor_desc(33, LION_DTYPE_F32);
    t.lr_scale = lr_scale;
    t.weight_decay_scale = weight_decay_scale;
    vec![lion_tensor_desc(7, LION_DTYPE_F32), t]
}

fn refused_at_create(config: LionConfig, tensors: &[LionTensorDesc], says: &str) {
    match Opt::new(config, tensors) {
        Ok(_) => panic!("created, want a refusal saying {says:?}"),
        Err((status, message)) => {
            assert_eq!(status, LionStatus::LION_ERROR_INVALID_ARGUMENT, "{message}");
            assert!(message.contains(says), "{message:?} should say {says:?}");
        }
    }
}

#[test]
fn products_of_valid_values_are_refused_at_create() {
    // lr and lr_scale each finite, their product not (in f32).
    refused_at_create(config(1e30, 0.0), &one_tensor(1e10, 1.0), "tensors[1]");
    // lr * weight_decay = 3: decay would flip the parameters' sign.
    refused_at_create(config(0.5, 6.0), &one_tensor(1.0, 1.0), "outside [0, 1]");
    // Decay per tensor: the second tensor's weight_decay_scale makes it 1.5.
    refused_at_create(config(0.1, 5.0), &one_tensor(1.0, 3.0), "tensors[1]");
    // Corrected decay, (lr*lr_scale)^2/lr0 * wd: 0.5 with lr_scale 1, 8 with lr_scale 4.
    let corrected = LionConfig {
        decay_mode: LION_DECAY_CORRECTED,
        ..config(0.1, 5.0)
    };
    assert!(Opt::new(corrected, &one_tensor(1.0, 1.0)).is_ok());
    refused_at_create(corrected, &one_tensor(4.0, 1.0), "Corrected");
    // Cautious Lion divides the step by a mean as small as the factor: 1e35 / 1e-5 overflows.
    let cautious = LionConfig {
        cautious_factor: 0.0,
        ..config(1e35, 0.0)
    };
    refused_at_create(cautious, &one_tensor(1.0, 1.0), "renormalisation");
    // At the edge: d = 1 exactly is allowed (the parameters are zeroed, as asked).
    assert!(Opt::new(config(0.5, 2.0), &one_tensor(1.0, 1.0)).is_ok());
}

#[test]
fn a_refused_set_lr_keeps_the_lr() {
    let opt = Opt::new(config(1e-3, 1.0), &one_tensor(1.0, 1.0)).unwrap();
    for bad in [2.0f32, 1e38] {
        let st = unsafe { lion_set_lr(opt.raw, bad) };
        assert_eq!(st, LionStatus::LION_ERROR_INVALID_ARGUMENT, "lr {bad}");
        assert!(last_error().contains("outside [0, 1]"), "{}", last_error());
        assert_eq!(opt.lr(), 1e-3);
    }
    assert_eq!(unsafe { lion_set_lr(opt.raw, 0.5) }, LionStatus::LION_OK);
    assert_eq!(opt.lr(), 0.5);
}

fn step_with(opt: &Opt, p: &mut Buf, g: &mut Buf, options: &LionStepOptions) -> LionStatus {
    let params = [p.ptr()];
    let grads = [g.ptr() as *const c_void];
    unsafe {
        lion_step_with_options(
            opt.raw,
            params.as_ptr(),
            grads.as_ptr(),
            1,
            std::ptr::null_mut(),
            options,
        )
    }
}

#[test]
fn a_host_lr_is_checked_with_the_products_and_nothing_is_written() {
    let tensors = [lion_tensor_desc(100, LION_DTYPE_F32)];
    let opt = Opt::new(config(1e-3, 1.0), &tensors).unwrap();
    let mut rng = Rng::new(3);
    let mut p = Buf::random(LION_DTYPE_F32, 100, 1.0, &mut rng);
    let mut g = Buf::random(LION_DTYPE_F32, 100, 1.0, &mut rng);
    let before = p.bits();
    let lr = 3.0f32;
    let options = LionStepOptions {
        lr: &lr,
        ..lion_step_options_default()
    };
    let st = step_with(&opt, &mut p, &mut g, &options);
    assert_eq!(st, LionStatus::LION_ERROR_INVALID_ARGUMENT);
    assert!(last_error().starts_with("options.lr"), "{}", last_error());
    assert_eq!(p.bits(), before);
    assert_eq!(opt.step_count(), 0);
}

#[test]
fn check_finite_sees_the_gradients_after_grad_scale() {
    let tensors = [lion_tensor_desc(50, LION_DTYPE_F16)];
    let opt = Opt::new(config(1e-3, 0.0), &tensors).unwrap();
    let mut p = Buf::from_f64(LION_DTYPE_F16, &[0.5; 50]);
    // 60000 is a finite f16; times 1e35 it is not a finite f32.
    let mut values = vec![0.25; 50];
    values[17] = 60000.0;
    let mut g = Buf::from_f64(LION_DTYPE_F16, &values);
    let before = p.bits();
    let options = LionStepOptions {
        grad_scale: 1e35,
        check_finite: true,
        ..lion_step_options_default()
    };
    let st = step_with(&opt, &mut p, &mut g, &options);
    assert_eq!(st, LionStatus::LION_ERROR_NON_FINITE, "{}", last_error());
    assert!(last_error().contains("grads[0][17]"), "{}", last_error());
    assert_eq!(p.bits(), before);
    // Without the overflowing scale the same gradients pass.
    let options = LionStepOptions {
        grad_scale: 1.0,
        ..options
    };
    assert_eq!(
        step_with(&opt, &mut p, &mut g, &options),
        LionStatus::LION_OK
    );
}

/// A checkpoint with `edit` applied and its checksum made valid again.
fn resealed(blob: &[u8], edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = blob.to_vec();
    edit(&mut b);
    let body = b.len() - 16;
    let sum = xxh3_128(&b[..body]).to_le_bytes();
    b[body..].copy_from_slice(&sum);
    b
}

fn assert_load_refused(opt: &Opt, blob: &[u8], says: &str) {
    let before = opt.save();
    assert_eq!(
        opt.load(blob),
        LionStatus::LION_ERROR_CORRUPT_STATE,
        "{says}"
    );
    assert!(
        last_error().contains(says),
        "{:?} should say {says:?}",
        last_error()
    );
    assert_eq!(opt.save(), before, "{says}: state changed");
}

#[test]
fn checkpoint_fields_are_validated_even_under_a_valid_checksum() {
    let tensors = one_tensor(1.0, 1.0);
    let opt = Opt::new(config(1e-3, 1.0), &tensors).unwrap();
    let blob = opt.save();
    let put_u32 =
        |at: usize, v: u32| move |b: &mut Vec<u8>| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    // Header offsets (docs/checkpoint-format.md): reserved at 12, cautious_weight_decay at 40,
    // stochastic_rounding at 48, reserved at 52, step at 64, lr at 72, reserved at 76; the
    // table from 88, 24 bytes a tensor (numel, param dtype, grad dtype, scales).
    assert_load_refused(&opt, &resealed(&blob, put_u32(12, 1)), "reserved");
    assert_load_refused(&opt, &resealed(&blob, put_u32(52, 7)), "reserved");
    assert_load_refused(&opt, &resealed(&blob, put_u32(76, 1)), "reserved");
    assert_load_refused(
        &opt,
        &resealed(&blob, put_u32(40, 2)),
        "cautious_weight_decay",
    );
    assert_load_refused(
        &opt,
        &resealed(&blob, put_u32(48, 9)),
        "stochastic_rounding",
    );
    assert_load_refused(&opt, &resealed(&blob, put_u32(88 + 8, 5)), "param_dtype");
    assert_load_refused(
        &opt,
        &resealed(&blob, put_u32(88 + 24 + 12, 77)),
        "grad_dtype",
    );
    let max_step = |b: &mut Vec<u8>| b[64..72].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_load_refused(&opt, &resealed(&blob, max_step), "2^63");
    // An lr valid alone whose decay with this optimizer's weight_decay would flip signs.
    let big_lr = |b: &mut Vec<u8>| b[72..76].copy_from_slice(&5.0f32.to_le_bytes());
    assert_load_refused(&opt, &resealed(&blob, big_lr), "outside [0, 1]");
    // The parameter dtype is not part of the layout: f16 -> f32 parameters load (documented).
    let as_f16 = put_u32(88 + 24 + 8, LION_DTYPE_F16);
    assert_eq!(
        opt.load(&resealed(&blob, as_f16)),
        LionStatus::LION_OK,
        "{}",
        last_error()
    );
}

#[test]
fn a_length_longer_than_the_checkpoint_is_refused_before_reading_past_it() {
    let opt = Opt::new(config(1e-3, 1.0), &one_tensor(1.0, 1.0)).unwrap();
    let blob = opt.save();
    // The claimed length runs 1 MiB past the blob's end, into a region mapped without access:
    // reading a byte of it would fault, so a refusal proves nothing past the blob was read.
    let page = 4096;
    let len = blob.len().div_ceil(page) * page;
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len + (1 << 20),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let start = (map as *mut u8).add(len - blob.len());
        std::ptr::copy_nonoverlapping(blob.as_ptr(), start, blob.len());
        assert_eq!(
            libc::mprotect((map as *mut u8).add(len).cast(), 1 << 20, libc::PROT_NONE),
            0
        );
        let st = lion_state_load(opt.raw, start.cast(), blob.len() + (1 << 20));
        assert_eq!(st, LionStatus::LION_ERROR_CORRUPT_STATE);
        assert!(
            last_error().contains(&format!("is {} bytes", blob.len())),
            "{}",
            last_error()
        );
        assert_eq!(
            lion_state_load(opt.raw, start.cast(), blob.len()),
            LionStatus::LION_OK
        );
        libc::munmap(map, len + (1 << 20));
    }
}

fn save_file(opt: &Opt, path: &std::path::Path) -> LionStatus {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    unsafe { lion_state_save_file(opt.raw, c.as_ptr()) }
}

fn temp_folder(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lion-host-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn saving_over_a_symlink_replaces_the_link_and_keeps_modes() {
    let opt = Opt::new(config(1e-3, 0.0), &one_tensor(1.0, 1.0)).unwrap();
    let dir = temp_folder("symlink");
    let target = dir.join("target.ckpt");
    std::fs::write(&target, b"not to be touched").unwrap();
    let link = dir.join("latest.ckpt");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_eq!(
        save_file(&opt, &link),
        LionStatus::LION_OK,
        "{}",
        last_error()
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_file());
    assert_eq!(std::fs::read(&target).unwrap(), b"not to be touched");
    assert_eq!(std::fs::read(&link).unwrap(), opt.save());
    // An existing checkpoint's permission bits survive the replacement.
    std::fs::set_permissions(&link, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        save_file(&opt, &link),
        LionStatus::LION_OK,
        "{}",
        last_error()
    );
    let mode = std::fs::metadata(&link).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The folder may be written but not read: the save must fail before replacing anything.
/// Root reads every folder, so as root the check runs in a child that drops to `nobody`.
#[test]
fn a_folder_that_cannot_be_opened_refuses_the_save_and_changes_nothing() {
    if std::env::var_os("LION_HOST_CHILD").is_none() && unsafe { libc::geteuid() } == 0 {
        let dir = temp_folder("unreadable");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "a_folder_that_cannot_be_opened_refuses_the_save_and_changes_nothing",
                "--nocapture",
            ])
            .env("LION_HOST_CHILD", &dir)
            .env(
                "LD_LIBRARY_PATH",
                std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default(),
            )
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "child as nobody:\n{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    }
    let dir = match std::env::var_os("LION_HOST_CHILD") {
        Some(d) => std::path::PathBuf::from(d).join("sub"),
        None => temp_folder("unreadable"),
    };
    std::fs::create_dir_all(&dir).unwrap();
    let opt = Opt::new(config(1e-3, 0.0), &one_tensor(1.0, 1.0)).unwrap();
    let path = dir.join("state.ckpt");
    std::fs::write(&path, b"the old checkpoint").unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o333)).unwrap();
    let st = save_file(&opt, &path);
    let message = last_error();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(st, LionStatus::LION_ERROR_IO, "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), b"the old checkpoint");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "a temporary file was left"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

use std::os::unix::process::CommandExt;

fn pool_threads_alive() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("lion-cpu"))
        .count()
}

#[test]
fn destroy_joins_every_pool_thread_and_the_count_is_bounded() {
    let tensors = [lion_tensor_desc(100_000, LION_DTYPE_F32)];
    let mut rng = Rng::new(5);
    let mut p = vec![Buf::random(LION_DTYPE_F32, 100_000, 1.0, &mut rng)];
    let mut g = vec![Buf::random(LION_DTYPE_F32, 100_000, 1.0, &mut rng)];
    for trial in 0..30 {
        let opt = Opt::new(
            LionConfig {
                num_threads: 6,
                ..config(1e-3, 0.0)
            },
            &tensors,
        )
        .unwrap();
        assert_eq!(opt.step(&mut p, &mut g), LionStatus::LION_OK);
        // The pool's threads are there and found by their name (else the check below would
        // pass having seen nothing).
        assert!(
            pool_threads_alive() >= 6,
            "trial {trial}: the pool's 6 threads are not listed as lion-cpu-*"
        );
        drop(opt);
        // lion_destroy joined them; the kernel may list a joined thread for a few more
        // microseconds (its tid is cleared before the task is released), so allow 50 ms.
        let gone = (0..50).any(|_| {
            let alive = pool_threads_alive();
            if alive > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            alive == 0
        });
        assert!(gone, "trial {trial}: threads alive after lion_destroy");
        assert_eq!(
            pool_threads_alive(),
            0,
            "trial {trial}: threads alive after lion_destroy"
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bound = (4 * cores).max(256) as u32;
    let too_many = LionConfig {
        num_threads: bound + 1,
        ..config(1e-3, 0.0)
    };
    refused_at_create(too_many, &tensors, "num_threads");
}
