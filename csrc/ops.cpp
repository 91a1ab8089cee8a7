// Schemas of every abd_fast op. Kernels register per device in csrc/cpu and csrc/cuda;
// autograd and fake (meta) implementations are registered from Python (abd_fast/ops).
#include <Python.h>
#include <torch/library.h>

#include "cpu/output_pool.h"

namespace {

// Runs f, turning a C++ exception (a bad ABD_FAST_CPU_POOL_MB, say) into a Python error.
template <typename F>
PyObject* guarded(F&& f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* cpu_pool_stats(PyObject*, PyObject*) {
  return guarded([] {
    const auto s = abd_fast::pool_stats();
    return Py_BuildValue("{sLsLsLsLsLsL}", "cached_bytes", (long long)s.cached_bytes,
                         "live_bytes", (long long)s.live_bytes, "reused", (long long)s.reused,
                         "fresh", (long long)s.fresh, "limit_bytes", (long long)s.limit_bytes,
                         "unknown_blocks", (long long)s.unknown_blocks);
  });
}

PyObject* release_cpu_pool(PyObject*, PyObject*) {
  return guarded([] {
    abd_fast::release_pool();
    Py_RETURN_NONE;
  });
}

PyObject* set_cpu_pool_limit(PyObject*, PyObject* arg) {
  const long long bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  return guarded([&] { return PyLong_FromLongLong(abd_fast::set_pool_limit(bytes)); });
}

// Tests only (tests/test_output_pool.py).
PyObject* pool_give_back_unknown(PyObject*, PyObject*) {
  return guarded([] {
    abd_fast::pool_give_back_unknown_for_test();
    Py_RETURN_NONE;
  });
}

PyObject* pool_hold_lock(PyObject*, PyObject* arg) {
  const long long ms = PyLong_AsLongLong(arg);
  if (ms == -1 && PyErr_Occurred()) return nullptr;
  return guarded([&] {
    Py_BEGIN_ALLOW_THREADS  // other Python threads (one that forks, say) run meanwhile
    abd_fast::pool_hold_lock_for_test(ms);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
  });
}

PyMethodDef methods[] = {
    {"set_cpu_pool_limit", set_cpu_pool_limit, METH_O,
     "Sets the bytes of unused blocks the pool keeps; returns the previous limit."},
    {"cpu_pool_stats", cpu_pool_stats, METH_NOARGS, "Counters of the CPU output pool."},
    {"release_cpu_pool", release_cpu_pool, METH_NOARGS, "Frees the pool's unused blocks."},
    {"_pool_give_back_unknown", pool_give_back_unknown, METH_NOARGS,
     "Tests only: the pool's deleter on a block it never handed out."},
    {"_pool_hold_lock", pool_hold_lock, METH_O,
     "Tests only: holds the pool's lock for the given milliseconds, without the GIL."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing the module runs the static registrations below; it also exposes the pool.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
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
