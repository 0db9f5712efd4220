//! The checkpoint blob: self-describing, device-independent, checksummed.
//!
//! Layout (all integers and floats little-endian; docs/checkpoint-format.md has the table):
//! a fixed 88-byte header (magic, format version, hyperparameters, step count, current lr,
//! tensor count), 24 bytes per tensor, the momentum in its dtype, and an XXH3-128 checksum of
//! everything before it.

use xxhash_rust::xxh3::xxh3_128;

use crate::config::{DType, DecayMode};
use crate::numerics::convert::bf16_bits_nearest;
use crate::numerics::{q8, update};
use crate::optimizer::Optimizer;
use crate::status::{Error, Result};

pub(crate) const MAGIC: [u8; 8] = *b"LIONCKPT";
pub(crate) const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 88;
const PER_TENSOR: usize = 24;
const CHECKSUM: usize = 16;
/// Step counts from here on are never saved nor loaded: 2^63 steps is a count no run reaches,
/// and a blob's count below it can still be stepped past without wrapping the u64.
const STEP_LIMIT: u64 = 1 << 63;

fn blob_size(n_tensors: usize, state_bytes: usize) -> Option<usize> {
    n_tensors
        .checked_mul(PER_TENSOR)?
        .checked_add(HEADER + CHECKSUM)?
        .checked_add(state_bytes)
}

pub fn size(opt: &Optimizer) -> usize {
    blob_size(opt.tensors.len(), opt.state_len()).expect("state already allocated")
}

/// The size of the largest blob that `load` could accept for `opt`: its tensors' checkpoint
/// with f32 momentum, the widest state (bf16 holds 2 bytes an element, q8 at most 4: small
/// tensors keep f32), since a checkpoint of any state dtype loads, converted. `None` if it
/// cannot be addressed.
pub fn largest_size(opt: &Optimizer) -> Option<usize> {
    let bytes = q8::state_bytes(DType::F32, opt.tensors.iter().map(|t| t.numel))?;
    blob_size(opt.tensors.len(), usize::try_from(bytes).ok()?)
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes())
    }
    fn f32(&mut self, v: f32) {
        self.u32(v.to_bits())
    }
}

/// Takes part in a collective save whose bytes this rank does not want (it refused the
/// caller's buffer, or had no memory for it): the momentum's gather runs through the
/// engine's own buffers, made at creation, and nothing is kept.
pub fn take_part(opt: &Optimizer) -> Result<()> {
    opt.read_state(None)
}

/// Writes the blob into `buf[..size(opt)]`; the caller checked the length.
pub fn save(opt: &Optimizer, buf: &mut [u8]) -> Result<usize> {
    let total = size(opt);
    // What can fail comes first (the state straight into its place): a failed save writes
    // nothing.
    let step = opt.step_count()?;
    if step >= STEP_LIMIT {
        // A collective save (sharded) still takes part, or the other ranks would wait; this
        // rank's own refusal is its error.
        if opt.collective_checkpoint() {
            let _ = take_part(opt);
        }
        return Err(Error::invalid(format!(
            "the step count is {step}, at least 2^63: no checkpoint holds such a count (a \
             load refuses it), so none was written"
        )));
    }
    let state_at = HEADER + PER_TENSOR * opt.tensors.len();
    let state = opt.state_len();
    opt.read_state(Some(&mut buf[state_at..state_at + state]))?;
    let h = &opt.hyper;
    let mut w = Writer {
        buf: &mut buf[..total],
        at: 0,
    };
    w.put(&MAGIC);
    w.u32(FORMAT_VERSION);
    w.u32(0);
    w.f32(h.lr0);
    w.f32(h.beta1);
    w.f32(h.beta2);
    w.f32(h.weight_decay);
    w.u32(h.decay_mode.raw());
    w.f32(h.cautious_factor);
    w.u32(h.cautious_weight_decay as u32);
    w.u32(h.state_dtype.raw());
    w.u32(h.stochastic_rounding as u32);
    w.u32(0);
    w.u64(h.seed);
    w.u64(step);
    w.f32(opt.lr());
    w.u32(0);
    w.u64(opt.tensors.len() as u64);
    debug_assert_eq!(w.at, HEADER);
    for t in &opt.tensors {
        w.u64(t.numel);
        w.u32(t.param.raw());
        w.u32(t.grad.raw());
        w.f32(t.lr_scale);
        w.f32(t.weight_decay_scale);
    }
    debug_assert_eq!(w.at, state_at);
    w.at += state;
    let sum = xxh3_128(&w.buf[..w.at]);
    w.put(&sum.to_le_bytes());
    debug_assert_eq!(w.at, total);
    Ok(total)
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn f32(&mut self) -> f32 {
        f32::from_bits(self.u32())
    }
}

