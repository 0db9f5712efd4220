/* Every function of the C ABI and every error path, from C. Built and run by tests/c_api.rs. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lion.h"
#include "check.h"

static uint32_t rng_state = 12345u;
static float uniform(void) { /* in [-1, 1) */
  rng_state = rng_state * 1664525u + 1013904223u;
  return (float)((rng_state >> 8) / 8388608.0 - 1.0);
}

static uint16_t to_bf16(float x) { /* round to nearest even; finite inputs only */
  uint32_t b;
  memcpy(&b, &x, 4);
  return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

static float from_bf16(uint16_t h) {
  uint32_t b = (uint32_t)h << 16;
  float x;
  memcpy(&x, &b, 4);
  return x;
}

static void test_versions(void) {
  char want[32];
  CHECK(lion_abi_version() == 1);
  CHECK(LION_ABI_VERSION == 1);
  snprintf(want, sizeof want, "%d.%d.%d", LION_VERSION_MAJOR, LION_VERSION_MINOR, LION_VERSION_PATCH);
  CHECK(strcmp(lion_version(), want) == 0);
  CHECK(strcmp(lion_version(), LION_VERSION_STRING) == 0);
}

static void test_defaults(void) {
  LionConfig c = lion_config_default();
  LionTensorDesc t = lion_tensor_desc(123, LION_DTYPE_BF16);
  CHECK(c.struct_size == sizeof(LionConfig));
  CHECK(c.lr == 1e-4f && c.beta1 == 0.9f && c.beta2 == 0.99f && c.weight_decay == 0.0f);
  CHECK(c.decay_mode == LION_DECAY_STANDARD && c.cautious_factor == 1.0f);
  CHECK(!c.cautious_weight_decay && !c.stochastic_rounding);
  CHECK(c.device == LION_DEVICE_CPU && c.device_index == 0 && c.state_dtype == LION_DTYPE_F32);
  CHECK(c.seed == 0 && c.num_threads == 0);
  CHECK(t.numel == 123 && t.param_dtype == LION_DTYPE_BF16 && t.grad_dtype == LION_DTYPE_BF16);
  CHECK(t.lr_scale == 1.0f && t.weight_decay_scale == 1.0f);
  CHECK(lion_last_error() != NULL && lion_last_error()[0] == '\0');
}

/* Three f32 steps against a double-precision reference of the paper's update. */
static void test_f32_steps_match_reference(void) {
  enum { N = 1000 };
  static float p[N], g[N];
  static double rp[N], rm[N];
  LionConfig c = lion_config_default();
  LionTensorDesc t = lion_tensor_desc(N, LION_DTYPE_F32);
  LionOptimizer *opt = NULL;
  void *params[1];
  const void *grads[1];
  int i, step, bad = 0;
  uint64_t count = 0;
  c.lr = 0.01f;
  c.weight_decay = 0.5f;
  c.num_threads = 2;
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_OK);
  CHECK(opt != NULL);
  for (i = 0; i < N; i++) {
    p[i] = uniform();
    rp[i] = p[i];
    rm[i] = 0.0;
  }
  params[0] = p;
  grads[0] = g;
  for (step = 0; step < 3; step++) {
    for (i = 0; i < N; i++) g[i] = uniform();
    CHECK_STATUS(lion_step(opt, params, grads, 1, NULL), LION_OK);
    for (i = 0; i < N; i++) {
      double b1 = (double)c.beta1, b2 = (double)c.beta2, lr = (double)c.lr, wd = (double)c.weight_decay;
      double cc = b1 * rm[i] + (1.0 - b1) * g[i];
      double u = cc > 0 ? 1.0 : (cc < 0 ? -1.0 : 0.0);
      rp[i] = rp[i] * (1.0 - lr * wd) - lr * u;
      rm[i] = b2 * rm[i] + (1.0 - b2) * g[i];
      if (fabs(p[i] - rp[i]) > 1e-5) bad++;
    }
  }
  CHECK(bad == 0);
  CHECK_STATUS(lion_step_count(opt, &count), LION_OK);
  CHECK(count == 3);
  lion_destroy(opt);
}

