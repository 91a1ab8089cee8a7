// Device helpers shared by the CUDA kernels: dtype tags and conversions, aligned vector packs.
// Plain CUDA (no ATen): the torch build defines __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so every conversion below is an explicit intrinsic.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/image_math.h"
#include "cuda/launchers.h"

namespace abd_fast {
namespace cuda {

constexpr int kThreads = 256;

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>) with the C++ type of a dtype.
template <typename F>
void dispatch_image(DType t, F&& f) {
  switch (t) {
    case DType::U8: return f(Tag<uint8_t>{});
    case DType::F32: return f(Tag<float>{});
    case DType::F64: return f(Tag<double>{});
    case DType::BF16: return f(Tag<__nv_bfloat16>{});
    case DType::F16: return f(Tag<__half>{});
  }
}

template <typename F>
void dispatch_float(DType t, F&& f) {
  switch (t) {
    case DType::F32: return f(Tag<float>{});
    case DType::F64: return f(Tag<double>{});
    case DType::BF16: return f(Tag<__nv_bfloat16>{});
    case DType::F16: return f(Tag<__half>{});
    case DType::U8: return;  // rejected by the host code
  }
}

template <typename F>
void dispatch_acc(bool dbl, F&& f) {
  if (dbl) return f(Tag<double>{});
  return f(Tag<float>{});
}

// Element -> compute type, as the CPU kernels' to_unit: uint8 0..255 -> [0,1], floats as is
// (bf16/fp16 -> float is exact, as c10::BFloat16/Half -> float).
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(uint8_t v) { return uint8_to_unit<acc_t>(v); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(float v) { return static_cast<acc_t>(v); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(double v) { return static_cast<acc_t>(v); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__nv_bfloat16 v) {
  return static_cast<acc_t>(__bfloat162float(v));
}
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__half v) { return static_cast<acc_t>(__half2float(v)); }

// Compute type -> output element, as the CPU's out_t(v): c10::BFloat16 / c10::Half round a
// float to nearest even, and a double first to float (so double -> float -> bf16 here too).
template <typename out_t>
struct FromAcc;
template <>
struct FromAcc<float> {
  template <typename A>
  static __device__ __forceinline__ float cvt(A v) { return static_cast<float>(v); }
};
template <>
struct FromAcc<double> {
  template <typename A>
  static __device__ __forceinline__ double cvt(A v) { return static_cast<double>(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  template <typename A>
  static __device__ __forceinline__ __nv_bfloat16 cvt(A v) {
    return __float2bfloat16(static_cast<float>(v));
  }
};
template <>
struct FromAcc<__half> {
  template <typename A>
  static __device__ __forceinline__ __half cvt(A v) { return __float2half(static_cast<float>(v)); }
};

template <typename out_t, typename A>
__device__ __forceinline__ out_t from_acc(A v) { return FromAcc<out_t>::cvt(v); }

// N elements loaded or stored with one (or, above 16 bytes, several) aligned vector accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned grid_1d(int64_t work, int64_t max_blocks) {
  int64_t blocks = ceil_div(work, kThreads);
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

}  // namespace cuda
}  // namespace abd_fast
