/*
 * train_mlp.c: trains a small multilayer perceptron through liblion, in plain C.
 *
 * The model (2 -> 64 -> 64 -> 1, tanh) learns y = sin(3*x0) * cos(2*x1) on [-1, 1]^2 from
 * mini-batches of 64, with hand-written backpropagation. liblion steps all six tensors at
 * once; biases are exempt from weight decay through their tensor's weight_decay_scale.
 * It prints the loss as it falls and exits non-zero if it did not fall.
 *
 *   cc train_mlp.c -I include -L target/release -llion -lm -o train_mlp
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lion.h"

enum { IN = 2, H = 64, OUT = 1, BATCH = 64, STEPS = 3000 };

/* Parameters and gradients, tensor by tensor. */
static float w1[H * IN], b1[H], w2[H * H], b2[H], w3[OUT * H], b3[OUT];
static float gw1[H * IN], gb1[H], gw2[H * H], gb2[H], gw3[OUT * H], gb3[OUT];

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static float uniform(void) { /* in [-1, 1) */
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (float)((rng >> 40) / 8388608.0 - 1.0);
}

static float target(const float *x) { return sinf(3.0f * x[0]) * cosf(2.0f * x[1]); }

static void init(float *w, int n, int fan_in) {
  float scale = sqrtf(3.0f / (float)fan_in);
  for (int i = 0; i < n; i++) w[i] = uniform() * scale;
}

/* One forward and backward pass over a batch: fills the gradients, returns the mean loss. */
static float forward_backward(const float x[BATCH][IN], const float *y) {
  static float h1[BATCH][H], h2[BATCH][H], d1[H], d2[H];
  float loss = 0.0f;
  memset(gw1, 0, sizeof gw1); memset(gb1, 0, sizeof gb1);
  memset(gw2, 0, sizeof gw2); memset(gb2, 0, sizeof gb2);
  memset(gw3, 0, sizeof gw3); memset(gb3, 0, sizeof gb3);
  for (int n = 0; n < BATCH; n++) {
    float out = b3[0];
    for (int j = 0; j < H; j++) {
      float a = b1[j];
      for (int i = 0; i < IN; i++) a += w1[j * IN + i] * x[n][i];
      h1[n][j] = tanhf(a);
    }
    for (int j = 0; j < H; j++) {
      float a = b2[j];
      for (int i = 0; i < H; i++) a += w2[j * H + i] * h1[n][i];
      h2[n][j] = tanhf(a);
      out += w3[j] * h2[n][j];
    }
    float err = out - y[n];
    loss += err * err;
    float dout = 2.0f * err / BATCH;
    gb3[0] += dout;
    for (int j = 0; j < H; j++) {
      gw3[j] += dout * h2[n][j];
      d2[j] = dout * w3[j] * (1.0f - h2[n][j] * h2[n][j]);
      gb2[j] += d2[j];
    }
    for (int i = 0; i < H; i++) {
      float s = 0.0f;
      for (int j = 0; j < H; j++) {
        gw2[j * H + i] += d2[j] * h1[n][i];
        s += d2[j] * w2[j * H + i];
      }
      d1[i] = s * (1.0f - h1[n][i] * h1[n][i]);
      gb1[i] += d1[i];
      for (int k = 0; k < IN; k++) gw1[i * IN + k] += d1[i] * x[n][k];
    }
  }
  return loss / BATCH;
}

static int check(LionStatus st, const char *what) {
  if (st != LION_OK) {
    fprintf(stderr, "%s failed (%d): %s\n", what, (int)st, lion_last_error());
    return 1;
  }
  return 0;
}

int main(void) {
  void *params[6] = {w1, b1, w2, b2, w3, b3};
  const void *grads[6] = {gw1, gb1, gw2, gb2, gw3, gb3};
  const uint64_t sizes[6] = {H * IN, H, H * H, H, OUT * H, OUT};
  LionTensorDesc tensors[6];
  LionConfig config = lion_config_default();
  LionOptimizer *opt = NULL;
  float x[BATCH][IN], y[BATCH], first = 0.0f, recent = 0.0f;

  init(w1, H * IN, IN);
  init(w2, H * H, H);
  init(w3, OUT * H, H);
  for (int t = 0; t < 6; t++) {
    tensors[t] = lion_tensor_desc(sizes[t], LION_DTYPE_F32);
    if (t % 2 == 1) tensors[t].weight_decay_scale = 0.0f; /* no decay on biases */
  }
  /* The paper's advice: lr 3-10x smaller than AdamW's, weight decay 3-10x larger. */
  config.lr = 1e-3f;
  config.beta1 = 0.9f;
  config.beta2 = 0.99f;
  config.weight_decay = 0.1f;
  config.num_threads = 1; /* a model this small is best stepped on the caller's thread */
  if (check(lion_create(&config, tensors, 6, &opt), "lion_create")) return 1;

  printf("liblion %s: training a 2-64-64-1 MLP on sin(3x)cos(2y) with Lion\n", lion_version());
  for (int step = 1; step <= STEPS; step++) {
    for (int n = 0; n < BATCH; n++) {
      x[n][0] = uniform();
      x[n][1] = uniform();
      y[n] = target(x[n]);
    }
    float loss = forward_backward((const float(*)[IN])x, y);
    /* Cosine decay of the learning rate over the run. */
    float lr = config.lr * 0.5f * (1.0f + cosf(3.14159265f * (float)step / STEPS));
    if (check(lion_set_lr(opt, lr), "lion_set_lr")) return 1;
    if (check(lion_step(opt, params, grads, 6, NULL), "lion_step")) return 1;
    if (step <= 50) first += loss / 50.0f;
    if (step > STEPS - 100) recent += loss / 100.0f;
    if (step == 1 || step % 250 == 0) printf("step %5d  loss %.5f  lr %.2e\n", step, loss, lr);
  }
  lion_destroy(opt);
  printf("mean loss: first 50 steps %.5f, last 100 steps %.5f\n", first, recent);
  if (!(recent < 0.1f * first)) {
    fprintf(stderr, "the loss did not fall by 10x\n");
    return 1;
  }
  return 0;
}
