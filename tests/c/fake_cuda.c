/* A fake CUDA driver (libcuda.so.1) and, built with -DFAKE_NVRTC, a fake NVRTC (libnvrtc.so):
 * the entry points liblion calls, acting as one device whose memory is host memory and whose
 * kernels do nothing. tests/cuda_fake.rs runs the CUDA engine's host side against them on
 * machines without a GPU: creation, distributed creation's check, refusals, running out of
 * device memory. Nothing numeric can be checked here (tests/cuda.rs and tests/cuda_dist.rs
 * run the real kernels).
 *
 * Only what liblion uses is here, with the signatures of cuda.h and nvrtc.h (CUDA 12/13):
 * cudarc resolves each function by name when it is first called. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

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

EXPORT CUresult cuModuleLoadData(CUmodule *module, const void *image) {
  if (!image) return INVALID_VALUE;
  *module = &the_module;
  return SUCCESS;
}

EXPORT CUresult cuModuleGetFunction(CUfunction *f, CUmodule module, const char *name) {
  if (module != &the_module || !name) return INVALID_VALUE;
  *f = &the_function;
  return SUCCESS;
}

EXPORT CUresult cuModuleUnload(CUmodule module) { return module == &the_module ? SUCCESS : INVALID_VALUE; }

/* Kernels do nothing; the launch checks what a real one would refuse outright. */
EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared, CUstream stream, void **params, void **extra) {
  (void)stream;
  (void)shared;
  (void)params;
  if (f != &the_function || !gx || !gy || !gz || !bx || !by || !bz || bx * by * bz > 1024) return INVALID_VALUE;
  if (!params && !extra) return INVALID_VALUE;
  return depth ? SUCCESS : INVALID_CONTEXT;
}

EXPORT CUresult cuGetErrorName(CUresult code, const char **name) {
  *name = code == OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY" : "CUDA_ERROR_FAKE";
  return SUCCESS;
}

#else /* FAKE_NVRTC: compiling "succeeds" with an image the fake driver takes */

typedef int nvrtcResult;
typedef void *nvrtcProgram;
static char the_program;
static const char image[] = "fake cubin";

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
  *prog = &the_program;
  return 0;
}

EXPORT nvrtcResult nvrtcCompileProgram(nvrtcProgram prog, int n_options, const char *const *options) {
  (void)n_options;
  (void)options;
  return prog == &the_program ? 0 : 1;
}

EXPORT nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram prog, size_t *size) {
  (void)prog;
  *size = 1;
  return 0;
}

EXPORT nvrtcResult nvrtcGetProgramLog(nvrtcProgram prog, char *log) {
  (void)prog;
  log[0] = 0;
  return 0;
}

EXPORT nvrtcResult nvrtcGetCUBINSize(nvrtcProgram prog, size_t *size) {
  (void)prog;
  *size = sizeof image;
  return 0;
}

EXPORT nvrtcResult nvrtcGetCUBIN(nvrtcProgram prog, char *out) {
  (void)prog;
  memcpy(out, image, sizeof image);
  return 0;
}

EXPORT nvrtcResult nvrtcGetPTXSize(nvrtcProgram prog, size_t *size) { return nvrtcGetCUBINSize(prog, size); }
EXPORT nvrtcResult nvrtcGetPTX(nvrtcProgram prog, char *out) { return nvrtcGetCUBIN(prog, out); }

EXPORT nvrtcResult nvrtcDestroyProgram(nvrtcProgram *prog) {
  *prog = NULL;
  return 0;
}

#endif
