//! One handle, many threads: calls are serialised, never racing; handles on different threads
//! are independent; the last-error message belongs to each thread.

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use lion::*;

struct Shared(*mut LionOptimizer);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

#[test]
fn many_threads_on_one_handle_are_serialised() {
    let threads = 8;
    let steps = 40;
    let t = [lion_tensor_desc(20_000, LION_DTYPE_F32)];
    let opt = Opt::new(
        LionConfig {
            num_threads: 2,
            ..lion_config_default()
        },
        &t,
    )
    .unwrap();
    let shared = Arc::new(Shared(opt.raw));
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let (shared, barrier) = (Arc::clone(&shared), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut rng = Rng::new(k as u64);
                let t = [lion_tensor_desc(20_000, LION_DTYPE_F32)];
                let mut p = random_params(&t, &mut rng);
                let g = random_grads(&t, 1.0, &mut rng);
                let pp = [p[0].ptr()];
                let gp = [match &g[0] {
                    Buf::F32(v) => v.as_ptr() as *const std::ffi::c_void,
                    _ => unreachable!(),
                }];
                barrier.wait();
                for i in 0..steps {
                    let st = unsafe {
                        lion_step(shared.0, pp.as_ptr(), gp.as_ptr(), 1, std::ptr::null_mut())
                    };
                    assert_eq!(st, LionStatus::LION_OK, "thread {k}: {}", last_error());
                    if i % 5 == 0 {
                        let mut lr = 0.0;
                        assert_eq!(
                            unsafe { lion_get_lr(shared.0, &mut lr) },
                            LionStatus::LION_OK
                        );
                        assert_eq!(unsafe { lion_set_lr(shared.0, lr) }, LionStatus::LION_OK);
                        let mut n = 0;
                        assert_eq!(
                            unsafe { lion_state_size(shared.0, &mut n) },
                            LionStatus::LION_OK
                        );
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(opt.step_count(), (threads * steps) as u64);
}

#[test]
fn handles_on_different_threads_are_independent() {
    let run = |seed: u64| {
        let t = [lion_tensor_desc(50_000, LION_DTYPE_BF16)];
        let opt = Opt::new(
            LionConfig {
                stochastic_rounding: true,
                seed,
                ..lion_config_default()
            },
            &t,
        )
        .unwrap();
        let mut rng = Rng::new(seed);
        let mut p = random_params(&t, &mut rng);
        for _ in 0..5 {
            let mut g = random_grads(&t, 1.0, &mut rng);
            assert_eq!(opt.step(&mut p, &mut g), LionStatus::LION_OK);
        }
        (p[0].bits(), opt.save())
    };
    let alone: Vec<_> = (0..6).map(run).collect();
    let together: Vec<_> = (0..6u64)
        .map(|s| std::thread::spawn(move || run(s)))
        .collect();
    for (want, h) in alone.into_iter().zip(together) {
        assert!(h.join().unwrap() == want);
    }
}

#[test]
fn the_last_error_is_per_thread() {
    let barrier = Arc::new(Barrier::new(2));
    let b2 = Arc::clone(&barrier);
    let failing = std::thread::spawn(move || {
        assert_eq!(
            unsafe { lion_set_lr(std::ptr::null_mut(), 1.0) },
            LionStatus::LION_ERROR_NULL_POINTER
        );
        b2.wait(); // the other thread succeeds now
        b2.wait();
        last_error()
    });
    let opt = Opt::new(
        lion_config_default(),
        &[lion_tensor_desc(4, LION_DTYPE_F32)],
    )
    .unwrap();
    barrier.wait();
    assert_eq!(unsafe { lion_set_lr(opt.raw, 0.5) }, LionStatus::LION_OK);
    assert_eq!(last_error(), "");
    barrier.wait();
    assert!(failing.join().unwrap().contains("opt is NULL"));
}
