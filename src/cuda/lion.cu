// liblion's CUDA kernels, compiled at run time by NVRTC (src/cuda/module.rs) with --fmad=false.
//
// They compute, bit for bit, what the CPU engine computes: the same f32 operations in the same
// order, the same conversions and the same counter-based hash for stochastic rounding, all
// specified in src/numerics (each copy here is tagged MIRROR(..) with its Rust twin).
//
// NVRTC compiles this file inside the program of src/cuda/prelude.rs: a prelude before it
// #defines every constant shared with the Rust side (LION_DTYPE_*, LION_DECAY_*, STREAM_*,
// CAUTIOUS_MEAN_FLOOR, the hash's MIX64_* / HASH32_* / GOLDEN_GAMMA, MAX_TENSORS, ELEMS,
// CUDA_THREADS_PER_BLOCK, COUNTER_*, 8-bit momentum's Q8_*, STATE_ALIGN, and the measured
// knobs of src/cuda/tuning.rs: UNROLL_*, MIN_BLOCKS_*, Q8_L2_AHEAD, Q8_STAGES, Q8_SLOT_BYTES),
// generated from the Rust definitions, and
// static_asserts after it check the layout of the structs of the kernel interface below.
// Define none of those constants here, and write none of their values as a bare number
// (src/cuda/prelude.rs's tests check both).

// ---- BEGIN KERNEL INTERFACE ----
// MIRROR(kernel-args): src/cuda/args.rs kernel_structs! (names, fields and layout)
// What the host passes to the kernels. Plain C++ (no CUDA keywords): the tests also compile
// this section with the host's C++ compiler, where the layout asserts check every offset.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct HyperArgs {
  float beta1, beta2, weight_decay, lr0, cautious_factor, grad_scale;
  u32 decay_mode, cautious_wd, stochastic_rounding, state_dtype;
  u64 seed;
};

// Per tensor, uploaded once at creation.
struct TensorInfo {
  u64 numel;
  u64 state_offset;  // in elements, a multiple of ELEMS (q8 state: in bytes, of STATE_ALIGN)
  float lr_scale, wd_scale;
  u32 param_dtype, grad_dtype;
};

// Per CUDA block: its slice of one tensor.
struct BlockChunk {
  u32 tensor;  // global index
  u32 len;
  u64 start;
};

struct StepArgs {
  HyperArgs h;
  float lr;               // used when lr_ptr is NULL
  u32 first_tensor;       // this launch's tensors are [first_tensor, first_tensor + n_tensors)
  u32 n_tensors;
  u32 last_launch;        // the launch that advances the step count
  const float *lr_ptr;    // NULL, or the lr read now (CUDA graphs)
  const float *found_inf; // NULL, or: skip the step when non-zero
  u64 *step_counters;     // [COUNTER_STEP] steps taken, [COUNTER_TICKET] finished blocks
  u64 *agreeing;          // per tensor: Cautious Lion's count of signs that agree
  const TensorInfo *tensors;
  const BlockChunk *chunks; // this launch's chunks, one per block
  u8 *state;
  const u64 *agreement;   // distributed: the step's agreement (AGREE_*); NULL alone
  const u64 *sums_bad;    // sharded: the ranks' count of non-finite gradient sums, or NULL
  u64 *fill_table;        // NULL, or a pointer table (TableArgs) that the update kernel's block 0
                          // fills with this launch's pointers
  void *params[MAX_TENSORS];  // per launch: the pointers travel in the parameters (4 KB)
  const void *grads[MAX_TENSORS];
};

// A whole step's launch whose tensors' addresses lie in device memory (src/cuda/pointer_tables.rs):
// StepArgs' fields without its pointer arrays, 144 bytes where StepArgs has 3984, which the
// driver queues faster behind running work. A table is filled by a StepArgs launch of the
// step before (fill_table), never by a copy from the host.
struct TableArgs {
  HyperArgs h;
  float lr;
  u32 first_tensor;
  u32 n_tensors;
  u32 last_launch;
  const float *lr_ptr;
  const float *found_inf;
  u64 *step_counters;
  u64 *agreeing;
  const TensorInfo *tensors;
  const BlockChunk *chunks;
  u8 *state;
  const u64 *agreement;
  const u64 *sums_bad;
  const u64 *pointers;  // tensor t (its global index): [2t] its parameter's address, [2t + 1] its gradient's
};

// lion_step_tensors: any list of tensors, one per slot. Block b works on chunk
// b - slot_block[s] of slot s's tensor, s the last slot whose first block is at most b.
struct TensorsArgs {
  HyperArgs h;
  float lr;               // used when lr_ptr is NULL
  u32 n_slots;
  u32 n_blocks;           // blocks with work; blocks past them are idle
  u32 chunk_elems;        // a whole step's chunk length
  u32 completes_round;    // the launch that advances the step count
  u32 _pad;
  const float *lr_ptr;
  const float *found_inf;
  u64 *step_counters;
  u64 *agreeing;
  const TensorInfo *tensors;
  u8 *state;
  void *params[MAX_SLOTS];
  const void *grads[MAX_SLOTS];
  u32 slot_tensor[MAX_SLOTS];  // the slot's tensor (its global index)
  u32 slot_block[MAX_SLOTS];   // the slot's first block (non-decreasing)
};

// The distributed modes' kernels (src/cuda/sharded.rs, src/cuda/vote.rs).

// A distributed step's first kernel: this rank's flags and fingerprint, for the all-reduce.
struct AgreeArgs {
  u64 *agreement;
  const u64 *step_counters;
  const float *found_inf;  // NULL, or this rank's
  const float *lr_ptr;     // NULL, or the lr read now
  u64 setup;               // the hash of what every rank must share
  float lr;
  u32 refused;             // this rank refused the step
};

// Copies between the caller's tensors and a flat buffer (what the collectives carry).
struct CopyArgs {
  u8 *flat;
  u64 flat_base;           // the flat element at `flat`
  const u64 *agreement;    // non-NULL: copy only in a step every rank agreed to
  const u64 *sums_bad;
  const TensorInfo *tensors;  // state_offset: the tensor's first flat element
  const BlockChunk *chunks;
  u32 first_tensor, elem_size, to_flat, unused;
  void *ptrs[MAX_TENSORS];
};

// The sharded mode's check of the summed gradients (found_inf given).
struct CheckArgs {
  const u8 *sums;
  u64 *bad;
  u64 n;
  float scale;
  u32 grad_dtype;
};

// The vote mode: `lion_vote` writes this rank's votes, `lion_apply` reads the ranks' votes.
struct VoteArgs {
  StepArgs s;
  u8 *votes;        // vote: where this rank's votes go; apply: the gathered votes or results
  u64 rank_bytes;   // apply (VOTE_PACKED): bytes per rank in `votes`
  u32 ranks;        // apply (VOTE_PACKED): ranks whose 2-bit votes are summed
  u32 exchange;     // vote: VOTE_PACKED (2 bits an element) or VOTE_I8 (one i8 each);
                    // apply: VOTE_PACKED (every rank's votes) or VOTE_TRITS (the results)
  const u64 *flat;  // vote under q8 state: per tensor, its first vote's flattened element (its
                    // state_offset then places its momentum); NULL: state_offset is both
};

// The vote mode's sums: their signs, packed 5 a byte.
struct SignsArgs {
  const u8 *sums;   // i8
  u8 *packed;
  u64 n;            // a multiple of SIGNS_PER_THREAD
};
// ---- END KERNEL INTERFACE ----

// ---- the counter-based hash ----
// MIRROR(hash): src/numerics/rng.rs mix64, hash32, Key::new, Key::bits
__device__ __forceinline__ u64 mix64(u64 x) {
  x ^= x >> 30; x *= MIX64_MUL1;
  x ^= x >> 27; x *= MIX64_MUL2;
  return x ^ (x >> 31);
}
__device__ __forceinline__ u32 hash32(u32 x) {
  x ^= x >> 16; x *= HASH32_MUL1;
  x ^= x >> 15; x *= HASH32_MUL2;
  return x ^ (x >> 16);
}
struct Key { u32 lo, hi; };
__device__ __forceinline__ Key make_key(u64 seed, u64 step, u64 tensor, u64 stream) {
  u64 t = mix64((tensor << 1 | stream) + GOLDEN_GAMMA);
  u64 k = mix64(seed ^ mix64(step ^ t));
  Key key; key.lo = (u32)k; key.hi = (u32)(k >> 32);
  return key;
}
__device__ __forceinline__ u32 key_bits(Key k, u64 index) {
  u32 h = hash32((u32)index ^ k.lo);
  return hash32(h ^ k.hi ^ (u32)(index >> 32));
}

