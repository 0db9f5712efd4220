/*
 * distributed_mpi.c: liblion's distributed optimizers over MPI, in plain C.
 *
 * Every MPI process (rank) trains the same 2 -> 64 -> 64 -> 1 MLP as train_mlp.c on its own
 * shard of the data (its own random batches of y = sin(3*x0) * cos(2*x1)), and one
 * distributed optimizer per rank keeps the parameters the same everywhere. liblion sends
 * nothing itself: the program hands it a LionCollectives table of three functions written
 * here with MPI (all-reduce, reduce-scatter and all-gather on MPI_COMM_WORLD).
 *
 * It trains in both modes and checks what the library promises:
 *   - the collectives themselves, on every LionCommDType, against sums known exactly;
 *   - sharded (ZeRO-1: each rank keeps the momentum of 1/W of the parameters) and vote
 *     (Distributed Lion: each rank keeps its own momentum, and only 2-bit votes travel):
 *     the loss falls, and the parameters are bit-identical on every rank;
 *   - sharded: the parameters equal those of a single-process optimizer (lion_create, on
 *     every rank) stepped on the mean gradient, and the checkpoint (lion_state_save, called
 *     by every rank: it gathers the momentum) equals the single-process one byte for byte
 *     and loads into a single-process optimizer.
 * Rank 0 prints the loss as it falls and "N passed, N failed"; every rank exits non-zero if a
 * check failed (every check is decided by all ranks together).
 *
 * Sums and their order. The library's sharded step takes the mean gradient as the sum the
 * reduce-scatter returns, times 1/W rounded to f32. A float sum depends on the order of its
 * additions, and MPI promises no order: MPI_Reduce_scatter_block and MPI_Allreduce may add
 * W > 2 numbers in different orders (a + b = b + a, so for W <= 2 they agree bit for bit).
 * So the sharded mode runs with two kinds of sums, each with f32 and bf16 gradients:
 *   - "MPI sums": the reduce-scatter is MPI_Reduce_scatter_block and the reference's sum
 *     MPI_Allreduce. Bit-identical to the reference for W <= 2. For W > 2 the two sums may
 *     differ in their last bits, and a sign of the update with them where the momentum is
 *     all but zero; the two runs then part like any two float computations that differ
 *     (with Open MPI 4.1.4: on 3 ranks the momentum differed in last bits, the parameters
 *     not; on 4 ranks with bf16 gradients a third of the parameters differed after 300
 *     steps). So for W > 2 the program checks only the first step (all but 1% of the
 *     parameters equal, none off by more than 2 lr) and reports the rest;
 *   - "rank-order sums": both sums are computed here, in rank order ((g0 + g1) + g2) + ...,
 *     from an MPI_Alltoall (which sends as many bytes per rank as a ring reduce-scatter,
 *     (W-1)/W of the buffer) or an MPI_Allgather: bit-identical for every W, checkpoints
 *     included. This is the way to results that do not depend on the MPI library.
 * Either way the parameters are identical on every rank: each slice is updated by one rank
 * and all-gathered. And the vote mode's sums are of small integers (int8), exact in any order.
 *
 * f16 and bf16 have no MPI datatype: they travel as MPI_UINT16_T and are summed by a
 * user-defined MPI_Op that converts each pair to float, adds, and rounds to nearest even: the
 * correctly rounded sum of the two (f32 has more than twice their bits, so rounding twice
 * never differs from rounding once). A sum over W > 2 ranks still depends on their order,
 * like any float reduction.
 *
 * The collectives return MPI's error code on failure (MPI_ERRORS_RETURN is set on the
 * communicator), which liblion reports as LION_ERROR_COMM. A rank whose step fails calls
 * MPI_Abort: the others may already wait in a collective that will never complete.
 *
 *   cargo build --release
 *   mpicc -O2 -Wall -Wextra -Werror examples/distributed_mpi.c -I include \
 *     -L target/release -llion -Wl,-rpath,$PWD/target/release -lm -o distributed_mpi
 *   mpirun -np 2 ./distributed_mpi
 *
 * (As root, Open MPI wants --allow-run-as-root; with more ranks than cores, --oversubscribe.)
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "lion.h"

enum { IN = 2, H = 64, BATCH = 64, STEPS = 300, NT = 6 };
/* The six tensors (w1, b1, w2, b2, w3, b3), laid end to end in one array. */
enum { W1 = 0, B1 = W1 + H * IN, W2 = B1 + H, B2 = W2 + H * H, W3 = B2 + H, B3 = W3 + H };
enum { NP = B3 + 1 }; /* parameters in all */
static const int offsets[NT] = {W1, B1, W2, B2, W3, B3};
static const int sizes[NT] = {H * IN, H, H * H, H, H, 1};

