// Schemas of every abd_fast op. Kernels register per device in csrc/cpu and csrc/cuda;
// autograd and fake (meta) implementations are registered from Python (abd_fast/ops).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An importable module whose only job is to run the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(abd_fast, m) {
  // Image op: trigger or perturbation on the selected rows, clamp to [0,1], normalize.
  // kind: none | patch | blend | add | warp. See abd_fast/ops/reference.py for the math.
  m.def("image_op(Tensor images, str kind, Tensor? src, Tensor? loc, Tensor? rows, float alpha, "
        "float eps, Tensor? mean, Tensor? std, ScalarType out_dtype) -> Tensor");
  // Gradient of image_op's output with respect to src (kinds patch, blend, add).
  m.def("image_op_backward(Tensor grad_out, Tensor images, str kind, Tensor src, Tensor? loc, "
        "Tensor? rows, float alpha, float eps, Tensor? std) -> Tensor");
  // InfoNCE over tiles with online log-sum-exp; never materializes q @ k.T.
  // symmetric=False: loss = mean_i(row_lse_i - s q_i.k_{offset+i}); col_lse is empty.
  // symmetric=True (N == M, offset 0): the CLIP loss, both directions from the same tiles.
  m.def("contrastive_forward(Tensor q, Tensor k, Tensor scale, int offset, bool symmetric) "
        "-> (Tensor loss, Tensor row_lse, Tensor col_lse)");
  m.def("contrastive_backward(Tensor grad_loss, Tensor q, Tensor k, Tensor scale, Tensor row_lse, "
        "Tensor col_lse, int offset, bool symmetric) -> (Tensor grad_q, Tensor grad_k, Tensor grad_scale)");
}
