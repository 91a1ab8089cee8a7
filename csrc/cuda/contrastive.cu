// CUDA kernels of the fused InfoNCE / CLIP loss (the host loop and the GEMMs are in
// ops_cuda.cpp; the algorithm is csrc/cpu/contrastive.cpp's). The host computes one column
// block's raw dot products T = q @ k_blk.T [N, nb] (fp32, or fp64 for fp64 features) with
// cuBLAS; these kernels do everything else on device, reading the scale (and grad_loss) from
// device memory, so nothing synchronizes with the host.
//
// Log-sum-exps use online (max, sum-of-exp) pairs: a thread folds its elements in one pass,
// pairs merge through warp shuffles (xor butterfly) and shared memory in a fixed order, so
// every result is deterministic.
//  - rows (lse_rows / grad_tile): one warp per row when nb <= 2048, else one 256-thread block
//    per row; consecutive threads read consecutive columns (coalesced).
//  - columns (lse_cols, symmetric loss): blocks of 32 columns x 8 row-lanes over chunks of
//    >= 128 rows (grid.y), partial pairs go to a workspace [chunks, nb] merged in chunk order.
#include <cfloat>
#include <cmath>

#include "cuda/device_utils.cuh"

namespace abd_fast {
namespace cuda {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int64_t kColChunkRows = 128;  // rows per column-statistics chunk (at least)
constexpr int64_t kMaxGridY = 65535;

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// Folds x into the running (max m, sum s of exp(. - m)).
template <typename T>
__device__ __forceinline__ void ms_add(T& m, T& s, T x) {
  if (x > m) {
    s = s * dexp(m - x) + T(1);  // m = -inf at first: s = 0 * 0 + 1
    m = x;
  } else {
    s += dexp(x - m);
  }
}

// Merges (m2, s2) into (m, s). Empty pairs are (-inf, 0).
template <typename T>
__device__ __forceinline__ void ms_merge(T& m, T& s, T m2, T s2) {
  const T mx = m > m2 ? m : m2;
  if (mx == neg_inf<T>()) return;  // both empty (avoids exp(-inf - -inf) = NaN)
  s = s * dexp(m - mx) + s2 * dexp(m2 - mx);
  m = mx;
}

template <typename T>
__device__ __forceinline__ void warp_merge(T& m, T& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const T s2 = __shfl_xor_sync(0xffffffffu, s, o);
    ms_merge(m, s, m2, s2);
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// WPR warps per row (1 or kWarps); the block covers kWarps / WPR consecutive rows.
template <typename T, int WPR>
__global__ void __launch_bounds__(kThreads)
    lse_rows_kernel(const T* __restrict__ tile, int64_t N, int64_t nb, int64_t j0,
                    int64_t offset, const T* __restrict__ scale, T* __restrict__ row_m,
                    T* __restrict__ row_s, T* __restrict__ diag, bool first) {
  constexpr int kRowsPerBlock = kWarps / WPR;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp / WPR;
  const int part = (warp % WPR) * 32 + lane;  // thread's index within its row
  const T s = *scale;
  T m = neg_inf<T>(), sum = T(0);
  if (i < N) {
    const T* t = tile + i * nb;
    for (int64_t j = part; j < nb; j += WPR * 32) ms_add(m, sum, s * t[j]);
  }
  warp_merge(m, sum);
  if constexpr (WPR > 1) {
    __shared__ T sh_m[kWarps], sh_s[kWarps];
    if (lane == 0) {
      sh_m[warp] = m;
      sh_s[warp] = sum;
    }
    __syncthreads();
    if (part == 0) {
      for (int w = 1; w < WPR; ++w) ms_merge(m, sum, sh_m[warp + w], sh_s[warp + w]);
    }
  }
  if (i < N && part == 0) {
    if (!first) ms_merge(m, sum, row_m[i], row_s[i]);
    row_m[i] = m;
    row_s[i] = sum;
    const int64_t pos = offset + i - j0;  // the positive's column within the block
    if (pos >= 0 && pos < nb) diag[i] = s * tile[i * nb + pos];
  }
}

// Column statistics over the rows of chunk blockIdx.y, 32 columns per block.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lse_cols_partial_kernel(const T* __restrict__ tile, int64_t N, int64_t nb,
                            const T* __restrict__ scale, int64_t rows_per_chunk,
                            T* __restrict__ part_m, T* __restrict__ part_s) {
  const int tx = threadIdx.x, ty = threadIdx.y;  // block (32, kWarps)
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < N ? r0 + rows_per_chunk : N;
  const T s = *scale;
  T m = neg_inf<T>(), sum = T(0);
  if (j < nb) {
    for (int64_t i = r0 + ty; i < r1; i += kWarps) ms_add(m, sum, s * tile[i * nb + j]);
  }
  __shared__ T sh_m[kWarps][32], sh_s[kWarps][32];
  sh_m[ty][tx] = m;
  sh_s[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && j < nb) {
    for (int r = 1; r < kWarps; ++r) ms_merge(m, sum, sh_m[r][tx], sh_s[r][tx]);
    part_m[static_cast<int64_t>(blockIdx.y) * nb + j] = m;
    part_s[static_cast<int64_t>(blockIdx.y) * nb + j] = sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lse_cols_final_kernel(const T* __restrict__ part_m, const T* __restrict__ part_s,
                          int64_t chunks, int64_t nb, T* __restrict__ col_lse) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= nb) return;
  T m = neg_inf<T>(), sum = T(0);
  for (int64_t p = 0; p < chunks; ++p) ms_merge(m, sum, part_m[p * nb + j], part_s[p * nb + j]);
  col_lse[j] = m + dlog(sum);
}

// One block: row_lse in place over row_m, and the loss (sums in double, fixed order).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    loss_kernel(T* __restrict__ row_m, const T* __restrict__ row_s, const T* __restrict__ diag,
                const T* __restrict__ col_lse, int64_t N, bool symmetric, T* __restrict__ loss) {
  double a = 0.0, c = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    const T lse = row_m[i] + dlog(row_s[i]);
    row_m[i] = lse;
    a += static_cast<double>(lse - diag[i]);
    if (symmetric) c += static_cast<double>(col_lse[i] - diag[i]);
  }
  a = warp_sum(a);
  c = warp_sum(c);
  __shared__ double sh_a[kWarps], sh_c[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sh_a[warp] = a;
    sh_c[warp] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0.0;
    c = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      a += sh_a[w];
      c += sh_c[w];
    }
    double l = a / static_cast<double>(N);
    if (symmetric) l = (l + c / static_cast<double>(N)) / 2.0;
    *loss = static_cast<T>(l);
  }
}