/// Verifies the whole blob against `opt` and, only if every check passes, restores it.
///
/// The sizes come first, from the header and this optimizer's layout, so that a `blob`
/// whose claimed length overstates the caller's buffer is refused before anything past the
/// real checkpoint is read (the checksum covers the claimed length).
pub fn load(opt: &mut Optimizer, blob: &[u8]) -> Result<()> {
    if blob.len() < HEADER + CHECKSUM {
        return Err(Error::corrupt(format!(
            "the blob is truncated: {} bytes, a checkpoint has at least {}",
            blob.len(),
            HEADER + CHECKSUM
        )));
    }
    if blob[..8] != MAGIC {
        return Err(Error::corrupt("not a liblion checkpoint (bad magic)"));
    }
    let mut r = Reader { buf: blob, at: 8 };
    let version = r.u32();
    if version != FORMAT_VERSION {
        return Err(Error::corrupt(format!(
            "checkpoint format version {version}; this library reads version {FORMAT_VERSION}"
        )));
    }
    let header = read_header(&mut r)?;
    if header.n_tensors != opt.tensors.len() as u64 {
        return Err(Error::corrupt(format!(
            "the blob was made for {} tensors, this optimizer has {}",
            header.n_tensors,
            opt.tensors.len()
        )));
    }
    // The table lies inside any blob whose length is not a lie: read it first, to name the
    // tensor whose size differs.
    let table_end = HEADER + PER_TENSOR * opt.tensors.len();
    if blob.len() < table_end + CHECKSUM {
        return Err(Error::corrupt(format!(
            "the blob is truncated: {} bytes cannot hold the layout of {} tensors",
            blob.len(),
            opt.tensors.len()
        )));
    }
    for (i, t) in opt.tensors.iter().enumerate() {
        let numel = r.u64();
        // The parameter and gradient dtypes are recorded, not part of the layout: momentum
        // means the same whatever they are (docs/checkpoint-format.md).
        for what in ["param_dtype", "grad_dtype"] {
            let dtype = DType::from_raw(r.u32(), &format!("tensor {i}'s {what}"))
                .map_err(|e| Error::corrupt(e.message))?;
            if dtype == DType::Q8 {
                return Err(Error::corrupt(format!(
                    "tensor {i}'s {what} (row {i} of the tensor table) is q8, a state dtype \
                     only: no parameter or gradient is q8"
                )));
            }
        }
        let _lr_scale = r.f32();
        let _wd_scale = r.f32();
        if numel != t.numel {
            return Err(Error::corrupt(format!(
                "tensor {i} has {numel} elements in the blob and {} in this optimizer",
                t.numel
            )));
        }
    }
    let elements: u64 = opt.tensors.iter().map(|t| t.numel).sum();
    let expected = q8::state_bytes(header.state_dtype, opt.tensors.iter().map(|t| t.numel))
        .and_then(|state| blob_size(opt.tensors.len(), usize::try_from(state).ok()?));
    if expected != Some(blob.len()) {
        return Err(Error::corrupt(format!(
            "the blob is {} bytes, but a checkpoint of this optimizer's {} tensors ({elements} \
             elements) with {} momentum is {} bytes: truncated, padded, or made for other tensors",
            blob.len(),
            opt.tensors.len(),
            header.state_dtype.name(),
            expected.map_or("more".to_string(), |e| e.to_string()),
        )));
    }
    let (body, sum) = blob.split_at(blob.len() - CHECKSUM);
    if xxh3_128(body).to_le_bytes() != sum {
        return Err(Error::corrupt(
            "checksum mismatch: the blob is truncated or was modified",
        ));
    }
    if header.step >= STEP_LIMIT {
        return Err(Error::corrupt(format!(
            "the saved step count is {}, a count no run reaches (2^63 steps or more)",
            header.step
        )));
    }
    if !header.lr.is_finite() || header.lr < 0.0 {
        return Err(Error::corrupt(format!(
            "the saved lr {} is not a valid lr",
            header.lr
        )));
    }
    update::check_products(&opt.hyper, header.lr, &opt.tensors)
        .map_err(|e| Error::corrupt(format!("the saved lr with this optimizer's {}", e.message)))?;
    let saved_state = &blob[r.at..blob.len() - CHECKSUM];
    if header.state_dtype == DType::Q8 {
        check_q8(saved_state, opt.tensors.iter().map(|t| t.numel))?;
    }
    let target = opt.hyper.state_dtype;
    if header.state_dtype == target {
        return opt.restore(header.step, header.lr, saved_state);
    }
    let mut converted = Vec::new();
    converted
        .try_reserve_exact(opt.state_len())
        .map_err(|_| Error::out_of_memory("no memory to convert the saved momentum"))?;
    converted.resize(opt.state_len(), 0);
    let numels = opt.tensors.iter().map(|t| t.numel);
    convert_state(
        saved_state,
        header.state_dtype,
        &mut converted,
        target,
        numels,
    );
    opt.restore(header.step, header.lr, &converted)
}

