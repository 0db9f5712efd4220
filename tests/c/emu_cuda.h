/* CUDA for the host's C++ compiler: the keywords and the intrinsics lion.cu uses, so that
 * the host reads the kernels (src/cuda/prelude.rs tests: syntax only) and, with
 * LION_EMU_RUNTIME defined, runs them on the CPU (src/cuda/on_host.rs; the fake driver
 * tests/c/fake_cuda.c under LION_FAKE_CUDA_RUN=1: scripts/cuda_on_cpu.sh).
 *
 * The emulator runs a launch block by block, and a block's threads one after another, each
 * as a fiber (ucontext) that runs until it ends or waits: at __syncthreads for the whole
 * block, at a shuffle for its warp. So it runs the CUDA C as written, with the host's IEEE
 * f32 arithmetic (built with -ffp-contract=off, as NVRTC is given --fmad=false); not what
 * NVRTC makes of it, and not the hardware's scheduling: a data race that a GPU would show
 * stays hidden here. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define __device__
#ifdef LION_EMU_SCAN /* the fake NVRTC finds the kernels' names in the preprocessed text */
#define __global__ emu_global_marker
#else
#define __global__
#endif
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __grid_constant__
#define __shared__ static thread_local
struct Dim3 {
  unsigned x, y, z;
};
extern thread_local Dim3 threadIdx, blockIdx, gridDim, blockDim;
inline float __uint_as_float(unsigned x) {
  float f;
  memcpy(&f, &x, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  memcpy(&x, &f, 4);
  return x;
}
struct float4 {
  float x, y, z, w;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
/* Byte n of the result is byte (selector nibble n & 7) of y:x (x the low four bytes). */
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long both = (unsigned long long)y << 32 | x;
  unsigned r = 0;
  for (int n = 0; n < 4; n++) r |= (unsigned)((both >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
  return r;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline int __float2int_rz(float x) { return (int)x; }
/* One thread at a time: a plain read-modify-write is atomic here. */
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
  unsigned long long o = *p;
  *p += v;
  return o;
}
inline void __threadfence() {}
/* The emulator's waits (below): the whole block, or one warp exchanging a value. */
void emu_sync_block();
unsigned emu_shuffle(unsigned v, unsigned from_lane);
inline void __syncthreads() { emu_sync_block(); }
inline unsigned __shfl_xor_sync(unsigned, unsigned v, int lane_mask) {
  return emu_shuffle(v, (threadIdx.x & 31) ^ (unsigned)lane_mask);
}
inline unsigned __shfl_down_sync(unsigned, unsigned v, int delta) {
  const unsigned lane = (threadIdx.x & 31) + (unsigned)delta;
  return emu_shuffle(v, lane < 32 ? lane : threadIdx.x & 31);
}

#ifdef LION_EMU_RUNTIME
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>

#include <type_traits>

thread_local Dim3 threadIdx, blockIdx, gridDim, blockDim;

// Per host thread: ranks of the distributed tests launch from threads of their own.
namespace emu {
enum State { RUNNING, AT_BLOCK, AT_WARP, DONE };
const unsigned MAX_THREADS = 1024;
const size_t STACK_BYTES = 128 * 1024;

struct Fiber {
  ucontext_t context;
  State state;
};
static thread_local Fiber fibers[MAX_THREADS];
static thread_local unsigned lanes[MAX_THREADS];  // what each thread offers in a shuffle
static thread_local char *stacks;
static thread_local ucontext_t scheduler;
static thread_local unsigned current;
static thread_local void (*body)();

static void wait(State state) {
  fibers[current].state = state;
  swapcontext(&fibers[current].context, &scheduler);
}

static void entry() {
  body();
  fibers[current].state = DONE;
  swapcontext(&fibers[current].context, &scheduler);
}

/* Runs `kernel` on every thread of every block. */
static void run(void (*kernel)(), unsigned grid, unsigned block) {
  if (block == 0 || block > MAX_THREADS) {
    fprintf(stderr, "emu_cuda: %u threads per block\n", block);
    abort();
  }
  if (!stacks && !(stacks = (char *)malloc(MAX_THREADS * STACK_BYTES))) abort();
  body = kernel;
  gridDim = Dim3{grid, 1, 1};
  blockDim = Dim3{block, 1, 1};
  for (unsigned b = 0; b < grid; b++) {
    blockIdx = Dim3{b, 0, 0};
    for (unsigned t = 0; t < block; t++) {
      getcontext(&fibers[t].context);
      fibers[t].context.uc_stack.ss_sp = stacks + t * STACK_BYTES;
      fibers[t].context.uc_stack.ss_size = STACK_BYTES;
      fibers[t].context.uc_link = NULL;
      makecontext(&fibers[t].context, entry, 0);
      fibers[t].state = RUNNING;
    }
    for (;;) {
      for (unsigned t = 0; t < block; t++) {
        if (fibers[t].state != RUNNING) continue;
        current = t;
        threadIdx = Dim3{t, 0, 0};
        swapcontext(&scheduler, &fibers[t].context);
      }
      // Every thread has ended or waits: release the warps whose live threads all wait at
      // a shuffle, else the block if all of its live threads wait at __syncthreads.
      bool released = false, live = false;
      for (unsigned w = 0; w < block; w += 32) {
        bool all = true, any = false;
        for (unsigned t = w; t < w + 32 && t < block; t++) {
          if (fibers[t].state == DONE) continue;
          any = true;
          all = all && fibers[t].state == AT_WARP;
        }
        live = live || any;
        if (any && all) {
          for (unsigned t = w; t < w + 32 && t < block; t++)
            if (fibers[t].state == AT_WARP) fibers[t].state = RUNNING;
          released = true;
        }
      }
      if (!live) break;
      if (released) continue;
      bool all = true;
      for (unsigned t = 0; t < block; t++) all = all && (fibers[t].state == DONE || fibers[t].state == AT_BLOCK);
      if (!all) {
        fprintf(stderr, "emu_cuda: block %u cannot go on (threads wait at different barriers)\n", b);
        abort();
      }
      for (unsigned t = 0; t < block; t++)
        if (fibers[t].state == AT_BLOCK) fibers[t].state = RUNNING;
    }
  }
}

/* A kernel of one by-value argument, as lion.cu's are, launched with cuLaunchKernel's
 * parameter array. */
template <class A>
void launch(void (*kernel)(A), void **params, unsigned grid, unsigned block) {
  static thread_local void (*k)(A);
  static thread_local const void *arg;
  k = kernel;
  arg = params[0];
  run([] { k(*(const typename std::decay<A>::type *)arg); }, grid, block);
}
}  // namespace emu

void emu_sync_block() { emu::wait(emu::AT_BLOCK); }

unsigned emu_shuffle(unsigned v, unsigned from_lane) {
  const unsigned me = emu::current, from = (me & ~31u) + from_lane;
  emu::lanes[me] = v;
  emu::wait(emu::AT_WARP);  // every lane has offered its value
  const unsigned r = emu::lanes[from];
  emu::wait(emu::AT_WARP);  // every lane has read before the next shuffle overwrites
  return r;
}

template <class A>
size_t emu_arg_bytes(void (*)(A)) {
  return sizeof(typename std::decay<A>::type);
}

/* cuLaunchKernel's entry for kernel `name`, and the size of its argument (tests/c/fake_cuda.c
 * looks up emu_<name> and emu_size_<name>). */
#define EMU_KERNEL(name)                                                     \
  extern "C" void emu_##name(void **params, unsigned grid, unsigned block) { \
    emu::launch(name, params, grid, block);                                  \
  }                                                                          \
  extern "C" size_t emu_size_##name(void) { return emu_arg_bytes(name); }
#endif
