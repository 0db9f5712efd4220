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
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

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

enum {
  SUCCESS = 0,
  INVALID_VALUE = 1,
  OUT_OF_MEMORY = 2,
  INVALID_DEVICE = 101,
  INVALID_CONTEXT = 201,
  NOT_FOUND = 500,
};
enum { ATTR_CC_MAJOR = 75, ATTR_CC_MINOR = 76 };
enum { POINTER_MEMORY_TYPE = 2, POINTER_DEVICE_ORDINAL = 9, MEMORYTYPE_DEVICE = 2 };

static char the_context, the_module, the_function;

/* Allocations on this thread of at least this many bytes fail (fake_cuda_fail_allocs_from). */
static _Thread_local size_t fail_from = SIZE_MAX;
/* This thread's context stack (push and pop), deep enough for liblion's nesting. */
static _Thread_local CUcontext stack[64];
static _Thread_local int depth;

/* Test hook: allocations of `bytes` or more on the calling thread fail with
 * CUDA_ERROR_OUT_OF_MEMORY (SIZE_MAX: none). */
EXPORT void fake_cuda_fail_allocs_from(size_t bytes) { fail_from = bytes; }

EXPORT CUresult cuInit(unsigned flags) { return flags == 0 ? SUCCESS : INVALID_VALUE; }

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
  *value = attribute == ATTR_CC_MAJOR ? 9 : 0;
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
  if (depth == 0) depth = 1;
  stack[depth - 1] = ctx;
  return SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(CUcontext *ctx) {
  *ctx = depth ? stack[depth - 1] : NULL;
  return SUCCESS;
}

/* Work "queued" on the device is done at once: every wait returns. */
EXPORT CUresult cuCtxSynchronize(void) { return depth ? SUCCESS : INVALID_CONTEXT; }
EXPORT CUresult cuStreamSynchronize(CUstream stream) {
  (void)stream;
  return SUCCESS;
}

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t bytes) {
  if (!depth) return INVALID_CONTEXT;
  if (bytes >= fail_from) return OUT_OF_MEMORY;
  void *p = calloc(1, bytes ? bytes : 1);
  if (!p) return OUT_OF_MEMORY;
  *ptr = (CUdeviceptr)(uintptr_t)p;
  return SUCCESS;
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr ptr) {
  free((void *)(uintptr_t)ptr);
  return SUCCESS;
}

EXPORT CUresult cuMemsetD8_v2(CUdeviceptr ptr, unsigned char value, size_t n) {
  memset((void *)(uintptr_t)ptr, value, n);
  return SUCCESS;
}

EXPORT CUresult cuMemsetD8Async(CUdeviceptr ptr, unsigned char value, size_t n, CUstream stream) {
  (void)stream;
  return cuMemsetD8_v2(ptr, value, n);
}

EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
  memcpy((void *)(uintptr_t)dst, src, n);
  return SUCCESS;
}

EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
  memcpy(dst, (const void *)(uintptr_t)src, n);
  return SUCCESS;
}

/* Every non-NULL address is device memory of device 0. */
EXPORT CUresult cuPointerGetAttribute(void *data, int attribute, CUdeviceptr ptr) {
  if (!ptr) return INVALID_VALUE;
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
    *module = built;
    return SUCCESS;
  }
  *module = &the_module;
  return SUCCESS;
}

typedef void (*emu_entry)(void **params, unsigned grid, unsigned block);
struct emu_function {
  emu_entry run;
};