/* ---- half-precision conversions (f16: IEEE binary16; bf16: the top half of an f32) ---- */

static float bits_to_f32(uint32_t x) {
  float f;
  memcpy(&f, &x, sizeof f);
  return f;
}

static uint32_t f32_to_bits(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  return x;
}

static float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

static uint16_t f32_to_bf16(float f) { /* round to nearest even */
  uint32_t x = f32_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40); /* NaN stays NaN */
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

static float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0) { /* zero or subnormal: man * 2^-24, exact */
    float f = (float)man * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

static uint16_t f32_to_f16(float f) { /* round to nearest even */
  uint32_t x = f32_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000, exp = (x >> 23) & 0xff, man = x & 0x7fffff;
  int e = (int)exp - 127 + 15;
  uint32_t h, rem, half;
  int shift;
  if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 | (man >> 13) : 0));
  if (e >= 31) return (uint16_t)(sign | 0x7c00); /* overflow: infinity */
  if (e <= 0) {                                   /* a subnormal f16, or zero */
    if (e < -10) return (uint16_t)sign;           /* below half the smallest subnormal */
    man |= 0x800000;
    shift = 14 - e;
    h = man >> shift;
    rem = man & ((1u << shift) - 1);
    half = 1u << (shift - 1);
  } else {
    h = ((uint32_t)e << 10) | (man >> 13);
    rem = man & 0x1fff;
    half = 0x1000;
  }
  if (rem > half || (rem == half && (h & 1))) h++; /* a carry into the exponent is right */
  return (uint16_t)(sign | h);
}

/* ---- the collectives: LionCollectives over MPI ---- */

typedef struct {
  MPI_Comm comm;
  int rank, world;
  /* 0: MPI's own reductions; 1: float sums computed here, in rank order. */
  int rank_order;
  MPI_Op sum_f16, sum_bf16;
} Comm;

static void sum_f16(void *in, void *inout, int *len, MPI_Datatype *type) {
  const uint16_t *a = in;
  uint16_t *b = inout;
  (void)type;
  for (int i = 0; i < *len; i++) b[i] = f32_to_f16(f16_to_f32(a[i]) + f16_to_f32(b[i]));
}

