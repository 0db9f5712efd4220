//! CPU benchmark: `lion_step` beside plain parallel loops that move the same bytes (the
//! machine's ceiling for this traffic), in the same run, on the same number of threads: a
//! Rust loop on rayon, and for f32 a C loop with Lion's arithmetic on OpenMP
//! (`benches/c/same_bytes.c`, compiled at run time with the system's C compiler; its column
//! is left empty where that fails).
//!
//!   cargo bench --bench cpu_step                 # criterion's report
//!   LION_BENCH_QUICK=1 cargo bench --bench cpu_step -- --summary   # the table only
//!   cargo bench --bench cpu_step -- --in-cache   # one thread, data in cache: ns per element
//!   cargo bench --bench cpu_step -- --sweep      # flat sizes from cache to memory
//!
//! Cases: flat f32 buffers (2^25 and 2^26 elements), the 148 tensors of GPT-2 small (124M
//! parameters), bf16 parameters, gradients and momentum, and f16 parameters and gradients
//! with f32 momentum, f32 parameters and gradients with 8-bit momentum (`LION_DTYPE_Q8`).
//! Bytes per element: f32 20 (read p, g, m; write p, m), bf16 10, f16 14, q8 14 (and 1/32 of
//! a byte of block scales, left out). The summary measures each case on one thread and on
//! one per core. For experiments: `LION_BENCH_ONLY` (cases by name), `LION_BENCH_THREADS`
//! (thread counts), `LION_BENCH_C=same-bytes` (the C loop with trivial arithmetic).

use std::ffi::c_void;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use lion::*;
use rayon::prelude::*;

#[path = "common/shapes.rs"]
mod shapes;
use shapes::gpt2_small;

#[path = "c/c_loop.rs"]
mod c_loop;

enum Data {
    F32 {
        p: Vec<Vec<f32>>,
        g: Vec<Vec<f32>>,
        m: Vec<Vec<f32>>,
    },
    Bf16 {
        p: Vec<Vec<bf16>>,
        g: Vec<Vec<bf16>>,
        m: Vec<Vec<bf16>>,
    },
    F16 {
        p: Vec<Vec<f16>>,
        g: Vec<Vec<f16>>,
        m: Vec<Vec<f32>>,
    },
    /// f32 parameters and gradients with 8-bit momentum (the loops move one byte of it).
    Q8 {
        p: Vec<Vec<f32>>,
        g: Vec<Vec<f32>>,
        m: Vec<Vec<u8>>,
    },
    /// bf16 parameters and gradients with 8-bit momentum.
    Q8Bf16 {
        p: Vec<Vec<bf16>>,
        g: Vec<Vec<bf16>>,
        m: Vec<Vec<u8>>,
    },
}

struct Case {
    name: &'static str,
    sizes: Vec<u64>,
    /// Parameters and gradients; the momentum is bf16 with bf16 parameters, else f32.
    dtype: LionDType,
    /// 8-bit momentum instead.
    q8: bool,
}

impl Case {
    fn state_dtype(&self) -> LionDType {
        if self.q8 {
            LION_DTYPE_Q8
        } else if self.dtype == LION_DTYPE_BF16 {
            LION_DTYPE_BF16
        } else {
            LION_DTYPE_F32
        }
    }
}

impl Case {
    fn elements(&self) -> u64 {
        self.sizes.iter().sum()
    }
    fn bytes(&self) -> u64 {
        let size = |d| match d {
            LION_DTYPE_F32 => 4,
            LION_DTYPE_Q8 => 1,
            _ => 2,
        };
        // Read p, g, m; write p, m (q8: plus a 4-byte scale per 256 elements, read and
        // written, left out).
        self.elements() * (2 * size(self.dtype) + size(self.dtype) + 2 * size(self.state_dtype()))
    }
}

fn random_f32(n: u64, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 - 1000.0) * 1e-3)
        .collect()
}