// tile and g_out may alias (G == T): every element is read, then written, by one thread.
template <typename T, typename G, int WPR>
__global__ void __launch_bounds__(kThreads)
    grad_tile_kernel(const T* tile, G* g_out, int64_t N, int64_t nb, int64_t j0, int64_t offset,
                     bool symmetric, const T* __restrict__ scale,
                     const T* __restrict__ grad_loss, const T* __restrict__ row_lse,
                     const T* __restrict__ col_lse, T* __restrict__ ds_rows, bool first) {
  constexpr int kRowsPerBlock = kWarps / WPR;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp / WPR;
  const int part = (warp % WPR) * 32 + lane;
  const T s = *scale;
  const T w = *grad_loss / T(symmetric ? 2 * N : N);
  const T w_pos = symmetric ? T(2) * w : w;
  T ds = T(0);
  if (i < N) {
    const T r = row_lse[i];
    const int64_t pos = offset + i - j0;
    const T* t = tile + i * nb;
    G* go = g_out + i * nb;
    for (int64_t j = part; j < nb; j += WPR * 32) {
      const T tv = t[j];
      const T l = s * tv;
      T g = symmetric ? w * (dexp(l - r) + dexp(l - col_lse[j])) : w * dexp(l - r);
      if (j == pos) g -= w_pos;
      ds += g * tv;
      go[j] = from_acc<G>(s * g);  // s * dLoss/dlogits: the GEMMs need no scalar from device
    }
  }
  ds = warp_sum(ds);
  if constexpr (WPR > 1) {
    __shared__ T sh[kWarps];
    if (lane == 0) sh[warp] = ds;
    __syncthreads();
    if (part == 0) {
      for (int w2 = 1; w2 < WPR; ++w2) ds += sh[warp + w2];
    }
  }
  if (i < N && part == 0) ds_rows[i] = first ? ds : ds_rows[i] + ds;
}

constexpr int64_t kWideRow = 2048;  // columns above which a row gets a whole block