/* bf16 parameters and gradients through uint16_t buffers, with bf16 state. */
static void test_bf16_step(void) {
  enum { N = 333 };
  uint16_t p[N], g[N];
  float before[N];
  LionConfig c = lion_config_default();
  LionTensorDesc t = lion_tensor_desc(N, LION_DTYPE_BF16);
  LionOptimizer *opt = NULL;
  void *params[1];
  const void *grads[1];
  int i, bad = 0;
  c.lr = 0.05f;
  c.state_dtype = LION_DTYPE_BF16;
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_OK);
  for (i = 0; i < N; i++) {
    p[i] = to_bf16(uniform());
    before[i] = from_bf16(p[i]);
    g[i] = to_bf16(uniform());
  }
  params[0] = p;
  grads[0] = g;
  CHECK_STATUS(lion_step(opt, params, grads, 1, NULL), LION_OK);
  for (i = 0; i < N; i++) {
    float gi = from_bf16(g[i]);
    float want = before[i] - (gi > 0 ? 0.05f : (gi < 0 ? -0.05f : 0.0f));
    if (fabsf(from_bf16(p[i]) - want) > 0.01f) bad++;
  }
  CHECK(bad == 0);
  lion_destroy(opt);
}

static void test_lr_and_state(void) {
  enum { N = 64 };
  float p[N], g[N], p2[N];
  LionConfig c = lion_config_default();
  LionTensorDesc t[2];
  LionOptimizer *a = NULL, *b = NULL;
  void *params[2];
  const void *grads[2];
  size_t size = 0, written = 0;
  unsigned char *blob, *copy;
  float lr = 0;
  uint64_t steps = 0;
  int i;
  t[0] = lion_tensor_desc(N, LION_DTYPE_F32);
  t[1] = lion_tensor_desc(0, LION_DTYPE_F32);
  CHECK_STATUS(lion_create(&c, t, 2, &a), LION_OK);
  CHECK_STATUS(lion_create(&c, t, 2, &b), LION_OK);
  CHECK_STATUS(lion_get_lr(a, &lr), LION_OK);
  CHECK(lr == 1e-4f);
  CHECK_STATUS(lion_set_lr(a, 3e-4f), LION_OK);
  CHECK_STATUS(lion_get_lr(a, &lr), LION_OK);
  CHECK(lr == 3e-4f);
  for (i = 0; i < N; i++) {
    p[i] = uniform();
    g[i] = uniform();
  }
  params[0] = p;
  params[1] = NULL; /* an empty tensor's pointer may be NULL */
  grads[0] = g;
  grads[1] = NULL;
  CHECK_STATUS(lion_step(a, params, grads, 2, NULL), LION_OK);

  CHECK_STATUS(lion_state_size(a, &size), LION_OK);
  CHECK(size > (size_t)N * 4);
  blob = malloc(size);
  copy = malloc(size);
  CHECK_STATUS(lion_state_save(a, blob, size - 1, &written), LION_ERROR_INVALID_ARGUMENT);
  CHECK(written == 0);
  CHECK_STATUS(lion_state_save(a, blob, size, &written), LION_OK);
  CHECK(written == size);
  CHECK_STATUS(lion_state_load(b, blob, size), LION_OK);
  CHECK_STATUS(lion_step_count(b, &steps), LION_OK);
  CHECK(steps == 1);
  CHECK_STATUS(lion_get_lr(b, &lr), LION_OK);
  CHECK(lr == 3e-4f);

  /* Both continue identically. */
  memcpy(p2, p, sizeof p);
  for (i = 0; i < N; i++) g[i] = uniform();
  CHECK_STATUS(lion_step(a, params, grads, 2, NULL), LION_OK);
  params[0] = p2;
  CHECK_STATUS(lion_step(b, params, grads, 2, NULL), LION_OK);
  CHECK(memcmp(p, p2, sizeof p) == 0);

  /* A damaged blob is refused, and b is unchanged. */
  memcpy(copy, blob, size);
  copy[size / 2] ^= 1;
  CHECK_STATUS(lion_state_load(b, copy, size), LION_ERROR_CORRUPT_STATE);
  CHECK_STATUS(lion_state_load(b, blob, size - 1), LION_ERROR_CORRUPT_STATE);
  CHECK_STATUS(lion_state_load(b, blob, 3), LION_ERROR_CORRUPT_STATE);
  CHECK_STATUS(lion_step_count(b, &steps), LION_OK);
  CHECK(steps == 2);
  free(blob);
  free(copy);
  lion_destroy(a);
  lion_destroy(b);
}

