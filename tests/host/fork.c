/* liblion in a child of fork(): the child's copy of an optimizer steps (its pool rebuilt there)
 * with the same bits as a fresh single-threaded optimizer, and destroys without waiting for
 * the parent's threads; the parent goes on unaffected. An optimizer that another thread was
 * stepping when the process forked is refused in the child, never waited for. Every child runs
 * under alarm(): a hang fails the test instead of blocking it. Built and run by tests/host.rs
 * (also under valgrind by scripts/test.sh). */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lion.h"
#include "check.h"

enum { N = 70001 }; /* above the size a step hands to the pool */

static void fill(float *p, float *g, float *ref) {
  for (int i = 0; i < N; i++) {
    p[i] = 0.001f * (float)(i % 97) - 0.05f;
    g[i] = 0.002f * (float)(i % 31) - 0.03f;
    if (ref) ref[i] = p[i];
  }
}

static LionOptimizer *make(uint32_t threads) {
  LionConfig c = lion_config_default();
  LionTensorDesc t = lion_tensor_desc(N, LION_DTYPE_F32);
  LionOptimizer *opt = NULL;
  c.lr = 1e-3f;
  c.weight_decay = 0.1f;
  c.num_threads = threads;
  if (lion_create(&c, &t, 1, &opt) != LION_OK) {
    fprintf(stderr, "lion_create: %s\n", lion_last_error());
    exit(2);
  }
  return opt;
}

static LionStatus step(LionOptimizer *opt, float *p, const float *g) {
  void *params[1] = {p};
  const void *grads[1] = {g};
  return lion_step(opt, params, grads, 1, NULL);
}

/* Runs `body` in a child under a 30 s alarm; the child's exit code is its failure count. */
static int in_child(int (*body)(void *), void *arg) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) {
    alarm(30);
    _exit(body(arg));
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) {
    fprintf(stderr, "child killed by signal %d%s\n", WTERMSIG(status),
            WTERMSIG(status) == SIGALRM ? " (it hung)" : "");
    return -1;
  }
  return WEXITSTATUS(status);
}

struct Case {
  uint32_t threads;
  float *p, *g;
  void *blob;
  size_t blob_len;
  LionOptimizer *opt;
};

/* The child steps its copy twice, then compares with a fresh 1-thread optimizer loaded from
 * the checkpoint taken before the fork, stepping the same parameters. */
static int child_steps(void *arg) {
  struct Case *c = arg;
  static float p2[N];
  int bad = 0;
  uint64_t count = 0;
  memcpy(p2, c->p, sizeof p2);
  bad += step(c->opt, c->p, c->g) != LION_OK;
  bad += step(c->opt, c->p, c->g) != LION_OK;
  bad += lion_step_count(c->opt, &count) != LION_OK || count != 3;
  LionOptimizer *ref = make(1);
  bad += lion_state_load(ref, c->blob, c->blob_len) != LION_OK;
  bad += step(ref, p2, c->g) != LION_OK;
  bad += step(ref, p2, c->g) != LION_OK;
  bad += memcmp(p2, c->p, sizeof p2) != 0;
  lion_destroy(ref);
  lion_destroy(c->opt); /* must not wait for the parent's threads */
  if (bad) fprintf(stderr, "child (%u threads): %d checks failed: %s\n", c->threads, bad, lion_last_error());
  return bad;
}

static int child_destroys(void *arg) {
  lion_destroy(((struct Case *)arg)->opt);
  return 0;
}

static void test_child_steps_and_destroys(uint32_t threads) {
  static float p[N], g[N], ref[N];
  struct Case c = {threads, p, g, NULL, 0, make(threads)};
  fill(p, g, ref);
  CHECK_STATUS(step(c.opt, p, g), LION_OK);
  CHECK_STATUS(lion_state_size(c.opt, &c.blob_len), LION_OK);
  c.blob = malloc(c.blob_len);
  CHECK_STATUS(lion_state_save(c.opt, c.blob, c.blob_len, NULL), LION_OK);
  CHECK(in_child(child_steps, &c) == 0);
  CHECK(in_child(child_destroys, &c) == 0);
  /* The parent is unaffected: its next step matches a fresh optimizer's from the same state. */
  {
    static float p2[N];
    LionOptimizer *fresh = make(1);
    memcpy(p2, p, sizeof p2);
    CHECK_STATUS(lion_state_load(fresh, c.blob, c.blob_len), LION_OK);
    CHECK_STATUS(step(c.opt, p, g), LION_OK);
    CHECK_STATUS(step(fresh, p2, g), LION_OK);
    CHECK(memcmp(p, p2, sizeof p2) == 0);
    lion_destroy(fresh);
  }
  lion_destroy(c.opt);
  free(c.blob);
}

/* Fork while another thread steps: the child gets LION_OK (forked between steps) or
 * LION_ERROR_UNSUPPORTED (forked mid-step), never a hang. */
struct Busy {
  LionOptimizer *opt;
  float *p, *g;
  _Atomic int stop;
};

static void *keep_stepping(void *arg) {
  struct Busy *b = arg;
  while (!b->stop) step(b->opt, b->p, b->g);
  return NULL;
}

static int child_while_busy(void *arg) {
  struct Busy *b = arg;
  LionStatus s = step(b->opt, b->p, b->g);
  if (s != LION_OK && s != LION_ERROR_UNSUPPORTED) {
    fprintf(stderr, "child of a busy parent: status %d: %s\n", (int)s, lion_last_error());
    return 1;
  }
  if (s == LION_ERROR_UNSUPPORTED && strstr(lion_last_error(), "fork") == NULL) return 1;
  lion_destroy(b->opt);
  return 0;
}

static void test_fork_while_another_thread_steps(void) {
  static float p[N], g[N];
  struct Busy b = {make(2), p, g, 0};
  pthread_t th;
  fill(p, g, NULL);
  pthread_create(&th, NULL, keep_stepping, &b);
  for (int i = 0; i < 20; i++) CHECK(in_child(child_while_busy, &b) == 0);
  b.stop = 1;
  pthread_join(th, NULL);
  lion_destroy(b.opt);
}

int main(void) {
  test_child_steps_and_destroys(4);
  test_child_steps_and_destroys(0);
  test_child_steps_and_destroys(1);
  test_fork_while_another_thread_steps();
  return check_report("fork");
}