/// What `load` uses of the fixed header. `read_header` checks what has a set of valid values
/// that a blob alone shows: the reserved fields (0), the flags (0 or 1), the decay mode and
/// state dtype (known codes; not f16 state). The float hyperparameters (lr0, betas, weight
/// decay, cautious factor) and the seed are neither checked nor restored: the optimizer keeps
/// its own, they are a record of the run that saved the blob, and the checksum already catches
/// a damaged one. `load` then checks the step count and the lr, which it restores.
struct Header {
    state_dtype: DType,
    step: u64,
    lr: f32,
    n_tensors: u64,
}

fn read_header(r: &mut Reader) -> Result<Header> {
    let reserved = |v: u32, at: &str| {
        if v == 0 {
            Ok(())
        } else {
            Err(Error::corrupt(format!(
                "the reserved field {at} is {v}, not 0"
            )))
        }
    };
    let flag = |v: u32, name: &str| match v {
        0 | 1 => Ok(()),
        _ => Err(Error::corrupt(format!("{name} is {v}, not 0 or 1"))),
    };
    reserved(r.u32(), "after the version")?;
    let _lr0 = r.f32();
    let _beta1 = r.f32();
    let _beta2 = r.f32();
    let _weight_decay = r.f32();
    DecayMode::from_raw(r.u32()).map_err(|e| Error::corrupt(e.message))?;
    let _cautious_factor = r.f32();
    flag(r.u32(), "cautious_weight_decay")?;
    let state_dtype =
        DType::from_raw(r.u32(), "state_dtype").map_err(|e| Error::corrupt(e.message))?;
    if state_dtype == DType::F16 {
        return Err(Error::corrupt(
            "the blob claims f16 state, which liblion never writes",
        ));
    }
    flag(r.u32(), "stochastic_rounding")?;
    reserved(r.u32(), "after stochastic_rounding")?;
    let _seed = r.u64();
    let step = r.u64();
    let lr = r.f32();
    reserved(r.u32(), "after the lr")?;
    let n_tensors = r.u64();
    debug_assert_eq!(r.at, HEADER);
    Ok(Header {
        state_dtype,
        step,
        lr,
        n_tensors,
    })
}