static void test_errors(void) {
  LionConfig c = lion_config_default();
  LionTensorDesc t = lion_tensor_desc(8, LION_DTYPE_F32);
  LionOptimizer *opt = NULL, *none = NULL;
  float p[8] = {0}, g[8] = {0}, lr = 0;
  void *params[1];
  const void *grads[1];
  uint64_t steps = 0;
  size_t size = 0;
  unsigned char bytes[256];
  params[0] = p;
  grads[0] = g;

  CHECK_STATUS(lion_create(NULL, &t, 1, &opt), LION_ERROR_NULL_POINTER);
  CHECK(strstr(lion_last_error(), "config") != NULL);
  CHECK_STATUS(lion_create(&c, NULL, 1, &opt), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_create(&c, &t, 1, NULL), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_create(&c, &t, 0, &opt), LION_ERROR_INVALID_ARGUMENT);
  CHECK(opt == NULL);

  c.decay_mode = (LionDecayMode)7;
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_ERROR_INVALID_ARGUMENT);
  c = lion_config_default();
  c.device = (LionDevice)42;
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_ERROR_INVALID_ARGUMENT);
  c = lion_config_default();
  c.lr = NAN;
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_ERROR_INVALID_ARGUMENT);
  c = lion_config_default();
  c.beta1 = 2.0f;
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_ERROR_INVALID_ARGUMENT);
  c = lion_config_default();
  c.state_dtype = LION_DTYPE_F16;
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_ERROR_UNSUPPORTED);
  c = lion_config_default();
  c.struct_size = 8;
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(lion_last_error(), "struct_size") != NULL);

  /* A caller built against a newer, larger LionConfig. */
  memset(bytes, 0, sizeof bytes);
  c = lion_config_default();
  c.struct_size = (uint32_t)sizeof(LionConfig) + 16;
  memcpy(bytes, &c, sizeof c);
  CHECK_STATUS(lion_create((const LionConfig *)(const void *)bytes, &t, 1, &opt), LION_OK);
  lion_destroy(opt);
  opt = NULL;
  bytes[sizeof(LionConfig) + 3] = 1;
  CHECK_STATUS(lion_create((const LionConfig *)(const void *)bytes, &t, 1, &opt), LION_ERROR_UNSUPPORTED);
  CHECK(opt == NULL);

  t.param_dtype = (LionDType)5;
  c = lion_config_default();
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_ERROR_INVALID_ARGUMENT);
  t = lion_tensor_desc(8, LION_DTYPE_F32);
  t.lr_scale = -1.0f;
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_ERROR_INVALID_ARGUMENT);
  t = lion_tensor_desc(8, LION_DTYPE_F32);

  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_OK);
  CHECK_STATUS(lion_step(NULL, params, grads, 1, NULL), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_step(opt, NULL, grads, 1, NULL), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_step(opt, params, NULL, 1, NULL), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_step(opt, params, grads, 2, NULL), LION_ERROR_INVALID_ARGUMENT);
  params[0] = NULL;
  CHECK_STATUS(lion_step(opt, params, grads, 1, NULL), LION_ERROR_NULL_POINTER);
  params[0] = p;
  grads[0] = p;
  CHECK_STATUS(lion_step(opt, params, grads, 1, NULL), LION_ERROR_INVALID_ARGUMENT);
  grads[0] = g;
  CHECK_STATUS(lion_step_count(opt, &steps), LION_OK);
  CHECK(steps == 0);

  CHECK_STATUS(lion_set_lr(NULL, 0.1f), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_set_lr(opt, -0.1f), LION_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(lion_set_lr(opt, INFINITY), LION_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(lion_get_lr(NULL, &lr), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_get_lr(opt, NULL), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_get_lr(opt, &lr), LION_OK);
  CHECK(lr == 1e-4f);
  CHECK_STATUS(lion_step_count(NULL, &steps), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_step_count(opt, NULL), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_state_size(NULL, &size), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_state_size(opt, NULL), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_state_save(NULL, bytes, sizeof bytes, NULL), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_state_save(opt, NULL, 1000, NULL), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_state_load(NULL, bytes, sizeof bytes), LION_ERROR_NULL_POINTER);
  CHECK_STATUS(lion_state_load(opt, NULL, 10), LION_ERROR_NULL_POINTER);
  memset(bytes, 0, sizeof bytes);
  CHECK_STATUS(lion_state_load(opt, bytes, sizeof bytes), LION_ERROR_CORRUPT_STATE);
  lion_destroy(opt);
  lion_destroy(NULL);
  (void)none;
}

static void test_step_options(void) {
  enum { N = 16 };
  float p[N], g[N], before[N], flag = 1.0f, lr = 0.25f, nan_lr = NAN;
  void *params[1];
  const void *grads[1];
  LionConfig c = lion_config_default();
  LionTensorDesc t = lion_tensor_desc(N, LION_DTYPE_F32);
  LionStepOptions o = lion_step_options_default();
  LionOptimizer *opt = NULL;
  uint64_t steps = 0;
  int i, bad = 0;
  CHECK(o.struct_size == sizeof(LionStepOptions));
  CHECK(o.grad_scale == 1.0f && o.found_inf == NULL && o.lr == NULL);
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_OK);
  for (i = 0; i < N; i++) {
    p[i] = uniform();
    g[i] = (i % 2) ? 1.0f : -1.0f;
  }
  memcpy(before, p, sizeof p);
  params[0] = p;
  grads[0] = g;
  /* found_inf non-zero: nothing happens, the step does not count. */
  o.found_inf = &flag;
  CHECK_STATUS(lion_step_with_options(opt, params, grads, 1, NULL, &o), LION_OK);
  CHECK(memcmp(p, before, sizeof p) == 0);
  CHECK_STATUS(lion_step_count(opt, &steps), LION_OK);
  CHECK(steps == 0);
  /* The lr from the pointer, and a negative grad scale that flips every update. */
  flag = 0.0f;
  o.lr = &lr;
  o.grad_scale = -2.0f;
  CHECK_STATUS(lion_step_with_options(opt, params, grads, 1, NULL, &o), LION_OK);
  for (i = 0; i < N; i++)
    if (fabsf(p[i] - (before[i] + (g[i] > 0 ? 0.25f : -0.25f))) > 1e-6f) bad++;
  CHECK(bad == 0);
  CHECK_STATUS(lion_step_count(opt, &steps), LION_OK);
  CHECK(steps == 1);
  /* NULL options are the defaults. */
  CHECK_STATUS(lion_step_with_options(opt, params, grads, 1, NULL, NULL), LION_OK);
  /* Refused: a non-finite scale or lr, a short or unknown-tailed struct. */
  memcpy(before, p, sizeof p);
  o.grad_scale = INFINITY;
  CHECK_STATUS(lion_step_with_options(opt, params, grads, 1, NULL, &o), LION_ERROR_INVALID_ARGUMENT);
  o.grad_scale = 1.0f;
  o.lr = &nan_lr;
  CHECK_STATUS(lion_step_with_options(opt, params, grads, 1, NULL, &o), LION_ERROR_INVALID_ARGUMENT);
  o.lr = NULL;
  o.struct_size = 4;
  CHECK_STATUS(lion_step_with_options(opt, params, grads, 1, NULL, &o), LION_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(lion_step_with_options(NULL, params, grads, 1, NULL, NULL), LION_ERROR_NULL_POINTER);
  CHECK(memcmp(p, before, sizeof p) == 0);
  lion_destroy(opt);
}

/* CUDA asked for: a handle where there is a GPU, a clear refusal where there is none. */
static void test_cuda_availability(void) {
  LionConfig c = lion_config_default();
  LionTensorDesc t = lion_tensor_desc(8, LION_DTYPE_F32);
  LionOptimizer *opt = NULL;
  LionStatus st;
  c.device = LION_DEVICE_CUDA;
  st = lion_create(&c, &t, 1, &opt);
  CHECK(st == LION_OK || st == LION_ERROR_DEVICE_UNAVAILABLE || st == LION_ERROR_UNSUPPORTED);
  if (st != LION_OK) CHECK(strstr(lion_last_error(), "CUDA") != NULL);
  lion_destroy(opt);
  c.device_index = 1000;
  opt = NULL;
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), st == LION_ERROR_UNSUPPORTED ? LION_ERROR_UNSUPPORTED : LION_ERROR_DEVICE_UNAVAILABLE);
  CHECK(opt == NULL);
}

int main(void) {
  test_versions();
  test_defaults();
  test_f32_steps_match_reference();
  test_bf16_step();
  test_lr_and_state();
  test_errors();
  test_step_options();
  test_cuda_availability();
  return check_report("test_api.c");
}
