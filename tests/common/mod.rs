//! Helpers shared by the Rust integration tests: a deterministic random source, typed host
//! buffers of any dtype, a safe wrapper over the C ABI, and the f64 reference of the update.
#![allow(dead_code)]

pub mod budget;
pub mod dist;
pub mod ranks;

use std::ffi::{c_void, CStr};

use half::{bf16, f16};
use lion::*;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

pub const DTYPES: [LionDType; 3] = [LION_DTYPE_F32, LION_DTYPE_F16, LION_DTYPE_BF16];
pub const STATE_DTYPES: [LionDType; 2] = [LION_DTYPE_F32, LION_DTYPE_BF16];

/// Every dtype combination that the f64 reference checks the CPU on (reference.rs) and the CPU
/// checks the GPU on (cuda.rs): (param dtype, grad dtype, `base` with a state dtype and
/// stochastic rounding on or off, seed 42). Always in this order, so that each test's seeds
/// stay the same.
pub fn dtype_configs(base: LionConfig) -> Vec<(LionDType, LionDType, LionConfig)> {
    let mut configs = Vec::new();
    for param in DTYPES {
        for grad in DTYPES {
            for state_dtype in STATE_DTYPES {
                for stochastic_rounding in [false, true] {
                    let config = LionConfig {
                        state_dtype,
                        stochastic_rounding,
                        seed: 42,
                        ..base
                    };
                    configs.push((param, grad, config));
                }
            }
        }
    }
    configs
}

/// The option combinations that the f64 reference checks the CPU on (reference.rs) and the
/// CPU checks the GPU on (cuda.rs): every decay mode, cautious factor (full, off, partial)
/// and cautious weight decay, with non-default betas, over `base`. Always in this order, so
/// that each test's seeds stay the same.
pub fn option_configs(base: LionConfig) -> Vec<LionConfig> {
    let mut configs = Vec::new();
    for decay_mode in [
        LION_DECAY_STANDARD,
        LION_DECAY_DECOUPLED,
        LION_DECAY_CORRECTED,
    ] {
        for cautious_factor in [1.0, 0.0, 0.25] {
            for cautious_weight_decay in [false, true] {
                configs.push(LionConfig {
                    decay_mode,
                    cautious_factor,
                    cautious_weight_decay,
                    beta1: 0.95,
                    beta2: 0.98,
                    ..base
                });
            }
        }
    }
    configs
}

pub fn dtype_name(d: LionDType) -> &'static str {
    ["f32", "f16", "bf16", "q8"][d as usize]
}

/// `config` with 8-bit momentum.
pub fn q8(config: LionConfig) -> LionConfig {
    LionConfig {
        state_dtype: LION_DTYPE_Q8,
        ..config
    }
}

/// 8-bit momentum (docs/ABI.md): blocks of 256, tensors from 4096 elements.
pub const Q8_BLOCK: usize = 256;
pub const Q8_MIN_NUMEL: u64 = 4096;

/// Bytes of one tensor's momentum in a checkpoint.
pub fn state_bytes(state: LionDType, numel: u64) -> usize {
    let n = numel as usize;
    match state {
        LION_DTYPE_Q8 if numel >= Q8_MIN_NUMEL => n + n.div_ceil(Q8_BLOCK) * 4,
        LION_DTYPE_Q8 | LION_DTYPE_F32 => 4 * n,
        _ => 2 * n,
    }
}

/// One tensor's momentum from its checkpoint bytes, as the library reads it (q8: k * |k|
/// times the block's scale / 16129, in f32).
pub fn decode_state(state: LionDType, numel: u64, bytes: &[u8]) -> Vec<f64> {
    let n = numel as usize;
    let f32_at = |at: usize| f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    match state {
        LION_DTYPE_Q8 if numel >= Q8_MIN_NUMEL => (0..n)
            .map(|i| {
                let scale = f32_at(n + i / Q8_BLOCK * 4);
                let k = bytes[i] as i8 as i32;
                ((k * k.abs()) as f32 * (scale / 16129.0)) as f64
            })
            .collect(),
        LION_DTYPE_Q8 | LION_DTYPE_F32 => (0..n).map(|i| f32_at(4 * i) as f64).collect(),
        _ => (0..n)
            .map(|i| bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f64())
            .collect(),
    }
}

pub fn dtype_size(d: LionDType) -> usize {
    if d == LION_DTYPE_F32 {
        4
    } else {
        2
    }
}

