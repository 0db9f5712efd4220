/* The CPU engine's distributed modes against its single-process step, in one run: what a
 * sharded or vote step costs beyond the update itself (copies, votes, packing), with one rank
 * whose collectives are plain copies (a world of one: no wire), so that only liblion's own
 * work is timed.
 *
 *   cargo build --release
 *   cc -O2 -Iinclude benches/c/dist_cpu_step.c -Ltarget/release -llion \
 *      -Wl,-rpath,$PWD/target/release -o /tmp/dist_cpu_step
 *   /tmp/dist_cpu_step [elements, default 2^24] [threads, default 1]
 *
 * Prints the best of 7 steps (after 3) per mode, its GB/s of the single-process step's bytes
 * (p, g, m f32: 20 bytes an element) and its time over the single-process step's. */
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
  const char *names[] = {"single process", "sharded, W = 1", "vote, W = 1"};
  double single = 0;
  printf("%zu f32 elements, %u thread(s)\n", n, threads);
  for (int mode = 0; mode < 3; mode++) {
    LionOptimizer *opt;
    LionStatus st;
    if (mode == 0) {
      st = lion_create(&config, &desc, 1, &opt);
    } else {
      LionDistConfig dist = lion_dist_config_default();
      dist.mode = mode == 1 ? LION_DIST_SHARDED : LION_DIST_VOTE;
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
  return 0;
}