// ---- conversions ----
// MIRROR(conversions): src/numerics/convert.rs bf16_bits_to_f32, bf16_bits_nearest,
// bf16_bits_stochastic, f16_bits_to_f32, f16_bits_nearest, f16_grid_stochastic
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float((u32)h << 16); }
__device__ __forceinline__ u16 bf16_nearest(float x) {
  u32 b = __float_as_uint(x);
  u16 rounded = (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
  u16 nan = (u16)((b >> 16) | 0x40u);
  return x != x ? nan : rounded;
}
__device__ __forceinline__ u16 bf16_stochastic(float x, u32 random) {
  u32 b = __float_as_uint(x);
  u16 rounded = (u16)((b + (random & 0xffffu)) >> 16);
  u16 nan = (u16)((b >> 16) | 0x40u);
  return x != x ? nan : rounded;
}
__device__ __forceinline__ float f16_to_f32(u16 h) {
  u32 sign = ((u32)(h & 0x8000u)) << 16;
  u32 em = h & 0x7fffu;
  u32 normal = (em << 13) + (112u << 23);
  u32 subnormal = __float_as_uint((float)em * (1.0f / 16777216.0f));
  u32 special = 0x7f800000u | ((em & 0x3ffu) << 13);
  u32 bits = em >= 0x7c00u ? special : (em < 0x400u ? subnormal : normal);
  return __uint_as_float(bits | sign);
}
__device__ __forceinline__ u16 f16_nearest(float x) {
  u32 b = __float_as_uint(x);
  u32 sign = (b >> 16) & 0x8000u;
  u32 a = b & 0x7fffffffu;
  u32 special = 0x7c00u | (a > 0x7f800000u ? (0x200u | ((a >> 13) & 0x3ffu)) : 0u);
  u32 t = a - 0x38000000u;
  u32 normal = (t + (0xfffu + ((t >> 13) & 1u))) >> 13;
  float scaled = __uint_as_float(a) * 16777216.0f;
  float r = (scaled + 8388608.0f) - 8388608.0f;
  u32 subnormal = (u32)r;
  u32 h = a >= 0x7f800000u ? special : (a >= 0x477ff000u ? 0x7c00u : (a >= 0x38800000u ? normal : subnormal));
  return (u16)(h | sign);
}
__device__ __forceinline__ float f16_grid_stochastic(float x, u32 random) {
  float a = fabsf(x);
  int e = (int)(__float_as_uint(a) >> 23) - 127;
  e = e < -14 ? -14 : (e > 15 ? 15 : e);
  float ulp = __uint_as_float((u32)(e - 10 + 127) << 23);
  float inv_ulp = __uint_as_float((u32)(10 - e + 127) << 23);
  float q = a * inv_ulp;
  float fl = floorf(q);
  float threshold = (float)(random >> 8) * (1.0f / 16777216.0f);
  float up = (q - fl > threshold) ? 1.0f : 0.0f;
  float y = copysignf((fl + up) * ulp, x);
  return (a <= 3.402823466e38f) ? y : x;  // finite a (NaN compares false)
}

// MIRROR(rounding): src/cpu/elem.rs Elem impls
template <int DT> struct Elem;
template <> struct Elem<LION_DTYPE_F32> {
  typedef float T;
  static __device__ __forceinline__ float load(const T *p, u64 i) { return p[i]; }
  static __device__ __forceinline__ void store(T *p, u64 i, float x, bool sr, Key, u64) { p[i] = x; }
  // Four elements from a 16-byte boundary (q8's runs), and eight (two such).
  static __device__ __forceinline__ void load4(const T *p, u64 i, float v[4]) {
    const float4 a = *reinterpret_cast<const float4 *>(p + i);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  }
  static __device__ __forceinline__ void store4(T *p, u64 i, const float v[4], bool, Key, u64) {
    *reinterpret_cast<float4 *>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
  }
  static __device__ __forceinline__ void load8(const T *p, u64 i, float v[ELEMS]) {
    load4(p, i, v);
    load4(p, i + 4, v + 4);
  }
  static __device__ __forceinline__ void store8(T *p, u64 i, const float v[ELEMS], bool sr, Key key, u64 index) {
    store4(p, i, v, sr, key, index);
    store4(p, i + 4, v + 4, sr, key, index + 4);
  }
};
template <int DT> struct Half {
  typedef u16 T;
  static __device__ __forceinline__ float to_f32(u16 h) { return DT == LION_DTYPE_BF16 ? bf16_to_f32(h) : f16_to_f32(h); }
  static __device__ __forceinline__ u16 round(float x, bool sr, Key key, u64 index) {
    if (DT == LION_DTYPE_BF16) return sr ? bf16_stochastic(x, key_bits(key, index)) : bf16_nearest(x);
    return f16_nearest(sr ? f16_grid_stochastic(x, key_bits(key, index)) : x);
  }
  static __device__ __forceinline__ float load(const T *p, u64 i) { return to_f32(p[i]); }
  static __device__ __forceinline__ void store(T *p, u64 i, float x, bool sr, Key key, u64 index) {
    p[i] = round(x, sr, key, index);
  }
  // Four elements from an 8-byte boundary (q8's runs).
  static __device__ __forceinline__ void load4(const T *p, u64 i, float v[4]) {
    const uint2 w = *reinterpret_cast<const uint2 *>(p + i);
    v[0] = to_f32((u16)(w.x & 0xffffu));
    v[1] = to_f32((u16)(w.x >> 16));
    v[2] = to_f32((u16)(w.y & 0xffffu));
    v[3] = to_f32((u16)(w.y >> 16));
  }
  static __device__ __forceinline__ void store4(T *p, u64 i, const float v[4], bool sr, Key key, u64 index) {
    u32 words[2];
#pragma unroll
    for (int j = 0; j < 2; j++) {
      const u32 lo = round(v[2 * j], sr, key, index + 2 * j);
      const u32 hi = round(v[2 * j + 1], sr, key, index + 2 * j + 1);
      words[j] = lo | (hi << 16);
    }
    *reinterpret_cast<uint2 *>(p + i) = make_uint2(words[0], words[1]);
  }
  static __device__ __forceinline__ void load8(const T *p, u64 i, float v[ELEMS]) {
    uint4 w = *reinterpret_cast<const uint4 *>(p + i);
    u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
      v[2 * j] = to_f32((u16)(words[j] & 0xffffu));
      v[2 * j + 1] = to_f32((u16)(words[j] >> 16));
    }
  }
  static __device__ __forceinline__ void store8(T *p, u64 i, const float v[ELEMS], bool sr, Key key, u64 index) {
    u32 words[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      u32 lo = round(v[2 * j], sr, key, index + 2 * j);
      u32 hi = round(v[2 * j + 1], sr, key, index + 2 * j + 1);
      words[j] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4 *>(p + i) = make_uint4(words[0], words[1], words[2], words[3]);
  }
};
template <> struct Elem<LION_DTYPE_F16> : Half<LION_DTYPE_F16> {};
template <> struct Elem<LION_DTYPE_BF16> : Half<LION_DTYPE_BF16> {};

// ---- the update's coefficients, in f64 rounded once ----
// MIRROR(coeffs): src/numerics/update.rs Coeffs::new
struct Coeffs {
  float beta1, omb1, beta2, omb2, step_size, decay_keep, cautious_factor, cautious_wd, grad_scale;
};

__device__ Coeffs coeffs(const HyperArgs &h, float lr, const TensorInfo &t, u64 agreeing) {
  double lr_t = (double)lr * (double)t.lr_scale;
  double wd_t = (double)h.weight_decay * (double)t.wd_scale;
  double lr0 = (double)h.lr0;
  double d;
  if (h.decay_mode == LION_DECAY_STANDARD) d = lr_t * wd_t;
  else if (wd_t == 0.0) d = 0.0;
  else if (h.decay_mode == LION_DECAY_DECOUPLED) d = lr_t / lr0 * wd_t;
  else d = lr_t * lr_t / lr0 * wd_t;  // LION_DECAY_CORRECTED
  double cf = (double)h.cautious_factor;
  double step_size = lr_t;
  if (cf < 1.0 && t.numel > 0) {
    double n = (double)t.numel;
    double mean = ((double)agreeing + cf * (n - (double)agreeing)) / n;
    step_size = lr_t / (mean > CAUTIOUS_MEAN_FLOOR ? mean : CAUTIOUS_MEAN_FLOOR);
  }
  Coeffs k;
  k.beta1 = h.beta1;
  k.omb1 = (float)(1.0 - (double)h.beta1);
  k.beta2 = h.beta2;
  k.omb2 = (float)(1.0 - (double)h.beta2);
  k.step_size = (float)step_size;
  k.decay_keep = (float)(1.0 - d);
  k.cautious_factor = h.cautious_factor;
  k.cautious_wd = h.cautious_wd ? 1.0f : 0.0f;
  k.grad_scale = h.grad_scale;
  return k;
}

// MIRROR(update): src/numerics/update.rs sign, lion_element, signs_agree
__device__ __forceinline__ float sign_of(float c) {
  float unit = __uint_as_float((__float_as_uint(c) & 0x80000000u) | 0x3f800000u);
  return fabsf(c) > 0.0f ? unit : 0.0f;
}

__device__ __forceinline__ void lion_element(const Coeffs &k, bool plain, float &p, float g, float &m) {
  g = g * k.grad_scale;
  float c = k.beta1 * m + k.omb1 * g;
  float u = sign_of(c);
  float keep = k.decay_keep;
  if (!plain) {
    u *= (u * g > 0.0f) ? 1.0f : k.cautious_factor;
    if (k.cautious_wd != 0.0f && !(u * p > 0.0f)) keep = 1.0f;  // a NaN product spares it, as mask = (u*p > 0)
  }
  p = p * keep - k.step_size * u;
  m = k.beta2 * m + k.omb2 * g;
}

__device__ __forceinline__ bool signs_agree(const Coeffs &k, float g, float m) {
  g = g * k.grad_scale;
  float c = k.beta1 * m + k.omb1 * g;
  return sign_of(c) * g > 0.0f;
}

// MIRROR(step-options): src/cpu/mod.rs `impl Engine for CpuEngine` step, step_tensors (found_inf, lr, count)
// (A: StepArgs or TensorsArgs, which share these fields.)
template <class A> __device__ __forceinline__ bool skipped(const A &a) {
  return a.found_inf != 0 && *a.found_inf != 0.0f;
}

// MIRROR(agreement): src/dist/mod.rs Agreement::alike, agree_on_step (the same decisions)
// Whether a distributed step is skipped on every rank: a rank refused it or set found_inf,
// the ranks' fingerprints differ, or (sharded, found_inf given) a gradient sum is not finite.
__device__ __forceinline__ bool ranks_differ(const u64 *a) {
  const u64 *mine = a + AGREE_SEND, *all = a + AGREE_SUM;
  const u64 w = a[AGREE_RANKS];
  return all[AGREE_FP] != mine[AGREE_FP] * w || all[AGREE_FP2] != mine[AGREE_FP2] * w;
}
__device__ __forceinline__ bool dist_skip(const u64 *a, const u64 *sums_bad) {
  if (a == 0) return false;
  const u64 *all = a + AGREE_SUM;
  return all[AGREE_REFUSED] != 0 || all[AGREE_FOUND_INF] != 0 || all[AGREE_NON_FINITE] != 0 ||
         ranks_differ(a) || (sums_bad != 0 && *sums_bad != 0);
}

// A single process's and a distributed step's (StepArgs, TableArgs): the same, and the
// agreement.
template <class A> __device__ __forceinline__ bool whole_step_skipped(const A &a) {
  return (a.found_inf != 0 && *a.found_inf != 0.0f) || dist_skip(a.agreement, a.sums_bad);
}
__device__ __forceinline__ bool skipped(const StepArgs &a) { return whole_step_skipped(a); }
__device__ __forceinline__ bool skipped(const TableArgs &a) { return whole_step_skipped(a); }

// A skipped distributed step whose ranks differ is remembered (lion_step_count reports it).
// (A: StepArgs or TableArgs.)
template <class A> __device__ __forceinline__ void note_skip(const A &a) {
  if (a.agreement != 0 && blockIdx.x == 0 && threadIdx.x == 0 && a.agreement[AGREE_SUM + AGREE_REFUSED] == 0 &&
      ranks_differ(a.agreement))
    ((u64 *)a.agreement)[AGREE_DIFFERED] = 1;
}


template <class A> __device__ __forceinline__ float current_lr(const A &a) {
  return a.lr_ptr != 0 ? *a.lr_ptr : a.lr;
}

// Where a tensor's momentum starts in the state buffer: `state_offset` counts elements of
// the state dtype, or bytes under q8 state (src/cuda/plan.rs state_layout).
template <class A> __device__ __forceinline__ u8 *momentum_at(const A &a, const TensorInfo &t, u64 elem_bytes) {
  return a.state + t.state_offset * (a.h.state_dtype == LION_DTYPE_Q8 ? 1ull : elem_bytes);
}

// ---- 8-bit momentum (state dtype LION_DTYPE_Q8) ----
// MIRROR(q8): src/numerics/q8.rs quantized, unit, decode, abs_bits, scale_of, encoder, encode
// (q8_encode_bits: the same codes by another route, see there), encode_block (q8_store_block)
// (each one IEEE operation, as there); src/cpu/kernel.rs q8_fused,
// q8_count_agreeing_chunk (the block step: decode with the old scale, lion_element, encode
// with the new block's largest |m|)
//
// A quantized tensor's region (src/cuda/plan.rs state_layout): `numel` codes (i8) from
// state_offset, then, from the next multiple of STATE_ALIGN, one f32 scale per Q8_BLOCK
// elements. Smaller tensors keep f32 momentum. One warp steps one block, ELEMS elements a
// lane in two runs of Q8_RUN: lane l's run h starts at element h * Q8_BLOCK / 2 + Q8_RUN * l
// (q8_run_start), so that each load or store of a run is one stretch of the warp's bytes, in
// whole 32-byte sectors. (With one run of ELEMS a lane, each 16-byte access of f32 took half
// of every sector it touched: L2 served each sector twice and was 90-95% busy, the DRAM
// 77-83%, in ncu on an H200.) A lane's v[0..Q8_RUN) is its run 0, v[Q8_RUN..ELEMS) its run 1.
static_assert(Q8_BLOCK == 32 * ELEMS, "a q8 block is one warp's ELEMS elements a lane");
static_assert(CUDA_THREADS_PER_BLOCK % 32 == 0, "whole warps");
#define Q8_RUN (ELEMS / 2)
static_assert(Q8_RUN == 4, "a run is four elements (q8_decode4, q8_encode4, Elem::load4)");
__device__ __forceinline__ u64 q8_run_start(u64 block_start, u32 lane, u32 run) {
  return block_start + run * (Q8_BLOCK / 2) + (u64)lane * Q8_RUN;
}
// A lane's two runs of the block from element `b0` of `base` (global memory, or a ring slot
// with b0 = 0), whole and aligned: loaded, and stored with Elem<DT>'s rounding.
template <int DT>
__device__ __forceinline__ void q8_load_runs(const typename Elem<DT>::T *base, u64 b0, u32 lane, float v[ELEMS]) {
#pragma unroll
  for (u32 h = 0; h < 2; h++) Elem<DT>::load4(base, q8_run_start(b0, lane, h), v + h * Q8_RUN);
}
template <int DT>
__device__ __forceinline__ void q8_store_runs(typename Elem<DT>::T *base, u64 b0, u32 lane, const float v[ELEMS],
                                              bool sr, Key key) {
#pragma unroll
  for (u32 h = 0; h < 2; h++) {
    const u64 r = q8_run_start(b0, lane, h);
    Elem<DT>::store4(base, r, v + h * Q8_RUN, sr, key, r);
  }
}

__device__ __forceinline__ bool q8_quantized(u32 state_dtype, u64 numel) {
  return state_dtype == LION_DTYPE_Q8 && numel >= Q8_MIN_NUMEL;
}
__device__ __forceinline__ signed char *q8_codes(u8 *state, const TensorInfo &t) {
  return (signed char *)(state + t.state_offset);
}
__device__ __forceinline__ float *q8_scales(u8 *state, const TensorInfo &t) {
  return (float *)(state + t.state_offset + (t.numel + STATE_ALIGN - 1) / STATE_ALIGN * STATE_ALIGN);
}
__device__ __forceinline__ float q8_unit(float scale) { return __fdiv_rn(scale, Q8_MAX_LEVEL); }
__device__ __forceinline__ float q8_decode(int k, float unit) { return (float)(k * (k < 0 ? -k : k)) * unit; }
__device__ __forceinline__ u32 q8_abs_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }
// The largest |m| kept within [Q8_MIN_SCALE_BITS, Q8_MAX_SCALE_BITS] (0 for zeros, NaN where
// not finite): src/numerics/q8.rs scale_of says why.
__device__ __forceinline__ float q8_scale_of(u32 max_abs_bits) {
  const u32 kept = max_abs_bits < Q8_MIN_SCALE_BITS ? Q8_MIN_SCALE_BITS
                   : max_abs_bits > Q8_MAX_SCALE_BITS ? Q8_MAX_SCALE_BITS
                                                      : max_abs_bits;
  return __uint_as_float(max_abs_bits >= 0x7f800000u ? Q8_NAN_SCALE_BITS : max_abs_bits == 0u ? 0u : kept);
}
__device__ __forceinline__ float q8_encoder(float scale) {
  const float q = __fdiv_rn(Q8_MAX_LEVEL, scale);
  return q < 3.402823466e38f ? q : 3.402823466e38f;  // f32::MAX
}

