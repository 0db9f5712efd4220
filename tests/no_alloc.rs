//! A steady-state `lion_step` allocates nothing, on the pool or on the caller's thread, for
//! every kind of step (real-time hosts call it from their frame loop). The only test in this
//! binary, so that no other test allocates while it counts.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use lion::*;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_steps_do_not_allocate() {
    let cases = [
        (
            "f32, pool",
            lion_config_default(),
            LION_DTYPE_F32,
            300_000u64,
        ),
        (
            "f32, caller's thread",
            LionConfig {
                num_threads: 1,
                ..lion_config_default()
            },
            LION_DTYPE_F32,
            300_000,
        ),
        ("small step", lion_config_default(), LION_DTYPE_F32, 100),
        (
            "bf16, cautious, stochastic rounding",
            LionConfig {
                cautious_factor: 0.0,
                cautious_weight_decay: true,
                weight_decay: 0.1,
                state_dtype: LION_DTYPE_BF16,
                stochastic_rounding: true,
                ..lion_config_default()
            },
            LION_DTYPE_BF16,
            300_000,
        ),
        (
            "q8, cautious, stochastic rounding",
            LionConfig {
                cautious_factor: 0.0,
                cautious_weight_decay: true,
                weight_decay: 0.1,
                state_dtype: LION_DTYPE_Q8,
                stochastic_rounding: true,
                ..lion_config_default()
            },
            LION_DTYPE_BF16,
            300_000,
        ),
        (
            "f16 params",
            LionConfig {
                stochastic_rounding: true,
                ..lion_config_default()
            },
            LION_DTYPE_F16,
            300_000,
        ),
    ];
    // Every optimizer lives to the end: a dropped pool's threads finish exiting (and free
    // and allocate thread-local bookkeeping) after `lion_destroy` returns, which would be
    // counted against the next case.
    let mut finished = Vec::new();
    for (name, config, dtype, n) in cases {
        let tensors = [
            lion_tensor_desc(n, dtype),
            lion_tensor_desc(n / 3 + 1, dtype),
        ];
        let opt = Opt::new(config, &tensors).unwrap();
        let mut rng = Rng::new(3);
        let mut params: Vec<Buf> = tensors
            .iter()
            .map(|t| Buf::random(dtype, t.numel as usize, 1.0, &mut rng))
            .collect();
        let mut grads: Vec<Buf> = tensors
            .iter()
            .map(|t| Buf::random(dtype, t.numel as usize, 1.0, &mut rng))
            .collect();
        let p: Vec<*mut std::ffi::c_void> = params.iter_mut().map(Buf::ptr).collect();
        let g: Vec<*const std::ffi::c_void> =
            grads.iter_mut().map(|b| b.ptr() as *const _).collect();
        let step = || unsafe {
            lion_step(
                opt.raw,
                p.as_ptr(),
                g.as_ptr(),
                p.len(),
                std::ptr::null_mut(),
            )
        };
        // Warm-up: thread-locals and the pool's first wake-ups may allocate once.
        for _ in 0..3 {
            assert_eq!(step(), LionStatus::LION_OK);
        }
        ALLOCATIONS.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        // More steps than rayon's injector block (63 jobs), so a per-63 allocation shows.
        for _ in 0..200 {
            assert_eq!(step(), LionStatus::LION_OK);
        }
        COUNTING.store(false, Ordering::SeqCst);
        assert_eq!(
            ALLOCATIONS.load(Ordering::SeqCst),
            0,
            "{name}: lion_step allocated"
        );
        finished.push(opt);
    }
    // Rounds of lion_step_tensors (one tensor per call, then groups): the same, per call.
    for (name, config) in [
        ("step_tensors, pool", lion_config_default()),
        (
            "step_tensors, cautious, bf16 state, caller's thread",
            LionConfig {
                num_threads: 1,
                cautious_factor: 0.0,
                state_dtype: LION_DTYPE_BF16,
                stochastic_rounding: true,
                ..lion_config_default()
            },
        ),
    ] {
        let sizes = [300_000u64, 100, 0, 70_000];
        let tensors: Vec<LionTensorDesc> = (sizes.iter())
            .map(|&n| lion_tensor_desc(n, LION_DTYPE_BF16))
            .collect();
        let opt = Opt::new(config, &tensors).unwrap();
        let mut rng = Rng::new(4);
        let mut params = random_params(&tensors, &mut rng);
        let mut grads = random_grads(&tensors, 1.0, &mut rng);
        let p: Vec<*mut std::ffi::c_void> = params.iter_mut().map(Buf::ptr).collect();
        let g: Vec<*const std::ffi::c_void> =
            grads.iter_mut().map(|b| b.ptr() as *const _).collect();
        let groups: [&[u32]; 5] = [&[3], &[1], &[0, 2], &[2, 0, 3], &[1]];
        // Each group's pointers, in its order, held beforehand.
        let held: Vec<(Vec<*mut std::ffi::c_void>, Vec<*const std::ffi::c_void>)> = (groups.iter())
            .map(|gr| {
                (
                    gr.iter().map(|&i| p[i as usize]).collect(),
                    gr.iter().map(|&i| g[i as usize]).collect(),
                )
            })
            .collect();
        let round = || {
            for (gr, (hp, hg)) in groups.iter().zip(&held) {
                let st = unsafe {
                    lion_step_tensors(
                        opt.raw,
                        gr.as_ptr(),
                        gr.len(),
                        hp.as_ptr(),
                        hg.as_ptr(),
                        std::ptr::null_mut(),
                        std::ptr::null(),
                    )
                };
                assert_eq!(st, LionStatus::LION_OK);
            }
        };
        // Groups 0-2 make one round, 3-4 the next.
        for _ in 0..3 {
            round();
        }
        ALLOCATIONS.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        for _ in 0..100 {
            round();
        }
        COUNTING.store(false, Ordering::SeqCst);
        assert_eq!(
            ALLOCATIONS.load(Ordering::SeqCst),
            0,
            "{name}: lion_step_tensors allocated"
        );
        finished.push(opt);
    }
    // The distributed modes, one rank whose collectives are copies (the step's own work:
    // agreements, copies, votes, packing), with and without the found_inf exchange.
    for (mode, exchange) in [
        (LION_DIST_SHARDED, LION_VOTE_AUTO),
        (LION_DIST_VOTE, LION_VOTE_GATHER),
        (LION_DIST_VOTE, LION_VOTE_SUMS),
    ] {
        let config = LionConfig {
            cautious_weight_decay: true,
            weight_decay: 0.1,
            stochastic_rounding: true,
            ..lion_config_default()
        };
        let tensors = [
            lion_tensor_desc(300_001, LION_DTYPE_BF16),
            lion_tensor_desc(7, LION_DTYPE_BF16),
        ];
        // Copied by lion_create_distributed (its functions must outlive the optimizer).
        let copies = LionCollectives {
            struct_size: std::mem::size_of::<LionCollectives>() as u32,
            context: std::ptr::null_mut(),
            all_reduce_sum: Some(copy_collective),
            reduce_scatter_sum: Some(copy_collective),
            all_gather: Some(copy_collective),
        };
        let dist = LionDistConfig {
            mode,
            world_size: 1,
            collectives: &copies,
            vote_exchange: exchange,
            ..lion_dist_config_default()
        };
        let opt = Opt::distributed(config, &tensors, &dist).unwrap();
        let mut rng = Rng::new(5);
        let mut params = random_params(&tensors, &mut rng);
        let mut grads = random_grads(&tensors, 1.0, &mut rng);
        let p: Vec<*mut std::ffi::c_void> = params.iter_mut().map(Buf::ptr).collect();
        let g: Vec<*const std::ffi::c_void> =
            grads.iter_mut().map(|b| b.ptr() as *const _).collect();
        let no_inf = 0.0f32;
        let options = LionStepOptions {
            found_inf: &no_inf,
            ..lion_step_options_default()
        };
        let step = |opts: *const LionStepOptions| unsafe {
            let st = lion_step_with_options(
                opt.raw,
                p.as_ptr(),
                g.as_ptr(),
                p.len(),
                std::ptr::null_mut(),
                opts,
            );
            assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
        };
        for _ in 0..3 {
            step(std::ptr::null());
            step(&options);
        }
        ALLOCATIONS.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        for _ in 0..100 {
            step(std::ptr::null());
            step(&options);
        }
        COUNTING.store(false, Ordering::SeqCst);
        assert_eq!(
            ALLOCATIONS.load(Ordering::SeqCst),
            0,
            "distributed mode {mode} (exchange {exchange}): lion_step allocated"
        );
        finished.push(opt);
    }
}

/// A world of one's collectives: copies.
unsafe extern "C" fn copy_collective(
    _: *mut std::ffi::c_void,
    send: *const std::ffi::c_void,
    recv: *mut std::ffi::c_void,
    count: usize,
    dtype: LionCommDType,
    _: *mut std::ffi::c_void,
) -> i32 {
    let size = match dtype {
        LION_COMM_F32 => 4,
        LION_COMM_F16 | LION_COMM_BF16 => 2,
        LION_COMM_U64 => 8,
        _ => 1,
    };
    if !std::ptr::eq(send, recv) {
        std::ptr::copy_nonoverlapping(send as *const u8, recv as *mut u8, count * size);
    }
    0
}
