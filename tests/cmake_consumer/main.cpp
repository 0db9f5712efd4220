// Built against an installed liblion by CMake (tests/install.rs): one step through lion.hpp.
#include <cstdio>
#include <vector>

#include "lion.hpp"

int main() {
  LionConfig config = lion_config_default();
  config.lr = 0.5f;
  std::vector<float> p = {1.0f}, g = {2.0f};
  lion::Optimizer opt(config, {lion_tensor_desc(1, LION_DTYPE_F32)});
  opt.step({p.data()}, {g.data()});
  bool ok = p[0] == 0.5f && opt.step_count() == 1;
  std::printf("cmake consumer: %d passed, %d failed\n", ok ? 1 : 0, ok ? 0 : 1);
  return ok ? 0 : 1;
}
