// Every fastdarts op schema, and the empty Python module whose import registers them.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fastdarts._C` loads this library, which runs the static registrars below and the
// TORCH_LIBRARY_IMPL blocks at the bottom of each kernel file; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastdarts, m) {
  // out = sum_k w[k] * xs[k]: the DARTS mixed-op weighted sum.
  m.def("weighted_sum(Tensor[] xs, Tensor w) -> Tensor");
  // (grad_xs[k] = w[k] * grad, grad_w[k] = <grad, xs[k]>) in one pass over grad and xs.
  m.def("weighted_sum_backward(Tensor grad, Tensor[] xs, Tensor w) -> (Tensor[], Tensor)");
}
