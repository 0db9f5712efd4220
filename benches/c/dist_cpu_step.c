/* The CPU engine's distributed modes against its single-process step, in one run: what a
 * sharded or vote step costs beyond the update itself (copies, votes, packing), with one rank
 * whose collectives are plain copies (a world of one: no wire), so that only liblion's own
 * work is timed. Then sharded on two ranks (two threads of this process, collectives through
 * shared memory), the parameters and gradients each one flat buffer (one tensor).
 *
 *   cargo build --release
 *   cc -O2 -pthread -Iinclude benches/c/dist_cpu_step.c -Ltarget/release -llion \
 *      -Wl,-rpath,$PWD/target/release -o /tmp/dist_cpu_step
 *   /tmp/dist_cpu_step [elements, default 2^24] [threads per rank, default 1]
 *
 * Prints the best of 7 steps (after 3) per mode, its GB/s of the single-process step's bytes
 * (p, g, m f32: 20 bytes an element) and its time over the single-process step's; on two
 * ranks, the slower rank's. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lion.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static size_t comm_size(LionCommDType d) {
  return d == LION_COMM_F32 ? 4 : d == LION_COMM_U64 ? 8 : (d == LION_COMM_F16 || d == LION_COMM_BF16) ? 2 : 1;
}

/* Every collective of a world of one is a copy. */
static int32_t copy(void *context, const void *send, void *recv, size_t count, LionCommDType dtype, void *stream) {
  (void)context;
  (void)stream;
  if (send != recv) memcpy(recv, send, count * comm_size(dtype));
  return 0;
}

/* Two ranks in one process: each collective leaves its input in a slot, waits for the other,
 * and computes its output from both slots (sums in rank order). */
typedef struct {
  pthread_barrier_t barrier;
  const void *slot[2];
} Pair;
typedef struct {
  Pair *pair;
  int rank;
} RankOf;

static void add_into(void *acc, const void *x, size_t count, LionCommDType dtype) {
  for (size_t i = 0; i < count; i++) {
    if (dtype == LION_COMM_F32) ((float *)acc)[i] += ((const float *)x)[i];
    else ((uint64_t *)acc)[i] += ((const uint64_t *)x)[i];
  }
}

static int32_t pair_collective(int op, void *context, const void *send, void *recv, size_t count,
                               LionCommDType dtype) {
  RankOf *me = context;
  Pair *p = me->pair;
  size_t bytes = count * comm_size(dtype);
  if (dtype != LION_COMM_F32 && dtype != LION_COMM_U64 && op != 2) return 1;
  p->slot[me->rank] = send;
  pthread_barrier_wait(&p->barrier);
  if (op == 0) { /* all-reduce */
    memcpy(recv, p->slot[0], bytes);
    add_into(recv, p->slot[1], count, dtype);
  } else if (op == 1) { /* reduce-scatter: block `rank` of both */
    memcpy(recv, (const char *)p->slot[0] + me->rank * bytes, bytes);
    add_into(recv, (const char *)p->slot[1] + me->rank * bytes, count, dtype);
  } else { /* all-gather */
    for (int r = 0; r < 2; r++) memcpy((char *)recv + r * bytes, p->slot[r], bytes);
  }
  pthread_barrier_wait(&p->barrier); /* both have read both slots */
  return 0;
}
static int32_t pair_all_reduce(void *c, const void *s, void *r, size_t n, LionCommDType d, void *st) {
  (void)st;
  return pair_collective(0, c, s, r, n, d);
}
static int32_t pair_reduce_scatter(void *c, const void *s, void *r, size_t n, LionCommDType d, void *st) {
  (void)st;
  return pair_collective(1, c, s, r, n, d);
}
static int32_t pair_all_gather(void *c, const void *s, void *r, size_t n, LionCommDType d, void *st) {
  (void)st;
  return pair_collective(2, c, s, r, n, d);
}

typedef struct {
  RankOf rank;
  size_t n;
  uint32_t threads;
  double best;
} RankRun;

