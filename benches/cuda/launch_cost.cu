// What a CUDA step's host time is made of, on the card at hand (issue 11: one lion_step of
// GPT-2 small's 148 tensors in 5 us or less). liblion's own work is 0.27 us against a fake
// driver with everything in cache (tests/cuda_fake.rs); the rest is the driver's.
// This times, with no liblion in the way, the driver calls a step makes and the ones a cheaper
// design would make instead:
// - cuLaunchKernel by the size of the kernel's by-value parameters: 64 B (pointers in a device
//   table), 2432 B (148 tensors' two pointers and a header, sized to the tensors), 3968 B
//   (about liblion's StepArgs, 3976 B: room for 240 tensors);
// - cuCtxPushCurrent + cuCtxPopCurrent around it (liblion's ContextGuard), and cuCtxGetCurrent
//   (what skipping the push when the context is already current would cost);
// - cuStreamIsCapturing (a capture check a device-table design would need);
// - cuMemcpyHtoDAsync of 2.4 KB from pageable memory (updating such a table when pointers change).
// Each on the legacy default stream and on a created non-blocking stream, in rounds of 20 calls,
// the device synchronized before each round so that the queue never fills; rounds alternate
// between "onto an idle card" and "behind a running kernel" (the round starts with a kernel
// that spins for about 2 ms on the same stream, so that its 20 calls queue behind work, as a
// trainer's steps do), so that a drift of the host falls on both: the median of 2000 calls of
// each. examples/cuda_host_time.rs times lion_step behind work, each call paired with a bare
// launch of its parameter block's size.
//
//   nvcc -O2 -o launch_cost benches/cuda/launch_cost.cu -lcuda && ./launch_cost
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                              \
  do {                                                                        \
    CUresult r_ = (x);                                                        \
    if (r_ != CUDA_SUCCESS) {                                                 \
      const char *s_ = nullptr;                                               \
      cuGetErrorString(r_, &s_);                                              \
      std::fprintf(stderr, "%s failed: %s\n", #x, s_ ? s_ : "?");             \
      std::exit(1);                                                           \
    }                                                                         \
  } while (0)

template <int BYTES>
struct Params {
  unsigned long long words[BYTES / 8];
};

// Does nothing the host can see unless words[0] is a magic value (never): the launch is all.
template <int BYTES>
__global__ void __launch_bounds__(256) idle(const __grid_constant__ Params<BYTES> p) {
  if (p.words[0] == 0x5eed && threadIdx.x == 0) *(int *)p.words[1] = (int)p.words[BYTES / 8 - 1];
}

// Spins for `cycles` of the SM's clock: work the timed launches queue behind.
__global__ void spin(long long cycles) {
  long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

struct Medians {
  double idle, busy;  // us: onto an idle card, behind a running kernel
};

static double median_of(std::vector<double> &t) {
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

template <typename F>
static Medians medians_us(CUstream stream, F call) {
  std::vector<double> t[2];  // [idle, busy]
  for (int round = 0; round < 202; round++) {  // the first two discarded
    const int busy = round % 2;
    CHECK(cuCtxSynchronize());
    if (busy) {
      spin<<<1, 1, 0, (cudaStream_t)stream>>>(4000000);  // ~2 ms at 2 GHz
      if (cudaGetLastError() != cudaSuccess) {
        std::fprintf(stderr, "launching the spinning kernel failed\n");
        std::exit(1);
      }
    }
    for (int i = 0; i < 20; i++) {
      auto a = std::chrono::steady_clock::now();
      call();
      auto b = std::chrono::steady_clock::now();
      if (round > 1) t[busy].push_back(std::chrono::duration<double, std::micro>(b - a).count());
    }
  }
  CHECK(cuCtxSynchronize());
  return {median_of(t[0]), median_of(t[1])};
}

template <int BYTES>
static CUfunction function_of() {
  cudaFunction_t f;
  if (cudaGetFuncBySymbol(&f, (const void *)idle<BYTES>) != cudaSuccess) {
    std::fprintf(stderr, "cudaGetFuncBySymbol failed\n");
    std::exit(1);
  }
  return (CUfunction)f;
}

template <int BYTES>
static Medians launch_us(CUstream stream, bool push, CUcontext ctx) {
  static Params<BYTES> p{};
  CUfunction f = function_of<BYTES>();
  void *args[] = {&p};
  return medians_us(stream, [&] {
    if (push) CHECK(cuCtxPushCurrent(ctx));
    CHECK(cuLaunchKernel(f, 128, 1, 1, 256, 1, 1, 0, stream, args, nullptr));
    if (push) {
      CUcontext old;
      CHECK(cuCtxPopCurrent(&old));
    }
  });
}

int main() {
  CHECK(cuInit(0));
  cudaFree(nullptr);  // the runtime's primary context, current on this thread
  CUcontext ctx;
  CHECK(cuCtxGetCurrent(&ctx));
  CUdevice dev;
  CHECK(cuCtxGetDevice(&dev));
  char name[256];
  CHECK(cuDeviceGetName(name, sizeof name, dev));
  int driver = 0;
  CHECK(cuDriverGetVersion(&driver));
  std::printf("%s, driver API %d: host time per call, us (median of 2000)\n\n", name, driver);

  CUstream created;
  CHECK(cuStreamCreate(&created, CU_STREAM_NON_BLOCKING));
  CUdeviceptr table;
  CHECK(cuMemAlloc(&table, 2432));
  std::vector<unsigned char> host(2432, 1);

  std::printf(
      "| call | legacy stream, onto an idle card | legacy, behind a running kernel | created stream, idle | "
      "created, behind |\n|---|---|---|---|---|\n");
  {
    CUstream streams[2] = {nullptr, created};
    auto row = [&](const char *what, auto f) {
      const Medians legacy = f(streams[0]), mine = f(streams[1]);
      std::printf("| %s | %.2f | %.2f | %.2f | %.2f |\n", what, legacy.idle, legacy.busy, mine.idle, mine.busy);
    };
    row("cuLaunchKernel, 64 B of parameters", [&](CUstream st) { return launch_us<64>(st, false, ctx); });
    row("cuLaunchKernel, 2432 B (148 tensors)", [&](CUstream st) { return launch_us<2432>(st, false, ctx); });
    row("cuLaunchKernel, 3968 B (about StepArgs)", [&](CUstream st) { return launch_us<3968>(st, false, ctx); });
    row("push + cuLaunchKernel 64 B + pop", [&](CUstream st) { return launch_us<64>(st, true, ctx); });
    row("push + cuLaunchKernel 3968 B + pop (a step's driver calls)",
        [&](CUstream st) { return launch_us<3968>(st, true, ctx); });
    row("cuCtxPushCurrent + cuCtxPopCurrent", [&](CUstream st) {
      return medians_us(st, [&] {
        CUcontext old;
        CHECK(cuCtxPushCurrent(ctx));
        CHECK(cuCtxPopCurrent(&old));
      });
    });
    row("cuCtxGetCurrent", [&](CUstream st) {
      return medians_us(st, [&] {
        CUcontext cur;
        CHECK(cuCtxGetCurrent(&cur));
      });
    });
    row("cuStreamIsCapturing", [&](CUstream st) {
      return medians_us(st, [&] {
        CUstreamCaptureStatus status;
        CHECK(cuStreamIsCapturing(st, &status));
      });
    });
    row("cuMemcpyHtoDAsync 2432 B, pageable", [&](CUstream st) {
      return medians_us(st, [&] { CHECK(cuMemcpyHtoDAsync(table, host.data(), host.size(), st)); });
    });
  }
  return 0;
}
