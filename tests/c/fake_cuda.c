/* A fake CUDA driver (libcuda.so.1) and, built with -DFAKE_NVRTC, a fake NVRTC (libnvrtc.so):
 * the entry points liblion calls, acting as one device whose memory is host memory and whose
 * kernels do nothing. tests/cuda_fake.rs runs the CUDA engine's host side against them on
 * machines without a GPU: creation, distributed creation's check, refusals, running out of
 * device memory.
 *
 * With LION_FAKE_CUDA_RUN=1 the kernels run, on the CPU: the fake NVRTC builds the program
 * with the host's C++ compiler over tests/c/emu_cuda.h (its path given at this file's build
 * as LION_EMU_HEADER) into a shared library, whose path is the "cubin"; the fake driver
 * loads it and a launch runs the kernel's emu_<name> entry, thread by thread
 * (scripts/cuda_on_cpu.sh runs tests/cuda.rs and tests/cuda_dist.rs so).
 *
 * Only what liblion uses is here, with the signatures of cuda.h and nvrtc.h (CUDA 12/13):
 * cudarc resolves each function by name when it is first called. */
#define _GNU_SOURCE /* popen, strdup, getpid */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* Sleeps the milliseconds the environment variable `name` gives (tests/host/fork_init.c: a
 * slow first call, as a real driver's cuInit or NVRTC's compile can be). */
static void delay_from(const char *name) {
  const char *v = getenv(name);
  if (v && *v) usleep((useconds_t)atoi(v) * 1000);
}

static int run_kernels(void) {
  const char *v = getenv("LION_FAKE_CUDA_RUN");
  return v && strcmp(v, "1") == 0;
}

#ifndef FAKE_NVRTC

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUmodule;
typedef void *CUfunction;
typedef void *CUstream;
typedef unsigned long long CUdeviceptr;
typedef void *CUgraph;
typedef void *CUgraphExec;

enum {
  SUCCESS = 0,
  INVALID_VALUE = 1,
  OUT_OF_MEMORY = 2,
  INVALID_DEVICE = 101,
  INVALID_CONTEXT = 201,
  NOT_FOUND = 500,
  CAPTURE_UNSUPPORTED = 900,
  CAPTURE_IMPLICIT = 906,
};
enum { CAPTURE_STATUS_NONE = 0, CAPTURE_STATUS_ACTIVE = 1 };
enum { ATTR_CC_MAJOR = 75, ATTR_CC_MINOR = 76, ATTR_SHARED_OPTIN = 97 };
enum { SHARED_DEFAULT = 48 * 1024, SHARED_OPTIN = 232448, ATTR_MAX_DYNAMIC_SHARED = 8 };
enum { POINTER_MEMORY_TYPE = 2, POINTER_DEVICE_ORDINAL = 9, MEMORYTYPE_DEVICE = 2 };

static char the_context, the_module, the_function;

typedef void (*emu_entry)(void **params, unsigned grid, unsigned block, unsigned shared);
typedef size_t (*emu_size)(void);
struct emu_function {
  emu_entry run;
  size_t arg_bytes;       // the kernel's one by-value argument
  unsigned max_shared;    // dynamic shared memory a launch may give (cuFuncSetAttribute)
  char name[64];
  unsigned long long launches;  // launches run or recorded (fake_cuda_launches)
  struct emu_function *next;    // every function got, for fake_cuda_launches
};
static struct emu_function *functions;

/* Streams and graphs. A created stream runs its work at once, as the legacy one (whose
 * cuMemsetD8 alone is held: `land_held`), but while it captures (cuStreamBeginCapture) it
 * records its launches (their argument copied, as CUDA does) and memsets into a graph, which
 * cuGraphLaunch runs again in order. */
struct node {
  enum { LAUNCH, MEMSET } kind;
  CUfunction function;
  unsigned grid, block, shared;
  void *arg;
  CUdeviceptr ptr;
  unsigned char value;
  size_t n;
  struct node *next;
};
struct graph {
  struct node *first, **last;
};
struct stream {
  struct graph *capture;
  unsigned flags;  // cuStreamCreate's: CU_STREAM_NON_BLOCKING (1) or 0
};

/* The legacy and per-thread default streams are the handles 0, 1 and 2; out of run mode a
 * stream may be any handle a test made up. */
static struct graph *capturing(CUstream stream) {
  return run_kernels() && (uintptr_t)stream > 2 ? ((struct stream *)stream)->capture : NULL;
}

