// Every fastdarts op schema, in one place. Kernels register against these names from
// cpu/<op>.cpp (TORCH_LIBRARY_IMPL); fakes and autograd formulas live in fastdarts/ops/_cpp.py.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fastdarts._C` only needs to load this shared library: its static initialisers
// (TORCH_LIBRARY and TORCH_LIBRARY_IMPL) register the ops with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Compiled fastdarts kernels; the ops are under torch.ops.fastdarts.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastdarts, m) {
  // out = sum_k w[k] * xs[k]: the DARTS mixed-op sum. xs: K tensors of one shape, w: [K].
  m.def("weighted_sum(Tensor[] xs, Tensor w) -> Tensor");
  // grad_xs[k] = w[k] * grad, grad_w[k] = sum(grad * xs[k]), in one pass over grad.
  m.def("weighted_sum_backward(Tensor grad, Tensor[] xs, Tensor w) -> (Tensor[], Tensor)");
}