/// A host buffer of one dtype, read and written as f64.
#[derive(Clone, Debug, PartialEq)]
pub enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Buf {
    pub fn from_f64(dtype: LionDType, values: &[f64]) -> Buf {
        match dtype {
            LION_DTYPE_F32 => Buf::F32(values.iter().map(|&v| v as f32).collect()),
            LION_DTYPE_F16 => Buf::F16(values.iter().map(|&v| f16::from_f64(v)).collect()),
            LION_DTYPE_BF16 => Buf::BF16(values.iter().map(|&v| bf16::from_f64(v)).collect()),
            _ => unreachable!(),
        }
    }
    pub fn random(dtype: LionDType, n: usize, scale: f64, rng: &mut Rng) -> Buf {
        let v: Vec<f64> = (0..n).map(|_| rng.uniform() * scale).collect();
        Buf::from_f64(dtype, &v)
    }
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Buf::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Buf::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Buf::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
        }
    }
    pub fn dtype(&self) -> LionDType {
        match self {
            Buf::F32(_) => LION_DTYPE_F32,
            Buf::F16(_) => LION_DTYPE_F16,
            Buf::BF16(_) => LION_DTYPE_BF16,
        }
    }
    pub fn ptr(&mut self) -> *mut c_void {
        match self {
            Buf::F32(v) => v.as_mut_ptr() as *mut c_void,
            Buf::F16(v) => v.as_mut_ptr() as *mut c_void,
            Buf::BF16(v) => v.as_mut_ptr() as *mut c_void,
        }
    }
    pub fn bits(&self) -> Vec<u32> {
        match self {
            Buf::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
            Buf::F16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
            Buf::BF16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        }
    }
}

/// Random parameters (in [-1, 1)) for each tensor, in its parameter dtype.
pub fn random_params(tensors: &[LionTensorDesc], rng: &mut Rng) -> Vec<Buf> {
    tensors
        .iter()
        .map(|t| Buf::random(t.param_dtype, t.numel as usize, 1.0, rng))
        .collect()
}

/// Random gradients (in [-scale, scale)) for each tensor, in its gradient dtype, those under
/// scale / 16 in magnitude exactly 0 (about one in 16, at other places each step): where
/// Cautious Lion's `u * g > 0` is decided at 0, beside a momentum that is not.
pub fn random_grads(tensors: &[LionTensorDesc], scale: f64, rng: &mut Rng) -> Vec<Buf> {
    tensors
        .iter()
        .map(|t| {
            let b = Buf::random(t.grad_dtype, t.numel as usize, scale, rng);
            let small_to_zero = |x: f64| if x.abs() < scale / 16.0 { 0.0 } else { x };
            let values: Vec<f64> = b.to_f64().into_iter().map(small_to_zero).collect();
            Buf::from_f64(t.grad_dtype, &values)
        })
        .collect()
}

/// Tensors of the given sizes with varied lr and decay scales (1, 0.5, 2 and 1, 0, 3).
pub fn scaled_tensors(sizes: &[u64], param: LionDType, grad: LionDType) -> Vec<LionTensorDesc> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| LionTensorDesc {
            numel: n,
            param_dtype: param,
            grad_dtype: grad,
            lr_scale: [1.0, 0.5, 2.0][i % 3],
            weight_decay_scale: [1.0, 0.0, 3.0][i % 3],
        })
        .collect()
}