static CUresult record(CUstream stream, const struct node *node);
static void land_held(void);
static void order_on(CUstream stream);

/* A stream of this thread captures: the calls CUDA refuses then (synchronous ones, in the
 * default global capture mode) fail here too. */
static _Thread_local int captures;

/* Allocations on this thread of at least this many bytes fail (fake_cuda_fail_allocs_from). */
static _Thread_local size_t fail_from = SIZE_MAX;
/* This thread's context stack (push and pop), deep enough for liblion's nesting. */
static _Thread_local CUcontext stack[64];
static _Thread_local int depth;

/* Test hook: allocations of `bytes` or more on the calling thread fail with
 * CUDA_ERROR_OUT_OF_MEMORY (SIZE_MAX: none). */
EXPORT void fake_cuda_fail_allocs_from(size_t bytes) { fail_from = bytes; }

EXPORT CUresult cuInit(unsigned flags) {
  delay_from("LION_FAKE_CUDA_INIT_DELAY_MS");
  return flags == 0 ? SUCCESS : INVALID_VALUE;
}

EXPORT CUresult cuDriverGetVersion(int *version) {
  *version = 13000;
  return SUCCESS;
}

EXPORT CUresult cuDeviceGetCount(int *count) {
  *count = 1;
  return SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
  if (ordinal != 0) return INVALID_DEVICE;
  *dev = 0;
  return SUCCESS;
}

EXPORT CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice dev) {
  if (dev != 0) return INVALID_DEVICE;
  /* sm_90 with an H100's 227 KiB of shared memory a block on request; other attributes 0. */
  *value = attribute == ATTR_CC_MAJOR ? 9 : attribute == ATTR_SHARED_OPTIN ? SHARED_OPTIN : 0;
  return SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
  if (dev != 0) return INVALID_DEVICE;
  *ctx = &the_context;
  return SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) { return dev == 0 ? SUCCESS : INVALID_DEVICE; }

EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
  if (ctx != &the_context || depth == 64) return INVALID_CONTEXT;
  stack[depth++] = ctx;
  return SUCCESS;
}

EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *ctx) {
  if (depth == 0) return INVALID_CONTEXT;
  depth--;
  if (ctx) *ctx = stack[depth];
  return SUCCESS;
}

EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
  if (!ctx) {  // NULL pops, as CUDA documents
    if (depth) depth--;
    return SUCCESS;
  }
  if (depth == 0) depth = 1;
  stack[depth - 1] = ctx;
  return SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(CUcontext *ctx) {
  *ctx = depth ? stack[depth - 1] : NULL;
  return SUCCESS;
}

/* No context is current on this thread (none pushed, or NULL set): the calls that work in
 * the current context then fail, as CUDA's do. */
static int no_context(void) { return !depth || !stack[depth - 1]; }

/* Work "queued" on the device is done at once: every wait returns. */
EXPORT CUresult cuCtxSynchronize(void) {
  if (captures) return CAPTURE_UNSUPPORTED;
  if (no_context()) return INVALID_CONTEXT;
  land_held();
  return SUCCESS;
}
EXPORT CUresult cuStreamSynchronize(CUstream stream) {
  if ((uintptr_t)stream <= 2 && no_context()) return INVALID_CONTEXT;  // a created one has its own
  order_on(stream);
  return SUCCESS;
}

/* Run mode: the allocations, so that other memory is not "device memory" (the real driver
 * does not know a host buffer either). */
#define MAX_ALLOCATIONS 65536
static struct {
  uintptr_t start, end;
} allocations[MAX_ALLOCATIONS];
static pthread_mutex_t allocations_lock = PTHREAD_MUTEX_INITIALIZER;

static int allocations_used;  // every live one is below this index

static void remember(uintptr_t start, size_t bytes) {
  pthread_mutex_lock(&allocations_lock);
  int i = 0;
  while (i < MAX_ALLOCATIONS && allocations[i].start != 0) i++;
  if (i == MAX_ALLOCATIONS) {
    fprintf(stderr, "fake_cuda: more than %d allocations at once\n", MAX_ALLOCATIONS);
    abort();
  }
  allocations[i].start = start;
  allocations[i].end = start + bytes;
  if (i >= allocations_used) allocations_used = i + 1;
  pthread_mutex_unlock(&allocations_lock);
}