static void *sharded_rank(void *arg) {
  RankRun *run = arg;
  float *p = malloc(run->n * sizeof *p), *g = malloc(run->n * sizeof *g);
  for (size_t i = 0; i < run->n; i++) {
    p[i] = (float)(i % 7) * 0.1f;
    g[i] = (float)((i * 13 + (size_t)run->rank.rank) % 11) - 5.0f;
  }
  LionConfig config = lion_config_default();
  config.num_threads = run->threads;
  config.lr = 1e-4f;
  LionTensorDesc desc = lion_tensor_desc(run->n, LION_DTYPE_F32);
  LionCollectives coll = {sizeof coll, &run->rank, pair_all_reduce, pair_reduce_scatter, pair_all_gather};
  LionDistConfig dist = lion_dist_config_default();
  dist.mode = LION_DIST_SHARDED;
  dist.rank = run->rank.rank;
  dist.world_size = 2;
  dist.collectives = &coll;
  LionOptimizer *opt;
  run->best = -1;
  if (lion_create_distributed(&config, &desc, 1, &dist, &opt) != LION_OK) {
    fprintf(stderr, "rank %d: %s\n", run->rank.rank, lion_last_error());
    return NULL;
  }
  void *params[1] = {p};
  const void *grads[1] = {g};
  double best = 1e30;
  for (int i = 0; i < 10; i++) {
    pthread_barrier_wait(&run->rank.pair->barrier);
    double t = now();
    if (lion_step(opt, params, grads, 1, NULL) != LION_OK) return NULL;
    t = now() - t;
    if (i >= 3 && t < best) best = t;
  }
  run->best = best;
  lion_destroy(opt);
  free(p);
  free(g);
  return NULL;
}

/* Sharded on two ranks; the slower rank's best step (s), or a negative number on failure. */
static double sharded_two_ranks(size_t n, uint32_t threads) {
  Pair pair;
  pthread_barrier_init(&pair.barrier, NULL, 2);
  RankRun runs[2] = {{{&pair, 0}, n, threads, 0}, {{&pair, 1}, n, threads, 0}};
  pthread_t t[2];
  for (int r = 0; r < 2; r++) pthread_create(&t[r], NULL, sharded_rank, &runs[r]);
  for (int r = 0; r < 2; r++) pthread_join(t[r], NULL);
  pthread_barrier_destroy(&pair.barrier);
  return runs[0].best < 0 || runs[1].best < 0 ? -1 : (runs[0].best > runs[1].best ? runs[0].best : runs[1].best);
}

int main(int argc, char **argv) {
  size_t n = argc > 1 ? strtoull(argv[1], NULL, 0) : (size_t)1 << 24;
  uint32_t threads = argc > 2 ? (uint32_t)atoi(argv[2]) : 1;
  float *p = malloc(n * sizeof *p), *g = malloc(n * sizeof *g);
  if (!p || !g) return 1;
  for (size_t i = 0; i < n; i++) {
    p[i] = (float)(i % 7) * 0.1f;
    g[i] = (float)((i * 13) % 11) - 5.0f;
  }
  LionConfig config = lion_config_default();
  config.num_threads = threads;
  config.lr = 1e-4f;
  LionTensorDesc desc = lion_tensor_desc(n, LION_DTYPE_F32);
  LionCollectives coll = {sizeof coll, NULL, copy, copy, copy};
  const char *names[] = {"single process", "sharded, W = 1", "vote (gather), W = 1", "vote (sums), W = 1"};
  double single = 0;
  printf("%zu f32 elements, %u thread(s)\n", n, threads);
  for (int mode = 0; mode < 4; mode++) {
    LionOptimizer *opt;
    LionStatus st;
    if (mode == 0) {
      st = lion_create(&config, &desc, 1, &opt);
    } else {
      LionDistConfig dist = lion_dist_config_default();
      dist.mode = mode == 1 ? LION_DIST_SHARDED : LION_DIST_VOTE;
      dist.vote_exchange = mode == 3 ? LION_VOTE_SUMS : LION_VOTE_GATHER;
      dist.world_size = 1;
      dist.collectives = &coll;
      st = lion_create_distributed(&config, &desc, 1, &dist, &opt);
    }
    if (st != LION_OK) {
      fprintf(stderr, "%s: %s\n", names[mode], lion_last_error());
      return 1;
    }
    void *params[1] = {p};
    const void *grads[1] = {g};
    double best = 1e30;
    for (int i = 0; i < 10; i++) {
      double t = now();
      if (lion_step(opt, params, grads, 1, NULL) != LION_OK) return 1;
      t = now() - t;
      if (i >= 3 && t < best) best = t;
    }
    if (mode == 0) single = best;
    printf("| %s | %.2f ms | %.1f GB/s | %.2fx |\n", names[mode], best * 1e3, 20.0 * (double)n / best / 1e9,
           best / single);
    lion_destroy(opt);
  }
  free(p);
  free(g);
  double two = sharded_two_ranks(n, threads);
  if (two < 0) return 1;
  printf("| sharded, W = 2 (two threads, %u each) | %.2f ms | %.1f GB/s | %.2fx |\n", threads, two * 1e3,
         20.0 * (double)n / two / 1e9, two / single);
  return 0;
}