fn data(case: &Case) -> Data {
    let make = |seed| {
        case.sizes
            .iter()
            .map(|&n| random_f32(n, seed))
            .collect::<Vec<_>>()
    };
    let to_bf16 = |v: Vec<Vec<f32>>| {
        v.into_iter()
            .map(|t| t.into_iter().map(bf16::from_f32).collect())
            .collect()
    };
    let to_f16 = |v: Vec<Vec<f32>>| {
        v.into_iter()
            .map(|t| t.into_iter().map(f16::from_f32).collect())
            .collect()
    };
    if case.q8 {
        let m = case.sizes.iter().map(|&n| vec![0u8; n as usize]).collect();
        return if case.dtype == LION_DTYPE_BF16 {
            Data::Q8Bf16 {
                p: to_bf16(make(1)),
                g: to_bf16(make(2)),
                m,
            }
        } else {
            Data::Q8 {
                p: make(1),
                g: make(2),
                m,
            }
        };
    }
    match case.dtype {
        LION_DTYPE_F32 => Data::F32 {
            p: make(1),
            g: make(2),
            m: make(3),
        },
        LION_DTYPE_F16 => Data::F16 {
            p: to_f16(make(1)),
            g: to_f16(make(2)),
            m: make(3),
        },
        _ => Data::Bf16 {
            p: to_bf16(make(1)),
            g: to_bf16(make(2)),
            m: to_bf16(make(3)),
        },
    }
}

/// The optimizer's settings in every case (the C loop derives its coefficients from them).
fn bench_config() -> LionConfig {
    LionConfig {
        lr: 1e-4,
        weight_decay: 0.1,
        ..lion_config_default()
    }
}

struct Lion {
    opt: *mut LionOptimizer,
    params: Vec<*mut c_void>,
    grads: Vec<*const c_void>,
}

impl Lion {
    fn new(case: &Case, data: &mut Data) -> Lion {
        Self::with_threads(case, data, 0)
    }

