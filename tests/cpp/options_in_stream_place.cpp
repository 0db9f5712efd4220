// A LionStepOptions pointer in the stream's place must not compile (it would convert to the
// stream's void * and the options would be dropped): tests/c_api.rs compiles this with
// -DBAD=1..4, each of which must fail, and without BAD, the calls that must still compile.
#include "lion.hpp"

int main() {
  lion::Optimizer opt(lion_config_default(), {lion_tensor_desc(4, LION_DTYPE_F32)});
  float w[4] = {1, 1, 1, 1}, g[4] = {1, 1, 1, 1};
  void *p[1] = {w};
  const void *q[1] = {g};
  uint32_t i = 0;
  LionStepOptions o = lion_step_options_default();
  (void)p, (void)q, (void)i, (void)o;
#if BAD == 1
  opt.step({w}, {g}, &o);
#elif BAD == 2
  opt.step_tensors({0}, {w}, {g}, &o);
#elif BAD == 3
  opt.step(p, q, 1, &o);
#elif BAD == 4
  opt.step_tensors(&i, 1, p, q, &o);
#else
  struct CUstream_st *s = nullptr;  // a CUstream still goes in the stream's place
  opt.step({w}, {g}, nullptr);
  opt.step({w}, {g}, s);
  opt.step({w}, {g}, o, nullptr);
  opt.step(p, q, 1, s);
  opt.step(p, q, 1);
  opt.step_tensors({0}, {w}, {g}, nullptr, &o);
  opt.step_tensors({0}, {w}, {g}, s);
  opt.step_tensors(&i, 1, p, q, s, &o);
#endif
}
