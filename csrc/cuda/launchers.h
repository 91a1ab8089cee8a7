// Interface between the host code (ops_cuda.cpp: ATen, validation, allocation, cuBLAS) and
// the CUDA kernels (image_ops.cu, contrastive.cu). Raw pointers, sizes and a stream only, so
// the .cu files compile without the ATen/torch headers. Every launcher only enqueues kernels
// on `stream` (no synchronization); the caller checks the launch with
// C10_CUDA_KERNEL_LAUNCH_CHECK() right after the call.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/image_math.h"

namespace abd_fast {
namespace cuda {

enum class DType : int { U8 = 0, F32 = 1, F64 = 2, BF16 = 3, F16 = 4 };

// ---- image_op ------------------------------------------------------------------------------

struct ImageForwardArgs {
  ImageGeom g;
  Kind kind;
  const void* img;  // [B,C,H,W] of img_t
  DType img_t;
  const void* src;  // acc_t (float or double, see dbl), contiguous; nullptr for kind none
  const int64_t* loc;  // [B,2] (kind patch) or nullptr
  const bool* rows;    // [B] or nullptr (all rows)
  double alpha, eps;
  const float* mean;  // [C] or nullptr
  const float* stdv;  // [C] or nullptr
  void* out;          // [B,C,H,W] of out_t
  DType out_t;
  bool dbl;  // compute in double (images or src are float64)
};

// max_blocks caps the grid (the kernel is grid-stride).
void launch_image_forward(const ImageForwardArgs& a, int64_t max_blocks, cudaStream_t stream);

struct ImageBackwardArgs {
  ImageGeom g;
  Kind kind;           // patch, blend or add
  const void* gout;    // [B,C,H,W] of gout_t, contiguous
  DType gout_t;
  const void* img;     // [B,C,H,W] of img_t
  DType img_t;
  const void* src;     // acc_t, [C,h,w] or [B,C,h,w]
  const int64_t* loc;
  const bool* rows;
  double alpha, eps;
  const float* stdv;   // [C] or nullptr
  void* gsrc;          // acc_t, shaped like src
  bool dbl;
  // Shared src only: the batch is split into nchunk chunks of rows_per_chunk rows; each
  // chunk writes its partial sums to workspace [nchunk, C*h*w] (acc_t) and a second kernel
  // adds them in chunk order. nchunk == 1: no workspace, gsrc is written directly.
  int64_t nchunk, rows_per_chunk;
  void* workspace;
};

void launch_image_backward(const ImageBackwardArgs& a, int64_t max_blocks, cudaStream_t stream);

// Vector width (elements per 16-byte load) the forward kernel uses for an input dtype.
int image_vec_width(DType img_t);

// ---- contrastive ---------------------------------------------------------------------------
// acc is F32 or F64: the dtype of the tile and of every statistic; the scale and grad_loss
// pointers point to one acc value in device memory. The tile is row-major [N, nb].

// Online row log-sum-exp update with the block's columns j0..j0+nb-1, and the positive's
// logit diag[i] = s * tile[i, offset + i - j0] when that column is in the block.
// first: row_m/row_s hold nothing yet (the first block).
void launch_lse_rows(DType acc, const void* tile, int64_t N, int64_t nb, int64_t j0,
                     int64_t offset, const void* scale, void* row_m, void* row_s, void* diag,
                     bool first, cudaStream_t stream);

// Number of row chunks the column log-sum-exp splits N into (size of its workspace: that
// many times nb values, twice).
int64_t lse_cols_chunks(int64_t N);

// Column log-sum-exp over all N rows of the block (the symmetric loss): col_lse[j] for
// j < nb (col_lse points at column j0). part_m / part_s: workspace of lse_cols_chunks(N) * nb.
void launch_lse_cols(DType acc, const void* tile, int64_t N, int64_t nb, const void* scale,
                     void* part_m, void* part_s, void* col_lse, cudaStream_t stream);

// row_lse[i] = row_m[i] + log(row_s[i]) (in place over row_m), and the 0-dim loss:
// mean(row_lse - diag), averaged with mean(col_lse - diag) when symmetric.
void launch_contrastive_loss(DType acc, void* row_m, const void* row_s, const void* diag,
                             const void* col_lse, int64_t N, bool symmetric, void* loss,
                             cudaStream_t stream);

// Backward of one block: tile (raw dots q.k_j) -> g_out = s * dLoss/dlogits, with
// dLoss/dlogit_ij = w (exp(l_ij - row_lse_i) [+ exp(l_ij - col_lse_j)]) - w_pos [j == pos_i],
// w = grad_loss / N (/ 2N symmetric), w_pos = w (2w symmetric). g_out has dtype g_t (acc, or
// the bf16/fp16 of the features) and may alias tile when g_t == acc. ds_rows[i] (+)= sum_j
// dLoss/dlogit_ij * tile_ij, the row's share of dLoss/dscale (first: = instead of +=).
// col_lse points at column j0 (ignored unless symmetric).
void launch_contrastive_grad_tile(DType acc, DType g_t, const void* tile, void* g_out, int64_t N,
                                  int64_t nb, int64_t j0, int64_t offset, bool symmetric,
                                  const void* scale, const void* grad_loss, const void* row_lse,
                                  const void* col_lse, void* ds_rows, bool first,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace abd_fast