// The block step's codes go in and out without conversion instructions (a quarter of the
// arithmetic rate on these GPUs, three of them an element): an integer 0 <= n < 2^23 is the
// low bits of the f32 2^23 + n, so a byte becomes a float by a byte permute and a subtraction,
// and a float integer becomes a byte by an addition. The values are those of q8_decode and
// the CPU's encode, bit for bit.
#define Q8_MAGIC 8388608.0f  // 2^23

// k * |k| for code byte j of `biased` (a word of codes, each XORed with 0x80: k + 128).
__device__ __forceinline__ float q8_code_square(u32 biased, u32 j) {
  const float k = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7540u | j)) - (Q8_MAGIC + 128.0f);
  return k * fabsf(k);  // exact: at most 127^2
}
// A run's four codes (a little-endian word) to momentum.
__device__ __forceinline__ void q8_decode4(u32 word, float unit, float v[Q8_RUN]) {
  const u32 biased = word ^ 0x80808080u;
#pragma unroll
  for (int j = 0; j < 4; j++) v[j] = q8_code_square(biased, j) * unit;
}

// The code of x (finite, |x| at most the block's scale) as the low byte of the result: the
// CPU's encode (src/numerics/q8.rs) without its correctly rounded square root. With
// y = |x| * encoder, the CPU's code is the number of midpoints j * (j + 1) + 1/2 (j = 0..126)
// below y. Here kr = rint(sqrt(y)) from the hardware's approximate root is that number or
// one more: it is one more exactly where y <= (kr - 1) * kr + 1/2, whatever the root's last
// bits, since the midpoints lie a quarter away from the squares of half-integers. Every f32
// y of the range is checked against the CPU's formula on the GPU (src/cuda/module.rs tests).
__device__ __forceinline__ float q8_sqrt_approx(float y) {
#ifdef __CUDA_ARCH__
  float r;
  asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
#elif defined(LION_EMU_RUNTIME)
  // The emulator (tests/c/emu_cuda.h): the root one ulp off, up or down by the input's last
  // bit, as the hardware's approximation may be.
  const float r = sqrtf(y);
  return (__float_as_uint(y) & 1u) ? nextafterf(r, INFINITY) : nextafterf(r, 0.0f);
#else
  return sqrtf(y);  // the host's syntax check (src/cuda/prelude.rs tests): PTX is not its asm
#endif
}
__device__ __forceinline__ u32 q8_encode_bits(float x, float encoder) {
  const float y = fabsf(x) * encoder;
  const float kr = (q8_sqrt_approx(y) + Q8_MAGIC) - Q8_MAGIC;  // rint
  float k = y <= (kr - 1.0f) * kr + 0.5f ? kr - 1.0f : kr;        // -1 where kr = 0
  k = fmaxf(k, x != 0.0f ? 1.0f : 0.0f);                          // no momentum loses its sign
  // 2^23 + 256 +- k: the low byte is k, or 256 - k (the two's complement) for a negative x.
  return __float_as_uint((Q8_MAGIC + 256.0f) + __uint_as_float(__float_as_uint(k) | (__float_as_uint(x) & 0x80000000u)));
}
// A run's four codes, as a little-endian word.
__device__ __forceinline__ u32 q8_encode4(const float v[Q8_RUN], float encoder) {
  u32 b[4];
#pragma unroll
  for (int j = 0; j < 4; j++) b[j] = q8_encode_bits(v[j], encoder);
  return __byte_perm(__byte_perm(b[0], b[1], 0x0040u), __byte_perm(b[2], b[3], 0x0040u), 0x5410u);
}

// The momentum of the run from element r, 0 past the tensor's `end` (the tail of a tensor
// whose last block is partial).
__device__ __forceinline__ void q8_decode_run(const signed char *codes, u64 r, u64 end, float unit,
                                              float mv[Q8_RUN]) {
  if (r + Q8_RUN <= end) {
    q8_decode4(*(const u32 *)(codes + r), unit, mv);
  } else {
#pragma unroll
    for (int j = 0; j < Q8_RUN; j++) mv[j] = r + j < end ? q8_decode(codes[r + j], unit) : 0.0f;
  }
}

