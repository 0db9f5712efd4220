/*
 * flat_buffer.c: the flat-buffer pattern. A trainer often keeps all its parameters in one
 * float buffer (and the gradients in a second one, laid out alike). Give liblion ONE
 * optimizer with one tensor per parameter, each pointing into the buffer: then every tensor
 * has its own weight_decay_scale (0 for biases and norm gains) and lr_scale, and one
 * lion_step updates them all.
 *
 * The model, y = gain * (W x) + b, fits a fixed linear map. Alongside liblion the program runs
 * its own Lion loop on a copy of the parameters, with every operation rounded to float
 * separately, and checks that both agree bit for bit at every step. Compile it without
 * contraction into fused multiply-adds, or the copy drifts at the first near-zero momentum:
 *
 *   cc -std=c99 -O2 -ffp-contract=off flat_buffer.c -I include -L target/release -llion \
 *      -Wl,-rpath,"$PWD/target/release" -lm -o flat_buffer
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lion.h"

enum { IN = 16, OUT = 8, STEPS = 300 };

/* The layout: where each parameter lives in the flat buffer. */
enum { W_AT = 0, B_AT = W_AT + OUT * IN, GAIN_AT = B_AT + OUT, TOTAL = GAIN_AT + OUT };
enum { N_TENSORS = 3 };
static const size_t offset[N_TENSORS] = {W_AT, B_AT, GAIN_AT};
static const size_t numel[N_TENSORS] = {OUT * IN, OUT, OUT};
static const float decay_scale[N_TENSORS] = {1.0f, 0.0f, 0.0f}; /* no decay on b and gain */

static float params[TOTAL], grads[TOTAL];
static float target_map[OUT][IN], target_bias[OUT];

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float uniform(void) { /* in [-1, 1) */
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (float)((rng >> 40) / 8388608.0 - 1.0);
}

/* The mean squared error of one batch, and its gradient in `grads`. */
static float loss_and_grads(void) {
  enum { BATCH = 32 };
  const float *w = params + W_AT, *b = params + B_AT, *gain = params + GAIN_AT;
  float loss = 0.0f;
  memset(grads, 0, sizeof grads);
  for (int n = 0; n < BATCH; n++) {
    float x[IN];
    for (int i = 0; i < IN; i++) x[i] = uniform();
    for (int o = 0; o < OUT; o++) {
      float wx = 0.0f, t = target_bias[o];
      for (int i = 0; i < IN; i++) {
        wx += w[o * IN + i] * x[i];
        t += target_map[o][i] * x[i];
      }
      float err = gain[o] * wx + b[o] - t;
      loss += err * err / (BATCH * OUT);
      float d = 2.0f * err / (BATCH * OUT);
      grads[B_AT + o] += d;
      grads[GAIN_AT + o] += d * wx;
      for (int i = 0; i < IN; i++) grads[W_AT + o * IN + i] += d * gain[o] * x[i];
    }
  }
  return loss;
}

/* Lion as the README writes it, each operation rounded to float on its own; the scalars
 * (1 - beta), lr * lr_scale and 1 - lr*wd are computed in double and rounded once. */
static void own_lion_step(float *p, float *m, const float *g, const LionConfig *c) {
  float one_minus_b1 = (float)(1.0 - (double)c->beta1);
  float one_minus_b2 = (float)(1.0 - (double)c->beta2);
  for (int t = 0; t < N_TENSORS; t++) {
    float step = (float)((double)c->lr * 1.0);
    float keep = (float)(1.0 - (double)c->lr * 1.0 * ((double)c->weight_decay * (double)decay_scale[t]));
    for (size_t i = offset[t]; i < offset[t] + numel[t]; i++) {
      float u = c->beta1 * m[i] + one_minus_b1 * g[i];
      float s = u > 0.0f ? 1.0f : u < 0.0f ? -1.0f : 0.0f;
      p[i] = p[i] * keep - step * s;
      m[i] = c->beta2 * m[i] + one_minus_b2 * g[i];
    }
  }
}