    fn with_threads(case: &Case, data: &mut Data, num_threads: u32) -> Lion {
        let tensors: Vec<LionTensorDesc> = case
            .sizes
            .iter()
            .map(|&n| lion_tensor_desc(n, case.dtype))
            .collect();
        let config = LionConfig {
            state_dtype: case.state_dtype(),
            num_threads,
            ..bench_config()
        };
        let mut opt = std::ptr::null_mut();
        let st = unsafe { lion_create(&config, tensors.as_ptr(), tensors.len(), &mut opt) };
        assert_eq!(st, LionStatus::LION_OK);
        let (params, grads) = match data {
            Data::F32 { p, g, .. } | Data::Q8 { p, g, .. } => (
                p.iter_mut()
                    .map(|t| t.as_mut_ptr() as *mut c_void)
                    .collect(),
                g.iter().map(|t| t.as_ptr() as *const c_void).collect(),
            ),
            Data::Bf16 { p, g, .. } | Data::Q8Bf16 { p, g, .. } => (
                p.iter_mut()
                    .map(|t| t.as_mut_ptr() as *mut c_void)
                    .collect(),
                g.iter().map(|t| t.as_ptr() as *const c_void).collect(),
            ),
            Data::F16 { p, g, .. } => (
                p.iter_mut()
                    .map(|t| t.as_mut_ptr() as *mut c_void)
                    .collect(),
                g.iter().map(|t| t.as_ptr() as *const c_void).collect(),
            ),
        };
        Lion { opt, params, grads }
    }
    fn step(&self) {
        let st = unsafe {
            lion_step(
                self.opt,
                self.params.as_ptr(),
                self.grads.as_ptr(),
                self.params.len(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(st, LionStatus::LION_OK);
    }
}

impl Drop for Lion {
    fn drop(&mut self) {
        unsafe { lion_destroy(self.opt) }
    }
}

/// The ceiling: read p, g, m and write p, m, with trivial arithmetic, on a pool of the same
/// size, in chunks of the same size.
fn plain_loop(pool: &rayon::ThreadPool, data: &mut Data) {
    pool.install(|| match data {
        Data::F32 { p, g, m } => each_element(p, g, m, |p, g, m| {
            *p -= 1e-4 * g;
            *m = *m * 0.99 + g;
        }),
        Data::Bf16 { p, g, m } => each_element(p, g, m, |p, g, m| {
            *p = bf16::from_bits(p.to_bits() ^ g.to_bits());
            *m = bf16::from_bits(m.to_bits().wrapping_add(g.to_bits()));
        }),
        Data::F16 { p, g, m } => each_element(p, g, m, |p, g, m| {
            *p = f16::from_bits(p.to_bits() ^ g.to_bits());
            *m = *m * 0.99 + g.to_bits() as f32;
        }),
        Data::Q8 { p, g, m } => each_element(p, g, m, |p, g, m| {
            *p -= 1e-4 * g;
            *m = m.wrapping_add(g.to_bits() as u8);
        }),
        Data::Q8Bf16 { p, g, m } => each_element(p, g, m, |p, g, m| {
            *p = bf16::from_bits(p.to_bits() ^ g.to_bits());
            *m = m.wrapping_add(g.to_bits() as u8);
        }),
    });
}

/// `f(p, g, m)` for every element of every tensor, in parallel chunks of lion's size.
fn each_element<P: Send, G: Copy + Sync, M: Send>(
    p: &mut [Vec<P>],
    g: &[Vec<G>],
    m: &mut [Vec<M>],
    f: impl Fn(&mut P, G, &mut M) + Sync,
) {
    const CHUNK: usize = 16 * 1024;
    for ((p, g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .for_each(|((p, g), m)| {
                for ((p, &g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
                    f(p, g, m);
                }
            });
    }
}

fn cases() -> Vec<Case> {
    let quick = std::env::var("LION_BENCH_QUICK").is_ok_and(|v| v == "1");
    let mut cases = vec![
        Case {
            name: "flat 2^25 f32",
            sizes: vec![1 << 25],
            dtype: LION_DTYPE_F32,
            q8: false,
        },
        Case {
            name: "GPT-2 small f32 (148 tensors)",
            sizes: gpt2_small(),
            dtype: LION_DTYPE_F32,
            q8: false,
        },
        Case {
            name: "flat 2^25 bf16 (p, g, m)",
            sizes: vec![1 << 25],
            dtype: LION_DTYPE_BF16,
            q8: false,
        },
        Case {
            name: "flat 2^25 f32 p, g (q8 m)",
            sizes: vec![1 << 25],
            dtype: LION_DTYPE_F32,
            q8: true,
        },
        Case {
            name: "GPT-2 small f32 p, g (q8 m)",
            sizes: gpt2_small(),
            dtype: LION_DTYPE_F32,
            q8: true,
        },
        Case {
            name: "GPT-2 small bf16 (p, g, m)",
            sizes: gpt2_small(),
            dtype: LION_DTYPE_BF16,
            q8: false,
        },
    ];
    if !quick {
        cases.insert(
            1,
            Case {
                name: "flat 2^26 f32",
                sizes: vec![1 << 26],
                dtype: LION_DTYPE_F32,
                q8: false,
            },
        );
        cases.push(Case {
            name: "flat 2^25 f16 p, g (f32 m)",
            sizes: vec![1 << 25],
            dtype: LION_DTYPE_F16,
            q8: false,
        });
        cases.push(Case {
            name: "flat 2^25 bf16 p, g (q8 m)",
            sizes: vec![1 << 25],
            dtype: LION_DTYPE_BF16,
            q8: true,
        });
    }
    // LION_BENCH_ONLY="2^25 f32,GPT-2 small f32" keeps the cases whose names contain one of these.
    if let Ok(only) = std::env::var("LION_BENCH_ONLY") {
        cases.retain(|c| only.split(',').any(|o| c.name.contains(o.trim())));
    }
    cases
}

/// Milliseconds per call of `f`, `reps` calls after one warm-up call.
fn samples_ms(mut f: impl FnMut(), reps: usize) -> Vec<f64> {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn median_ms(f: impl FnMut(), reps: usize) -> f64 {
    median(samples_ms(f, reps))
}

/// Medians over all samples, and lion's ratio to each loop per round.
struct Timings {
    lion: f64,
    rayon: f64,
    c: Option<f64>,
    /// loop / lion in each round (medians of the round's steps), for the rayon and the C loop.
    rayon_ratios: Vec<f64>,
    c_ratios: Vec<f64>,
}

/// Which C loop is the second ceiling: Lion's arithmetic (the default), or with
/// `LION_BENCH_C=same-bytes` trivial arithmetic over the same bytes.
fn c_trivial() -> bool {
    std::env::var("LION_BENCH_C").is_ok_and(|v| v == "same-bytes")
}

/// Rounds and steps per round (`LION_BENCH_ROUNDS="9,5"`): many short rounds weather a
/// shared machine whose memory bandwidth drifts better than a few long ones.
fn rounds() -> (usize, usize) {
    std::env::var("LION_BENCH_ROUNDS")
        .ok()
        .and_then(|v| {
            let (r, s) = v.split_once(',')?;
            Some((r.trim().parse().ok()?, s.trim().parse().ok()?))
        })
        .filter(|&(r, s)| r > 0 && s > 0)
        .unwrap_or((9, 5))
}

/// lion_step and the loops on `threads` threads, measured in alternating rounds (so that a
/// machine whose speed drifts, shared or throttled, weighs on all alike).
fn timings(case: &Case, threads: usize, cl: Option<&c_loop::CLoops>) -> Timings {
    let (rounds, reps) = rounds();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut d = data(case);
    let lion = Lion::with_threads(case, &mut d, threads as u32);
    // The C loop updates its own momentum (lion's is inside the optimizer).
    let mut c_state = match (&mut d, cl) {
        (Data::F32 { p, g, .. }, Some(_)) => {
            let mut m: Vec<Vec<f32>> = case.sizes.iter().map(|&n| random_f32(n, 3)).collect();
            let t = c_loop::Tensors::new(p, g, &mut m);
            Some((m, t))
        }
        _ => None,
    };
    let k = c_loop::Coeffs::new(&bench_config());
    let (mut t_lion, mut t_rayon, mut t_c) = (vec![], vec![], vec![]);
    let (mut r_rayon, mut r_c) = (vec![], vec![]);
    for _ in 0..rounds {
        let l = samples_ms(|| lion.step(), reps);
        let r = samples_ms(|| plain_loop(&pool, &mut d), reps);
        r_rayon.push(median(r.clone()) / median(l.clone()));
        if let (Some(cl), Some((_, t))) = (cl, &mut c_state) {
            let c = samples_ms(
                || match c_trivial() {
                    true => cl.same_bytes(threads, t),
                    false => cl.lion(threads, t, &k),
                },
                reps,
            );
            r_c.push(median(c.clone()) / median(l.clone()));
            t_c.extend(c);
        }
        t_lion.extend(l);
        t_rayon.extend(r);
    }
    Timings {
        lion: median(t_lion),
        rayon: median(t_rayon),
        c: (!t_c.is_empty()).then(|| median(t_c)),
        rayon_ratios: r_rayon,
        c_ratios: r_c,
    }
}

/// "0.91x (0.88-0.93)": the median over the rounds of loop / lion, and its interquartile
/// range; "-" for no rounds.
fn ratio(mut per_round: Vec<f64>) -> String {
    if per_round.is_empty() {
        return "-".into();
    }
    per_round.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |f: f64| per_round[((per_round.len() - 1) as f64 * f).round() as usize];
    format!("{:.2}x ({:.2}-{:.2})", q(0.5), q(0.25), q(0.75))
}

/// Checks that the C loop computes lion_step's bits (two steps, an odd length).
fn check_c_loop(cl: &c_loop::CLoops) {
    let case = Case {
        name: "check",
        sizes: vec![(1 << 20) + 13, 1000],
        dtype: LION_DTYPE_F32,
        q8: false,
    };
    let (mut a, mut b) = (data(&case), data(&case));
    let lion = Lion::new(&case, &mut a);
    let Data::F32 { p, g, .. } = &mut b else {
        unreachable!()
    };
    let mut m: Vec<Vec<f32>> = case.sizes.iter().map(|&n| vec![0.0; n as usize]).collect();
    let t = c_loop::Tensors::new(p, g, &mut m);
    let k = c_loop::Coeffs::new(&bench_config());
    for _ in 0..2 {
        lion.step();
        cl.lion(2, &t, &k);
    }
    drop(lion);
    let (Data::F32 { p: pa, .. }, Data::F32 { p: pb, .. }) = (&a, &b) else {
        unreachable!()
    };
    let bits =
        |v: &Vec<Vec<f32>>| -> Vec<u32> { v.iter().flatten().map(|x| x.to_bits()).collect() };
    assert!(
        bits(pa) == bits(pb),
        "the C loop does not compute lion_step's values"
    );
}

/// The thread counts to measure: one, and one per core (`LION_BENCH_THREADS="2"` picks).
fn thread_counts() -> Vec<usize> {
    if let Ok(v) = std::env::var("LION_BENCH_THREADS") {
        return v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    }
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    if all > 1 {
        vec![1, all]
    } else {
        vec![1]
    }
}

/// A table of medians: lion_step beside the loops, GB/s and the fraction of each ceiling.
fn summary() {
    let cl = c_loop::CLoops::load();
    if let Some(cl) = &cl {
        check_c_loop(cl);
    }
    let c_name = if c_trivial() {
        "C same-bytes loop"
    } else {
        "C Lion loop"
    };
    let (r, n) = rounds();
    println!(
        "\nCPU summary ({r} alternating rounds of {n} steps of each; ms: medians of all steps; \
         ratio: loop / lion, median over the rounds (interquartile range))"
    );
    println!(
        "| case | threads | lion_step ms | GB/s | rayon loop ms | {c_name} ms | lion / rayon loop | lion / {c_name} |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for case in cases() {
        for threads in thread_counts() {
            let t = timings(&case, threads, cl.as_ref());
            let gb = case.bytes() as f64 / 1e9;
            let c_ms = t.c.map_or("-".into(), |c| format!("{c:.2}"));
            println!(
                "| {} | {threads} | {:.2} | {:.1} | {:.2} | {c_ms} | {} | {} |",
                case.name,
                t.lion,
                gb / t.lion * 1e3,
                t.rayon,
                ratio(t.rayon_ratios),
                ratio(t.c_ratios),
            );
        }
    }
}

/// The compute cost alone: one thread, 16 Ki elements (a few hundred KB, in L2), per
/// instruction set the CPU offers. Where the data comes from cache (the flat bf16 case on
/// a large-cache server), this, not memory, bounds the step.
fn in_cache() {
    let n = 16 * 1024;
    let reps = 2000;
    let isas = ["baseline", "avx2", "avx512", "best"];
    println!(
        "\nIn cache: one thread, {n} elements, ns per element (median of 15 runs of {reps} steps)"
    );
    println!("| case | {} |", isas.join(" | "));
    println!("|---|{}", "---|".repeat(isas.len()));
    let cases = [
        ("f32", LION_DTYPE_F32, false),
        ("bf16 p, g, m", LION_DTYPE_BF16, false),
        ("f16 p, g; f32 m", LION_DTYPE_F16, false),
        ("f32 p, g; q8 m", LION_DTYPE_F32, true),
        ("bf16 p, g; q8 m", LION_DTYPE_BF16, true),
    ];
    let only = std::env::var("LION_BENCH_ONLY").ok();
    for (name, dtype, q8) in cases {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|c| name.contains(c.trim())))
        {
            continue;
        }
        let case = Case {
            name,
            sizes: vec![n],
            dtype,
            q8,
        };
        let mut row = format!("| {name} |");
        for isa in isas {
            // Read by lion_create (Isa::detect); this thread is the only one running.
            if isa == "best" {
                std::env::remove_var("LION_CPU_ISA");
            } else {
                std::env::set_var("LION_CPU_ISA", isa);
            }
            let mut d = data(&case);
            let lion = Lion::with_threads(&case, &mut d, 1);
            let ms = median_ms(
                || {
                    for _ in 0..reps {
                        lion.step()
                    }
                },
                15,
            );
            row += &format!(" {:.3} |", ms * 1e6 / (reps as f64 * n as f64));
        }
        println!("{row}");
    }
    std::env::remove_var("LION_CPU_ISA");
    // The C loop's compute cost beside it (gcc's vectorization of the same arithmetic).
    if let Some(cl) = c_loop::CLoops::load() {
        let case = Case {
            name: "f32",
            sizes: vec![n],
            dtype: LION_DTYPE_F32,
            q8: false,
        };
        let Data::F32 { mut p, g, mut m } = data(&case) else {
            unreachable!()
        };
        let t = c_loop::Tensors::new(&mut p, &g, &mut m);
        let k = c_loop::Coeffs::new(&bench_config());
        let ms = median_ms(
            || {
                for _ in 0..reps {
                    cl.lion(1, &t, &k)
                }
            },
            15,
        );
        println!(
            "C Lion loop, f32: {:.3} ns per element",
            ms * 1e6 / (reps as f64 * n as f64)
        );
    }
}

/// lion_step against the loop on flat buffers from cache-sized to memory-sized: where the
/// ratio changes says whether compute or memory limits the step.
fn sweep() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cl = c_loop::CLoops::load();
    let (r, n) = rounds();
    println!("\nSweep, {threads} threads ({r} alternating rounds of {n} steps; as the summary)");
    println!(
        "| case | lion_step ms | GB/s | rayon loop ms | C loop ms | lion / rayon | lion / C |"
    );
    println!("|---|---|---|---|---|---|---|");
    for dtype in [LION_DTYPE_BF16, LION_DTYPE_F32] {
        // LION_BENCH_SWEEP="24,25" picks the sizes (log2 of the elements).
        let sizes: Vec<u32> = std::env::var("LION_BENCH_SWEEP")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or(vec![22, 24, 25, 26, 27]);
        for &log2 in &sizes {
            let case = Case {
                name: "",
                sizes: vec![1 << log2],
                dtype,
                q8: false,
            };
            let t = timings(&case, threads, cl.as_ref());
            let gb = case.bytes() as f64 / 1e9;
            let name = if dtype == LION_DTYPE_F32 {
                "f32"
            } else {
                "bf16"
            };
            let c_ms = t.c.map_or("-".into(), |c| format!("{c:.3}"));
            println!(
                "| 2^{log2} {name} | {:.3} | {:.0} | {:.3} | {c_ms} | {} | {} |",
                t.lion,
                gb / t.lion * 1e3,
                t.rayon,
                ratio(t.rayon_ratios),
                ratio(t.c_ratios),
            );
        }
    }
}

fn criterion_benches(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    for case in cases() {
        let mut group = c.benchmark_group(case.name);
        group
            .throughput(Throughput::Bytes(case.bytes()))
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1));
        let mut d = data(&case);
        {
            let lion = Lion::new(&case, &mut d);
            group.bench_function(BenchmarkId::new("lion_step", threads), |b| {
                b.iter(|| lion.step())
            });
        }
        group.bench_function(BenchmarkId::new("same-bytes loop", threads), |b| {
            b.iter(|| plain_loop(&pool, &mut d))
        });
        group.finish();
    }
}

fn main() {
    if std::env::args().any(|a| a == "--in-cache") {
        return in_cache();
    }
    if std::env::args().any(|a| a == "--sweep") {
        return sweep();
    }
    let summary_only = std::env::args().any(|a| a == "--summary");
    if !summary_only {
        let mut c = Criterion::default().configure_from_args();
        criterion_benches(&mut c);
        c.final_summary();
    }
    summary();
}