/// Refuses q8 momentum that no step writes (the checksum is no proof of that, only of
/// integrity): a code of -128 (codes are -127..=127) or a block scale other than a finite one
/// with its sign clear or the NaN of a non-finite block (`q8::scale_of`). Either would load
/// as momentum of another sign or size than any run's.
fn check_q8(state: &[u8], numels: impl Iterator<Item = u64>) -> Result<()> {
    let mut at = 0;
    for (t, n) in numels.enumerate() {
        let len = q8::tensor_state_bytes(DType::Q8, n).expect("checked sizes") as usize;
        let s = &state[at..at + len];
        at += len;
        if !q8::quantized(DType::Q8, n) {
            continue;
        }
        if let Some(i) = s[..n as usize].iter().position(|&c| c == 0x80) {
            return Err(Error::corrupt(format!(
                "tensor {t}'s q8 code {i} is -128, outside -127..=127"
            )));
        }
        for (b, scale) in s[n as usize..].chunks_exact(4).enumerate() {
            let bits = u32::from_le_bytes(scale.try_into().unwrap());
            if bits >= 0x7f80_0000 && bits != q8::NAN_SCALE_BITS {
                return Err(Error::corrupt(format!(
                    "tensor {t}'s q8 block {b} has the scale {} (bits {bits:#010x}), which no \
                     step writes: a non-negative finite scale, or the NaN of a non-finite block",
                    f32::from_bits(bits)
                )));
            }
        }
    }
    Ok(())
}

/// Converts momentum between state dtypes, tensor by tensor (`numels`), through f32: bf16
/// and q8 to f32 exactly (q8 decodes as a step does), f32 to bf16 to nearest even, and into q8
/// as a step encodes (`numerics::q8`: per block of 256, nearest, signs kept); a small tensor's
/// q8 momentum is f32.
fn convert_state(
    src: &[u8],
    from: DType,
    dst: &mut [u8],
    to: DType,
    numels: impl Iterator<Item = u64>,
) {
    let (mut s_at, mut d_at) = (0, 0);
    let mut block = [0f32; q8::BLOCK];
    for n in numels {
        let size = |d| q8::tensor_state_bytes(d, n).expect("checked sizes") as usize;
        let (s, d) = (
            &src[s_at..s_at + size(from)],
            &mut dst[d_at..d_at + size(to)],
        );
        s_at += s.len();
        d_at += d.len();
        for lo in (0..n as usize).step_by(q8::BLOCK) {
            let x = &mut block[..q8::BLOCK.min(n as usize - lo)];
            read_block(s, from, n, lo, x);
            write_block(d, to, n, lo, x);
        }
    }
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Elements `lo..lo + x.len()` of one tensor's momentum `s` (of `numel` elements, in `dtype`),
/// in f32.
fn read_block(s: &[u8], dtype: DType, numel: u64, lo: usize, x: &mut [f32]) {
    if q8::quantized(dtype, numel) {
        let unit = q8::unit(f32_at(s, numel as usize + lo / q8::BLOCK * 4));
        for (i, v) in x.iter_mut().enumerate() {
            *v = q8::decode(s[lo + i] as i8, unit);
        }
    } else if dtype == DType::BF16 {
        for (i, v) in x.iter_mut().enumerate() {
            let at = 2 * (lo + i);
            *v = f32::from_bits((u16::from_le_bytes([s[at], s[at + 1]]) as u32) << 16);
        }
    } else {
        for (i, v) in x.iter_mut().enumerate() {
            *v = f32_at(s, 4 * (lo + i));
        }
    }
}

/// The inverse of `read_block`, rounding as described at `convert_state`.
fn write_block(d: &mut [u8], dtype: DType, numel: u64, lo: usize, x: &[f32]) {
    if q8::quantized(dtype, numel) {
        let mut codes = [0i8; q8::BLOCK];
        let scale = q8::encode_block(x, &mut codes);
        for (i, &c) in codes[..x.len()].iter().enumerate() {
            d[lo + i] = c as u8;
        }
        let at = numel as usize + lo / q8::BLOCK * 4;
        d[at..at + 4].copy_from_slice(&scale.to_le_bytes());
    } else if dtype == DType::BF16 {
        for (i, &v) in x.iter().enumerate() {
            d[2 * (lo + i)..2 * (lo + i) + 2].copy_from_slice(&bf16_bits_nearest(v).to_le_bytes());
        }
    } else {
        for (i, &v) in x.iter().enumerate() {
            d[4 * (lo + i)..4 * (lo + i) + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
}
