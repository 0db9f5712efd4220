/* A child of fork() made while another thread of the parent was inside one of liblion's
 * process-wide first-use sections (initialising CUDA, compiling the kernels, loading NCCL),
 * each of which holds a lock for as long as it takes: the child inherits the lock held, and no
 * thread of the child will release it. The child's call on that path is refused with
 * LION_ERROR_DEVICE_UNAVAILABLE, never waited for; its CPU calls work. Run by tests/cuda_fake.rs
 * against tests/c/fake_cuda.c and fake_nccl.c, whose first calls are slowed through the
 * environment (LION_FAKE_*_DELAY_MS).
 *
 *   fork_init cuda|nvrtc|nccl [path of the fake libnccl]
 */
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

static const char *which, *nccl_path;

static LionStatus make(LionDevice device) {
  LionConfig c = lion_config_default();
  LionTensorDesc t = lion_tensor_desc(1024, LION_DTYPE_F32);
  LionOptimizer *opt = NULL;
  c.device = device;
  c.num_threads = 1;
  LionStatus status = lion_create(&c, &t, 1, &opt);
  lion_destroy(opt);
  return status;
}

static LionStatus unique_id(void) {
  uint8_t id[LION_NCCL_UNIQUE_ID_BYTES];
  return lion_nccl_unique_id(nccl_path, id, sizeof id);
}

/* The parent's thread that enters the slow section first. */
static void *first_use(void *arg) {
  LionStatus *status = arg;
  *status = strcmp(which, "nccl") == 0 ? unique_id() : make(LION_DEVICE_CUDA);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 2 || (strcmp(argv[1], "nccl") == 0 && argc < 3)) {
    fprintf(stderr, "usage: fork_init cuda|nvrtc|nccl [fake libnccl]\n");
    return 2;
  }
  which = argv[1];
  nccl_path = argc > 2 ? argv[2] : NULL;
  LionStatus first = LION_ERROR_PANIC;
  pthread_t th;
  pthread_create(&th, NULL, first_use, &first);
  usleep(300 * 1000); /* that thread is inside the slow call (1.5 s) */
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) {
    alarm(10);
    CHECK_STATUS(make(LION_DEVICE_CPU), LION_OK);
    LionStatus status = strcmp(which, "nccl") == 0 ? unique_id() : make(LION_DEVICE_CUDA);
    printf("child: %s after the fork: %d (%s)\n", which, (int)status, lion_last_error());
    CHECK(status == LION_ERROR_DEVICE_UNAVAILABLE);
    CHECK(strstr(lion_last_error(), "child of fork()") != NULL);
    fflush(stdout);
    _exit(checks_failed == 0 ? 0 : 1);
  }
  int wstatus = 0;
  waitpid(pid, &wstatus, 0);
  if (WIFSIGNALED(wstatus))
    fprintf(stderr, "child killed by signal %d%s\n", WTERMSIG(wstatus),
            WTERMSIG(wstatus) == SIGALRM ? " (it hung)" : "");
  CHECK(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0);
  pthread_join(th, NULL);
  printf("parent: %s's first use: %d\n", which, (int)first);
  CHECK(first == LION_OK);
  /* The parent goes on: the section is its own. */
  CHECK_STATUS(strcmp(which, "nccl") == 0 ? unique_id() : make(LION_DEVICE_CUDA), LION_OK);
  return check_report(which);
}