static void forget(uintptr_t start) {
  pthread_mutex_lock(&allocations_lock);
  for (int i = 0; i < MAX_ALLOCATIONS; i++)
    if (allocations[i].start == start) allocations[i].start = 0;
  pthread_mutex_unlock(&allocations_lock);
}

static int allocated(uintptr_t at) {
  int found = 0;
  pthread_mutex_lock(&allocations_lock);
  for (int i = 0; i < allocations_used && !found; i++)
    found = allocations[i].start != 0 && allocations[i].start <= at && at < allocations[i].end;
  pthread_mutex_unlock(&allocations_lock);
  return found;
}

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t bytes) {
  if (no_context()) return INVALID_CONTEXT;
  if (captures) return CAPTURE_UNSUPPORTED;
  if (bytes >= fail_from) return OUT_OF_MEMORY;
  const size_t n = bytes ? bytes : 1;
  void *p = calloc(1, n);
  if (!p) return OUT_OF_MEMORY;
  if (run_kernels()) {
    memset(p, 0xa5, n);  // fresh device memory holds garbage, as a GPU's may
    remember((uintptr_t)p, n);
  }
  *ptr = (CUdeviceptr)(uintptr_t)p;
  return SUCCESS;
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr ptr) {
  if (no_context()) return INVALID_CONTEXT;
  land_held();  // none of it may land in freed memory
  if (run_kernels()) forget((uintptr_t)ptr);
  free((void *)(uintptr_t)ptr);
  return SUCCESS;
}

static CUresult memset_now(CUdeviceptr ptr, unsigned char value, size_t n) {
  memset((void *)(uintptr_t)ptr, value, n);
  return SUCCESS;
}

/* Run mode: cuMemsetD8 is queued on the legacy stream and returns before it is done, so it
 * is held here until something orders it: a synchronization, a synchronous copy, a free, or
 * work on the legacy stream or a blocking one. Work on a non-blocking stream runs before it,
 * one of the orders CUDA allows, and the one that shows a caller who did not wait for its
 * zeroing. Where CUDA leaves the order open (a free, a blocking stream's synchronization with
 * nothing queued on it) the fake orders, so a missing wait shows only before work on a
 * non-blocking stream. Shared by every thread, as a context's legacy stream is. */
#define MAX_HELD 4096
static struct {
  CUdeviceptr ptr;
  unsigned char value;
  size_t n;
} held[MAX_HELD];
static int n_held;
static pthread_mutex_t held_lock = PTHREAD_MUTEX_INITIALIZER;

static void land_held(void) {
  pthread_mutex_lock(&held_lock);
  for (int i = 0; i < n_held; i++) memset_now(held[i].ptr, held[i].value, held[i].n);
  n_held = 0;
  pthread_mutex_unlock(&held_lock);
}

static int non_blocking(CUstream stream) {
  return run_kernels() && (uintptr_t)stream > 2 && (((struct stream *)stream)->flags & 1);
}

/* Work about to run on `stream`: the legacy stream's held work lands first unless `stream`
 * does not wait for it. */
static void order_on(CUstream stream) {
  if (!non_blocking(stream)) land_held();
}

/* Test hook for tests/c/fake_nccl.c: a collective about to run on `stream`. */
EXPORT void fake_cuda_order_on(CUstream stream) { order_on(stream); }

EXPORT CUresult cuMemsetD8_v2(CUdeviceptr ptr, unsigned char value, size_t n) {
  if (captures) return CAPTURE_UNSUPPORTED;
  if (no_context()) return INVALID_CONTEXT;
  if (run_kernels()) {
    pthread_mutex_lock(&held_lock);
    const int room = n_held < MAX_HELD;
    if (room) {
      held[n_held].ptr = ptr;
      held[n_held].value = value;
      held[n_held].n = n;
      n_held++;
    }
    pthread_mutex_unlock(&held_lock);
    if (room) return SUCCESS;
    land_held();
  }
  return memset_now(ptr, value, n);
}

EXPORT CUresult cuMemsetD8Async(CUdeviceptr ptr, unsigned char value, size_t n, CUstream stream) {
  if (no_context()) return INVALID_CONTEXT;
  order_on(stream);
  if (capturing(stream)) {
    struct node node = {.kind = MEMSET, .ptr = ptr, .value = value, .n = n};
    return record(stream, &node);
  }
  return memset_now(ptr, value, n);
}

EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
  if (captures) return CAPTURE_UNSUPPORTED;
  if (no_context()) return INVALID_CONTEXT;
  land_held();  // a synchronous copy follows the legacy stream's work
  memcpy((void *)(uintptr_t)dst, src, n);
  return SUCCESS;
}

EXPORT CUresult cuStreamIsCapturing(CUstream stream, int *status) {
  if (captures && (uintptr_t)stream == 0) return CAPTURE_IMPLICIT;
  *status = capturing(stream) ? CAPTURE_STATUS_ACTIVE : CAPTURE_STATUS_NONE;
  return SUCCESS;
}

EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
  if (captures) return CAPTURE_UNSUPPORTED;
  if (no_context()) return INVALID_CONTEXT;
  land_held();
  memcpy(dst, (const void *)(uintptr_t)src, n);
  return SUCCESS;
}

/* Every non-NULL address is device memory of device 0; in run mode, every allocated one. */
EXPORT CUresult cuPointerGetAttribute(void *data, int attribute, CUdeviceptr ptr) {
  if (!ptr || (run_kernels() && !allocated((uintptr_t)ptr))) return INVALID_VALUE;
  if (attribute == POINTER_MEMORY_TYPE) {
    *(unsigned *)data = MEMORYTYPE_DEVICE;
  } else if (attribute == POINTER_DEVICE_ORDINAL) {
    *(int *)data = 0;
  } else {
    return INVALID_VALUE;
  }
  return SUCCESS;
}

/* Run mode: the image is the path of the program built for the host (FAKE_NVRTC below). */
EXPORT CUresult cuModuleLoadData(CUmodule *module, const void *image) {
  if (!image) return INVALID_VALUE;
  if (run_kernels()) {
    void *built = dlopen((const char *)image, RTLD_NOW | RTLD_LOCAL);
    if (!built) {
      fprintf(stderr, "fake cuModuleLoadData: %s\n", dlerror());
      return INVALID_VALUE;
    }
    remove((const char *)image);  // mapped now; nothing is left behind
    // The kernels' prefetches are checked against the allocations (emu_prefetch_l2).
    int (**device_memory)(uintptr_t) = dlsym(built, "emu_device_memory");
    if (device_memory) *device_memory = allocated;
    *module = built;
    return SUCCESS;
  }
  *module = &the_module;
  return SUCCESS;
}

EXPORT CUresult cuModuleGetFunction(CUfunction *f, CUmodule module, const char *name) {
  if (!name) return INVALID_VALUE;
  if (run_kernels()) {
    char symbol[256], size_symbol[256];
    snprintf(symbol, sizeof symbol, "emu_%s", name);
    snprintf(size_symbol, sizeof size_symbol, "emu_size_%s", name);
    void *entry = dlsym(module, symbol), *size = dlsym(module, size_symbol);
    struct emu_function *function = entry && size ? malloc(sizeof *function) : NULL;
    if (!function) return NOT_FOUND;
    // (ISO C casts no object pointer to a function one.)
    emu_size arg_bytes;
    memcpy(&function->run, &entry, sizeof entry);
    memcpy(&arg_bytes, &size, sizeof size);
    function->arg_bytes = arg_bytes();
    function->max_shared = SHARED_DEFAULT;
    snprintf(function->name, sizeof function->name, "%s", name);
    function->launches = 0;
    function->next = functions;
    functions = function;
    *f = function;
    return SUCCESS;
  }
  if (module != &the_module) return INVALID_VALUE;
  *f = &the_function;
  return SUCCESS;
}

EXPORT CUresult cuModuleUnload(CUmodule module) {
  if (run_kernels()) return SUCCESS;  // the built program stays loaded
  return module == &the_module ? SUCCESS : INVALID_VALUE;
}

/* Lets a kernel's launches give it up to `value` bytes of dynamic shared memory (the one
 * attribute liblion sets), up to what the device allows. */
EXPORT CUresult cuFuncSetAttribute(CUfunction f, int attribute, int value) {
  if (!f || attribute != ATTR_MAX_DYNAMIC_SHARED || value < 0 || value > SHARED_OPTIN) return INVALID_VALUE;
  if (run_kernels()) ((struct emu_function *)f)->max_shared = (unsigned)value;
  return SUCCESS;
}

