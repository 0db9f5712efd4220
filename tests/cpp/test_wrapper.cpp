// The C++ wrapper (bindings/cpp/lion.hpp): steps, lr, checkpoints, moves and errors, 8-bit
// momentum; a
// distributed optimizer of one rank; lion::nccl_unique_id's errors.
// Built and run by tests/c_api.rs with -std=c++17 -Wall -Wextra -Werror -pedantic.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "lion.hpp"
#include "comm_size.h"

static int passed = 0, failed = 0;
#define CHECK(cond)                                                                    \
  do {                                                                                 \
    if (cond) {                                                                        \
      passed++;                                                                        \
    } else {                                                                           \
      failed++;                                                                        \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);    \
    }                                                                                  \
  } while (0)

static_assert(!std::is_copy_constructible<lion::Optimizer>::value, "move-only");
static_assert(std::is_nothrow_move_constructible<lion::Optimizer>::value, "nothrow move");
static_assert(std::is_nothrow_move_assignable<lion::Optimizer>::value, "nothrow move assignment");
static_assert(std::is_base_of<std::runtime_error, lion::Error>::value, "lion::Error is a runtime_error");
static_assert(std::is_same<decltype(lion::nccl_unique_id()), std::array<uint8_t, 128>>::value,
              "an ncclUniqueId is 128 bytes");

// Every collective of a group of one rank: the result is this rank's own data. The context
// counts the calls.
static int32_t one_rank(void *context, const void *send, void *recv, size_t count, LionCommDType dtype,
                        void *stream) {
  (void)stream;
  ++*static_cast<int *>(context);
  std::memcpy(recv, send, count * comm_size(dtype));
  return 0;
}