EXPORT CUresult cuModuleGetFunction(CUfunction *f, CUmodule module, const char *name) {
  if (!name) return INVALID_VALUE;
  if (run_kernels()) {
    char symbol[256];
    snprintf(symbol, sizeof symbol, "emu_%s", name);
    void *entry = dlsym(module, symbol);
    struct emu_function *function = entry ? malloc(sizeof *function) : NULL;
    if (!function) return NOT_FOUND;
    memcpy(&function->run, &entry, sizeof entry);  // (ISO C casts no object pointer to a function one)
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

/* Kernels do nothing, or run to their end here (run mode); the launch checks what a real one
 * would refuse outright. Streams are one: everything is done when the call returns. */
EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared, CUstream stream, void **params, void **extra) {
  (void)stream;
  (void)shared;
  if (!f || !gx || !gy || !gz || !bx || !by || !bz || bx * by * bz > 1024) return INVALID_VALUE;
  if (!run_kernels() && f != &the_function) return INVALID_VALUE;
  if (!params && !extra) return INVALID_VALUE;
  if (!depth) return INVALID_CONTEXT;
  if (run_kernels()) {
    if (!params || gy != 1 || gz != 1 || by != 1 || bz != 1) return INVALID_VALUE;
    ((struct emu_function *)f)->run(params, gx, bx);
  }
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
enum { NVRTC_ERROR_COMPILATION = 6 };

static const char *image(void) { return run_kernels() ? built : fake_image; }

/* Writes `emu_<name>` entries for every `__global__` function of `src` to `out`. */
static void write_entries(FILE *out, const char *src) {
  for (const char *at = strstr(src, "__global__"); at; at = strstr(at + 1, "__global__")) {
    const char *open = strchr(at, '(');
    // Past __launch_bounds__(...): the kernel's name ends at the next '('.
    if (open && strncmp(open - strlen("__launch_bounds__"), "__launch_bounds__", 17) == 0)
      open = strchr(strchr(open, ')'), '(');
    if (!open) return;
    const char *end = open;
    while (end > at && (end[-1] == ' ')) end--;
    const char *name = end;
    while (name > at && (name[-1] == '_' || (name[-1] >= 'a' && name[-1] <= 'z') ||
                         (name[-1] >= 'A' && name[-1] <= 'Z') || (name[-1] >= '0' && name[-1] <= '9')))
      name--;
    fprintf(out, "EMU_KERNEL(%.*s)\n", (int)(end - name), name);
  }
}

/* Builds the program for the host: a shared library at `built`; the compiler's output in
 * the log. */
static nvrtcResult build_for_host(void) {
  static int n;
  char cpp[4200], cmd[9000];
  snprintf(built, sizeof built, "/tmp/lion-emu-%d-%d.so", (int)getpid(), n);
  snprintf(cpp, sizeof cpp, "/tmp/lion-emu-%d-%d.cpp", (int)getpid(), n++);
  FILE *f = fopen(cpp, "w");
  if (!f) return NVRTC_ERROR_COMPILATION;
  fprintf(f, "#define LION_EMU_RUNTIME\n#include \"%s\"\n%s\n", LION_EMU_HEADER, source);
  write_entries(f, source);
  fclose(f);
  snprintf(cmd, sizeof cmd, "c++ -std=c++17 -O1 -ffp-contract=off -fPIC -shared -w -o %s %s 2>&1", built, cpp);
  FILE *p = popen(cmd, "r");
  if (!p) return NVRTC_ERROR_COMPILATION;
  size_t len = fread(log_text, 1, sizeof log_text - 1, p);
  log_text[len] = 0;
  int status = pclose(p);
  remove(cpp);
  return status == 0 ? 0 : NVRTC_ERROR_COMPILATION;
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
  if (prog != &the_program) return 1;
  return run_kernels() ? build_for_host() : 0;
}

EXPORT nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram prog, size_t *size) {
  (void)prog;
  *size = strlen(log_text) + 1;
  return 0;
}

EXPORT nvrtcResult nvrtcGetProgramLog(nvrtcProgram prog, char *log) {
  (void)prog;
  memcpy(log, log_text, strlen(log_text) + 1);
  return 0;
}

EXPORT nvrtcResult nvrtcGetCUBINSize(nvrtcProgram prog, size_t *size) {
  (void)prog;
  *size = strlen(image()) + 1;
  return 0;
}

EXPORT nvrtcResult nvrtcGetCUBIN(nvrtcProgram prog, char *out) {
  (void)prog;
  memcpy(out, image(), strlen(image()) + 1);
  return 0;
}

EXPORT nvrtcResult nvrtcGetPTXSize(nvrtcProgram prog, size_t *size) { return nvrtcGetCUBINSize(prog, size); }
EXPORT nvrtcResult nvrtcGetPTX(nvrtcProgram prog, char *out) { return nvrtcGetCUBIN(prog, out); }

EXPORT nvrtcResult nvrtcDestroyProgram(nvrtcProgram *prog) {
  *prog = NULL;
  return 0;
}

#endif