/* Kernels do nothing, or run to their end here (run mode); the launch checks what a real one
 * would refuse outright. Streams are one: everything is done when the call returns (but the
 * legacy stream's held memsets: `land_held`). */
EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared, CUstream stream, void **params, void **extra) {
  if (!f || !gx || !gy || !gz || !bx || !by || !bz || bx * by * bz > 1024) return INVALID_VALUE;
  if (!run_kernels() && f != &the_function) return INVALID_VALUE;
  if (!params && !extra) return INVALID_VALUE;
  if (no_context()) return INVALID_CONTEXT;
  if (run_kernels()) {
    if (!params || gy != 1 || gz != 1 || by != 1 || bz != 1) return INVALID_VALUE;
    /* As CUDA (which also counts the kernel's static shared memory, left out here). */
    if (shared > ((struct emu_function *)f)->max_shared) return INVALID_VALUE;
    ((struct emu_function *)f)->launches++;
    order_on(stream);
    if (capturing(stream)) {
      struct node node = {.kind = LAUNCH, .function = f, .grid = gx, .block = bx, .shared = shared, .arg = params[0]};
      return record(stream, &node);
    }
    ((struct emu_function *)f)->run(params, gx, bx, shared);
  }
  return SUCCESS;
}

static CUresult record(CUstream stream, const struct node *node) {
  struct graph *graph = capturing(stream);
  struct node *copy = malloc(sizeof *copy);
  if (!copy) return OUT_OF_MEMORY;
  *copy = *node;
  copy->next = NULL;
  if (node->kind == LAUNCH) {
    size_t bytes = ((struct emu_function *)node->function)->arg_bytes;
    if (!(copy->arg = malloc(bytes))) return OUT_OF_MEMORY;
    memcpy(copy->arg, node->arg, bytes);
  }
  *graph->last = copy;
  graph->last = &copy->next;
  return SUCCESS;
}

/* Test hook (run mode): the launches of the kernel `name` so far, run or recorded in a graph
 * (not its graph's replays), summed over the modules loaded. */
EXPORT unsigned long long fake_cuda_launches(const char *name) {
  unsigned long long n = 0;
  for (struct emu_function *f = functions; f; f = f->next)
    if (strcmp(f->name, name) == 0) n += f->launches;
  return n;
}

EXPORT CUresult cuStreamCreate(CUstream *stream, unsigned flags) {
  struct stream *s = calloc(1, sizeof *s);
  if (!s) return OUT_OF_MEMORY;
  s->flags = flags;
  *stream = s;
  return SUCCESS;
}

EXPORT CUresult cuStreamDestroy_v2(CUstream stream) {
  free(stream);
  return SUCCESS;
}

EXPORT CUresult cuStreamBeginCapture_v2(CUstream stream, int mode) {
  (void)mode;
  if ((uintptr_t)stream <= 2 || capturing(stream)) return INVALID_VALUE;
  struct graph *graph = calloc(1, sizeof *graph);
  if (!graph) return OUT_OF_MEMORY;
  graph->last = &graph->first;
  ((struct stream *)stream)->capture = graph;
  captures++;
  return SUCCESS;
}

EXPORT CUresult cuStreamEndCapture(CUstream stream, CUgraph *graph) {
  if (!capturing(stream)) return INVALID_VALUE;
  *graph = capturing(stream);
  ((struct stream *)stream)->capture = NULL;
  captures--;
  return SUCCESS;
}

static void free_graph(struct graph *g) {
  for (struct node *n = g->first, *next; n; n = next) {
    next = n->next;
    if (n->kind == LAUNCH) free(n->arg);
    free(n);
  }
  free(g);
}

/* An executable graph is a copy of the graph's nodes: the graph may be destroyed first. */
EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec *exec, CUgraph graph, unsigned long long flags) {
  (void)flags;
  struct graph *copy = calloc(1, sizeof *copy);
  if (!copy) return OUT_OF_MEMORY;
  copy->last = &copy->first;
  for (struct node *n = ((struct graph *)graph)->first; n; n = n->next) {
    const int launch = n->kind == LAUNCH;
    const size_t arg_bytes = launch ? ((struct emu_function *)n->function)->arg_bytes : 0;
    struct node *c = malloc(sizeof *c);
    void *arg = launch ? malloc(arg_bytes) : NULL;
    if (!c || (launch && !arg)) {
      free(c);
      free(arg);
      free_graph(copy);
      return OUT_OF_MEMORY;
    }
    *c = *n;
    c->next = NULL;
    if (arg) c->arg = memcpy(arg, n->arg, arg_bytes);
    *copy->last = c;
    copy->last = &c->next;
  }
  *exec = copy;
  return SUCCESS;
}

