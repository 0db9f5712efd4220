// lion.hpp: a header-only C++17 wrapper over liblion's C ABI (include/lion.h).
//
//   lion::Optimizer opt(config, tensors);          // throws lion::Error on failure
//   opt.step(params, grads);                        // std::vector<void*>, std::vector<const void*>
//   opt.set_lr(1e-4f); float lr = opt.lr(); uint64_t n = opt.step_count();
//   std::vector<uint8_t> blob = opt.save(); opt.load(blob);
//
//   // Some tensors at a time, e.g. each as its gradient is ready (lion_step_tensors): a round
//   // that steps every tensor once, in any order and grouping, is one step, bit for bit.
//   opt.step_tensors({2}, {p2}, {g2});  opt.step_tensors({0, 1}, {p0, p1}, {g0, g1});
//   opt.finish_round();                 // ends a round early (the rest keep their values)
//   // 8-bit momentum (CPU and CUDA): about 1.016 bytes per element (docs/ABI.md, "8-bit momentum").
//   LionConfig config = lion_config_default(); config.state_dtype = LION_DTYPE_Q8;
//
//   // One per rank (distributed: docs/ABI.md, examples/distributed_mpi.c):
//   LionDistConfig dist = lion_dist_config_default();
//   dist.rank = rank; dist.world_size = world; dist.collectives = &my_collectives;
//   auto opt = lion::Optimizer::distributed(config, tensors, dist);
//   // The collectives are C functions called from inside liblion: they must not throw (an
//   // exception cannot cross liblion's Rust frames; the process aborts). Catch inside them
//   // and return non-zero: the call that made the collective (a step, a sharded save, the
//   // creation) then fails with LION_ERROR_COMM on this rank (docs/ABI.md: the group's state).
//
// Move-only (nothrow move); the handle is destroyed with the object.
#ifndef LION_HPP
#define LION_HPP

#include <array>
#include <cstddef>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lion.h"

namespace lion {

/// A failed liblion call: the status and the library's message.
class Error : public std::runtime_error {
 public:
  Error(LionStatus status, const std::string &message)
      : std::runtime_error(message), status_(status) {}
  LionStatus status() const noexcept { return status_; }

 private:
  LionStatus status_;
};

namespace detail {
inline void check(LionStatus status, const char *what) {
  if (status != LION_OK) throw Error(status, std::string(what) + ": " + lion_last_error());
}
// An empty vector's data() may be NULL, which liblion would report instead of the count (or a
// blob's length); this stands in for it, never read through (the count is 0).
template <class T>
inline const T *data_of(const std::vector<T> &v) {
  static const T none{};
  return v.empty() ? &none : v.data();
}
// Refuses a step this wrapper found wrong, after taking part in it as a refusing rank (a step
// without buffers, which liblion refuses on every rank and which writes nothing): the other
// ranks of a distributed optimizer are in the step's collectives and would wait for this one.
[[noreturn]] inline void refuse_step(LionOptimizer *handle, size_t n, void *stream, const std::string &why) {
  lion_step(handle, nullptr, nullptr, n, stream);
  throw Error(LION_ERROR_INVALID_ARGUMENT, why);
}
inline bool holds_nul(const std::string &path) { return path.find('\0') != std::string::npos; }
// Enables the deleted overloads below for a LionStepOptions pointer only (a CUstream, a
// pointer to another type, still converts to the stream's void *).
template <class T>
using if_options = std::enable_if_t<std::is_same<std::remove_cv_t<T>, LionStepOptions>::value>;
}  // namespace detail

class Optimizer {
 public:
  Optimizer(const LionConfig &config, const std::vector<LionTensorDesc> &tensors) {
    detail::check(lion_create(&config, detail::data_of(tensors), tensors.size(), &handle_), "lion_create");
  }
  /// Rank `dist.rank` of a distributed optimizer of `dist.world_size` ranks, in `dist.mode`
  /// (lion_create_distributed): every rank passes the same config and tensors. Its creation and
  /// steps are collective (every rank takes each one, with the same options), and so are
  /// save() and save_file() in sharded mode. The `dist.collectives` table is copied; its functions and context must
  /// outlive the optimizer.
  Optimizer(const LionConfig &config, const std::vector<LionTensorDesc> &tensors, const LionDistConfig &dist) {
    detail::check(lion_create_distributed(&config, detail::data_of(tensors), tensors.size(), &dist, &handle_),
                  "lion_create_distributed");
  }
  /// The same, by name: `auto opt = lion::Optimizer::distributed(config, tensors, dist);`
  static Optimizer distributed(const LionConfig &config, const std::vector<LionTensorDesc> &tensors,
                               const LionDistConfig &dist) {
    return Optimizer(config, tensors, dist);
  }
  ~Optimizer() { lion_destroy(handle_); }