static void sum_bf16(void *in, void *inout, int *len, MPI_Datatype *type) {
  const uint16_t *a = in;
  uint16_t *b = inout;
  (void)type;
  for (int i = 0; i < *len; i++) b[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}

static int is_float(LionCommDType d) {
  return d == LION_COMM_F32 || d == LION_COMM_F16 || d == LION_COMM_BF16;
}

static size_t comm_size(LionCommDType d) {
  switch (d) {
    case LION_COMM_F32: return 4;
    case LION_COMM_F16: case LION_COMM_BF16: return 2;
    case LION_COMM_I8: case LION_COMM_U8: return 1;
    case LION_COMM_U64: return 8;
    default: return 0;
  }
}

/* The MPI datatype and sum of a LionCommDType; 0 for one this program does not know. */
static int mpi_type(const Comm *c, LionCommDType d, MPI_Datatype *type, MPI_Op *sum) {
  *sum = MPI_SUM;
  switch (d) {
    case LION_COMM_F32: *type = MPI_FLOAT; return 1;
    case LION_COMM_F16: *type = MPI_UINT16_T; *sum = c->sum_f16; return 1;
    case LION_COMM_BF16: *type = MPI_UINT16_T; *sum = c->sum_bf16; return 1;
    case LION_COMM_I8: *type = MPI_INT8_T; return 1;
    case LION_COMM_U8: *type = MPI_UINT8_T; return 1;
    case LION_COMM_U64: *type = MPI_UINT64_T; return 1;
    default: return 0;
  }
}

/* out[i] = ((blocks[0][i] + blocks[1][i]) + blocks[2][i]) + ..., each sum rounded to `d`. */
static void rank_order_sum(LionCommDType d, const void *blocks, int world, size_t count,
                           void *out) {
  for (size_t i = 0; i < count; i++) {
    if (d == LION_COMM_F32) {
      const float *b = blocks;
      float s = b[i];
      for (int r = 1; r < world; r++) s += b[(size_t)r * count + i];
      ((float *)out)[i] = s;
    } else {
      const uint16_t *b = blocks;
      uint16_t s = b[i];
      for (int r = 1; r < world; r++) {
        uint16_t x = b[(size_t)r * count + i];
        s = d == LION_COMM_F16 ? f32_to_f16(f16_to_f32(s) + f16_to_f32(x))
                               : f32_to_bf16(bf16_to_f32(s) + bf16_to_f32(x));
      }
      ((uint16_t *)out)[i] = s;
    }
  }
}

/* MPI counts are ints. */
static int too_many(const Comm *c, size_t count) {
  return count > (size_t)INT_MAX / (size_t)c->world;
}

static int32_t mpi_all_reduce_sum(void *context, const void *send, void *recv, size_t count,
                                  LionCommDType dtype, void *stream) {
  Comm *c = context;
  MPI_Datatype type;
  MPI_Op sum;
  (void)stream; /* NULL on the CPU engine */
  if (!mpi_type(c, dtype, &type, &sum) || too_many(c, count)) return -1;
  if (c->rank_order && is_float(dtype)) {
    void *all = malloc(count * (size_t)c->world * comm_size(dtype) + 1);
    int err;
    if (!all) return -2;
    err = MPI_Allgather(send, (int)count, type, all, (int)count, type, c->comm);
    if (err == MPI_SUCCESS) rank_order_sum(dtype, all, c->world, count, recv);
    free(all);
    return err;
  }
  return MPI_Allreduce(send, recv, (int)count, type, sum, c->comm);
}

static int32_t mpi_reduce_scatter_sum(void *context, const void *send, void *recv, size_t count,
                                      LionCommDType dtype, void *stream) {
  Comm *c = context;
  MPI_Datatype type;
  MPI_Op sum;
  (void)stream;
  if (!mpi_type(c, dtype, &type, &sum) || too_many(c, count)) return -1;
  if (c->rank_order && is_float(dtype)) {
    /* Block `rank` of every rank, rank after rank, then summed here. */
    void *mine = malloc(count * (size_t)c->world * comm_size(dtype) + 1);
    int err;
    if (!mine) return -2;
    err = MPI_Alltoall(send, (int)count, type, mine, (int)count, type, c->comm);
    if (err == MPI_SUCCESS) rank_order_sum(dtype, mine, c->world, count, recv);
    free(mine);
    return err;
  }
  return MPI_Reduce_scatter_block(send, recv, (int)count, type, sum, c->comm);
}

static int32_t mpi_all_gather(void *context, const void *send, void *recv, size_t count,
                              LionCommDType dtype, void *stream) {
  Comm *c = context;
  MPI_Datatype type;
  MPI_Op sum;
  (void)stream;
  if (!mpi_type(c, dtype, &type, &sum) || too_many(c, count)) return -1;
  return MPI_Allgather(send, (int)count, type, recv, (int)count, type, c->comm);
}

static LionCollectives collectives(Comm *c) {
  LionCollectives t;
  memset(&t, 0, sizeof t);
  t.struct_size = sizeof t;
  t.context = c;
  t.all_reduce_sum = mpi_all_reduce_sum;
  t.reduce_scatter_sum = mpi_reduce_scatter_sum;
  t.all_gather = mpi_all_gather;
  return t;
}

/* ---- checks, decided by all ranks together ---- */

static int passed = 0, failed = 0;

static int check_at(const Comm *c, int ok, int line, const char *what) {
  int mine = ok != 0, all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_LAND, c->comm);
  if (all) {
    passed++;
  } else {
    failed++;
    if (!mine) fprintf(stderr, "rank %d: line %d: CHECK(%s) failed\n", c->rank, line, what);
  }
  return all;
}
#define CHECK(c, cond) check_at((c), (cond), __LINE__, #cond)