int64_t cols_rows_per_chunk(int64_t N) {
  int64_t rpc = kColChunkRows;
  if (ceil_div(N, rpc) > kMaxGridY) rpc = ceil_div(N, kMaxGridY);
  return rpc;
}

}  // namespace

void launch_lse_rows(DType acc, const void* tile, int64_t N, int64_t nb, int64_t j0,
                     int64_t offset, const void* scale, void* row_m, void* row_s, void* diag,
                     bool first, cudaStream_t stream) {
  dispatch_acc(acc == DType::F64, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto args = [&](auto kernel, int64_t rows_per_block) {
      kernel<<<static_cast<unsigned>(ceil_div(N, rows_per_block)), kThreads, 0, stream>>>(
          static_cast<const T*>(tile), N, nb, j0, offset, static_cast<const T*>(scale),
          static_cast<T*>(row_m), static_cast<T*>(row_s), static_cast<T*>(diag), first);
    };
    if (nb > kWideRow) {
      args(lse_rows_kernel<T, kWarps>, 1);
    } else {
      args(lse_rows_kernel<T, 1>, kWarps);
    }
  });
}

int64_t lse_cols_chunks(int64_t N) { return ceil_div(N, cols_rows_per_chunk(N)); }

void launch_lse_cols(DType acc, const void* tile, int64_t N, int64_t nb, const void* scale,
                     void* part_m, void* part_s, void* col_lse, cudaStream_t stream) {
  const int64_t rpc = cols_rows_per_chunk(N), chunks = ceil_div(N, rpc);
  dispatch_acc(acc == DType::F64, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(ceil_div(nb, 32)), static_cast<unsigned>(chunks));
    lse_cols_partial_kernel<T><<<grid, dim3(32, kWarps), 0, stream>>>(
        static_cast<const T*>(tile), N, nb, static_cast<const T*>(scale), rpc,
        static_cast<T*>(part_m), static_cast<T*>(part_s));
    lse_cols_final_kernel<T><<<static_cast<unsigned>(ceil_div(nb, kThreads)), kThreads, 0,
                               stream>>>(static_cast<const T*>(part_m),
                                         static_cast<const T*>(part_s), chunks, nb,
                                         static_cast<T*>(col_lse));
  });
}

void launch_contrastive_loss(DType acc, void* row_m, const void* row_s, const void* diag,
                             const void* col_lse, int64_t N, bool symmetric, void* loss,
                             cudaStream_t stream) {
  dispatch_acc(acc == DType::F64, [&](auto tag) {
    using T = typename decltype(tag)::type;
    loss_kernel<T><<<1, kThreads, 0, stream>>>(
        static_cast<T*>(row_m), static_cast<const T*>(row_s), static_cast<const T*>(diag),
        static_cast<const T*>(col_lse), N, symmetric, static_cast<T*>(loss));
  });
}

void launch_contrastive_grad_tile(DType acc, DType g_t, const void* tile, void* g_out, int64_t N,
                                  int64_t nb, int64_t j0, int64_t offset, bool symmetric,
                                  const void* scale, const void* grad_loss, const void* row_lse,
                                  const void* col_lse, void* ds_rows, bool first,
                                  cudaStream_t stream) {
  auto run = [&](auto t_tag, auto g_tag) {
    using T = typename decltype(t_tag)::type;
    using G = typename decltype(g_tag)::type;
    auto args = [&](auto kernel, int64_t rows_per_block) {
      kernel<<<static_cast<unsigned>(ceil_div(N, rows_per_block)), kThreads, 0, stream>>>(
          static_cast<const T*>(tile), static_cast<G*>(g_out), N, nb, j0, offset, symmetric,
          static_cast<const T*>(scale), static_cast<const T*>(grad_loss),
          static_cast<const T*>(row_lse), static_cast<const T*>(col_lse),
          static_cast<T*>(ds_rows), first);
    };
    if (nb > kWideRow) {
      args(grad_tile_kernel<T, G, kWarps>, 1);
    } else {
      args(grad_tile_kernel<T, G, 1>, kWarps);
    }
  };
  if (acc == DType::F64) return run(Tag<double>{}, Tag<double>{});
  switch (g_t) {
    case DType::BF16: return run(Tag<float>{}, Tag<__nv_bfloat16>{});
    case DType::F16: return run(Tag<float>{}, Tag<__half>{});
    default: return run(Tag<float>{}, Tag<float>{});
  }
}

}  // namespace cuda
}  // namespace abd_fast