// A block's new momentum `mv8` (a lane's two runs; 0 past the tensor's end) to its codes and
// scale.
__device__ __forceinline__ void q8_store_block(const float mv8[ELEMS], u32 lane, u64 b0, u64 end, u64 block,
                                               signed char *__restrict__ codes, float *__restrict__ scales) {
  // The block's largest |m| (as bits: they order like |m|, a NaN above +inf).
  u32 max_bits = 0;
#pragma unroll
  for (int j = 0; j < ELEMS; j++) {
    const u32 b = q8_abs_bits(mv8[j]);
    max_bits = b > max_bits ? b : max_bits;
  }
  for (int off = 16; off > 0; off >>= 1) {
    const u32 other = __shfl_xor_sync(0xffffffffu, max_bits, off);
    max_bits = other > max_bits ? other : max_bits;
  }
  const float scale = q8_scale_of(max_bits);
  const bool finite = max_bits < 0x7f800000u;  // else every code 0
  const float encoder = q8_encoder(scale);
#pragma unroll
  for (u32 h = 0; h < 2; h++) {
    const u32 word = finite ? q8_encode4(mv8 + h * Q8_RUN, encoder) : 0u;
    const u64 r = q8_run_start(b0, lane, h);
    if (r + Q8_RUN <= end) {
      *(u32 *)(codes + r) = word;
    } else {
      for (u64 j = r; j < r + Q8_RUN && j < end; j++) codes[j] = (signed char)(u8)(word >> (8 * (j - r)));
    }
  }
  if (lane == 0) scales[block] = scale;
}

// Asks L2 for the block `b` that this warp steps Q8_L2_AHEAD strides on: its parameters',
// gradients' and codes' lines, one line a lane. A warp's block step is long (decode, a
// warp-wide maximum, encode); these requests keep bytes on their way from memory while warps
// decode and encode, with no register to hold them (src/cuda/tuning.rs: 86% of the copy floor
// against 80% without them on an H200, 90-91% against 81% on an H100).
template <class PT, class GT>
__device__ __forceinline__ void q8_prefetch_block(const PT *p, const GT *g, const signed char *codes, u64 b,
                                                  u32 lane) {
  constexpr u32 line_bytes = 128;  // L2's line
  // n bytes from a 16-byte boundary (all these regions promise) touch at most n / 128 + 1
  // lines: lane k of a region asks for its byte 128 k, the last one for its last byte.
  constexpr u32 p_bytes = Q8_BLOCK * sizeof(PT), g_bytes = Q8_BLOCK * sizeof(GT), c_bytes = Q8_BLOCK;
  constexpr u32 p_lines = p_bytes / line_bytes + 1, g_lines = g_bytes / line_bytes + 1;
  constexpr u32 c_lines = c_bytes / line_bytes + 1;
  static_assert(p_lines + g_lines + c_lines <= 32, "one line a lane");
  const char *base;
  u32 k, bytes;
  if (lane < p_lines) {
    base = (const char *)(p + b), k = lane, bytes = p_bytes;
  } else if (lane < p_lines + g_lines) {
    base = (const char *)(g + b), k = lane - p_lines, bytes = g_bytes;
  } else if (lane < p_lines + g_lines + c_lines) {
    base = (const char *)(codes + b), k = lane - p_lines - g_lines, bytes = c_bytes;
  } else {
    return;
  }
  const char *line = base + (k * line_bytes < bytes ? k * line_bytes : bytes - 1);
#ifdef __CUDA_ARCH__
  asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
#elif defined(LION_EMU_RUNTIME)
  emu_prefetch_l2(line);  // the emulator checks that it is device memory
#else
  (void)line;  // the host's syntax check
#endif
}

// q8's ring (Q8_STAGES > 0, src/cuda/tuning.rs): each warp copies its next blocks' bytes into
// shared memory with cp.async (sm_80 and later) while it decodes, steps and encodes the block
// before them, so that loads stay on their way through the long block step without holding
// registers. Each lane copies, and later reads, only its own elements' bytes (and its own
// copy of the block's scale), so a lane's cp.async.wait_group is all the ordering it needs.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define Q8_RING 0  // no cp.async before sm_80: loads straight to registers
#else
#define Q8_RING Q8_STAGES
#endif
#if Q8_RING > 0
// MIRROR(q8-slot): src/cuda/tuning.rs Q8_SLOT_BYTES (this struct's size, the launch's unit)
struct Q8Slot {  // one block's bytes, sized for f32 parameters and gradients
  uint4 p[Q8_BLOCK * sizeof(float) / sizeof(uint4)];
  uint4 g[Q8_BLOCK * sizeof(float) / sizeof(uint4)];
  u32 codes[Q8_BLOCK / Q8_RUN];   // a run's codes each
  float scale[Q8_BLOCK / ELEMS];  // each lane's own copy
};
static_assert(sizeof(Q8Slot) == Q8_SLOT_BYTES, "Q8Slot differs from src/cuda/tuning.rs Q8_SLOT_BYTES");
// Warp `warp`'s Q8_RING slots, in the launch's dynamic shared memory (Q8_RING slots a warp:
// src/cuda/tuning.rs Tuning::q8_ring_bytes, which the host passes to each launch).
__device__ __forceinline__ Q8Slot *q8_ring(u32 warp) {
#ifdef __CUDA_ARCH__
  extern __shared__ Q8Slot q8_ring_slots[];
#else
  Q8Slot *q8_ring_slots = (Q8Slot *)emu_dynamic_shared(sizeof(Q8Slot) * Q8_RING * (CUDA_THREADS_PER_BLOCK / 32));
#endif
  return q8_ring_slots + warp * Q8_RING;
}
// `bytes` (4, 8 or 16, aligned so on both sides) from global to shared memory, asynchronously.
template <u32 bytes> __device__ __forceinline__ void q8_copy_async(void *to, const void *from) {
  static_assert(bytes == 4 || bytes == 8 || bytes == 16, "cp.async's sizes");
#ifdef __CUDA_ARCH__
  const u32 at = (u32)__cvta_generic_to_shared(to);
  const u64 source = (u64)__cvta_generic_to_global(from);
  // .ca (through L1): with .cg and each lane's elements in one run (a copy took half of each
  // sector, L2 sent each twice) the ring ran at 56-66% of the copy floor on an H200, with .ca
  // at 86-97% (BENCHMARKS.md, 2026-12-06); the runs (q8_run_start) now take whole sectors.
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(at), "l"(source), "n"(bytes) : "memory");
#elif defined(LION_EMU_RUNTIME)
  emu_cp_async(to, from, bytes);  // lands at the wait that retires its group
#else
  (void)to, (void)from;  // the host's syntax check
#endif
}
__device__ __forceinline__ void q8_ring_commit() {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.commit_group;" ::: "memory");
#elif defined(LION_EMU_RUNTIME)
  emu_cp_commit();
#endif
}
// Until at most `pending` of this lane's newest commit groups are still on their way.
template <int pending> __device__ __forceinline__ void q8_ring_wait() {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.wait_group %0;" ::"n"(pending) : "memory");
#elif defined(LION_EMU_RUNTIME)
  emu_cp_wait(pending);
#endif
}
// A block's elements of type T in shared memory in the order of global memory: lane l's run h
// at element h * Q8_BLOCK / 2 + Q8_RUN * l, so that a warp's copies and reads of one run are
// consecutive (a run of f32 is a uint4: no two lanes of a quarter warp on one bank).
template <class T> __device__ __forceinline__ void q8_ring_copy(uint4 *region, const T *block, u32 lane) {
#pragma unroll
  for (u32 h = 0; h < 2; h++) {
    const u64 r = q8_run_start(0, lane, h);
    q8_copy_async<Q8_RUN * sizeof(T)>((T *)region + r, block + r);
  }
}
// Lane `lane`'s bytes of the block from element `b` (whole, 16-byte aligned parameters and
// gradients) into `slot`, as one commit group; an empty group past `end`, so that every
// iteration commits one.
template <class PT, class GT>
__device__ __forceinline__ void q8_ring_fill(Q8Slot &slot, const PT *p, const GT *g, const signed char *codes,
                                             const float *scales, u64 b, u64 end, u32 lane) {
  if (b + Q8_BLOCK <= end) {
    q8_ring_copy(slot.p, p + b, lane);
    q8_ring_copy(slot.g, g + b, lane);
#pragma unroll
    for (u32 h = 0; h < 2; h++)
      q8_copy_async<sizeof(u32)>(&slot.codes[h * 32 + lane], codes + q8_run_start(b, lane, h));
    q8_copy_async<sizeof(float)>(&slot.scale[lane], scales + b / Q8_BLOCK);
  }
  q8_ring_commit();
}
#endif

