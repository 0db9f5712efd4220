// train_mlp.cpp: a linear model y = Wx + b fitted with Lion through the C++ wrapper
// (bindings/cpp/lion.hpp), with a checkpoint saved and restored half way.
//   c++ -std=c++17 train_mlp.cpp -I include -I bindings/cpp -L target/release -llion
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "lion.hpp"

int main() {
  const int in = 8, out = 4, batch = 64, steps = 2000;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> true_w(in * out), w(in * out, 0.0f), b(out, 0.0f), gw(in * out), gb(out);
  for (auto &v : true_w) v = u(rng);
  LionConfig config = lion_config_default();
  config.lr = 3e-3f;
  config.weight_decay = 0.01f;
  std::vector<LionTensorDesc> tensors = {lion_tensor_desc(w.size(), LION_DTYPE_F32), lion_tensor_desc(b.size(), LION_DTYPE_F32)};
  tensors[1].weight_decay_scale = 0.0f;
  lion::Optimizer opt(config, tensors);
  std::printf("liblion %s: fitting a linear map with Lion from C++\n", lion::version().c_str());
  float first = 0, last = 0;
  std::vector<uint8_t> checkpoint;
  for (int step = 1; step <= steps; step++) {
    std::fill(gw.begin(), gw.end(), 0.0f);
    std::fill(gb.begin(), gb.end(), 0.0f);
    float loss = 0;
    for (int n = 0; n < batch; n++) {
      float x[in];
      for (auto &v : x) v = u(rng);
      for (int o = 0; o < out; o++) {
        float pred = b[o], target = 0;
        for (int i = 0; i < in; i++) pred += w[o * in + i] * x[i], target += true_w[o * in + i] * x[i];
        float err = pred - target;
        loss += err * err / batch;
        for (int i = 0; i < in; i++) gw[o * in + i] += 2 * err * x[i] / batch;
        gb[o] += 2 * err / batch;
      }
    }
    opt.set_lr(3e-3f * 0.5f * (1.0f + std::cos(3.14159265f * step / steps)));
    opt.step({w.data(), b.data()}, {gw.data(), gb.data()});
    if (step == steps / 2) checkpoint = opt.save();
    if (step == steps / 2 + 1) opt.load(checkpoint);  // resume from the checkpoint: same run
    if (step <= 20) first += loss / 20;
    if (step > steps - 100) last += loss / 100;
    if (step == 1 || step % 400 == 0) std::printf("step %5d  loss %.6f\n", step, loss);
  }
  std::printf("mean loss: first 20 steps %.5f, last 100 steps %.6f\n", first, last);
  return last < 0.01f * first ? 0 : 1;
}
