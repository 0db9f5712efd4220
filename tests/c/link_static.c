/* Links liblion.a (not the shared library) and takes one step: proves the static archive
 * carries everything it needs but the system libraries. Built by tests/c_api.rs. */
#include "lion.h"
#include "check.h"

int main(void) {
  float p[3] = {1.0f, -1.0f, 0.5f}, g[3] = {1.0f, -1.0f, 0.0f};
  void *params[1] = {p};
  const void *grads[1] = {g};
  LionConfig c = lion_config_default();
  LionTensorDesc t = lion_tensor_desc(3, LION_DTYPE_F32);
  LionOptimizer *opt = NULL;
  c.lr = 0.5f;
  CHECK_STATUS(lion_create(&c, &t, 1, &opt), LION_OK);
  CHECK_STATUS(lion_step(opt, params, grads, 1, NULL), LION_OK);
  CHECK(p[0] == 0.5f && p[1] == -0.5f && p[2] == 0.5f);
  lion_destroy(opt);
  return check_report("link_static.c");
}