// A chunk of a quantized tensor: it starts on a block (chunks are multiples of Q8_BLOCK from
// the tensor's start). Warp w steps blocks w, w + warps, ..; each lane its two runs of each.
template <int P, int G, class A>
__device__ void q8_update_chunk(const A &a, const BlockChunk &c, const TensorInfo &t, void *pv, const void *gv, u64 step) {
  typedef typename Elem<P>::T PT;
  typedef typename Elem<G>::T GT;
  PT *__restrict__ p = (PT *)pv;
  const GT *__restrict__ g = (const GT *)gv;
  signed char *__restrict__ codes = q8_codes(a.state, t);
  float *__restrict__ scales = q8_scales(a.state, t);
  const Coeffs k = coeffs(a.h, current_lr(a), t, a.agreeing[c.tensor]);
  const bool plain = k.cautious_factor == 1.0f && k.cautious_wd == 0.0f;
  // q8 momentum always rounds to nearest; a 16-bit parameter may round stochastically.
  const bool sr_p = a.h.stochastic_rounding != 0 && P != LION_DTYPE_F32;
  const Key kp = make_key(a.h.seed, step, c.tensor, STREAM_PARAM);
  const bool vec = ((unsigned long long)p % 16 == 0) && ((unsigned long long)g % 16 == 0);
  const u32 lane = threadIdx.x & 31u;
  const u64 end = c.start + c.len;
  const u64 stride = (u64)(CUDA_THREADS_PER_BLOCK / 32) * Q8_BLOCK;
  u64 b0 = c.start + (u64)(threadIdx.x >> 5) * Q8_BLOCK;
#if Q8_RING > 0
  if (vec) {
    // Whole blocks through the ring: Q8_RING - 1 blocks on their way while the warp steps one.
    // An iteration refills the slot the one before it read (its values are used by now).
    Q8Slot *ring = q8_ring(threadIdx.x >> 5);
#pragma unroll
    for (u32 s = 0; s + 1 < Q8_RING; s++) q8_ring_fill(ring[s], p, g, codes, scales, b0 + s * stride, end, lane);
    for (u32 slot = 0; b0 + Q8_BLOCK <= end; b0 += stride, slot = slot + 1 == Q8_RING ? 0 : slot + 1) {
      q8_ring_fill(ring[slot == 0 ? Q8_RING - 1 : slot - 1], p, g, codes, scales, b0 + (Q8_RING - 1) * stride, end, lane);
      if constexpr (Q8_L2_AHEAD > 0) {
        const u64 ahead = b0 + (Q8_RING - 1 + Q8_L2_AHEAD) * stride;
        if (ahead + Q8_BLOCK <= end) q8_prefetch_block(p, g, codes, ahead, lane);
      }
      q8_ring_wait<Q8_RING - 1>();
      const Q8Slot &s = ring[slot];
      float pv8[ELEMS], gv8[ELEMS], mv8[ELEMS];
      q8_load_runs<P>((const PT *)s.p, 0, lane, pv8);
      q8_load_runs<G>((const GT *)s.g, 0, lane, gv8);
      const float unit = q8_unit(s.scale[lane]);
#pragma unroll
      for (u32 h = 0; h < 2; h++) q8_decode4(s.codes[h * 32 + lane], unit, mv8 + h * Q8_RUN);
#pragma unroll
      for (int j = 0; j < ELEMS; j++) lion_element(k, plain, pv8[j], gv8[j], mv8[j]);
      q8_store_runs<P>(p, b0, lane, pv8, sr_p, kp);
      q8_store_block(mv8, lane, b0, end, b0 / Q8_BLOCK, codes, scales);
    }
  }
#else
  if (vec) {
    // Whole blocks: all of a block's loads are issued before its math (the scale's division
    // would otherwise stand between them).
    for (; b0 + Q8_BLOCK <= end; b0 += stride) {  // warp-uniform
      if constexpr (Q8_L2_AHEAD > 0) {  // 0: no prefetch
        const u64 ahead = b0 + Q8_L2_AHEAD * stride;
        if (ahead + Q8_BLOCK <= end) q8_prefetch_block(p, g, codes, ahead, lane);
      }
      const float scale = scales[b0 / Q8_BLOCK];
      u32 words[2];
      float pv8[ELEMS], gv8[ELEMS], mv8[ELEMS];
#pragma unroll
      for (u32 h = 0; h < 2; h++) words[h] = *(const u32 *)(codes + q8_run_start(b0, lane, h));
      q8_load_runs<P>(p, b0, lane, pv8);
      q8_load_runs<G>(g, b0, lane, gv8);
      const float unit = q8_unit(scale);
#pragma unroll
      for (u32 h = 0; h < 2; h++) q8_decode4(words[h], unit, mv8 + h * Q8_RUN);
#pragma unroll
      for (int j = 0; j < ELEMS; j++) lion_element(k, plain, pv8[j], gv8[j], mv8[j]);
      q8_store_runs<P>(p, b0, lane, pv8, sr_p, kp);
      q8_store_block(mv8, lane, b0, end, b0 / Q8_BLOCK, codes, scales);
    }
  }
#endif
  for (; b0 < end; b0 += stride) {  // warp-uniform: a tensor's last block, or unaligned tensors
    const u64 block = b0 / Q8_BLOCK;
    const float unit = q8_unit(scales[block]);
    float mv8[ELEMS];
#pragma unroll
    for (u32 h = 0; h < 2; h++) {
      const u64 r = q8_run_start(b0, lane, h);
      float *mv = mv8 + h * Q8_RUN;
      q8_decode_run(codes, r, end, unit, mv);
      if (vec && r + Q8_RUN <= end) {
        float pv[Q8_RUN], gv[Q8_RUN];
        Elem<P>::load4(p, r, pv);
        Elem<G>::load4(g, r, gv);
#pragma unroll
        for (int j = 0; j < Q8_RUN; j++) lion_element(k, plain, pv[j], gv[j], mv[j]);
        Elem<P>::store4(p, r, pv, sr_p, kp, r);
      } else {
        for (u64 j = r; j < r + Q8_RUN && j < end; j++) {
          float pj = Elem<P>::load(p, j);
          lion_element(k, plain, pj, Elem<G>::load(g, j), mv[j - r]);
          Elem<P>::store(p, j, pj, sr_p, kp, j);
        }
      }
    }
    q8_store_block(mv8, lane, b0, end, block, codes, scales);
  }
}

template <int G, class A>
__device__ u32 q8_count_chunk(const A &a, const BlockChunk &c, const TensorInfo &t, const void *gv) {
  typedef typename Elem<G>::T GT;
  const GT *g = (const GT *)gv;
  const signed char *codes = q8_codes(a.state, t);
  const float *scales = q8_scales(a.state, t);
  const Coeffs k = coeffs(a.h, current_lr(a), t, 0);
  u32 n = 0;
  const u64 end = c.start + c.len;
  for (u64 i = c.start + threadIdx.x; i < end; i += CUDA_THREADS_PER_BLOCK)
    n += signs_agree(k, Elem<G>::load(g, i), q8_decode(codes[i], q8_unit(scales[i / Q8_BLOCK])));
  return n;
}

// ---- one chunk of one tensor, for each dtype combination ----

// ELEMS elements from index i, with 16-byte loads and stores.
template <int P, int G, int S>
__device__ __forceinline__ void update8(typename Elem<P>::T *__restrict__ p, const typename Elem<G>::T *__restrict__ g,
                                        typename Elem<S>::T *__restrict__ m, u64 i, const Coeffs &k, bool plain,
                                        bool sr_p, bool sr_m, Key kp, Key km) {
  float pv8[ELEMS], gv8[ELEMS], mv8[ELEMS];
  Elem<P>::load8(p, i, pv8);
  Elem<G>::load8(g, i, gv8);
  Elem<S>::load8(m, i, mv8);
#pragma unroll
  for (int j = 0; j < ELEMS; j++) lion_element(k, plain, pv8[j], gv8[j], mv8[j]);
  Elem<P>::store8(p, i, pv8, sr_p, kp, i);
  Elem<S>::store8(m, i, mv8, sr_m, km, i);
}
template <int P, int G, int S, class A>
__device__ void update_chunk(const A &a, const BlockChunk &c, const TensorInfo &t, void *pv, const void *gv, u64 step) {
  typedef typename Elem<P>::T PT;
  typedef typename Elem<G>::T GT;
  typedef typename Elem<S>::T ST;
  PT *__restrict__ p = (PT *)pv;
  const GT *__restrict__ g = (const GT *)gv;
  ST *__restrict__ m = (ST *)momentum_at(a, t, sizeof(ST));
  const Coeffs k = coeffs(a.h, current_lr(a), t, a.agreeing[c.tensor]);
  const bool plain = k.cautious_factor == 1.0f && k.cautious_wd == 0.0f;
  const bool sr = a.h.stochastic_rounding != 0;
  const bool sr_p = sr && P != LION_DTYPE_F32, sr_m = sr && S != LION_DTYPE_F32;
  Key kp = make_key(a.h.seed, step, c.tensor, STREAM_PARAM);
  Key km = make_key(a.h.seed, step, c.tensor, STREAM_MOMENTUM);
  const bool vec = ((unsigned long long)p % 16 == 0) && ((unsigned long long)g % 16 == 0);
  const u64 end = c.start + c.len;
  const u64 stride = (u64)CUDA_THREADS_PER_BLOCK * ELEMS;
  u64 i = c.start + (u64)threadIdx.x * ELEMS;
  if (vec) {
    // Whole strides first, unrolled so that several iterations' loads are in flight at once
    // (the buffers never overlap: checked on the host, hence __restrict__).
    const u64 full_end = c.start + (c.len / stride) * stride;
#pragma unroll(S == LION_DTYPE_BF16 ? UNROLL_BF16 : UNROLL_F32)
    for (; i < full_end; i += stride) update8<P, G, S>(p, g, m, i, k, plain, sr_p, sr_m, kp, km);
  }
  for (; i < end; i += stride) {
    if (vec && i + ELEMS <= end) {
      update8<P, G, S>(p, g, m, i, k, plain, sr_p, sr_m, kp, km);
    } else {
      for (u64 j = i; j < i + ELEMS && j < end; j++) {
        float pj = Elem<P>::load(p, j), mj = Elem<S>::load(m, j);
        lion_element(k, plain, pj, Elem<G>::load(g, j), mj);
        Elem<P>::store(p, j, pj, sr_p, kp, j);
        Elem<S>::store(m, j, mj, sr_m, km, j);
      }
    }
  }
}

template <int G, int S, class A>
__device__ u32 count_chunk(const A &a, const BlockChunk &c, const TensorInfo &t, const void *gv) {
  typedef typename Elem<G>::T GT;
  typedef typename Elem<S>::T ST;
  const GT *g = (const GT *)gv;
  const ST *m = (const ST *)momentum_at(a, t, sizeof(ST));
  const Coeffs k = coeffs(a.h, current_lr(a), t, 0);
  u32 n = 0;
  const u64 end = c.start + c.len;
  for (u64 i = c.start + threadIdx.x; i < end; i += CUDA_THREADS_PER_BLOCK) n += signs_agree(k, Elem<G>::load(g, i), Elem<S>::load(m, i));
  return n;
}

// The dispatches number a (param or grad, grad or state) dtype pair as 3 * first + second.
static_assert(LION_DTYPE_F32 == 0 && LION_DTYPE_F16 == 1 && LION_DTYPE_BF16 == 2, "dtype codes");
#define DISPATCH_P_G(S, CALL)                                  \
  switch (t.param_dtype * 3 + t.grad_dtype) {                  \
    case 0: CALL(LION_DTYPE_F32, LION_DTYPE_F32, S); break;    \
    case 1: CALL(LION_DTYPE_F32, LION_DTYPE_F16, S); break;    \
    case 2: CALL(LION_DTYPE_F32, LION_DTYPE_BF16, S); break;   \
    case 3: CALL(LION_DTYPE_F16, LION_DTYPE_F32, S); break;    \
    case 4: CALL(LION_DTYPE_F16, LION_DTYPE_F16, S); break;    \
    case 5: CALL(LION_DTYPE_F16, LION_DTYPE_BF16, S); break;   \
    case 6: CALL(LION_DTYPE_BF16, LION_DTYPE_F32, S); break;   \
    case 7: CALL(LION_DTYPE_BF16, LION_DTYPE_F16, S); break;   \
    default: CALL(LION_DTYPE_BF16, LION_DTYPE_BF16, S); break; \
  }