EXPORT CUresult cuGraphLaunch(CUgraphExec exec, CUstream stream) {
  order_on(stream);
  for (struct node *n = ((struct graph *)exec)->first; n; n = n->next) {
    if (n->kind == MEMSET) {
      memset_now(n->ptr, n->value, n->n);
    } else {
      void *params[1] = {n->arg};
      ((struct emu_function *)n->function)->run(params, n->grid, n->block, n->shared);
    }
  }
  return SUCCESS;
}

EXPORT CUresult cuGraphExecDestroy(CUgraphExec exec) {
  free_graph(exec);
  return SUCCESS;
}

EXPORT CUresult cuGraphDestroy(CUgraph graph) {
  free_graph(graph);
  return SUCCESS;
}

EXPORT CUresult cuGetErrorName(CUresult code, const char **name) {
  *name = code == OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY" : "CUDA_ERROR_FAKE";
  return SUCCESS;
}

#else /* FAKE_NVRTC: compiling "succeeds" with an image the fake driver takes */

typedef int nvrtcResult;
typedef void *nvrtcProgram;
#ifndef LION_EMU_HEADER /* its absolute path, where the kernels are to run */
#define LION_EMU_HEADER "emu_cuda.h"
#endif
static char the_program;
static const char fake_image[] = "fake cubin";
/* Run mode: the program's source, then the path of its build for the host, and the log. */
static char *source;
static char built[4096], log_text[65536];
enum { NVRTC_ERROR_OUT_OF_MEMORY = 1, NVRTC_ERROR_COMPILATION = 6 };

static const char *image(void) { return run_kernels() ? built : fake_image; }

/* The tests' knobs (tests/cuda_fake.rs): the first LION_FAKE_NVRTC_OUT_OF_MEMORY compiles
 * of the process run out of memory; where the kernels are not run, LION_FAKE_NVRTC_OUTPUT_BYTES
 * pads the log (with newlines) and the image (with NULs) to that many bytes, so that a
 * caller's buffers for them are as large as a real compile's. */
static size_t output_bytes(size_t own) {
  const char *v = getenv("LION_FAKE_NVRTC_OUTPUT_BYTES");
  size_t padded = v && *v && !run_kernels() ? (size_t)strtoul(v, NULL, 10) : 0;
  return padded > own ? padded : own;
}

static int compile_runs_out_of_memory(void) {
  static int left = -1;
  if (left < 0) {
    const char *v = getenv("LION_FAKE_NVRTC_OUT_OF_MEMORY");
    left = v && *v ? atoi(v) : 0;
  }
  return left > 0 ? left-- : 0;
}

/* Writes `emu_<name>` entries for every kernel of the preprocessed program `text` (where
 * emu_cuda.h made each `__global__` the marker: kernels made by macros are found too). */
static void write_entries(FILE *out, const char *text) {
  const char *marker = "emu_global_marker";
  for (const char *at = strstr(text, marker); at; at = strstr(at + 1, marker)) {
    const char *name = at + strlen(marker);
    while (*name == ' ' || *name == '\n') name++;
    if (strncmp(name, "void", 4) != 0) continue;
    name += 4;
    while (*name == ' ' || *name == '\n') name++;
    const char *end = name;
    while (*end == '_' || (*end >= 'a' && *end <= 'z') || (*end >= 'A' && *end <= 'Z') || (*end >= '0' && *end <= '9'))
      end++;
    fprintf(out, "EMU_KERNEL(%.*s)\n", (int)(end - name), name);
  }
}

/* Runs `cmd`, its output (stdout and stderr) into `out` (NUL-terminated, cut at `size`);
 * returns whether it succeeded. */
static int run(const char *cmd, char *out, size_t size) {
  FILE *p = popen(cmd, "r");
  if (!p) return 0;
  size_t len = 0, got;
  while (len + 1 < size && (got = fread(out + len, 1, size - 1 - len, p)) > 0) len += got;
  out[len] = 0;
  char rest[4096];
  while (fread(rest, 1, sizeof rest, p) > 0) {
  }
  return pclose(p) == 0;
}

/* Builds the program for the host: a shared library at `built`; the compiler's output in
 * the log. */
