//! The measurement behind liblion's 8-bit momentum format (`LION_DTYPE_Q8`): which code map
//! and which rounding keep Lion closest to f32 momentum; and whether a 4-bit one could (it
//! cannot: BENCHMARKS.md). Standalone (it does not call the library): it trains a small MLP
//! with Lion written out here, its momentum stored as f32, bf16 or one of several 8-bit
//! formats (blocks of 256, one scale per block) and 4-bit ones (blocks of 64 to 256), tensors
//! under 4096 elements kept in f32, and reports two numbers per format:
//!
//! - along the f32 run, a shadow momentum per format fed the same gradients: the fraction of
//!   update signs sign(b1*m + (1-b1)*g) that differ from f32 momentum's, and the momentum's
//!   relative RMS error (the quantizer's error alone, without the divergence of training);
//! - the final training loss when the format's momentum drives the training (mean of seeds).
//!
//! `cargo run --release --example q8_momentum` (about 7 minutes on one core; `Q8_ONLY=q4`
//! runs only the formats whose name holds "q4"; BENCHMARKS.md has the output and what it
//! decided).

use std::time::Instant;

const BLOCK: usize = 256;
const SMALL: usize = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

#[derive(Clone, Copy, Debug)]
enum Map {
    /// code * amax / 127.
    Linear,
    /// A small float (1 sign, `e` exponent and `m` mantissa bits, subnormals) times a power
    /// of two above the block's largest magnitude.
    Float { e: u32, m: u32 },
    /// sign(k) * (k / 127)^2 * amax: a square-root companding, k in -127..=127.
    Square,
    /// bitsandbytes' signed dynamic map (decimal exponents, linear fractions) times amax.
    Dynamic,
}

/// The 4-bit maps tried (`Format::Q4`).
#[derive(Clone, Copy, Debug)]
enum Map4 {
    /// sign(k) * (|k| / 7)^power * amax, k in -7..=7.
    Power(i32),
    /// The dynamic map's construction with 3 decimal binades (10^-2 .. 10^0: 1, 2 and 4
    /// points) and 1, signed (17 values: one more than 4 bits hold, in its favour).
    Dynamic,
}

#[derive(Clone, Copy, Debug)]
enum Format {
    F32,
    Bf16,
    Q8 {
        map: Map,
        stochastic: bool,
    },
    /// Linear, nearest, without keeping the sign of a value that rounds to 0.
    Q8LinearZeroing,
    /// A 4-bit map, one scale per `block` elements; `keep_sign`: a nonzero value never
    /// rounds to 0 (as q8 does).
    Q4 {
        map: Map4,
        block: usize,
        keep_sign: bool,
        stochastic: bool,
    },
}

impl Format {
    fn name(self) -> String {
        match self {
            Format::F32 => "f32".into(),
            Format::Bf16 => "bf16 (nearest)".into(),
            Format::Q8 { map, stochastic } => {
                let r = if stochastic { "stochastic" } else { "nearest" };
                match map {
                    Map::Linear => format!("q8 linear absmax, {r}"),
                    Map::Float { e, m } => format!("q8 float e{e}m{m} pow2 scale, {r}"),
                    Map::Dynamic => format!("q8 bnb dynamic absmax, {r}"),
                    Map::Square => format!("q8 square absmax, {r}"),
                }
            }
            Format::Q8LinearZeroing => "q8 linear absmax, nearest, to 0".into(),
            Format::Q4 {
                map,
                block,
                keep_sign,
                stochastic,
            } => {
                let zero = match (keep_sign, stochastic) {
                    (true, false) => "",
                    (false, false) => ", to 0",
                    (true, true) => ", stochastic",
                    (false, true) => ", stochastic, to 0",
                };
                match map {
                    Map4::Power(power) => format!("q4 (k/7)^{power}, block {block}{zero}"),
                    Map4::Dynamic => format!("q4 dynamic, block {block}{zero}"),
                }
            }
        }
    }

    /// Elements per scale.
    fn block(self) -> usize {
        match self {
            Format::Q4 { block, .. } => block,
            _ => BLOCK,
        }
    }
}

