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

#include <type_traits>

#define __device__
#ifdef LION_EMU_SCAN /* the fake NVRTC finds the kernels' names in the preprocessed text */
#define __global__ emu_global_marker
#else
#define __global__
#endif
#define __forceinline__ inline
#define __launch_bounds__(...)
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
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) ulonglong2 {
  unsigned long long x, y;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
/* Byte n of the result is byte (selector nibble n & 7) of y:x (x the low four bytes); the
 * hardware's sign-replicating selectors (nibble bit 3) are not emulated. */
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  if (s & 0x8888u) __builtin_trap();
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
/* The emulator's waits (below): the whole block, or one warp exchanging a value at one
 * place in the code (`site`: its line). Only full-warp shuffles of 32-bit unsigned values
 * are emulated; another type fails to compile, another mask stops the program. */
void emu_sync_block();
void *emu_dynamic_shared(size_t bytes);  // `extern __shared__` (lion.cu's q8 ring)
unsigned emu_shuffle(unsigned v, unsigned from_lane, unsigned mask, int site);
inline void __syncthreads() { emu_sync_block(); }
template <class T>
inline unsigned emu_shfl_xor(unsigned mask, T v, int lane_mask, int site) {
  static_assert(std::is_same<T, unsigned>::value, "emu_cuda.h shuffles only unsigned values");
  return emu_shuffle(v, (threadIdx.x & 31) ^ (unsigned)lane_mask, mask, site);
}
template <class T>
inline unsigned emu_shfl_down(unsigned mask, T v, int delta, int site) {
  static_assert(std::is_same<T, unsigned>::value, "emu_cuda.h shuffles only unsigned values");
  const unsigned lane = (threadIdx.x & 31) + (unsigned)delta;
  return emu_shuffle(v, lane < 32 ? lane : threadIdx.x & 31, mask, site);
}
#define __shfl_xor_sync(mask, v, lane_mask) emu_shfl_xor((mask), (v), (lane_mask), __LINE__)
#define __shfl_down_sync(mask, v, delta) emu_shfl_down((mask), (v), (delta), __LINE__)

#ifdef LION_EMU_RUNTIME
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>
#include <xmmintrin.h>

#include <vector>

thread_local Dim3 threadIdx, blockIdx, gridDim, blockDim;
void emu_block_end();  // checks after each block (cp.async's, below)

// Per host thread: ranks of the distributed tests launch from threads of their own.
namespace emu {
enum State { RUNNING, AT_BLOCK, AT_WARP, DONE };
const unsigned MAX_THREADS = 1024;
const size_t STACK_BYTES = 128 * 1024;

struct Fiber {
  ucontext_t context;
  State state;
  int site;  // where it waits at a shuffle
};
static thread_local Fiber fibers[MAX_THREADS];
static thread_local unsigned lanes[MAX_THREADS];  // what each thread offers in a shuffle
// Freed when the host thread ends (ranks of the distributed tests are threads).
struct Stacks {
  char *memory = nullptr;
  ~Stacks() { free(memory); }
};
static thread_local Stacks stacks;
static thread_local ucontext_t scheduler;
static thread_local unsigned current;
static thread_local void (*body)();
// The launch's dynamic shared memory (`extern __shared__` on a GPU), garbage at each block's start.
static thread_local unsigned dynamic_bytes;
static thread_local std::vector<unsigned char> dynamic_shared;

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
static void run(void (*kernel)(), unsigned grid, unsigned block, unsigned shared) {
  if (block == 0 || block > MAX_THREADS) {
    fprintf(stderr, "emu_cuda: %u threads per block\n", block);
    abort();
  }
  if (!stacks.memory && !(stacks.memory = (char *)malloc(MAX_THREADS * STACK_BYTES))) abort();
  // The kernels' arithmetic as a GPU's: no flush of subnormals, whatever the caller set.
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr & ~0x8040u);
  body = kernel;
  gridDim = Dim3{grid, 1, 1};
  blockDim = Dim3{block, 1, 1};
  dynamic_bytes = shared;
  dynamic_shared.resize(shared);
  for (unsigned b = 0; b < grid; b++) {
    blockIdx = Dim3{b, 0, 0};
    if (shared) memset(dynamic_shared.data(), 0xA5, shared);
    for (unsigned t = 0; t < block; t++) {
      getcontext(&fibers[t].context);
      fibers[t].context.uc_stack.ss_sp = stacks.memory + t * STACK_BYTES;
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
        bool all = true, any = false, ended = false;
        for (unsigned t = w; t < w + 32 && t < block; t++) {
          if (fibers[t].state == DONE) {
            ended = true;
            continue;
          }
          any = true;
          all = all && fibers[t].state == AT_WARP;
        }
        live = live || any;
        if (any && all) {
          // A full-mask shuffle needs all 32 lanes, at the same place.
          for (unsigned t = w; t < w + 32; t++) {
            if (ended || t >= block || fibers[t].site != fibers[w].site) {
              fprintf(stderr, "emu_cuda: block %u, warp %u: a shuffle without all of its lanes at line %d\n", b,
                      w / 32, fibers[w].site);
              abort();
            }
          }
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
    emu_block_end();
  }
  _mm_setcsr(csr);
}

/* A kernel of one by-value argument, as lion.cu's are, launched with cuLaunchKernel's
 * parameter array. */
template <class A>
void launch(void (*kernel)(A), void **params, unsigned grid, unsigned block, unsigned shared) {
  static thread_local void (*k)(A);
  static thread_local const void *arg;
  k = kernel;
  arg = params[0];
  run([] { k(*(const typename std::decay<A>::type *)arg); }, grid, block, shared);
}
}  // namespace emu

/* The block's dynamic shared memory, of which the kernel uses `bytes`: more than the launch
 * gave stops the program (a GPU would fail the launch or read past it). */
void *emu_dynamic_shared(size_t bytes) {
  if (bytes > emu::dynamic_bytes) {
    fprintf(stderr, "emu_cuda: %zu bytes of dynamic shared memory used, %u launched\n", bytes, emu::dynamic_bytes);
    abort();
  }
  void *at = emu::dynamic_shared.data();
  if ((uintptr_t)at % 16) abort();  // a GPU's is aligned for uint4 (lion.cu's Q8Slot)
  return at;
}

void emu_sync_block() { emu::wait(emu::AT_BLOCK); }

unsigned emu_shuffle(unsigned v, unsigned from_lane, unsigned mask, int site) {
  const unsigned me = emu::current, from = (me & ~31u) + from_lane;
  if (mask != 0xffffffffu) {
    fprintf(stderr, "emu_cuda: a shuffle with mask %#x at line %d (only full warps are emulated)\n", mask, site);
    abort();
  }
  emu::lanes[me] = v;
  emu::fibers[me].site = site;
  emu::wait(emu::AT_WARP);  // every lane has offered its value
  const unsigned r = emu::lanes[from];
  emu::wait(emu::AT_WARP);  // every lane has read before the next shuffle overwrites
  return r;
}

/* Set by tests/c/fake_cuda.c when it loads the kernels (null: nothing to check against):
 * whether an address lies in memory it allocated. lion.cu's L2 prefetches go through
 * emu_prefetch_l2, so a prefetch outside device memory fails the test. */
extern "C" int (*emu_device_memory)(uintptr_t at);
int (*emu_device_memory)(uintptr_t at) = nullptr;
inline void emu_prefetch_l2(const void *at) {
  if (emu_device_memory && !emu_device_memory((uintptr_t)at)) {
    fprintf(stderr, "emu_cuda: an L2 prefetch of %p, outside device memory\n", at);
    abort();
  }
}

/* cp.async (lion.cu's q8 ring) as the hardware may do it: from its issue until a
 * cp.async.wait_group retires its commit group, the destination holds garbage, and the copy
 * lands only at that wait. So a wrong wait count, a missing commit, or a slot refilled
 * before its last read gives wrong bits; a copy still pending at the end of a block, a
 * misaligned one, or one from outside device memory stops the program. Each thread's
 * copies and groups are its own (the hardware's too: a wait orders only the thread's own). */
namespace emu {
struct Copy {
  void *to;
  const void *from;
  unsigned bytes, group;
};
static thread_local std::vector<Copy> copies[MAX_THREADS];
static thread_local unsigned groups[MAX_THREADS];  // commit groups so far, per thread
}  // namespace emu
inline void emu_cp_async(void *to, const void *from, unsigned bytes) {
  const unsigned me = emu::current;
  if (((uintptr_t)to | (uintptr_t)from) % bytes) {
    fprintf(stderr, "emu_cuda: a cp.async of %u bytes, misaligned (%p to %p)\n", bytes, from, to);
    abort();
  }
  if (emu_device_memory && !emu_device_memory((uintptr_t)from)) {
    fprintf(stderr, "emu_cuda: a cp.async from %p, outside device memory\n", from);
    abort();
  }
  memset(to, 0xA5, bytes);
  emu::copies[me].push_back(emu::Copy{to, from, bytes, emu::groups[me]});
}
inline void emu_cp_commit() { emu::groups[emu::current]++; }
inline void emu_cp_wait(int pending) {
  const unsigned me = emu::current;
  std::vector<emu::Copy> left;
  for (const emu::Copy &c : emu::copies[me]) {
    if (c.group >= emu::groups[me]) {
      fprintf(stderr, "emu_cuda: a cp.async not committed at a wait\n");
      abort();
    }
    if (c.group + (unsigned)pending < emu::groups[me]) {
      memcpy(c.to, c.from, c.bytes);
    } else {
      left.push_back(c);
    }
  }
  emu::copies[me].swap(left);
}
/* After each block: no copy may still be on its way (empty groups may). */
void emu_block_end() {
  for (unsigned t = 0; t < emu::MAX_THREADS; t++) {
    if (!emu::copies[t].empty()) {
      fprintf(stderr, "emu_cuda: thread %u ended its block with a cp.async pending\n", t);
      abort();
    }
    emu::groups[t] = 0;
  }
}
template <class A>
size_t emu_arg_bytes(void (*)(A)) {
  return sizeof(typename std::decay<A>::type);
}

/* cuLaunchKernel's entry for kernel `name`, and the size of its argument (tests/c/fake_cuda.c
 * looks up emu_<name> and emu_size_<name>). */
#define EMU_KERNEL(name)                                                                     \
  extern "C" void emu_##name(void **params, unsigned grid, unsigned block, unsigned shared) { \
    emu::launch(name, params, grid, block, shared);                                          \
  }                                                                                          \
  extern "C" size_t emu_size_##name(void) { return emu_arg_bytes(name); }
#endif