static nvrtcResult build_for_host(void) {
  static int n;
  static char text[1 << 24];  // the preprocessed program
  char cpp[4200], cmd[9000];
  const char *tmp = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
  const char *cxx = getenv("CXX") && *getenv("CXX") ? getenv("CXX") : "c++";
  snprintf(built, sizeof built, "%s/lion-emu-%d-%d.so", tmp, (int)getpid(), n);
  snprintf(cpp, sizeof cpp, "%s/lion-emu-%d-%d.cpp", tmp, (int)getpid(), n++);
  FILE *f = fopen(cpp, "w");
  if (!f) return NVRTC_ERROR_COMPILATION;
  fprintf(f, "#define LION_EMU_SCAN\n#include \"%s\"\n%s\n", LION_EMU_HEADER, source);
  fclose(f);
  snprintf(cmd, sizeof cmd, "%s -std=c++17 -E -P -w %s 2>&1", cxx, cpp);
  int ok = run(cmd, text, sizeof text);
  if (ok && (f = fopen(cpp, "w"))) {
    fprintf(f, "#define LION_EMU_RUNTIME\n#include \"%s\"\n%s\n", LION_EMU_HEADER, source);
    write_entries(f, text);
    fclose(f);
    // Misaligned accesses trap, as they fault on a GPU.
    snprintf(cmd, sizeof cmd,
             "%s -std=c++17 -O1 -ffp-contract=off -fsanitize=alignment -fsanitize-undefined-trap-on-error "
             "-fPIC -shared -w -o %s %s 2>&1",
             cxx, built, cpp);
    ok = run(cmd, log_text, sizeof log_text);
  } else {
    snprintf(log_text, sizeof log_text, "preprocessing failed: %.60000s", text);
    ok = 0;
  }
  remove(cpp);
  return ok ? 0 : NVRTC_ERROR_COMPILATION;
}

EXPORT nvrtcResult nvrtcVersion(int *major, int *minor) {
  *major = 13;
  *minor = 0;
  return 0;
}

EXPORT nvrtcResult nvrtcCreateProgram(nvrtcProgram *prog, const char *src, const char *name, int n_headers,
                                      const char *const *headers, const char *const *include_names) {
  (void)name;
  (void)headers;
  (void)include_names;
  if (!src || n_headers) return 1;
  if (run_kernels()) {
    free(source);
    if (!(source = strdup(src))) return 1;
  }
  *prog = &the_program;
  return 0;
}

EXPORT nvrtcResult nvrtcCompileProgram(nvrtcProgram prog, int n_options, const char *const *options) {
  (void)n_options;
  (void)options;
  delay_from("LION_FAKE_NVRTC_COMPILE_DELAY_MS");
  if (prog != &the_program) return 1;
  if (compile_runs_out_of_memory()) return NVRTC_ERROR_OUT_OF_MEMORY;
  return run_kernels() ? build_for_host() : 0;
}

EXPORT nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram prog, size_t *size) {
  (void)prog;
  *size = output_bytes(strlen(log_text) + 1);
  return 0;
}

EXPORT nvrtcResult nvrtcGetProgramLog(nvrtcProgram prog, char *log) {
  (void)prog;
  size_t own = strlen(log_text), size = output_bytes(own + 1);
  memcpy(log, log_text, own);
  memset(log + own, '\n', size - 1 - own);
  log[size - 1] = 0;
  return 0;
}

EXPORT nvrtcResult nvrtcGetCUBINSize(nvrtcProgram prog, size_t *size) {
  (void)prog;
  *size = output_bytes(strlen(image()) + 1);
  return 0;
}

EXPORT nvrtcResult nvrtcGetCUBIN(nvrtcProgram prog, char *out) {
  (void)prog;
  size_t own = strlen(image()) + 1;
  memcpy(out, image(), own);
  memset(out + own, 0, output_bytes(own) - own);
  return 0;
}

EXPORT nvrtcResult nvrtcGetPTXSize(nvrtcProgram prog, size_t *size) { return nvrtcGetCUBINSize(prog, size); }
EXPORT nvrtcResult nvrtcGetPTX(nvrtcProgram prog, char *out) { return nvrtcGetCUBIN(prog, out); }

EXPORT nvrtcResult nvrtcDestroyProgram(nvrtcProgram *prog) {
  *prog = NULL;
  return 0;
}

#endif
