/* liblion in a thread that is cancelled (pthread_cancel, deferred: the default). Inside a
 * liblion call a cancellation point (a file's write, pthread_join of the pool, a read of /sys,
 * the host's own collective callback) would start glibc's forced unwind through liblion's
 * frames, which aborts the process; liblion holds cancellation off for the length of each
 * call, and the request is acted on at the thread's next cancellation point after it returns.
 * Each case cancels a worker (itself, or from main while it is blocked inside liblion), checks
 * the call's status, and that the worker then ends cancelled. Built and run by tests/host.rs. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lion.h"
#include "check.h"
#include "comm_size.h"

enum { N = 70001 }; /* above the size a step hands to the pool */

static char dir[64];

static LionOptimizer *make(uint32_t threads) {
  LionConfig c = lion_config_default();
  LionTensorDesc t = lion_tensor_desc(N, LION_DTYPE_F32);
  LionOptimizer *opt = NULL;
  c.num_threads = threads;
  if (lion_create(&c, &t, 1, &opt) != LION_OK) {
    fprintf(stderr, "lion_create: %s\n", lion_last_error());
    exit(2);
  }
  return opt;
}

struct Worker {
  int which;
  LionStatus status;
  int returned; /* set where the call returned */
  char path[128];
};

/* A world of one whose every collective first sleeps: usleep is a cancellation point. */
static int32_t sleepy_copy(void *ctx, const void *send, void *recv, size_t count, LionCommDType d,
                           void *stream) {
  (void)ctx;
  (void)stream;
  usleep(1000);
  if (send != recv) memmove(recv, send, count * comm_size(d));
  return 0;
}

static LionOptimizer *make_vote(void) {
  LionConfig c = lion_config_default();
  LionTensorDesc t = lion_tensor_desc(N, LION_DTYPE_F32);
  LionCollectives coll = {sizeof coll, NULL, sleepy_copy, sleepy_copy, sleepy_copy};
  LionDistConfig d = lion_dist_config_default();
  LionOptimizer *opt = NULL;
  c.num_threads = 1;
  d.mode = LION_DIST_VOTE;
  d.rank = 0;
  d.world_size = 1;
  d.collectives = &coll;
  if (lion_create_distributed(&c, &t, 1, &d, &opt) != LION_OK) {
    fprintf(stderr, "lion_create_distributed: %s\n", lion_last_error());
    exit(2);
  }
  return opt;
}

static void *work(void *arg) {
  struct Worker *w = arg;
  LionOptimizer *opt = NULL;
  static float p[N], g[N];
  void *params[1] = {p};
  const void *grads[1] = {g};
  switch (w->which) {
    case 0: /* creation reads the CPU count from /sys and /proc (num_threads 0) */
      pthread_cancel(pthread_self());
      {
        LionConfig c = lion_config_default();
        LionTensorDesc t = lion_tensor_desc(N, LION_DTYPE_F32);
        c.num_threads = 0;
        w->status = lion_create(&c, &t, 1, &opt);
      }
      break;
    case 1: /* a file's open, write, fsync, rename */
      opt = make(1);
      pthread_cancel(pthread_self());
      w->status = lion_state_save_file(opt, w->path);
      break;
    case 2: /* the file read back */
      opt = make(1);
      pthread_cancel(pthread_self());
      w->status = lion_state_load_file(opt, w->path);
      break;
    case 3: /* the pool's threads joined */
      opt = make(2);
      pthread_cancel(pthread_self());
      lion_destroy(opt);
      opt = NULL;
      w->status = LION_OK;
      break;
    case 4: /* the host's collective callback, inside the step */
      opt = make_vote();
      pthread_cancel(pthread_self());
      w->status = lion_step(opt, params, grads, 1, NULL);
      break;
    case 5: /* blocked in read() on a FIFO, cancelled from main */
      opt = make(1);
      w->status = lion_state_load_file(opt, w->path);
      break;
  }
  w->returned = 1;
  /* The optimizer is freed before the pending request ends the thread. */
  if (opt) lion_destroy(opt);
  pthread_testcancel();
  return NULL; /* not reached: the request was pending */
}

static void run_case(int which, const char *what, LionStatus want) {
  struct Worker w;
  memset(&w, 0, sizeof w);
  w.which = which;
  w.status = LION_ERROR_PANIC;
  pthread_t th;
  void *ret = NULL;
  snprintf(w.path, sizeof w.path, "%s/%s", dir, which == 5 ? "fifo" : "state.lion");
  pthread_create(&th, NULL, work, &w);
  if (which == 5) {
    usleep(200 * 1000); /* the worker is blocked in the FIFO's open or read */
    pthread_cancel(th);
    usleep(100 * 1000);
    int fd = open(w.path, O_WRONLY);
    if (fd >= 0) {
      CHECK(write(fd, "not a checkpoint", 16) == 16);
      close(fd);
    }
  }
  pthread_join(th, &ret);
  printf("%s: status %d, %s\n", what, (int)w.status,
         ret == PTHREAD_CANCELED ? "then cancelled" : "not cancelled");
  CHECK(w.returned);
  CHECK(w.status == want);
  CHECK(ret == PTHREAD_CANCELED);
}

/* A host that disabled cancellation itself finds it still disabled after a call. */
static void *keeps_disabled(void *arg) {
  int old = 0, now = 0;
  (void)arg;
  pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &old);
  LionOptimizer *opt = make(2);
  lion_destroy(opt);
  pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &now);
  CHECK(now == PTHREAD_CANCEL_DISABLE);
  pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, &now);
  return NULL;
}

int main(void) {
  snprintf(dir, sizeof dir, "/tmp/lion-cancel-%d", (int)getpid());
  mkdir(dir, 0700);
  char fifo[128];
  snprintf(fifo, sizeof fifo, "%s/fifo", dir);
  CHECK(mkfifo(fifo, 0600) == 0);

  run_case(0, "lion_create (num_threads 0) in a cancelled thread", LION_OK);
  run_case(1, "lion_state_save_file in a cancelled thread", LION_OK);
  run_case(2, "lion_state_load_file in a cancelled thread", LION_OK);
  run_case(3, "lion_destroy of a pool in a cancelled thread", LION_OK);
  run_case(4, "a vote step whose callback sleeps, in a cancelled thread", LION_OK);
  run_case(5, "lion_state_load_file blocked on a FIFO, cancelled from main",
           LION_ERROR_CORRUPT_STATE);

  pthread_t th;
  pthread_create(&th, NULL, keeps_disabled, NULL);
  pthread_join(th, NULL);

  char path[128];
  snprintf(path, sizeof path, "%s/state.lion", dir);
  unlink(path);
  unlink(fifo);
  rmdir(dir);
  return check_report("cancel");
}