// The tensors of a launch, whose cautious counts its last block resets.
__device__ __forceinline__ u32 launch_tensors(const StepArgs &a) { return a.n_tensors; }
__device__ __forceinline__ u32 launch_tensor(const StepArgs &a, u32 i) { return a.first_tensor + i; }
__device__ __forceinline__ u32 launch_tensors(const TableArgs &a) { return a.n_tensors; }
__device__ __forceinline__ u32 launch_tensor(const TableArgs &a, u32 i) { return a.first_tensor + i; }

// A whole step's tensor t (its global index): its parameter's and its gradient's addresses,
// from the launch's parameters (StepArgs) or from the table in device memory (TableArgs, one
// 16-byte load).
struct TensorAddresses {
  void *p;
  const void *g;
};
__device__ __forceinline__ TensorAddresses addresses_of(const StepArgs &a, u32 t) {
  return {a.params[t - a.first_tensor], a.grads[t - a.first_tensor]};
}
__device__ __forceinline__ TensorAddresses addresses_of(const TableArgs &a, u32 t) {
  const ulonglong2 pg = reinterpret_cast<const ulonglong2 *>(a.pointers)[t];
  return {reinterpret_cast<void *>(pg.x), reinterpret_cast<const void *>(pg.y)};
}
__device__ __forceinline__ u32 launch_tensors(const TensorsArgs &a) { return a.n_slots; }
__device__ __forceinline__ u32 launch_tensor(const TensorsArgs &a, u32 i) { return a.slot_tensor[i]; }

// One block's cautious count: its chunk's signs that agree, added to its tensor's count.
template <class A>
__device__ void count_block(const A &a, const BlockChunk &c, const void *g) {
  const TensorInfo t = a.tensors[c.tensor];
  u32 n = 0;
  if (a.h.state_dtype == LION_DTYPE_Q8) {
    // A small tensor keeps f32 momentum.
    const bool q = q8_quantized(a.h.state_dtype, t.numel);
    if (t.grad_dtype == LION_DTYPE_F32)
      n = q ? q8_count_chunk<LION_DTYPE_F32>(a, c, t, g) : count_chunk<LION_DTYPE_F32, LION_DTYPE_F32>(a, c, t, g);
    else if (t.grad_dtype == LION_DTYPE_F16)
      n = q ? q8_count_chunk<LION_DTYPE_F16>(a, c, t, g) : count_chunk<LION_DTYPE_F16, LION_DTYPE_F32>(a, c, t, g);
    else
      n = q ? q8_count_chunk<LION_DTYPE_BF16>(a, c, t, g) : count_chunk<LION_DTYPE_BF16, LION_DTYPE_F32>(a, c, t, g);
  } else switch (t.grad_dtype * 3 + a.h.state_dtype) {
    case 0: n = count_chunk<LION_DTYPE_F32, LION_DTYPE_F32>(a, c, t, g); break;
    case 2: n = count_chunk<LION_DTYPE_F32, LION_DTYPE_BF16>(a, c, t, g); break;
    case 3: n = count_chunk<LION_DTYPE_F16, LION_DTYPE_F32>(a, c, t, g); break;
    case 5: n = count_chunk<LION_DTYPE_F16, LION_DTYPE_BF16>(a, c, t, g); break;
    case 6: n = count_chunk<LION_DTYPE_BF16, LION_DTYPE_F32>(a, c, t, g); break;
    default: n = count_chunk<LION_DTYPE_BF16, LION_DTYPE_BF16>(a, c, t, g); break;
  }
  // Block sum, then one integer atomic per block: the total does not depend on the order.
  for (int off = 16; off > 0; off >>= 1) n += __shfl_down_sync(0xffffffffu, n, off);
  __shared__ u32 warp_sums[CUDA_THREADS_PER_BLOCK / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = n;
  __syncthreads();
  if (threadIdx.x == 0) {
    u64 total = 0;
    for (int w = 0; w < CUDA_THREADS_PER_BLOCK / 32; w++) total += warp_sums[w];
    atomicAdd(&a.agreeing[c.tensor], total);
  }
}

// The launch's end: the last block to finish resets the cautious counts of the launch's
// tensors for the next step (where it has counts) and, where `advance`, advances the step
// count: every block has read both by then.
template <class A>
__device__ void finish_launch(const A &a, u64 step, bool advance) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&a.step_counters[COUNTER_TICKET], 1ull) == gridDim.x - 1;
  }
  __syncthreads();
  if (last) {
    if (a.agreeing != 0) {
      const u32 n = launch_tensors(a);
      for (u32 i = threadIdx.x; i < n; i += CUDA_THREADS_PER_BLOCK) a.agreeing[launch_tensor(a, i)] = 0;
    }
    if (threadIdx.x == 0) {
      a.step_counters[COUNTER_TICKET] = 0;
      if (advance) a.step_counters[COUNTER_STEP] = step;
    }
  }
}

// One block's update (an idle block, without a chunk, only takes its ticket), then the
// launch's end: the last block to finish resets the cautious counts of the launch's tensors
// for the next step and, where `advance`, advances the step count: every block has read both
// by then. `S`, the optimizer's momentum dtype: each has its own kernels (lion_update_f32,
// _bf16, _q8: src/cuda/module.rs Kernels::update_for), so that one dtype's code does not set
// the register budget of the others' (q8's 80 registers in a shared kernel slowed the bf16
// steps from 94-97% to 72-76% of the H200's copy ceiling).
template <int S, class A>
__device__ void update_block(const A &a, bool has_chunk, const BlockChunk &c, void *p, const void *g, u64 step,
                             bool advance) {
  if (has_chunk) {
    const TensorInfo t = a.tensors[c.tensor];
#define CALL_UPDATE(PD, GD, SD) update_chunk<PD, GD, SD>(a, c, t, p, g, step)
#define CALL_Q8(PD, GD, SD) q8_update_chunk<PD, GD>(a, c, t, p, g, step)
    if constexpr (S != LION_DTYPE_Q8) {
      DISPATCH_P_G(S, CALL_UPDATE)
    } else if (q8_quantized(a.h.state_dtype, t.numel)) {
      DISPATCH_P_G(LION_DTYPE_Q8, CALL_Q8)
    } else {
      DISPATCH_P_G(LION_DTYPE_F32, CALL_UPDATE)  // a small tensor's f32 momentum
    }
#undef CALL_Q8
#undef CALL_UPDATE
  }
  finish_launch(a, step, advance);
}

// A whole step's launches (A: StepArgs or TableArgs): block b works on chunk b of the launch.
template <class A>
__device__ void count_launch(const A &a) {
  if (skipped(a)) return;
  const BlockChunk c = a.chunks[blockIdx.x];
  count_block(a, c, addresses_of(a, c.tensor).g);
}
extern "C" __global__ void __launch_bounds__(CUDA_THREADS_PER_BLOCK) lion_count(const __grid_constant__ StepArgs a) {
  count_launch(a);
}
extern "C" __global__ void __launch_bounds__(CUDA_THREADS_PER_BLOCK) lion_count_table(const __grid_constant__ TableArgs a) {
  count_launch(a);
}

// A by-value launch that fills a table (StepArgs::fill_table) writes its pointers there first,
// whether or not the step is skipped: the steps after it read them from there.
__device__ __forceinline__ void fill_table(const StepArgs &a) {
  if (a.fill_table == 0 || blockIdx.x != 0) return;
  for (u32 i = threadIdx.x; i < a.n_tensors; i += CUDA_THREADS_PER_BLOCK) {
    a.fill_table[2 * (a.first_tensor + i)] = (u64)a.params[i];
    a.fill_table[2 * (a.first_tensor + i) + 1] = (u64)a.grads[i];
  }
}
__device__ __forceinline__ void fill_table(const TableArgs &) {}

template <int S, class A>
__device__ void update_launch(const A &a) {
  fill_table(a);
  if (skipped(a)) {
    note_skip(a);
    return;
  }
  const u64 step = a.step_counters[COUNTER_STEP] + 1;
  const BlockChunk c = a.chunks[blockIdx.x];
  const TensorAddresses at = addresses_of(a, c.tensor);
  update_block<S>(a, true, c, at.p, at.g, step, a.last_launch != 0);
}

// ---- lion_step_tensors: any list of tensors in one launch ----
// Block b's slot and chunk (see TensorsArgs); false for an idle block.
__device__ __forceinline__ bool slot_chunk(const TensorsArgs &a, u32 &s, BlockChunk &c) {
  const u32 b = blockIdx.x;
  if (b >= a.n_blocks || a.n_slots == 0) return false;
  u32 lo = 0, hi = a.n_slots;  // slot_block[lo] <= b, and b < slot_block[hi] where hi < n_slots
  while (hi - lo > 1) {
    const u32 mid = lo + (hi - lo) / 2;
    if (a.slot_block[mid] <= b) lo = mid;
    else hi = mid;
  }
  s = lo;
  c.tensor = a.slot_tensor[lo];
  c.start = (u64)(b - a.slot_block[lo]) * a.chunk_elems;
  const u64 left = a.tensors[c.tensor].numel - c.start;
  c.len = (u32)(left < (u64)a.chunk_elems ? left : (u64)a.chunk_elems);
  return true;
}

extern "C" __global__ void __launch_bounds__(CUDA_THREADS_PER_BLOCK) lion_count_tensors(const __grid_constant__ TensorsArgs a) {
  if (skipped(a)) return;
  u32 s = 0;
  BlockChunk c = {0, 0, 0};
  if (!slot_chunk(a, s, c)) return;  // the whole block: no barrier is left waiting
  count_block(a, c, a.grads[s]);
}

template <int S>
__device__ void update_tensors_launch(const TensorsArgs &a) {
  if (skipped(a)) return;
  const u64 step = a.step_counters[COUNTER_STEP] + 1;
  u32 s = 0;
  BlockChunk c = {0, 0, 0};
  const bool has_chunk = slot_chunk(a, s, c);
  update_block<S>(a, has_chunk, c, a.params[s], a.grads[s], step, a.completes_round != 0);
}