  Optimizer(const Optimizer &) = delete;
  Optimizer &operator=(const Optimizer &) = delete;
  Optimizer(Optimizer &&other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Optimizer &operator=(Optimizer &&other) noexcept {
    if (this != &other) {
      lion_destroy(handle_);
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }

  /// One step for every tensor; `stream` is a CUstream for CUDA (nullptr: default stream).
  void step(void *const *params, const void *const *grads, size_t n_tensors, void *stream = nullptr) {
    detail::check(lion_step(handle_, params, grads, n_tensors, stream), "lion_step");
  }
  void step(const std::vector<void *> &params, const std::vector<const void *> &grads, void *stream = nullptr) {
    if (params.size() != grads.size())
      detail::refuse_step(handle_, params.size(), stream, "lion_step: params and grads differ in length");
    step(detail::data_of(params), detail::data_of(grads), params.size(), stream);
  }
  /// With mixed-precision / CUDA-graph options (see LionStepOptions).
  void step(void *const *params, const void *const *grads, size_t n_tensors, const LionStepOptions &options,
            void *stream = nullptr) {
    detail::check(lion_step_with_options(handle_, params, grads, n_tensors, stream, &options),
                  "lion_step_with_options");
  }
  void step(const std::vector<void *> &params, const std::vector<const void *> &grads,
            const LionStepOptions &options, void *stream = nullptr) {
    if (params.size() != grads.size())
      detail::refuse_step(handle_, params.size(), stream, "lion_step_with_options: params and grads differ in length");
    detail::check(lion_step_with_options(handle_, detail::data_of(params), detail::data_of(grads), params.size(),
                                         stream, &options),
                  "lion_step_with_options");
  }

  /// Steps the tensors `indices` (their places at creation), whose buffers are `params[j]`
  /// and `grads[j]`: one call of a round of lion_step_tensors. Every tensor once per round, in
  /// any order and grouping, is one step, as step() makes it; while a round is open, step(),
  /// set_lr(), save() and save_file() throw (LION_ERROR_ROUND_OPEN). `options` may be nullptr
  /// (its lr, if any, is checked against this call's tensors).
  void step_tensors(const uint32_t *indices, size_t n, void *const *params, const void *const *grads,
                    void *stream = nullptr, const LionStepOptions *options = nullptr) {
    detail::check(lion_step_tensors(handle_, indices, n, params, grads, stream, options), "lion_step_tensors");
  }
  void step_tensors(const std::vector<uint32_t> &indices, const std::vector<void *> &params,
                    const std::vector<const void *> &grads, void *stream = nullptr,
                    const LionStepOptions *options = nullptr) {
    if (params.size() != indices.size() || grads.size() != indices.size())
      throw Error(LION_ERROR_INVALID_ARGUMENT, "lion_step_tensors: indices, params and grads differ in length");
    step_tensors(detail::data_of(indices), indices.size(), detail::data_of(params), detail::data_of(grads), stream,
                 options);
  }
  // A LionStepOptions pointer where the stream goes would convert to void * and be taken for
  // the CUDA stream, the options dropped: such a call does not compile (options go by
  // reference to step(), as the last argument of step_tensors()).
  template <class T, class = detail::if_options<T>>
  void step(void *const *, const void *const *, size_t, T *) = delete;
  template <class T, class = detail::if_options<T>>
  void step(const std::vector<void *> &, const std::vector<const void *> &, T *) = delete;
  template <class T, class = detail::if_options<T>>
  void step_tensors(const uint32_t *, size_t, void *const *, const void *const *, T *,
                    const LionStepOptions * = nullptr) = delete;
  template <class T, class = detail::if_options<T>>
  void step_tensors(const std::vector<uint32_t> &, const std::vector<void *> &, const std::vector<const void *> &,
                    T *, const LionStepOptions * = nullptr) = delete;

  /// Ends an open round early: the tensors it did not step keep their values and momentum,
  /// and the round counts as a step (lion_round_finish). Nothing happens without one.
  void finish_round(void *stream = nullptr) {
    detail::check(lion_round_finish(handle_, stream), "lion_round_finish");
  }

  void set_lr(float lr) { detail::check(lion_set_lr(handle_, lr), "lion_set_lr"); }
  float lr() const {
    float lr = 0.0f;
    detail::check(lion_get_lr(handle_, &lr), "lion_get_lr");
    return lr;
  }
  uint64_t step_count() const {
    uint64_t n = 0;
    detail::check(lion_step_count(handle_, &n), "lion_step_count");
    return n;
  }

  /// The checkpoint (in sharded mode a collective: every rank calls it and gets the
  /// single-process checkpoint).
  std::vector<uint8_t> save() const {
    size_t size = 0;
    detail::check(lion_state_size(handle_, &size), "lion_state_size");
    std::vector<uint8_t> blob;
    try {
      blob.resize(size);
    } catch (const std::bad_alloc &) {
      // In sharded mode the other ranks wait in this save's gather: take part without the
      // bytes (liblion refuses a NULL buffer after the gather), then report the allocation.
      lion_state_save(handle_, nullptr, size, nullptr);
      throw;
    }
    size_t written = 0;
    detail::check(lion_state_save(handle_, blob.data(), blob.size(), &written), "lion_state_save");
    blob.resize(written);
    return blob;
  }
  void load(const std::vector<uint8_t> &blob) {
    detail::check(lion_state_load(handle_, detail::data_of(blob), blob.size()), "lion_state_load");
  }
  /// A path holding a NUL byte is refused (C would see only the part before it); in sharded
  /// mode this rank still takes part in the collective save, as a rank whose path fails.
  void save_file(const std::string &path) const {
    if (detail::holds_nul(path)) {
      lion_state_save_file(handle_, "");  // refused here, after the collective's gather
      throw Error(LION_ERROR_INVALID_ARGUMENT, "lion_state_save_file: the path holds a NUL byte");
    }
    detail::check(lion_state_save_file(handle_, path.c_str()), "lion_state_save_file");
  }
  void load_file(const std::string &path) {
    if (detail::holds_nul(path))
      throw Error(LION_ERROR_INVALID_ARGUMENT, "lion_state_load_file: the path holds a NUL byte");
    detail::check(lion_state_load_file(handle_, path.c_str()), "lion_state_load_file");
  }

  /// The C handle, for calls this wrapper does not cover.
  LionOptimizer *get() const noexcept { return handle_; }

 private:
  LionOptimizer *handle_ = nullptr;
};

inline std::string version() { return lion_version(); }

/// A new ncclUniqueId (lion_nccl_unique_id), for LionDistConfig.nccl_unique_id: made on one
/// rank and sent to every rank. `library`: nullptr (the libnccl.so.2 this process has loaded,
/// else the loader's search) or the path of the NCCL library. Throws lion::Error
/// (LION_ERROR_DEVICE_UNAVAILABLE without NCCL).
inline std::array<uint8_t, LION_NCCL_UNIQUE_ID_BYTES> nccl_unique_id(const char *library = nullptr) {
  std::array<uint8_t, LION_NCCL_UNIQUE_ID_BYTES> id{};
  detail::check(lion_nccl_unique_id(library, id.data(), id.size()), "lion_nccl_unique_id");
  return id;
}

}  // namespace lion

#endif  // LION_HPP