fn dynamic_map(binades: i32) -> Vec<f64> {
    // `binades` decimal binades 10^-(binades-1) .. 10^0, binade i holding the midpoints of
    // 2^i + 1 points evenly spaced over [0.1, 1]; signed, with 0 and 1 (7 binades: 8 bits).
    let mut v = vec![0.0, 1.0, -1.0];
    for i in 0..binades {
        let n = (1 << i) + 1;
        let pts: Vec<f64> = (0..n)
            .map(|j| 0.1 + 0.9 * j as f64 / (n - 1) as f64)
            .collect();
        for w in pts.windows(2) {
            let x = 10f64.powi(i - binades + 1) * (w[0] + w[1]) / 2.0;
            v.push(x);
            v.push(-x);
        }
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

/// Rounds `y` onto the sorted `grid` (nearest, or stochastic with `u` in [0, 1)), keeping a
/// nonzero value's sign.
fn onto_grid(y: f64, grid: &[f64], stochastic: bool, u: f64, keep_sign: bool) -> f64 {
    let i = grid.partition_point(|&v| v <= y).clamp(1, grid.len() - 1);
    let (lo, hi) = (grid[i - 1], grid[i]);
    let y = y.clamp(grid[0], grid[grid.len() - 1]);
    let up = if stochastic {
        u < (y - lo) / (hi - lo)
    } else {
        y - lo > hi - y || (y - lo == hi - y && i % 2 == 0)
    };
    let r = if up { hi } else { lo };
    if !keep_sign {
        r
    } else if y > 0.0 && r <= 0.0 {
        grid[grid.partition_point(|&v| v <= 0.0)]
    } else if y < 0.0 && r >= 0.0 {
        grid[grid.partition_point(|&v| v < 0.0) - 1]
    } else {
        r
    }
}

fn float_grid(e: u32, m: u32) -> Vec<f64> {
    let bias = (1i32 << e) as f64;
    let mut pos = vec![];
    for ex in 0..(1u32 << e) {
        for mm in 0..(1u32 << m) {
            let f = mm as f64 / (1u32 << m) as f64;
            pos.push(if ex == 0 {
                2f64.powf(1.0 - bias) * f
            } else {
                2f64.powf(ex as f64 - bias) * (1.0 + f)
            });
        }
    }
    let mut v: Vec<f64> = pos.iter().map(|x| -x).chain(pos.iter().copied()).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.dedup();
    v
}

/// One tensor's stored momentum.
struct Store {
    format: Format,
    n: usize,
    f: Vec<f32>,
    /// q8: the dequantized values (what the codes and scales decode to), kept decoded for
    /// the experiment's speed; bf16 likewise.
    grid: Vec<f64>,
}

impl Store {
    fn new(format: Format, n: usize) -> Store {
        let grid = match format {
            Format::Q8 {
                map: Map::Linear, ..
            }
            | Format::Q8LinearZeroing => (-127..=127).map(|k| k as f64 / 127.0).collect(),
            Format::Q8 {
                map: Map::Float { e, m },
                ..
            } => float_grid(e, m),
            Format::Q8 {
                map: Map::Dynamic, ..
            } => dynamic_map(7),
            Format::Q4 {
                map: Map4::Power(power),
                ..
            } => (-7..=7)
                .map(|k: i32| k.signum() as f64 * (k.abs() as f64 / 7.0).powi(power))
                .collect(),
            Format::Q4 { .. } => dynamic_map(3),
            Format::Q8 {
                map: Map::Square, ..
            } => (-127..=127)
                .map(|k: i32| (k * k.abs()) as f64 / (127.0 * 127.0))
                .collect(),
            _ => vec![],
        };
        Store {
            format,
            n,
            f: vec![0.0; n],
            grid,
        }
    }

    fn store(&mut self, m: &[f32], rng: &mut Rng) {
        match self.format {
            Format::F32 => self.f.copy_from_slice(m),
            Format::Q8 { .. } | Format::Q8LinearZeroing | Format::Q4 { .. } if self.n < SMALL => {
                self.f.copy_from_slice(m)
            }
            Format::Bf16 => {
                for (d, &x) in self.f.iter_mut().zip(m) {
                    *d = half::bf16::from_f32(x).to_f32();
                }
            }
            Format::Q8 { .. } | Format::Q8LinearZeroing | Format::Q4 { .. } => {
                // (a power-of-two scale, stochastic rounding, no nonzero value to 0)
                let (pow2_scale, stochastic, keep_sign) = match self.format {
                    Format::Q8 { map, stochastic } => {
                        (matches!(map, Map::Float { .. }), stochastic, true)
                    }
                    Format::Q4 {
                        keep_sign,
                        stochastic,
                        ..
                    } => (false, stochastic, keep_sign),
                    _ => (false, false, false),
                };
                let block = self.format.block();
                for (db, mb) in self.f.chunks_mut(block).zip(m.chunks(block)) {
                    let amax = mb.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
                    if amax == 0.0 {
                        db.fill(0.0);
                        continue;
                    }
                    let scale = if pow2_scale {
                        2f64.powi(amax.log2().floor() as i32 + 1)
                    } else {
                        amax
                    };
                    for (d, &x) in db.iter_mut().zip(mb) {
                        let u = rng.uniform() as f64;
                        let q = onto_grid(x as f64 / scale, &self.grid, stochastic, u, keep_sign);
                        *d = (q * scale) as f32;
                    }
                }
            }
        }
    }
}

struct Layer {
    w: Vec<f32>,
    b: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

struct Mlp {
    layers: Vec<Layer>,
}

impl Mlp {
    fn new(sizes: &[usize], rng: &mut Rng) -> Mlp {
        let layers = sizes
            .windows(2)
            .map(|s| {
                let std = (2.0 / s[0] as f32).sqrt();
                Layer {
                    w: (0..s[0] * s[1]).map(|_| rng.normal() * std).collect(),
                    b: vec![0.0; s[1]],
                    n_in: s[0],
                    n_out: s[1],
                }
            })
            .collect();
        Mlp { layers }
    }

    /// Activations of every layer for a batch (row-major, batch x width).
    fn forward(&self, x: &[f32], batch: usize) -> Vec<Vec<f32>> {
        let mut acts = vec![x.to_vec()];
        for (li, l) in self.layers.iter().enumerate() {
            let a = acts.last().unwrap();
            let mut z = vec![0f32; batch * l.n_out];
            for r in 0..batch {
                let zr = &mut z[r * l.n_out..(r + 1) * l.n_out];
                zr.copy_from_slice(&l.b);
                for i in 0..l.n_in {
                    let ai = a[r * l.n_in + i];
                    if ai != 0.0 {
                        let wi = &l.w[i * l.n_out..(i + 1) * l.n_out];
                        for (zo, wo) in zr.iter_mut().zip(wi) {
                            *zo += ai * wo;
                        }
                    }
                }
            }
            if li + 1 < self.layers.len() {
                z.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            acts.push(z);
        }
        acts
    }

    /// Mean cross-entropy, and the gradients (w, b per layer) when `grads` is given.
    fn loss(&self, x: &[f32], y: &[usize], grads: Option<&mut [Vec<f32>]>) -> f32 {
        let batch = y.len();
        let acts = self.forward(x, batch);
        let logits = acts.last().unwrap();
        let k = self.layers.last().unwrap().n_out;
        let mut delta = vec![0f32; batch * k];
        let mut loss = 0.0;
        for r in 0..batch {
            let row = &logits[r * k..(r + 1) * k];
            let mx = row.iter().fold(f32::MIN, |a, &b| a.max(b));
            let s: f32 = row.iter().map(|v| (v - mx).exp()).sum();
            loss += -(row[y[r]] - mx - s.ln());
            for j in 0..k {
                delta[r * k + j] =
                    ((row[j] - mx).exp() / s - (j == y[r]) as u8 as f32) / batch as f32;
            }
        }
        if let Some(grads) = grads {
            for li in (0..self.layers.len()).rev() {
                let l = &self.layers[li];
                let a = &acts[li];
                let (gw, rest) = grads[2 * li..].split_at_mut(1);
                let (gw, gb) = (&mut gw[0], &mut rest[0]);
                gw.fill(0.0);
                gb.fill(0.0);
                let mut prev = vec![0f32; batch * l.n_in];
                for r in 0..batch {
                    let d = &delta[r * l.n_out..(r + 1) * l.n_out];
                    for (g, dv) in gb.iter_mut().zip(d) {
                        *g += dv;
                    }
                    for i in 0..l.n_in {
                        let ai = a[r * l.n_in + i];
                        let wi = &l.w[i * l.n_out..(i + 1) * l.n_out];
                        let gi = &mut gw[i * l.n_out..(i + 1) * l.n_out];
                        let mut back = 0.0;
                        for o in 0..l.n_out {
                            gi[o] += ai * d[o];
                            back += wi[o] * d[o];
                        }
                        prev[r * l.n_in + i] = if ai > 0.0 { back } else { 0.0 };
                    }
                }
                delta = prev;
            }
        }
        loss / batch as f32
    }
}

const SIZES: [usize; 4] = [64, 128, 128, 10];
const STEPS: usize = 3000;
const BATCH: usize = 64;
const N_EVAL: usize = 8192;
const LR: f32 = 3e-4;
const B1: f32 = 0.9;
const B2: f32 = 0.99;
const WD: f32 = 0.1;

/// `n` samples of the teacher of `seed` (`stream` picks the draw: 0 and 1 for the two
/// evaluation sets, 2 + step for a step's batch: every batch is fresh data).
fn data(seed: u64, stream: u64, n: usize) -> (Vec<f32>, Vec<usize>) {
    let teacher = Mlp::new(&[64, 64, 10], &mut Rng(seed ^ 0xda7a));
    let mut rng = Rng(seed ^ 0xda7a ^ ((stream + 1) << 20));
    let x: Vec<f32> = (0..n * 64).map(|_| rng.normal()).collect();
    let logits = teacher.forward(&x, n).pop().unwrap();
    let y = (0..n)
        .map(|r| {
            let row = &logits[r * 10..(r + 1) * 10];
            // 10% label noise keeps the loss away from 0.
            if rng.uniform() < 0.1 {
                (rng.next() % 10) as usize
            } else {
                (0..10)
                    .max_by(|&a, &b| row[a].partial_cmp(&row[b]).unwrap())
                    .unwrap()
            }
        })
        .collect();
    (x, y)
}

struct Shadow {
    stores: Vec<Store>,
    differ: u64,
    counted: u64,
    err2: f64,
    ref2: f64,
}

/// Trains with `driver`'s momentum; every format in `shadows` follows the same gradients.
fn train(seed: u64, driver: Format, shadows: &mut [Shadow]) -> (f32, f32) {
    let mut rng = Rng(seed);
    let mut model = Mlp::new(&SIZES, &mut rng);
    let shapes: Vec<usize> = model
        .layers
        .iter()
        .flat_map(|l| [l.w.len(), l.b.len()])
        .collect();
    let mut grads: Vec<Vec<f32>> = shapes.iter().map(|&n| vec![0.0; n]).collect();
    let mut stores: Vec<Store> = shapes.iter().map(|&n| Store::new(driver, n)).collect();
    let mut qrng = Rng(seed ^ 0x5eed);
    let (mut xb, mut yb) = (vec![0f32; BATCH * 64], vec![0usize; BATCH]);
    let mut m_new = vec![];
    for step in 0..STEPS {
        let (x, y) = data(seed, 2 + step as u64, BATCH);
        xb.copy_from_slice(&x);
        yb.copy_from_slice(&y);
        model.loss(&xb, &yb, Some(&mut grads));
        for (t, g) in grads.iter().enumerate() {
            let m = &stores[t].f;
            let quantized = stores[t].n >= SMALL;
            for s in shadows.iter_mut().filter(|_| quantized) {
                let sm = &s.stores[t].f;
                for i in 0..g.len() {
                    let c_ref = B1 * m[i] + (1.0 - B1) * g[i];
                    let c = B1 * sm[i] + (1.0 - B1) * g[i];
                    s.differ +=
                        (c_ref.signum() != c.signum() || (c == 0.0) != (c_ref == 0.0)) as u64;
                    s.err2 += ((sm[i] - m[i]) as f64).powi(2);
                    s.ref2 += (m[i] as f64).powi(2);
                }
                s.counted += g.len() as u64;
                m_new.clear();
                m_new.extend(sm.iter().zip(g).map(|(m, g)| B2 * m + (1.0 - B2) * g));
                s.stores[t].store(&m_new, &mut qrng);
            }
            let layer = &mut model.layers[t / 2];
            let p = if t % 2 == 0 {
                &mut layer.w
            } else {
                &mut layer.b
            };
            let decay = if t % 2 == 0 { 1.0 - LR * WD } else { 1.0 };
            for i in 0..g.len() {
                let c = B1 * m[i] + (1.0 - B1) * g[i];
                let u = if c > 0.0 {
                    1.0
                } else if c < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                p[i] = p[i] * decay - LR * u;
            }
            m_new.clear();
            m_new.extend(m.iter().zip(g).map(|(m, g)| B2 * m + (1.0 - B2) * g));
            stores[t].store(&m_new, &mut qrng);
        }
    }
    let (x, y) = data(seed, 0, N_EVAL);
    let (xh, yh) = data(seed, 1, N_EVAL);
    (model.loss(&x, &y, None), model.loss(&xh, &yh, None))
}

fn main() {
    let formats = [
        Format::F32,
        Format::Bf16,
        Format::Q8 {
            map: Map::Linear,
            stochastic: false,
        },
        Format::Q8 {
            map: Map::Linear,
            stochastic: true,
        },
        Format::Q8LinearZeroing,
        Format::Q8 {
            map: Map::Float { e: 4, m: 3 },
            stochastic: false,
        },
        Format::Q8 {
            map: Map::Float { e: 3, m: 4 },
            stochastic: false,
        },
        Format::Q8 {
            map: Map::Dynamic,
            stochastic: false,
        },
        Format::Q8 {
            map: Map::Square,
            stochastic: false,
        },
        Format::Q8 {
            map: Map::Dynamic,
            stochastic: true,
        },
        Format::Q4 {
            map: Map4::Power(2),
            block: 256,
            keep_sign: true,
            stochastic: false,
        },
        Format::Q4 {
            map: Map4::Power(1),
            block: 128,
            keep_sign: true,
            stochastic: false,
        },
        Format::Q4 {
            map: Map4::Power(2),
            block: 128,
            keep_sign: true,
            stochastic: false,
        },
        Format::Q4 {
            map: Map4::Dynamic,
            block: 128,
            keep_sign: true,
            stochastic: false,
        },
        Format::Q4 {
            map: Map4::Power(1),
            block: 128,
            keep_sign: false,
            stochastic: false,
        },
        Format::Q4 {
            map: Map4::Dynamic,
            block: 64,
            keep_sign: false,
            stochastic: false,
        },
        Format::Q4 {
            map: Map4::Power(2),
            block: 128,
            keep_sign: true,
            stochastic: true,
        },
        Format::Q4 {
            map: Map4::Dynamic,
            block: 128,
            keep_sign: true,
            stochastic: true,
        },
        Format::Q4 {
            map: Map4::Dynamic,
            block: 64,
            keep_sign: false,
            stochastic: true,
        },
    ];
    // Q8_ONLY=text: only the formats whose name holds it (f32, the reference, always runs).
    let only = std::env::var("Q8_ONLY").unwrap_or_default();
    let formats: Vec<Format> = formats
        .into_iter()
        .enumerate()
        .filter(|(i, f)| *i == 0 || f.name().contains(&only))
        .map(|(_, f)| f)
        .collect();
    let seeds: Vec<u64> = (1..=std::env::var("Q8_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3))
        .collect();
    let t0 = Instant::now();
    let mut shadows: Vec<Shadow> = formats[1..]
        .iter()
        .map(|_| Shadow {
            stores: vec![],
            differ: 0,
            counted: 0,
            err2: 0.0,
            ref2: 0.0,
        })
        .collect();
    let n = seeds.len() as f32;
    let (mut f32_loss, mut f32_held) = (0.0, 0.0);
    for &seed in &seeds {
        for (s, &f) in shadows.iter_mut().zip(&formats[1..]) {
            let mut rng = Rng(seed);
            let model = Mlp::new(&SIZES, &mut rng);
            s.stores = model
                .layers
                .iter()
                .flat_map(|l| [Store::new(f, l.w.len()), Store::new(f, l.b.len())])
                .collect();
        }
        let (l, h) = train(seed, Format::F32, &mut shadows);
        f32_loss += l / n;
        f32_held += h / n;
    }
    println!(
        "MLP {SIZES:?}, {STEPS} steps, batch {BATCH}, lr {LR}, betas ({B1}, {B2}), wd {WD}, \
         seeds {seeds:?}; blocks of {BLOCK}, tensors under {SMALL} elements in f32"
    );
    println!(
        "| {:<34} | {:>12} | {:>10} | {:>10} | {:>7} | {:>10} | {:>7} |",
        "momentum", "signs differ", "m rel. RMS", "eval loss", "vs f32", "eval 2", "vs f32"
    );
    println!(
        "| {:<34} | {:>12} | {:>10} | {:>10.4} | {:>7} | {:>10.4} | {:>7} |",
        "f32", "-", "-", f32_loss, "-", f32_held, "-"
    );
    for (s, &f) in shadows.iter().zip(&formats[1..]) {
        let (mut loss, mut held) = (0.0, 0.0);
        for &sd in &seeds {
            let (l, h) = train(sd, f, &mut []);
            loss += l / n;
            held += h / n;
        }
        println!(
            "| {:<34} | {:>11.3}% | {:>10.4} | {:>10.4} | {:>+6.2}% | {:>10.4} | {:>+6.2}% |",
            f.name(),
            100.0 * s.differ as f64 / s.counted as f64,
            (s.err2 / s.ref2).sqrt(),
            loss,
            100.0 * (loss / f32_loss - 1.0),
            held,
            100.0 * (held / f32_held - 1.0)
        );
    }
    eprintln!("({:.0} s)", t0.elapsed().as_secs_f64());
}