/* A failed liblion call ends the job: the other ranks may be waiting in a collective. */
static void must(LionStatus st, const Comm *c, const char *what) {
  if (st != LION_OK) {
    fprintf(stderr, "rank %d: %s failed (%d): %s\n", c->rank, what, (int)st, lion_last_error());
    MPI_Abort(c->comm, 2);
  }
}

/* ---- the collectives checked on every dtype, with sums exact in any order ---- */

static void put(LionCommDType d, void *buf, size_t i, int v) {
  switch (d) {
    case LION_COMM_F32: ((float *)buf)[i] = (float)v; break;
    case LION_COMM_F16: ((uint16_t *)buf)[i] = f32_to_f16((float)v); break;
    case LION_COMM_BF16: ((uint16_t *)buf)[i] = f32_to_bf16((float)v); break;
    case LION_COMM_I8: ((int8_t *)buf)[i] = (int8_t)v; break;
    case LION_COMM_U8: ((uint8_t *)buf)[i] = (uint8_t)v; break;
    default: ((uint64_t *)buf)[i] = (uint64_t)v; break;
  }
}

static int get(LionCommDType d, const void *buf, size_t i) {
  switch (d) {
    case LION_COMM_F32: return (int)((const float *)buf)[i];
    case LION_COMM_F16: return (int)f16_to_f32(((const uint16_t *)buf)[i]);
    case LION_COMM_BF16: return (int)bf16_to_f32(((const uint16_t *)buf)[i]);
    case LION_COMM_I8: return ((const int8_t *)buf)[i];
    case LION_COMM_U8: return ((const uint8_t *)buf)[i];
    default: return (int)((const uint64_t *)buf)[i];
  }
}

/* What rank r sends as element i: small integers (int8 ones may be negative). */
static int value(LionCommDType d, int r, size_t i) {
  return d == LION_COMM_I8 ? (int)(i % 3) - (r % 2) : (int)(i % 5) + (r % 3);
}

static void check_collectives(Comm *c) {
  enum { COUNT = 37 };
  const LionCommDType dtypes[] = {LION_COMM_F32, LION_COMM_F16, LION_COMM_BF16,
                                  LION_COMM_I8,  LION_COMM_U8,  LION_COMM_U64};
  LionCollectives t = collectives(c);
  size_t n = (size_t)c->world * COUNT;
  uint64_t *send = calloc(n, sizeof *send), *recv = calloc(n, sizeof *recv);
  if (!send || !recv) MPI_Abort(c->comm, 3);
  for (size_t k = 0; k < sizeof dtypes / sizeof dtypes[0]; k++) {
    LionCommDType d = dtypes[k];
    int ok_reduce = 1, ok_scatter = 1, ok_gather = 1;
    /* all-reduce: element i summed over ranks */
    for (size_t i = 0; i < COUNT; i++) put(d, send, i, value(d, c->rank, i));
    ok_reduce &= t.all_reduce_sum(c, send, recv, COUNT, d, NULL) == 0;
    for (size_t i = 0; i < COUNT; i++) {
      int want = 0;
      for (int r = 0; r < c->world; r++) want += value(d, r, i);
      ok_reduce &= get(d, recv, i) == want;
    }
    /* reduce-scatter: W blocks of COUNT, block b holding element i as value(.., i + b) */
    for (size_t i = 0; i < n; i++) put(d, send, i, value(d, c->rank, i % COUNT + i / COUNT));
    ok_scatter &= t.reduce_scatter_sum(c, send, recv, COUNT, d, NULL) == 0;
    for (size_t i = 0; i < COUNT; i++) {
      int want = 0;
      for (int r = 0; r < c->world; r++) want += value(d, r, i + (size_t)c->rank);
      ok_scatter &= get(d, recv, i) == want;
    }
    /* all-gather: block r is rank r's */
    for (size_t i = 0; i < COUNT; i++) put(d, send, i, value(d, c->rank, i) + c->rank);
    ok_gather &= t.all_gather(c, send, recv, COUNT, d, NULL) == 0;
    for (size_t i = 0; i < n; i++) {
      int r = (int)(i / COUNT);
      ok_gather &= get(d, recv, i) == value(d, r, i % COUNT) + r;
    }
    CHECK(c, ok_reduce);
    CHECK(c, ok_scatter);
    CHECK(c, ok_gather);
  }
  free(send);
  free(recv);
}