int main(void) {
  int passed = 0, failed = 0;
  for (int o = 0; o < OUT; o++) {
    target_bias[o] = uniform();
    for (int i = 0; i < IN; i++) target_map[o][i] = uniform();
  }
  for (int i = 0; i < OUT * IN; i++) params[W_AT + i] = 0.3f * uniform();
  for (int o = 0; o < OUT; o++) params[GAIN_AT + o] = 1.0f; /* b starts at 0 */

  LionTensorDesc tensors[N_TENSORS];
  /* The trainer's own pointer arrays, typed float *. lion_step takes void *const * (any dtype),
   * and C converts float ** to it only with a cast; every platform liblion runs on gives
   * float * and void * one representation. */
  float *param_ptrs[N_TENSORS];
  const float *grad_ptrs[N_TENSORS];
  for (int t = 0; t < N_TENSORS; t++) {
    tensors[t] = lion_tensor_desc(numel[t], LION_DTYPE_F32);
    tensors[t].weight_decay_scale = decay_scale[t];
    param_ptrs[t] = params + offset[t];
    grad_ptrs[t] = grads + offset[t];
  }
  LionConfig config = lion_config_default();
  config.lr = 1e-2f;
  config.weight_decay = 0.1f;
  LionOptimizer *opt = NULL;
  if (lion_create(&config, tensors, N_TENSORS, &opt) != LION_OK) {
    fprintf(stderr, "lion_create: %s\n", lion_last_error());
    return 1;
  }

  /* The check's copy: the same parameters, their momentum, and the same gradients each step. */
  static float shadow[TOTAL], momentum[TOTAL];
  memcpy(shadow, params, sizeof params);
  int first_mismatch = -1;
  float first_loss = 0.0f, loss = 0.0f;
  for (int step = 0; step < STEPS; step++) {
    loss = loss_and_grads();
    if (step == 0) first_loss = loss;
    if (lion_step(opt, (void *const *)param_ptrs, (const void *const *)grad_ptrs, N_TENSORS, NULL) != LION_OK) {
      fprintf(stderr, "lion_step: %s\n", lion_last_error());
      return 1;
    }
    own_lion_step(shadow, momentum, grads, &config);
    if (first_mismatch < 0 && memcmp(shadow, params, sizeof params) != 0) first_mismatch = step;
    if (step % 100 == 0) printf("step %3d  loss %.5f\n", step, loss);
  }
  printf("step %3d  loss %.5f\n", STEPS, loss);

  if (first_mismatch < 0) {
    passed++;
  } else {
    failed++;
    printf("FAIL: liblion and the plain loop differ from step %d (built with FMA contraction?)\n", first_mismatch);
  }
  if (loss < first_loss / 10.0f) {
    passed++;
  } else {
    failed++;
    printf("FAIL: the loss went from %.5f to %.5f only\n", first_loss, loss);
  }
  /* No decay on b and gain: with zero gradients a step moves only W (by the factor 1 - lr*wd). */
  float before[TOTAL];
  memset(grads, 0, sizeof grads);
  memcpy(before, params, sizeof params);
  LionOptimizer *fresh = NULL;
  int ok = lion_create(&config, tensors, N_TENSORS, &fresh) == LION_OK &&
           lion_step(fresh, (void *const *)param_ptrs, (const void *const *)grad_ptrs, N_TENSORS, NULL) == LION_OK;
  float keep = (float)(1.0 - (double)config.lr * (double)config.weight_decay);
  for (int i = 0; ok && i < TOTAL; i++) {
    ok = params[i] == (i < B_AT ? before[i] * keep : before[i]);
  }
  if (ok) {
    passed++;
  } else {
    failed++;
    printf("FAIL: a zero-gradient step did not decay exactly W alone\n");
  }
  lion_destroy(fresh);
  lion_destroy(opt);
  printf("flat_buffer: %d passed, %d failed\n", passed, failed);
  return failed != 0;
}
