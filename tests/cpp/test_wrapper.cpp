// The C++ wrapper (bindings/cpp/lion.hpp): steps, lr, checkpoints, moves and errors.
// Built and run by tests/c_api.rs with -std=c++17 -Wall -Wextra -Werror -pedantic.
#include <cmath>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "lion.hpp"

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
  LionStepOptions o = lion_step_options_default();
  float skip = 1.0f;
  o.found_inf = &skip;
  opt.step(params, grads, o);
  CHECK(opt.step_count() == 1);
  CHECK(!lion::version().empty());
  std::printf("test_wrapper.cpp: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
