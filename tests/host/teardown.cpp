// liblion called while the host tears itself down: from a thread_local destructor (main
// thread and a worker), a pthread_key destructor, an atexit handler and a static C++
// destructor. Each of these runs after (or while) the calling thread's own storage is
// destroyed; every export must still return its status, and lion_last_error() a readable
// string. Built and run by tests/host.rs (also under valgrind by scripts/test.sh).
//
// The summary line is printed by the destructor of the first static object, which runs last,
// and the exit code comes from _exit there: a call that aborts the process fails the test.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <string>
#include <thread>

#include "lion.h"

static int passed = 0, failed = 0;
static std::string dir_path, ckpt_path;  // defined before `reporter`: destroyed after it

static void check(bool ok, const char *what, const char *where) {
  if (ok) {
    passed++;
  } else {
    failed++;
    fprintf(stderr, "%s: %s failed; lion_last_error: \"%s\"\n", where, what, lion_last_error());
  }
}

// One optimizer for the whole program, stepped in main; never destroyed before the end.
static LionOptimizer *opt = nullptr;
enum { N = 70000 };  // large enough for the pool
static float params[N], grads[N];

// Every export the issue saw abort, plus a step and a failing call's message.
static void exercise(const char *where) {
  float lr = 0;
  uint64_t steps = 0;
  check(lion_get_lr(opt, &lr) == LION_OK && lr == 1e-3f, "lion_get_lr", where);
  check(lion_set_lr(opt, 1e-3f) == LION_OK, "lion_set_lr", where);
  void *p[1] = {params};
  const void *g[1] = {grads};
  check(lion_step(opt, p, g, 1, nullptr) == LION_OK, "lion_step", where);
  check(lion_step_count(opt, &steps) == LION_OK && steps >= 1, "lion_step_count", where);
  // A refused call: the status, and a message that is a readable C string.
  check(lion_set_lr(opt, -1.0f) == LION_ERROR_INVALID_ARGUMENT, "lion_set_lr(-1) refused", where);
  const char *msg = lion_last_error();
  check(msg != nullptr && strlen(msg) > 0, "lion_last_error is a message", where);
  check(lion_get_lr(opt, &lr) == LION_OK && lr == 1e-3f, "a refused lr is not kept", where);
  check(lion_state_save_file(opt, ckpt_path.c_str()) == LION_OK, "lion_state_save_file", where);
  check(lion_state_load_file(opt, ckpt_path.c_str()) == LION_OK, "lion_state_load_file", where);
  check(strlen(lion_version()) > 0, "lion_version", where);
}

// Constructed first, destroyed last: reports, cleans up, and sets the exit code.
struct Reporter {
  ~Reporter() {
    exercise("static destructor (last)");
    lion_destroy(opt);
    unlink(ckpt_path.c_str());
    rmdir(dir_path.c_str());
    printf("teardown: %d passed, %d failed\n", passed, failed);
    fflush(stdout);
    _exit(failed == 0 && passed > 0 ? 0 : 1);
  }
} reporter;

struct AtThreadExit {
  const char *where;
  ~AtThreadExit() { exercise(where); }
};

static void at_exit_handler(void) { exercise("atexit handler"); }

static pthread_key_t key;
static void key_destructor(void *where) { exercise(static_cast<const char *>(where)); }

static void *worker(void *) {
  // The thread_local is constructed before this thread's first lion_ call, so it is destroyed
  // after liblion's own thread storage: the case that aborted.
  thread_local AtThreadExit t{"thread_local destructor (worker)"};
  (void)t;
  pthread_setspecific(key, const_cast<char *>("pthread_key destructor (worker)"));
  exercise("worker body");
  return nullptr;
}

int main() {
  char dir[] = "/tmp/lion-teardown-XXXXXX";
  if (!mkdtemp(dir)) return 2;
  dir_path = dir;
  ckpt_path = dir_path + "/state.ckpt";
  thread_local AtThreadExit main_tls{"thread_local destructor (main)"};
  (void)main_tls;
  for (int i = 0; i < N; i++) {
    params[i] = 0.001f * (float)(i % 97) - 0.05f;
    grads[i] = 0.002f * (float)(i % 31) - 0.03f;
  }
  LionConfig c = lion_config_default();
  c.lr = 1e-3f;
  c.num_threads = 4;
  LionTensorDesc t = lion_tensor_desc(N, LION_DTYPE_F32);
  if (lion_create(&c, &t, 1, &opt) != LION_OK) {
    fprintf(stderr, "lion_create: %s\n", lion_last_error());
    return 1;
  }
  exercise("main");
  pthread_key_create(&key, key_destructor);
  pthread_t th;
  pthread_create(&th, nullptr, worker, nullptr);
  pthread_join(th, nullptr);
  atexit(at_exit_handler);
  std::thread([] { exercise("std::thread"); }).join();
  return 0;    // exit(): main's thread_locals, then the atexit handler, then the statics
}