// Each momentum dtype's update kernels' launch bounds, with its minimum of resident blocks per
// multiprocessor where it has one (MIN_BLOCKS_*, src/cuda/tuning.rs: a minimum sets ptxas'
// register choice). A minimum of 0 is left out rather than written: "none" is not its
// documented meaning.
#if MIN_BLOCKS_F32 > 0
#define BOUNDS_F32 __launch_bounds__(CUDA_THREADS_PER_BLOCK, MIN_BLOCKS_F32)
#else
#define BOUNDS_F32 __launch_bounds__(CUDA_THREADS_PER_BLOCK)
#endif
#if MIN_BLOCKS_BF16 > 0
#define BOUNDS_BF16 __launch_bounds__(CUDA_THREADS_PER_BLOCK, MIN_BLOCKS_BF16)
#else
#define BOUNDS_BF16 __launch_bounds__(CUDA_THREADS_PER_BLOCK)
#endif
#if MIN_BLOCKS_Q8 > 0
#define BOUNDS_Q8 __launch_bounds__(CUDA_THREADS_PER_BLOCK, MIN_BLOCKS_Q8)
#else
#define BOUNDS_Q8 __launch_bounds__(CUDA_THREADS_PER_BLOCK)
#endif

// lion_update_f32 / lion_update_table_f32 / lion_update_tensors_f32, _bf16 and _q8: a whole
// step's (its tensors' addresses in the parameters or in a table) and lion_step_tensors'
// kernels per momentum dtype, with that dtype's bounds.
#define UPDATE_KERNELS(DTYPE, S, BOUNDS)                                                   \
  extern "C" __global__ void BOUNDS lion_update_##DTYPE(const __grid_constant__ StepArgs a) { \
    update_launch<S>(a);                                                                     \
  }                                                                                          \
  extern "C" __global__ void BOUNDS lion_update_table_##DTYPE(const __grid_constant__ TableArgs a) { \
    update_launch<S>(a);                                                                     \
  }                                                                                          \
  extern "C" __global__ void BOUNDS lion_update_tensors_##DTYPE(const __grid_constant__ TensorsArgs a) { \
    update_tensors_launch<S>(a);                                                             \
  }
UPDATE_KERNELS(f32, LION_DTYPE_F32, BOUNDS_F32)
UPDATE_KERNELS(bf16, LION_DTYPE_BF16, BOUNDS_BF16)
UPDATE_KERNELS(q8, LION_DTYPE_Q8, BOUNDS_Q8)
#undef UPDATE_KERNELS

// ---- the distributed modes ----

extern "C" __global__ void lion_agree(const __grid_constant__ AgreeArgs a) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  // MIRROR(agreement): src/dist/mod.rs fingerprint (the same hash of the step count and lr)
  const float lr = a.lr_ptr != 0 ? *a.lr_ptr : a.lr;
  const u64 steps = a.step_counters[COUNTER_STEP];
  const u64 fp = mix64(a.setup ^ mix64(steps ^ mix64((u64)__float_as_uint(lr))));
  u64 *send = a.agreement + AGREE_SEND;
  send[AGREE_REFUSED] = a.refused;
  send[AGREE_FOUND_INF] = (a.found_inf != 0 && *a.found_inf != 0.0f) ? 1ull : 0ull;
  send[AGREE_NON_FINITE] = 0;
  send[AGREE_FP] = fp;
  send[AGREE_FP2] = fp * fp;
}

template <typename T>
__device__ __forceinline__ void copy_elements(u8 *dst, const u8 *src, u64 from, u64 to) {
  for (u64 j = from + threadIdx.x; j < to; j += CUDA_THREADS_PER_BLOCK) ((T *)dst)[j] = ((const T *)src)[j];
}

extern "C" __global__ void __launch_bounds__(CUDA_THREADS_PER_BLOCK) lion_copy(const __grid_constant__ CopyArgs a) {
  if (a.agreement != 0 && dist_skip(a.agreement, a.sums_bad)) return;
  const BlockChunk c = a.chunks[blockIdx.x];
  const TensorInfo t = a.tensors[c.tensor];
  const u64 size = a.elem_size;
  u8 *tensor = (u8 *)a.ptrs[c.tensor - a.first_tensor] + c.start * size;
  u8 *flat = a.flat + (t.state_offset + c.start - a.flat_base) * size;
  u8 *dst = a.to_flat ? flat : tensor;
  const u8 *src = a.to_flat ? tensor : flat;
  u64 done = 0;
  if ((((u64)dst | (u64)src) % sizeof(uint4)) == 0) {
    const u64 vectors = (u64)c.len * size / sizeof(uint4);
    copy_elements<uint4>(dst, src, 0, vectors);
    done = vectors * sizeof(uint4) / size;
  }
  if (size == sizeof(float)) copy_elements<u32>(dst, src, done, c.len);
  else copy_elements<u16>(dst, src, done, c.len);
}

extern "C" __global__ void __launch_bounds__(CUDA_THREADS_PER_BLOCK) lion_check_sums(const __grid_constant__ CheckArgs a) {
  // MIRROR(step-options): src/cpu/mod.rs find_non_finite (the gradient as scaled for the update)
  bool bad = false;
  for (u64 i = (u64)blockIdx.x * CUDA_THREADS_PER_BLOCK + threadIdx.x; i < a.n; i += (u64)gridDim.x * CUDA_THREADS_PER_BLOCK) {
    float g;
    if (a.grad_dtype == LION_DTYPE_F32) g = Elem<LION_DTYPE_F32>::load((const float *)a.sums, i);
    else if (a.grad_dtype == LION_DTYPE_F16) g = Elem<LION_DTYPE_F16>::load((const u16 *)a.sums, i);
    else g = Elem<LION_DTYPE_BF16>::load((const u16 *)a.sums, i);
    const float x = g * a.scale;
    bad |= !(fabsf(x) <= 3.402823466e38f);
  }
  if (bad) *a.bad = 1;
}

// MIRROR(update): src/numerics/update.rs vote_element, voted_param
__device__ __forceinline__ int vote_element(const Coeffs &k, float g, float &m) {
  g = g * k.grad_scale;
  const float c = k.beta1 * m + k.omb1 * g;
  m = k.beta2 * m + k.omb2 * g;
  return (int)sign_of(c);
}
__device__ __forceinline__ float voted_param(const Coeffs &k, bool plain, float p, float u) {
  float keep = k.decay_keep;
  if (!plain && k.cautious_wd != 0.0f && !(u * p > 0.0f)) keep = 1.0f;
  return p * keep - k.step_size * u;
}

// MIRROR(vote-codes): src/cpu/vote_codes.rs code, decode (2 bits: 00 = 0, 01 = +1, 11 = -1)
__device__ __forceinline__ u32 vote_code(int v) { return (u32)v & 3u; }
__device__ __forceinline__ int vote_decode(u32 bits) { return ((int)(bits << 30)) >> 30; }

// MIRROR(vote-trits): src/cpu/vote_codes.rs trit_byte, trit, unpack_trits (the results, 5 a
// byte: the sum of (s_k + 1) 3^k; element e is trit e % 5 of byte e / 5, trit k of byte b
// is (b / 3^k) % 3 - 1)
// The byte of the five i8 sums in the low bytes of `five`.
__device__ __forceinline__ u32 trit_byte(const u64 five) {
  u32 byte = 0;
#pragma unroll
  for (int k = 4; k >= 0; k--) {
    const int s = (signed char)(u8)(five >> (8 * k));
    byte = byte * 3 + (u32)((s > 0) - (s < 0) + 1);
  }
  return byte;
}
// The results of elements e..e+ELEMS-1 (e a multiple of ELEMS: inside one 8-byte word of
// 40 results, over at most three bytes).
__device__ __forceinline__ void vote_trits(const u8 *packed, u64 e, int out[ELEMS]) {
  const u8 *at = packed + e / 5;
  u32 k = (u32)(e % 5), x = *at;
  for (u32 d = 0; d < k; d++) x /= 3;
#pragma unroll
  for (int j = 0; j < ELEMS; j++) {
    out[j] = (int)(x % 3) - 1;
    x /= 3;
    if (++k == 5 && j + 1 < ELEMS) {
      k = 0;
      x = *++at;
    }
  }
}

// The flattened element of tensor `tensor`'s first vote, a multiple of ELEMS.
__device__ __forceinline__ u64 vote_base(const VoteArgs &v, u32 tensor, const TensorInfo &t) {
  return v.flat != 0 ? v.flat[tensor] : t.state_offset;
}

// ELEMS votes from element i: flattened element vote_base + i, a multiple of ELEMS, so
// one thread writes whole bytes (2 bits an element) or a whole 8-byte word (i8).
template <int G, int S>
__device__ void vote_chunk(const VoteArgs &v, const BlockChunk &c, const TensorInfo &t, const void *gv, u64 step) {
  const StepArgs &a = v.s;
  typedef typename Elem<G>::T GT;
  typedef typename Elem<S>::T ST;
  const GT *__restrict__ g = (const GT *)gv;
  ST *__restrict__ m = (ST *)momentum_at(a, t, sizeof(ST));
  const u64 base = vote_base(v, c.tensor, t);
  const Coeffs k = coeffs(a.h, current_lr(a), t, 0);
  const bool sr_m = a.h.stochastic_rounding != 0 && S != LION_DTYPE_F32;
  const Key km = make_key(a.h.seed, step, c.tensor, STREAM_MOMENTUM);
  const bool vec = ((unsigned long long)g % 16 == 0);
  const u64 end = c.start + c.len;
  for (u64 i = c.start + (u64)threadIdx.x * ELEMS; i < end; i += (u64)CUDA_THREADS_PER_BLOCK * ELEMS) {
    const bool whole = vec && i + ELEMS <= end;
    float gv8[ELEMS], mv8[ELEMS];
    int votes[ELEMS];
    if (whole) {
      Elem<G>::load8(g, i, gv8);
      Elem<S>::load8(m, i, mv8);
    } else {
#pragma unroll
      for (int j = 0; j < ELEMS; j++) {
        gv8[j] = i + j < end ? Elem<G>::load(g, i + j) : 0.0f;
        mv8[j] = i + j < end ? Elem<S>::load(m, i + j) : 0.0f;
      }
    }
#pragma unroll
    for (int j = 0; j < ELEMS; j++) votes[j] = i + j < end ? vote_element(k, gv8[j], mv8[j]) : 0;
    if (whole) {
      Elem<S>::store8(m, i, mv8, sr_m, km, i);
    } else {
      for (u64 j = i; j < i + ELEMS && j < end; j++) Elem<S>::store(m, j, mv8[j - i], sr_m, km, j);
    }
    const u64 e = base + i;
    if (v.exchange == VOTE_PACKED) {
      u32 bits = 0;
#pragma unroll
      for (int j = 0; j < ELEMS; j++) bits |= vote_code(votes[j]) << (2 * j);
      *(u16 *)(v.votes + e / 4) = (u16)bits;
    } else {
      u64 word = 0;
#pragma unroll
      for (int j = 0; j < ELEMS; j++) word |= (u64)(u8)(signed char)votes[j] << (8 * j);
      *(u64 *)(v.votes + e) = word;
    }
  }
}

