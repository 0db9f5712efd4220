// step_in_backward.cpp: a two-layer network y = W2 tanh(W1 x + b1) + b2 trained with Lion,
// each layer stepped as soon as its gradients are ready, during the backward pass
// (lion_step_tensors through the C++ wrapper): the last layer first, while the first
// layer's gradients are still to come. A second network trained with whole steps (one
// lion_step after the backward pass) stays bit-identical: a round that steps every tensor
// once is one step.
//   c++ -std=c++17 step_in_backward.cpp -I include -I bindings/cpp -L target/release -llion
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "lion.hpp"

namespace {
const int in = 8, hidden = 16, batch = 32;

struct Net {
  std::vector<float> w1 = std::vector<float>(hidden * in), b1 = std::vector<float>(hidden, 0.0f),
                     w2 = std::vector<float>(hidden), b2 = std::vector<float>(1, 0.0f);
  // Tensor indices at creation: 0 w1, 1 b1, 2 w2, 3 b2.
  std::vector<void *> params() { return {w1.data(), b1.data(), w2.data(), b2.data()}; }
};

struct Grads {
  std::vector<float> w1 = std::vector<float>(hidden * in), b1 = std::vector<float>(hidden),
                     w2 = std::vector<float>(hidden), b2 = std::vector<float>(1);
};

// Forward over the batch, then the backward pass, calling `layer2_ready` once the last
// layer's gradients are complete (before the first layer's are computed). Returns the loss.
template <class F>
float forward_backward(const Net &net, const std::vector<float> &xs, const std::vector<float> &ys, Grads &g,
                       F layer2_ready) {
  std::vector<float> h(batch * hidden), err(batch);
  float loss = 0;
  for (int n = 0; n < batch; n++) {
    float pred = net.b2[0];
    for (int j = 0; j < hidden; j++) {
      float a = net.b1[j];
      for (int i = 0; i < in; i++) a += net.w1[j * in + i] * xs[n * in + i];
      h[n * hidden + j] = std::tanh(a);
      pred += net.w2[j] * h[n * hidden + j];
    }
    err[n] = pred - ys[n];
    loss += err[n] * err[n] / batch;
  }
  // Layer 2's gradients, and its step, before layer 1's gradients exist.
  std::fill(g.w2.begin(), g.w2.end(), 0.0f);
  g.b2[0] = 0;
  for (int n = 0; n < batch; n++) {
    g.b2[0] += 2 * err[n] / batch;
    for (int j = 0; j < hidden; j++) g.w2[j] += 2 * err[n] * h[n * hidden + j] / batch;
  }
  std::vector<float> w2 = net.w2;  // layer 1's gradients need layer 2's weights before its step
  layer2_ready();
  std::fill(g.w1.begin(), g.w1.end(), 0.0f);
  std::fill(g.b1.begin(), g.b1.end(), 0.0f);
  for (int n = 0; n < batch; n++)
    for (int j = 0; j < hidden; j++) {
      float d = 2 * err[n] / batch * w2[j] * (1 - h[n * hidden + j] * h[n * hidden + j]);
      g.b1[j] += d;
      for (int i = 0; i < in; i++) g.w1[j * in + i] += d * xs[n * in + i];
    }
  return loss;
}
}  // namespace

int main() {
  const int steps = 1500;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  Net overlapped, whole;
  for (auto &v : overlapped.w1) v = 0.5f * u(rng);
  for (auto &v : overlapped.w2) v = 0.5f * u(rng);
  whole = overlapped;
  LionConfig config = lion_config_default();
  config.lr = 2e-3f;
  config.weight_decay = 0.01f;
  std::vector<LionTensorDesc> tensors = {
      lion_tensor_desc(overlapped.w1.size(), LION_DTYPE_F32), lion_tensor_desc(overlapped.b1.size(), LION_DTYPE_F32),
      lion_tensor_desc(overlapped.w2.size(), LION_DTYPE_F32), lion_tensor_desc(overlapped.b2.size(), LION_DTYPE_F32)};
  tensors[1].weight_decay_scale = tensors[3].weight_decay_scale = 0.0f;
  lion::Optimizer in_backward(config, tensors), after_backward(config, tensors);
  std::printf("liblion %s: stepping each layer during the backward pass\n", lion::version().c_str());
  Grads g, gw;
  float first = 0, last = 0;
  for (int step = 1; step <= steps; step++) {
    std::vector<float> xs(batch * in), ys(batch);
    for (auto &v : xs) v = u(rng);
    for (int n = 0; n < batch; n++) ys[n] = std::sin(2 * xs[n * in]) * xs[n * in + 1];
    float lr = 2e-3f * 0.5f * (1.0f + std::cos(3.14159265f * step / steps));
    in_backward.set_lr(lr);  // between rounds: the round keeps one lr
    after_backward.set_lr(lr);
    // Overlapped: layer 2 (tensors 2, 3) as soon as its gradients are ready, then layer 1.
    float loss = forward_backward(overlapped, xs, ys, g, [&] {
      in_backward.step_tensors({2, 3}, {overlapped.w2.data(), overlapped.b2.data()}, {g.w2.data(), g.b2.data()});
    });
    in_backward.step_tensors({0, 1}, {overlapped.w1.data(), overlapped.b1.data()}, {g.w1.data(), g.b1.data()});
    // Whole steps: one lion_step after the backward pass.
    forward_backward(whole, xs, ys, gw, [] {});
    after_backward.step(whole.params(), {gw.w1.data(), gw.b1.data(), gw.w2.data(), gw.b2.data()});
    if (step <= 20) first += loss / 20;
    if (step > steps - 100) last += loss / 100;
    if (step == 1 || step % 300 == 0) std::printf("step %5d  loss %.6f\n", step, loss);
  }
  bool same = std::memcmp(overlapped.w1.data(), whole.w1.data(), 4 * whole.w1.size()) == 0 &&
              std::memcmp(overlapped.b1.data(), whole.b1.data(), 4 * whole.b1.size()) == 0 &&
              std::memcmp(overlapped.w2.data(), whole.w2.data(), 4 * whole.w2.size()) == 0 &&
              overlapped.b2[0] == whole.b2[0] && in_backward.save() == after_backward.save();
  std::printf("mean loss: first 20 steps %.5f, last 100 steps %.6f\n", first, last);
  std::printf("stepped during the backward pass and after it: %s\n", same ? "the same bits" : "DIFFERENT");
  return same && last < 0.5f * first ? 0 : 1;
}