/* ---- the model: train_mlp.c's MLP over the flat parameter array ---- */

typedef struct {
  uint64_t state;
} Rng;

static float uniform(Rng *rng) { /* in [-1, 1) */
  rng->state ^= rng->state << 13;
  rng->state ^= rng->state >> 7;
  rng->state ^= rng->state << 17;
  return (float)((double)(rng->state >> 40) / 8388608.0 - 1.0);
}

static void init_params(float *p) {
  Rng rng = {0x2545F4914F6CDD1Dull}; /* the same start on every rank */
  memset(p, 0, NP * sizeof *p);
  for (int i = 0; i < H * IN; i++) p[W1 + i] = uniform(&rng) * sqrtf(3.0f / IN);
  for (int i = 0; i < H * H; i++) p[W2 + i] = uniform(&rng) * sqrtf(3.0f / H);
  for (int i = 0; i < H; i++) p[W3 + i] = uniform(&rng) * sqrtf(3.0f / H);
}

/* One forward and backward pass over a batch: fills g, returns the batch's mean loss. */
static float forward_backward(const float *p, float *g, const float x[BATCH][IN], const float *y) {
  float h1[H], h2[H], d1[H], d2[H], loss = 0.0f;
  memset(g, 0, NP * sizeof *g);
  for (int n = 0; n < BATCH; n++) {
    float out = p[B3];
    for (int j = 0; j < H; j++) {
      float a = p[B1 + j];
      for (int i = 0; i < IN; i++) a += p[W1 + j * IN + i] * x[n][i];
      h1[j] = tanhf(a);
    }
    for (int j = 0; j < H; j++) {
      float a = p[B2 + j];
      for (int i = 0; i < H; i++) a += p[W2 + j * H + i] * h1[i];
      h2[j] = tanhf(a);
      out += p[W3 + j] * h2[j];
    }
    float err = out - y[n], dout = 2.0f * err / BATCH;
    loss += err * err;
    g[B3] += dout;
    for (int j = 0; j < H; j++) {
      g[W3 + j] += dout * h2[j];
      d2[j] = dout * p[W3 + j] * (1.0f - h2[j] * h2[j]);
      g[B2 + j] += d2[j];
    }
    for (int i = 0; i < H; i++) {
      float s = 0.0f;
      for (int j = 0; j < H; j++) {
        g[W2 + j * H + i] += d2[j] * h1[i];
        s += d2[j] * p[W2 + j * H + i];
      }
      d1[i] = s * (1.0f - h1[i] * h1[i]);
      g[B1 + i] += d1[i];
      for (int k = 0; k < IN; k++) g[W1 + i * IN + k] += d1[i] * x[n][k];
    }
  }
  return loss / BATCH;
}

/* ---- one training run ---- */

typedef struct {
  const char *name;
  LionDistMode mode;
  LionVoteExchange exchange;
  int rank_order;       /* sums in rank order (sharded: the reference matches for every W) */
  LionDType grad_dtype; /* F32 or BF16 (the gradients are rounded to it) */
  LionDType state_dtype;
} Run;

static void *step_grads(const Run *run, const float *g, uint16_t *g16) {
  if (run->grad_dtype == LION_DTYPE_F32) return (void *)g;
  for (int i = 0; i < NP; i++) g16[i] = f32_to_bf16(g[i]);
  return g16;
}