// MIRROR(q8): src/cpu/vote.rs q8_vote_chunk (the block step of q8_update_chunk, with
// vote_element in place of lion_element). A chunk of a quantized tensor from a block; warp w
// steps blocks w, w + warps, ..; each lane its two runs of each, whose four votes go out as
// one byte (2 bits each) or one word (i8) at flattened element vote_base + run start (a
// multiple of 4). A run past the tensor's end writes nothing: the next tensor's votes start
// at the next multiple of ELEMS.
template <int G>
__device__ void q8_vote_chunk(const VoteArgs &v, const BlockChunk &c, const TensorInfo &t, const void *gv) {
  const StepArgs &a = v.s;
  typedef typename Elem<G>::T GT;
  const GT *__restrict__ g = (const GT *)gv;
  signed char *__restrict__ codes = q8_codes(a.state, t);
  float *__restrict__ scales = q8_scales(a.state, t);
  const Coeffs k = coeffs(a.h, current_lr(a), t, 0);
  const bool vec = ((unsigned long long)g % 16 == 0);
  const u64 base = vote_base(v, c.tensor, t);
  const u32 lane = threadIdx.x & 31u;
  const u64 end = c.start + c.len;
  const u64 stride = (u64)(CUDA_THREADS_PER_BLOCK / 32) * Q8_BLOCK;
  for (u64 b0 = c.start + (u64)(threadIdx.x >> 5) * Q8_BLOCK; b0 < end; b0 += stride) {  // warp-uniform
    const u64 block = b0 / Q8_BLOCK;
    const float unit = q8_unit(scales[block]);
    float mv8[ELEMS];
#pragma unroll
    for (u32 h = 0; h < 2; h++) {
      const u64 r = q8_run_start(b0, lane, h);
      float *mv = mv8 + h * Q8_RUN;
      float gv[Q8_RUN];
      q8_decode_run(codes, r, end, unit, mv);
      if (vec && r + Q8_RUN <= end) {
        Elem<G>::load4(g, r, gv);
      } else {
#pragma unroll
        for (int j = 0; j < Q8_RUN; j++) gv[j] = r + j < end ? Elem<G>::load(g, r + j) : 0.0f;
      }
      u32 packed = 0, word = 0;
#pragma unroll
      for (int j = 0; j < Q8_RUN; j++) {
        const int vote = r + j < end ? vote_element(k, gv[j], mv[j]) : 0;
        packed |= vote_code(vote) << (2 * j);
        word |= (u32)(u8)(signed char)vote << (8 * j);
      }
      if (r < end) {
        const u64 e = base + r;
        if (v.exchange == VOTE_PACKED) v.votes[e / 4] = (u8)packed;
        else *(u32 *)(v.votes + e) = word;
      }
    }
    q8_store_block(mv8, lane, b0, end, block, codes, scales);
  }
}

// One kernel for every state dtype: q8's path costs the f32 and bf16 votes no registers
// worth a kernel of its own (NVRTC 13.0, sm_90: 57 registers together, 56 and 58 apart).
extern "C" __global__ void __launch_bounds__(CUDA_THREADS_PER_BLOCK) lion_vote(const __grid_constant__ VoteArgs v) {
  const StepArgs &a = v.s;
  if (skipped(a)) return;
  const u64 step = a.step_counters[COUNTER_STEP] + 1;
  const BlockChunk c = a.chunks[blockIdx.x];
  const TensorInfo t = a.tensors[c.tensor];
  const void *g = a.grads[c.tensor - a.first_tensor];
  if (a.h.state_dtype == LION_DTYPE_Q8) {
    const bool q8 = q8_quantized(a.h.state_dtype, t.numel);
    switch (t.grad_dtype) {  // a small tensor keeps f32 momentum
      case LION_DTYPE_F32: q8 ? q8_vote_chunk<LION_DTYPE_F32>(v, c, t, g) : vote_chunk<LION_DTYPE_F32, LION_DTYPE_F32>(v, c, t, g, step); break;
      case LION_DTYPE_F16: q8 ? q8_vote_chunk<LION_DTYPE_F16>(v, c, t, g) : vote_chunk<LION_DTYPE_F16, LION_DTYPE_F32>(v, c, t, g, step); break;
      default: q8 ? q8_vote_chunk<LION_DTYPE_BF16>(v, c, t, g) : vote_chunk<LION_DTYPE_BF16, LION_DTYPE_F32>(v, c, t, g, step); break;
    }
    return;
  }
  switch (t.grad_dtype * 3 + a.h.state_dtype) {
    case 0: vote_chunk<LION_DTYPE_F32, LION_DTYPE_F32>(v, c, t, g, step); break;
    case 2: vote_chunk<LION_DTYPE_F32, LION_DTYPE_BF16>(v, c, t, g, step); break;
    case 3: vote_chunk<LION_DTYPE_F16, LION_DTYPE_F32>(v, c, t, g, step); break;
    case 5: vote_chunk<LION_DTYPE_F16, LION_DTYPE_BF16>(v, c, t, g, step); break;
    case 6: vote_chunk<LION_DTYPE_BF16, LION_DTYPE_F32>(v, c, t, g, step); break;
    default: vote_chunk<LION_DTYPE_BF16, LION_DTYPE_BF16>(v, c, t, g, step); break;
  }
}

extern "C" __global__ void __launch_bounds__(CUDA_THREADS_PER_BLOCK) lion_signs(const __grid_constant__ SignsArgs a) {
  for (u64 i = ((u64)blockIdx.x * CUDA_THREADS_PER_BLOCK + threadIdx.x) * SIGNS_PER_THREAD; i < a.n;
       i += (u64)gridDim.x * CUDA_THREADS_PER_BLOCK * SIGNS_PER_THREAD) {
    const u64 *sums = (const u64 *)(a.sums + i);
    u64 bytes = 0;
#pragma unroll
    for (int b = 0; b < 8; b++) {
      // Byte b's five sums start at sum 5b: in word 5b / 8, from its byte 5b % 8, and on
      // into the next word past byte 7.
      const int w = 5 * b / 8, first = 5 * b % 8;
      const u64 lo = sums[w] >> (8 * first);
      const u64 hi = first > 3 ? sums[w + 1] << (8 * (8 - first)) : 0;
      bytes |= (u64)trit_byte(lo | hi) << (8 * b);
    }
    *(u64 *)(a.packed + i / 5) = bytes;
  }
}

template <int P>
__device__ void apply_chunk(const VoteArgs &v, const BlockChunk &c, const TensorInfo &t, void *pv, u64 step) {
  const StepArgs &a = v.s;
  typedef typename Elem<P>::T PT;
  PT *__restrict__ p = (PT *)pv;
  const Coeffs k = coeffs(a.h, current_lr(a), t, 0);
  const bool plain = k.cautious_wd == 0.0f;
  const bool sr_p = a.h.stochastic_rounding != 0 && P != LION_DTYPE_F32;
  const Key kp = make_key(a.h.seed, step, c.tensor, STREAM_PARAM);
  const bool vec = ((unsigned long long)p % 16 == 0);
  const u64 end = c.start + c.len;
  for (u64 i = c.start + (u64)threadIdx.x * ELEMS; i < end; i += (u64)CUDA_THREADS_PER_BLOCK * ELEMS) {
    const u64 e = t.state_offset + i;
    int sum[ELEMS];
    if (v.exchange == VOTE_TRITS) {
      vote_trits(v.votes, e, sum);
    } else {
#pragma unroll
      for (int j = 0; j < ELEMS; j++) sum[j] = 0;
      for (u32 r = 0; r < v.ranks; r++) {
        const u32 bits = *(const u16 *)(v.votes + r * v.rank_bytes + e / 4);
#pragma unroll
        for (int j = 0; j < ELEMS; j++) sum[j] += vote_decode(bits >> (2 * j));
      }
    }
    float pv8[ELEMS];
    if (vec && i + ELEMS <= end) {
      Elem<P>::load8(p, i, pv8);
#pragma unroll
      for (int j = 0; j < ELEMS; j++) pv8[j] = voted_param(k, plain, pv8[j], (float)((sum[j] > 0) - (sum[j] < 0)));
      Elem<P>::store8(p, i, pv8, sr_p, kp, i);
    } else {
      for (u64 j = i; j < i + ELEMS && j < end; j++) {
        const int s = sum[j - i];
        const float pj = voted_param(k, plain, Elem<P>::load(p, j), (float)((s > 0) - (s < 0)));
        Elem<P>::store(p, j, pj, sr_p, kp, j);
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(CUDA_THREADS_PER_BLOCK) lion_apply(const __grid_constant__ VoteArgs v) {
  const StepArgs &a = v.s;
  if (skipped(a)) {
    note_skip(a);
    return;
  }
  const u64 step = a.step_counters[COUNTER_STEP] + 1;
  const BlockChunk c = a.chunks[blockIdx.x];
  const TensorInfo t = a.tensors[c.tensor];
  void *p = a.params[c.tensor - a.first_tensor];
  if (t.param_dtype == LION_DTYPE_F32) apply_chunk<LION_DTYPE_F32>(v, c, t, p, step);
  else if (t.param_dtype == LION_DTYPE_F16) apply_chunk<LION_DTYPE_F16>(v, c, t, p, step);
  else apply_chunk<LION_DTYPE_BF16>(v, c, t, p, step);
  finish_launch(a, step, a.last_launch != 0);
}