pub fn last_error() -> String {
    unsafe { CStr::from_ptr(lion_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// An optimizer handle that is destroyed on drop.
pub struct Opt {
    pub raw: *mut LionOptimizer,
    pub tensors: Vec<LionTensorDesc>,
    pub config: LionConfig,
}

impl Opt {
    pub fn new(
        config: LionConfig,
        tensors: &[LionTensorDesc],
    ) -> Result<Opt, (LionStatus, String)> {
        Opt::made(config, tensors, |raw| unsafe {
            lion_create(&config, tensors.as_ptr(), tensors.len(), raw)
        })
    }

    /// A distributed optimizer's rank (`dist`'s collectives and their context must outlive it).
    pub fn distributed(
        config: LionConfig,
        tensors: &[LionTensorDesc],
        dist: &LionDistConfig,
    ) -> Result<Opt, (LionStatus, String)> {
        Opt::made(config, tensors, |raw| unsafe {
            lion_create_distributed(&config, tensors.as_ptr(), tensors.len(), dist, raw)
        })
    }

    /// The handle `create` makes (its status and message where it refuses).
    fn made(
        config: LionConfig,
        tensors: &[LionTensorDesc],
        create: impl FnOnce(*mut *mut LionOptimizer) -> LionStatus,
    ) -> Result<Opt, (LionStatus, String)> {
        let mut raw = std::ptr::null_mut();
        let st = create(&mut raw);
        if st != LionStatus::LION_OK {
            return Err((st, last_error()));
        }
        Ok(Opt {
            raw,
            tensors: tensors.to_vec(),
            config,
        })
    }

    pub fn step(&self, params: &mut [Buf], grads: &mut [Buf]) -> LionStatus {
        let p: Vec<*mut c_void> = params.iter_mut().map(|b| b.ptr()).collect();
        let g: Vec<*const c_void> = grads.iter_mut().map(|b| b.ptr() as *const c_void).collect();
        unsafe {
            lion_step(
                self.raw,
                p.as_ptr(),
                g.as_ptr(),
                p.len(),
                std::ptr::null_mut(),
            )
        }
    }

    pub fn save(&self) -> Vec<u8> {
        let mut size = 0;
        assert_eq!(
            unsafe { lion_state_size(self.raw, &mut size) },
            LionStatus::LION_OK
        );
        let mut blob = vec![0u8; size];
        let mut written = 0;
        let st = unsafe {
            lion_state_save(
                self.raw,
                blob.as_mut_ptr() as *mut c_void,
                size,
                &mut written,
            )
        };
        assert_eq!(st, LionStatus::LION_OK, "{}", last_error());
        assert_eq!(written, size);
        blob
    }

    pub fn load(&self, blob: &[u8]) -> LionStatus {
        unsafe { lion_state_load(self.raw, blob.as_ptr() as *const c_void, blob.len()) }
    }

    /// The momentum of every tensor, read from a checkpoint.
    pub fn momentum(&self) -> Vec<Vec<f64>> {
        let blob = self.save();
        let mut at = 88 + 24 * self.tensors.len();
        let state = self.config.state_dtype;
        self.tensors
            .iter()
            .map(|t| {
                let len = state_bytes(state, t.numel);
                at += len;
                decode_state(state, t.numel, &blob[at - len..at])
            })
            .collect()
    }

    pub fn lr(&self) -> f32 {
        let mut lr = 0.0;
        assert_eq!(
            unsafe { lion_get_lr(self.raw, &mut lr) },
            LionStatus::LION_OK
        );
        lr
    }

    pub fn step_count(&self) -> u64 {
        let mut n = 0;
        assert_eq!(
            unsafe { lion_step_count(self.raw, &mut n) },
            LionStatus::LION_OK
        );
        n
    }
}

impl Drop for Opt {
    fn drop(&mut self) {
        unsafe { lion_destroy(self.raw) }
    }
}

/// What the f64 reference allows for one element: the parameter within [lo, hi] (two values
/// when the sign of c is too close to zero for f32 to decide) and the momentum.
pub struct Expected {
    pub p_lo: f64,
    pub p_hi: f64,
    pub m: f64,
    /// The size of the terms that f32 arithmetic rounded (for the tolerance).
    pub p_mag: f64,
    pub m_mag: f64,
}

/// The update of ABI.md in f64, for one tensor, from the values the library stored.
// MIRROR(update): src/numerics/update.rs lion_element (exact there, in f32; here in f64, with
// tolerances for f32 arithmetic)
// MIRROR(coeffs): src/numerics/update.rs Coeffs::new, CAUTIOUS_MEAN_FLOOR (the 1e-5 below)
pub fn reference(
    cfg: &LionConfig,
    lr: f64,
    t: &LionTensorDesc,
    p: &[f64],
    g: &[f64],
    m: &[f64],
) -> Vec<Expected> {
    let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
    let lr_t = lr * t.lr_scale as f64;
    let wd_t = cfg.weight_decay as f64 * t.weight_decay_scale as f64;
    let lr0 = cfg.lr as f64;
    let d = match cfg.decay_mode {
        LION_DECAY_STANDARD => lr_t * wd_t,
        LION_DECAY_DECOUPLED => lr_t / lr0 * wd_t,
        _ => lr_t * lr_t / lr0 * wd_t,
    };
    let cf = cfg.cautious_factor as f64;
    let n = p.len();
    // sign(c), and whether f32 arithmetic could decide it either way.
    let signs: Vec<(f64, bool)> = (0..n)
        .map(|i| {
            let (a, b) = (b1 * m[i], (1.0 - b1) * g[i]);
            let c = a + b;
            let ambiguous = c.abs() <= 1e-6 * (a.abs() + b.abs()) && c != 0.0;
            (
                if c > 0.0 {
                    1.0
                } else if c < 0.0 {
                    -1.0
                } else {
                    0.0
                },
                ambiguous,
            )
        })
        .collect();
    // Cautious: the mean of s, with the ambiguous elements counted either way.
    let (mut agreeing_lo, mut agreeing_hi) = (0.0, 0.0);
    for i in 0..n {
        let (s, amb) = signs[i];
        if amb {
            agreeing_hi += (g[i] != 0.0) as u8 as f64;
        } else if s * g[i] > 0.0 {
            agreeing_lo += 1.0;
            agreeing_hi += 1.0;
        }
    }
    let scale = |agreeing: f64| {
        if cf < 1.0 {
            1.0 / ((agreeing + cf * (n as f64 - agreeing)) / n as f64).max(1e-5)
        } else {
            1.0
        }
    };
    let scales = [scale(agreeing_lo), scale(agreeing_hi)];
    (0..n)
        .map(|i| {
            let amb = signs[i].1;
            let candidates: &[f64] = if amb {
                &[1.0, -1.0, 0.0]
            } else {
                std::slice::from_ref(&signs[i].0)
            };
            let mut lo = f64::INFINITY;
            let mut hi = f64::NEG_INFINITY;
            for &u0 in candidates {
                for &sc in &scales {
                    let s = if u0 * g[i] > 0.0 { 1.0 } else { cf };
                    let u = u0 * s * sc;
                    let mask = if cfg.cautious_weight_decay {
                        (u * p[i] > 0.0) as u8 as f64
                    } else {
                        1.0
                    };
                    let v = p[i] * (1.0 - d * mask) - lr_t * u;
                    lo = lo.min(v);
                    hi = hi.max(v);
                }
            }
            Expected {
                p_lo: lo,
                p_hi: hi,
                m: b2 * m[i] + (1.0 - b2) * g[i],
                p_mag: p[i].abs() + lr_t * scales[0].max(scales[1]),
                m_mag: m[i].abs() + g[i].abs(),
            }
        })
        .collect()
}

/// The spacing of `dtype` at `x` (its unit in the last place).
pub fn ulp(dtype: LionDType, x: f64) -> f64 {
    let (mant, min_exp) = match dtype {
        LION_DTYPE_F32 => (23, -126),
        LION_DTYPE_F16 => (10, -14),
        _ => (7, -126),
    };
    let e = if x == 0.0 {
        min_exp
    } else {
        (x.abs().log2().floor() as i32).max(min_exp)
    };
    2f64.powi(e - mant)
}

/// Whether `got` (stored in `dtype`) is in [lo, hi] up to f32 arithmetic on terms of size
/// `mag` and one rounding into `dtype` (to nearest, or to either neighbour when stochastic).
pub fn close(dtype: LionDType, got: f64, lo: f64, hi: f64, mag: f64) -> bool {
    let f32_slack = 4.0 * f32::EPSILON as f64 * (mag + lo.abs().max(hi.abs())) + 1e-38;
    let round = if dtype == LION_DTYPE_F32 {
        0.0
    } else {
        ulp(dtype, lo.abs().max(hi.abs()) + f32_slack)
    };
    got >= lo - f32_slack - round && got <= hi + f32_slack + round
}

/// The scale of a q8 block of momentum `m`: its largest magnitude, kept within [2^-112, the
/// f32 below f32::MAX], or 0 for a block of zeros.
// MIRROR(q8): src/numerics/q8.rs scale_of
pub fn q8_scale(m: &[f64]) -> f64 {
    match m.iter().fold(0f64, |a, v| a.max(v.abs())) {
        0.0 => 0.0,
        largest => largest.clamp(2f64.powi(-112), f32::from_bits(0x7f7f_fffe) as f64),
    }
}

/// The f64 reference of the q8 encoder for one element: whether `got` is the code value for
/// `x` in a block of scale `scale` (`q8_scale`): the values are sign(k) * k^2 * scale / 16129,
/// `got` must be the nearest to `x` (either one within `slack` of a midpoint), with x's sign,
/// and at least one unit for a nonzero `x` (q8 keeps every sign).
// MIRROR(q8): src/numerics/q8.rs encode (exact there, in f32; here in f64 with tolerances)
pub fn q8_close(x: f64, got: f64, scale: f64, slack: f64) -> bool {
    if scale == 0.0 {
        return got == 0.0;
    }
    let units = |v: f64| v.abs() / scale * 16129.0;
    let k = units(got).sqrt().round();
    let on_grid = (units(got) - k * k).abs() <= 1e-4 * k * k + units(slack);
    if !on_grid {
        return false;
    }
    if x.abs() <= slack {
        // Too close to 0 for its sign to be known: 0, or one unit either way.
        return got == 0.0 || k == 1.0;
    }
    if got.signum() != x.signum() || got == 0.0 {
        return false;
    }
    let (y, s) = (units(x), units(slack));
    let k0 = y.sqrt().floor();
    let mid = k0 * k0 + k0 + 0.5;
    let lo = if y > mid + s { k0 + 1.0 } else { k0 };
    let hi = if y >= mid - s { k0 + 1.0 } else { k0 };
    // Near a square, sqrt may land on either side of it.
    let (lo, hi) = if (y - k0 * k0).abs() <= s && k0 >= 1.0 {
        (lo.min(k0), hi)
    } else {
        (lo, hi)
    };
    (lo.max(1.0)..=hi.max(1.0)).contains(&k)
}
