// Dtype dispatch for the CPU kernels: calls f with a value of the C++ type of a ScalarType.
#pragma once
#include <ATen/ATen.h>

namespace abd_fast {

template <typename F>
void dispatch_image_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kByte: return f(uint8_t{});
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "abd_fast: unsupported dtype ", t);
  }
}

// Floating types only (outputs, gradients, features).
template <typename F>
void dispatch_float_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "abd_fast: unsupported dtype ", t);
  }
}

// Compute precision: float64 when asked for, float32 otherwise.
template <typename F>
void dispatch_acc(bool use_double, F&& f) {
  if (use_double) return f(double{});
  return f(float{});
}

template <typename acc_t, typename in_t>
inline acc_t to_unit(in_t v) {
  if constexpr (std::is_same_v<in_t, uint8_t>) {
    return uint8_to_unit<acc_t>(v);
  } else {
    return static_cast<acc_t>(v);
  }
}

}  // namespace abd_fast