static void pointers(float *p, const void *g, LionDType grad_dtype, void **params,
                     const void **grads) {
  size_t gsize = grad_dtype == LION_DTYPE_F32 ? 4 : 2;
  for (int t = 0; t < NT; t++) {
    params[t] = p + offsets[t];
    grads[t] = (const char *)g + (size_t)offsets[t] * gsize;
  }
}

/* A checkpoint, saved (collectively, for a sharded optimizer) into a new buffer. */
static uint8_t *save(LionOptimizer *opt, const Comm *c, size_t *size) {
  uint8_t *blob;
  must(lion_state_size(opt, size), c, "lion_state_size");
  blob = malloc(*size);
  if (!blob) MPI_Abort(c->comm, 3);
  must(lion_state_save(opt, blob, *size, size), c, "lion_state_save");
  return blob;
}

/* How many parameters differ from the reference's, in bits, and the largest difference. */
static int compare(const float *p, const float *ref_p, float *worst) {
  int differ = 0;
  *worst = 0.0f;
  for (int i = 0; i < NP; i++) {
    float d = fabsf(p[i] - ref_p[i]);
    differ += f32_to_bits(p[i]) != f32_to_bits(ref_p[i]);
    if (d > *worst) *worst = d;
  }
  return differ;
}

static void train(const Run *run, Comm *comm) {
  static float p[NP], g[NP], ref_p[NP], sum[NP];
  static uint16_t g16[NP], sum16[NP];
  float x[BATCH][IN], y[BATCH], first = 0.0f, last = 0.0f, worst1 = 0.0f, lr1 = 0.0f;
  int sharded = run->mode == LION_DIST_SHARDED, W = comm->world, differ1 = 0;
  /* Whether the library's sum and the reference's are added in the same order. */
  int exact = run->rank_order || W <= 2;
  LionTensorDesc tensors[NT];
  LionConfig config = lion_config_default();
  LionDistConfig dist = lion_dist_config_default();
  LionCollectives table;
  LionOptimizer *opt = NULL, *ref = NULL;
  LionStepOptions mean = lion_step_options_default();
  void *params[NT], *ref_params[NT];
  const void *grads[NT], *ref_grads[NT];
  Rng data = {0x9E3779B97F4A7C15ull ^ (uint64_t)(comm->rank + 1) * 0xD1B54A32D192ED03ull};

  for (int t = 0; t < NT; t++) {
    tensors[t] = lion_tensor_desc((uint64_t)sizes[t], LION_DTYPE_F32);
    tensors[t].grad_dtype = run->grad_dtype;
    if (t % 2 == 1) tensors[t].weight_decay_scale = 0.0f; /* no decay on biases */
  }
  config.lr = 3e-3f;
  config.weight_decay = 0.1f;
  config.state_dtype = run->state_dtype;
  config.num_threads = 1; /* a model this small is best stepped on the caller's thread */
  comm->rank_order = run->rank_order;
  table = collectives(comm);
  dist.mode = run->mode;
  dist.rank = comm->rank;
  dist.world_size = W;
  dist.collectives = &table;
  dist.vote_exchange = run->exchange;
  must(lion_create_distributed(&config, tensors, NT, &dist, &opt), comm,
       "lion_create_distributed");
  /* The reference: one process's optimizer, on every rank, stepped on the mean gradient. */
  if (sharded) must(lion_create(&config, tensors, NT, &ref), comm, "lion_create");
  mean.grad_scale = (float)(1.0 / W);

  init_params(p);
  memcpy(ref_p, p, sizeof p);
  if (comm->rank == 0) printf("\n%s on %d ranks:\n", run->name, W);
  for (int step = 1; step <= STEPS; step++) {
    /* Cosine decay of the learning rate over the run. */
    float lr = config.lr * 0.5f * (1.0f + cosf(3.14159265f * (float)step / STEPS));
    float loss, mean_loss = 0.0f;
    const void *gs;
    for (int n = 0; n < BATCH; n++) { /* this rank's shard of the data */
      x[n][0] = uniform(&data);
      x[n][1] = uniform(&data);
      y[n] = sinf(3.0f * x[n][0]) * cosf(2.0f * x[n][1]);
    }
    loss = forward_backward(p, g, (const float(*)[IN])x, y);
    MPI_Allreduce(&loss, &mean_loss, 1, MPI_FLOAT, MPI_SUM, comm->comm);
    mean_loss /= (float)W;
    gs = step_grads(run, g, g16);
    /* Every rank steps (a collective), with the same lr and options. */
    must(lion_set_lr(opt, lr), comm, "lion_set_lr");
    pointers(p, gs, run->grad_dtype, params, grads);
    must(lion_step(opt, params, grads, NT, NULL), comm, "lion_step");
    if (ref) {
      /* The same gradients (computed at the distributed parameters), summed over the ranks
       * by the same transport's all-reduce; the library's step scales its sum by 1/W in f32,
       * grad_scale does the same here. While the parameters stay equal this is exactly one
       * process training on the mean gradient. */
      void *s = run->grad_dtype == LION_DTYPE_F32 ? (void *)sum : (void *)sum16;
      LionCommDType d = run->grad_dtype == LION_DTYPE_F32 ? LION_COMM_F32 : LION_COMM_BF16;
      if (table.all_reduce_sum(comm, gs, s, NP, d, NULL) != 0) MPI_Abort(comm->comm, 4);
      pointers(ref_p, s, run->grad_dtype, ref_params, ref_grads);
      must(lion_set_lr(ref, lr), comm, "lion_set_lr");
      must(lion_step_with_options(ref, ref_params, ref_grads, NT, NULL, &mean), comm,
           "lion_step_with_options");
      if (step == 1) {
        differ1 = compare(p, ref_p, &worst1);
        lr1 = lr;
      }
    }
    if (step <= 20) first += mean_loss / 20.0f;
    if (step > STEPS - 50) last += mean_loss / 50.0f;
    if (comm->rank == 0 && (step == 1 || step % 50 == 0))
      printf("  step %4d  loss %.5f  lr %.2e\n", step, mean_loss, lr);
  }
  if (comm->rank == 0)
    printf("  mean loss: first 20 steps %.5f, last 50 steps %.5f\n", first, last);
  CHECK(comm, last < 0.5f * first); /* the loss fell */

  /* (a) The parameters are the same on every rank, bit for bit. */
  {
    int same = 1;
    float *all_p = malloc((size_t)W * sizeof p);
    if (!all_p) MPI_Abort(comm->comm, 3);
    MPI_Allgather(p, NP, MPI_FLOAT, all_p, NP, MPI_FLOAT, comm->comm);
    for (int r = 0; r < W; r++) same &= memcmp(all_p + (size_t)r * NP, p, sizeof p) == 0;
    CHECK(comm, same);
    free(all_p);
  }
  if (sharded) {
    /* (b) Equal to one process stepped on the mean gradient: bit for bit when the two sums
     * are taken in the same order; otherwise close. */
    float worst = 0.0f;
    int differ = compare(p, ref_p, &worst);
    size_t size = 0, ref_size = 0;
    uint8_t *blob, *ref_blob;
    LionOptimizer *fresh = NULL;
    uint64_t steps = 0;
    int same_blob;
    if (comm->rank == 0) {
      if (!exact)
        printf("  against one process on MPI_Allreduce's mean gradient: after step 1, %d of %d "
               "parameters differ (largest by %.3g)\n",
               differ1, NP, worst1);
      printf("  against one process on the mean gradient: %d of %d parameters differ "
             "(largest by %.3g)%s\n",
             differ, NP, worst,
             exact ? "" : " (not checked: MPI need not add W > 2 numbers in one order)");
    }
    if (exact) {
      CHECK(comm, differ == 0);
    } else {
      /* The two sums may differ in their last bits, which flips the sign of an update where
       * the momentum is all but zero: rare after one step, and each flip moves a parameter by
       * at most 2 lr. Over many steps the two runs part like any two float computations that
       * differ, so only the first step is checked. */
      CHECK(comm, differ1 <= NP / 100);
      CHECK(comm, worst1 <= 2.5f * lr1);
    }
    /* (c) The checkpoint: lion_state_save on every rank (it gathers the momentum) gives the
     * single-process checkpoint, which loads into a single-process optimizer. */
    blob = save(opt, comm, &size);
    ref_blob = save(ref, comm, &ref_size);
    same_blob = size == ref_size && memcmp(blob, ref_blob, size) == 0;
    if (exact) CHECK(comm, same_blob);
    must(lion_create(&config, tensors, NT, &fresh), comm, "lion_create");
    CHECK(comm, lion_state_load(fresh, blob, size) == LION_OK);
    CHECK(comm, lion_step_count(fresh, &steps) == LION_OK && steps == STEPS);
    if (comm->rank == 0)
      printf("  checkpoint: %zu bytes, %s one process's\n", size,
             same_blob ? "equal to" : "not equal to");
    lion_destroy(fresh);
    free(blob);
    free(ref_blob);
  } else {
    /* Vote: a checkpoint holds this rank's own momentum; saving is not collective, so rank 0
     * alone saves here. It loads into a single-process optimizer of the same tensors. */
    int ok = 1;
    if (comm->rank == 0) {
      size_t size = 0;
      uint8_t *blob = save(opt, comm, &size);
      LionOptimizer *fresh = NULL;
      must(lion_create(&config, tensors, NT, &fresh), comm, "lion_create");
      ok = lion_state_load(fresh, blob, size) == LION_OK;
      lion_destroy(fresh);
      free(blob);
    }
    CHECK(comm, ok);
  }
  lion_destroy(ref);
  lion_destroy(opt);
}