// While set, an allocation of this many bytes or more fails (std::bad_alloc): a rank out of
// memory for a checkpoint's bytes.
static size_t fail_from = 0;
void *operator new(size_t size) {
  if (fail_from != 0 && size >= fail_from) throw std::bad_alloc();
  if (void *p = std::malloc(size ? size : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void *p) noexcept { std::free(p); }
void operator delete(void *p, size_t) noexcept { std::free(p); }

static bool mentions(const lion::Error &e, const char *word) {
  return std::string(e.what()).find(word) != std::string::npos;
}

int main() {
  LionConfig config = lion_config_default();
  config.lr = 0.5f;
  std::vector<LionTensorDesc> tensors = {lion_tensor_desc(3, LION_DTYPE_F32), lion_tensor_desc(2, LION_DTYPE_F32)};
  std::vector<float> w = {1.0f, -1.0f, 0.25f}, b = {0.0f, 2.0f};
  std::vector<float> gw = {1.0f, -1.0f, 0.0f}, gb = {-3.0f, 3.0f};
  std::vector<void *> params = {w.data(), b.data()};
  std::vector<const void *> grads = {gw.data(), gb.data()};

  lion::Optimizer opt(config, tensors);
  opt.step(params, grads);
  CHECK(w[0] == 0.5f && w[1] == -0.5f && w[2] == 0.25f);
  CHECK(b[0] == 0.5f && b[1] == 1.5f);
  CHECK(opt.step_count() == 1);
  opt.set_lr(0.25f);
  CHECK(opt.lr() == 0.25f);

  std::vector<uint8_t> blob = opt.save();
  lion::Optimizer other(config, tensors);
  other.load(blob);
  CHECK(other.step_count() == 1 && other.lr() == 0.25f);

  // Moves carry the handle; the moved-from object is empty and safe to destroy.
  lion::Optimizer moved(std::move(other));
  CHECK(moved.get() != nullptr && other.get() == nullptr);
  CHECK(moved.save() == blob);
  other = std::move(moved);
  CHECK(other.get() != nullptr && moved.get() == nullptr);

  // Errors carry the status and the library's message.
  try {
    opt.set_lr(NAN);
    CHECK(false);
  } catch (const lion::Error &e) {
    CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT);
    CHECK(std::string(e.what()).find("lr") != std::string::npos);
  }
  try {
    std::vector<uint8_t> bad = blob;
    bad[bad.size() / 2] ^= 1;
    opt.load(bad);
    CHECK(false);
  } catch (const lion::Error &e) {
    CHECK(e.status() == LION_ERROR_CORRUPT_STATE);
  }
  try {
    config.beta1 = 7.0f;
    lion::Optimizer broken(config, tensors);
    CHECK(false);
  } catch (const lion::Error &e) {
    CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT);
    CHECK(std::string(e.what()).find("beta1") != std::string::npos);
  }
  try {
    opt.step(params, {gw.data()});
    CHECK(false);
  } catch (const lion::Error &e) {
    CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT);
  }
  // 8-bit momentum (LION_DTYPE_Q8): a tensor of 4096 elements or more is quantized (4096
  // codes, 16 scales), a small one keeps f32; the blob loads into f32 state.
  {
    LionConfig q8 = lion_config_default();
    q8.state_dtype = LION_DTYPE_Q8;
    std::vector<LionTensorDesc> big = {lion_tensor_desc(4096, LION_DTYPE_F32), lion_tensor_desc(3, LION_DTYPE_F32)};
    std::vector<float> p1(4096, 0.5f), g1(4096), p2(3, 1.0f), g2 = {1.0f, -1.0f, 0.0f};
    for (size_t i = 0; i < g1.size(); i++) g1[i] = (float)((int)(i % 7) - 3);
    lion::Optimizer q(q8, big);
    q.step({p1.data(), p2.data()}, {g1.data(), g2.data()});
    std::vector<uint8_t> qb = q.save();
    CHECK(qb.size() == 88 + 24 * 2 + 4096 + 16 * 4 + 3 * 4 + 16);
    LionConfig f32 = q8;
    f32.state_dtype = LION_DTYPE_F32;
    lion::Optimizer back(f32, big);
    back.load(qb);
    CHECK(back.step_count() == 1);
    try {
      std::vector<LionTensorDesc> bad = {lion_tensor_desc(10, LION_DTYPE_Q8)};
      lion::Optimizer refused(config, bad);
      CHECK(false);
    } catch (const lion::Error &e) {
      CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT);
    }
  }

  LionStepOptions o = lion_step_options_default();
  float skip = 1.0f;
  o.found_inf = &skip;
  opt.step(params, grads, o);
  CHECK(opt.step_count() == 1);
  // The same by pointers and a count (found_inf set: skipped, the count stays).
  opt.step(params.data(), grads.data(), params.size(), o);
  CHECK(opt.step_count() == 1);
  CHECK(!lion::version().empty());

  // A distributed optimizer of one rank, over collectives that copy, steps as one process
  // does, in both modes; the factory and the constructor make the same thing.
  int calls = 0;
  LionCollectives one{};
  one.struct_size = sizeof one;
  one.context = &calls;
  one.all_reduce_sum = one.reduce_scatter_sum = one.all_gather = one_rank;
  LionDistConfig dist = lion_dist_config_default();
  dist.collectives = &one;
  LionConfig plain = lion_config_default();
  plain.lr = 0.5f;
  for (LionDistMode mode : {LION_DIST_SHARDED, LION_DIST_VOTE}) {
    dist.mode = mode;
    std::vector<float> w1 = {1.0f, -1.0f, 0.25f}, b1 = {0.0f, 2.0f};
    std::vector<void *> p1 = {w1.data(), b1.data()};
    lion::Optimizer d = mode == LION_DIST_SHARDED ? lion::Optimizer::distributed(plain, tensors, dist)
                                                  : lion::Optimizer(plain, tensors, dist);
    d.step(p1, grads);
    CHECK((w1 == std::vector<float>{0.5f, -0.5f, 0.25f}));
    CHECK((b1 == std::vector<float>{0.5f, 1.5f}));
    CHECK(d.step_count() == 1);
    lion::Optimizer single(plain, tensors);
    single.load(d.save());
    CHECK(single.step_count() == 1);
    // No memory for the bytes: a sharded save still takes part in its gather (the other
    // ranks wait in it), then throws the allocation's failure.
    int before = calls;
    fail_from = 32;
    try {
      (void)d.save();
      CHECK(false);
    } catch (const std::bad_alloc &) {
      CHECK(mode == LION_DIST_VOTE || calls > before);
    }
    fail_from = 0;
  }
  CHECK(calls > 0);

  // Bad distributed configs throw with the library's status and message.
  dist.mode = LION_DIST_SHARDED;
  try {
    LionDistConfig bad = dist;
    bad.world_size = 0;
    lion::Optimizer::distributed(plain, tensors, bad);
    CHECK(false);
  } catch (const lion::Error &e) {
    CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT);
    CHECK(mentions(e, "world_size"));
    CHECK(mentions(e, "lion_create_distributed"));
  }
  try {
    LionDistConfig bad = dist;
    bad.collectives = nullptr;  // no transport
    lion::Optimizer::distributed(plain, tensors, bad);
    CHECK(false);
  } catch (const lion::Error &e) {
    CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT);
    CHECK(mentions(e, "transport"));
  }
  try {
    LionDistConfig bad = dist;
    bad.mode = 7;
    lion::Optimizer broken(plain, tensors, bad);
    CHECK(false);
  } catch (const lion::Error &e) {
    CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT);
    CHECK(mentions(e, "mode"));
  }
  try {
    // A CUDA rank: made where there is a GPU (tests/cuda_dist.rs steps such ranks), refused
    // with DEVICE_UNAVAILABLE where there is none.
    LionConfig cuda = plain;
    cuda.device = LION_DEVICE_CUDA;
    lion::Optimizer::distributed(cuda, tensors, dist);
  } catch (const lion::Error &e) {
    CHECK(e.status() == LION_ERROR_DEVICE_UNAVAILABLE);
  }

  // lion::nccl_unique_id: an id where NCCL is, DEVICE_UNAVAILABLE where it is not.
  try {
    lion::nccl_unique_id("/nonexistent/libnccl.so.2");
    CHECK(false);
  } catch (const lion::Error &e) {
    CHECK(e.status() == LION_ERROR_DEVICE_UNAVAILABLE);
    CHECK(mentions(e, "/nonexistent/libnccl.so.2"));
  }
  // Some tensors at a time: a round over every tensor is one step, in any order.
  {
    LionConfig fresh = lion_config_default();
    fresh.lr = 0.5f;
    std::vector<float> w2 = {1.0f, -1.0f, 0.25f}, b2 = {0.0f, 2.0f};
    w = w2;
    b = b2;
    lion::Optimizer whole(fresh, tensors), rounds(fresh, tensors);
    for (int s = 0; s < 2; s++) whole.step({w.data(), b.data()}, grads);
    for (int s = 0; s < 2; s++) {
      rounds.step_tensors({1}, {b2.data()}, {gb.data()});
      CHECK(rounds.step_count() == uint64_t(s));  // the round is open
      try {
        rounds.set_lr(0.1f);
        CHECK(false);
      } catch (const lion::Error &e) {
        CHECK(e.status() == LION_ERROR_ROUND_OPEN);
      }
      try {
        rounds.step_tensors({1}, {b2.data()}, {gb.data()});
        CHECK(false);
      } catch (const lion::Error &e) {
        CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT && mentions(e, "already stepped"));
      }
      rounds.step_tensors({0}, {w2.data()}, {gw.data()});
    }
    CHECK(rounds.step_count() == 2 && w2 == w && b2 == b && rounds.save() == whole.save());
    rounds.step_tensors({0}, {w2.data()}, {gw.data()});
    rounds.finish_round();  // tensor 1 keeps its values
    CHECK(rounds.step_count() == 3 && b2 == b);
    rounds.finish_round();  // no round open: nothing
    CHECK(rounds.step_count() == 3);
  }

  try {
    lion::nccl_unique_id("");
    CHECK(false);
  } catch (const lion::Error &e) {
    CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT);
  }
  try {
    std::array<uint8_t, 128> id = lion::nccl_unique_id();
    CHECK(std::any_of(id.begin(), id.end(), [](uint8_t byte) { return byte != 0; }));
  } catch (const lion::Error &e) {
    CHECK(e.status() == LION_ERROR_DEVICE_UNAVAILABLE);
  }
  // What the wrapper refuses itself: as the C ABI would refuse it, and a distributed rank still
  // takes part in the step's collectives (else the other ranks would wait for it).
  {
    lion::Optimizer one(plain, tensors);
    try {
      one.load({});  // an empty blob is a truncated one, not a NULL buffer
      CHECK(false);
    } catch (const lion::Error &e) {
      CHECK(e.status() == LION_ERROR_CORRUPT_STATE);
    }
    try {
      one.step(std::vector<void *>{}, std::vector<const void *>{});  // the count is wrong, not a NULL
      CHECK(false);
    } catch (const lion::Error &e) {
      CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT && !mentions(e, "NULL"));
    }
    const std::string dir = "test_wrapper_nul";  // in the working directory: none is made there
    std::remove(dir.c_str());
    for (bool save : {true, false}) {
      try {
        std::string path = dir + '\0' + "rest";
        if (save) {
          one.save_file(path);
        } else {
          one.load_file(path);
        }
        CHECK(false);
      } catch (const lion::Error &e) {
        CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT && mentions(e, "NUL"));
      }
    }
    std::FILE *made = std::fopen(dir.c_str(), "rb");  // none at the path's part before the NUL
    CHECK(made == nullptr);
    if (made != nullptr) {
      std::fclose(made);
      std::remove(dir.c_str());
    }
    dist.mode = LION_DIST_SHARDED;
    lion::Optimizer d(plain, tensors, dist);
    std::vector<float> w3 = {1.0f, -1.0f, 0.25f};
    int before = calls;
    try {
      d.step(std::vector<void *>{w3.data()}, grads);  // one parameter, two gradients
      CHECK(false);
    } catch (const lion::Error &e) {
      CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT && mentions(e, "differ in length"));
    }
    CHECK(calls > before && d.step_count() == 0 && (w3 == std::vector<float>{1.0f, -1.0f, 0.25f}));
    before = calls;
    try {
      d.save_file(dir + '\0');
      CHECK(false);
    } catch (const lion::Error &e) {
      CHECK(e.status() == LION_ERROR_INVALID_ARGUMENT);
    }
    CHECK(calls > before);  // took part in the collective save
  }
  std::printf("test_wrapper.cpp: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