int main(int argc, char **argv) {
  Comm comm;
  const LionDType F32 = LION_DTYPE_F32, BF16 = LION_DTYPE_BF16;
  const LionDistMode SHARDED = LION_DIST_SHARDED, VOTE = LION_DIST_VOTE;
  const Run runs[] = {
      {"sharded, f32 gradients, MPI sums", SHARDED, LION_VOTE_AUTO, 0, F32, F32},
      {"sharded, bf16 gradients and momentum, MPI sums", SHARDED, LION_VOTE_AUTO, 0, BF16, BF16},
      {"sharded, f32 gradients, rank-order sums", SHARDED, LION_VOTE_AUTO, 1, F32, F32},
      {"sharded, bf16 gradients, rank-order sums", SHARDED, LION_VOTE_AUTO, 1, BF16, F32},
      {"vote, votes all-gathered (LION_VOTE_GATHER)", VOTE, LION_VOTE_GATHER, 0, F32, F32},
      {"vote, int8 sums reduce-scattered (LION_VOTE_SUMS)", VOTE, LION_VOTE_SUMS, 0, F32, F32},
  };
  double start;

  MPI_Init(&argc, &argv);
  memset(&comm, 0, sizeof comm);
  comm.comm = MPI_COMM_WORLD;
  /* MPI errors come back as codes (the collectives return them to liblion), not aborts. */
  MPI_Comm_set_errhandler(comm.comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm.comm, &comm.rank);
  MPI_Comm_size(comm.comm, &comm.world);
  MPI_Op_create(sum_f16, 1, &comm.sum_f16);
  MPI_Op_create(sum_bf16, 1, &comm.sum_bf16);
  start = MPI_Wtime();
  if (comm.rank == 0)
    printf("liblion %s: distributed Lion over MPI on %d ranks, each with its own data\n",
           lion_version(), comm.world);

  for (int mode = 0; mode < 2; mode++) { /* MPI's reductions, then rank-order sums */
    comm.rank_order = mode;
    check_collectives(&comm);
  }
  if (comm.rank == 0) printf("the collectives: %d checks passed, %d failed\n", passed, failed);
  for (size_t r = 0; r < sizeof runs / sizeof runs[0]; r++) train(&runs[r], &comm);

  if (comm.rank == 0)
    printf("\ndistributed_mpi.c (%d ranks, %.1f s): %d passed, %d failed\n", comm.world,
           MPI_Wtime() - start, passed, failed);
  MPI_Op_free(&comm.sum_f16);
  MPI_Op_free(&comm.sum_bf16);
  MPI_Finalize();
  return failed == 0 ? 0 : 1;
}
