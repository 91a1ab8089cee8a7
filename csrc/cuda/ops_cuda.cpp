// Host side of the CUDA kernels: validation (common/checks.h, as the CPU ops), allocation,
// the cuBLAS GEMMs of the contrastive loss, kernel launches on the current stream, and the
// registration of the four ops for the CUDA dispatch key. Nothing here synchronizes with the
// device: the logit scale and grad_loss stay on device and are read by the kernels.
//
// Contrastive precision: the dot tiles T = q @ k_blk.T are fp32 (fp64 for fp64 features);
// bf16/fp16 features use GEMMs with bf16/fp16 operands and fp32 accumulation and output
// (aten::mm.dtype). In the backward the fused kernel writes s * dLoss/dlogits in the
// features' dtype for bf16/fp16 (as flash-attention does with P and dS), so the two gradient
// GEMMs run on tensor cores with fp32 accumulation: dq accumulates over column blocks in an
// fp32 buffer through cublasGemmEx (beta = 1, fp32 output), each dk block is one fp32-output
// GEMM; both are rounded to the features' dtype once at the end. fp32/fp64 features keep
// everything in their own dtype (fp32 GEMMs follow torch's TF32 settings).
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "cuda/launchers.h"

extern "C" {
// Importing abd_fast._C_cuda runs the static registrations below.
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}

namespace abd_fast {
namespace {

using cuda::DType;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kByte: return DType::U8;
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "abd_fast (CUDA): unsupported dtype ", t);
  }
}

template <typename T = void>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<const T*>(t->data_ptr()) : nullptr;
}

// Grid-stride kernels: enough blocks for two full waves at 256 threads per block.
int64_t max_blocks() {
  return int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
}

void check_cuda(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), "abd_fast (CUDA): ", what, " must be a CUDA tensor");
}

// ---- image_op ------------------------------------------------------------------------------

at::Tensor image_op_cuda(const at::Tensor& images, std::string_view kind_name,
                         const std::optional<at::Tensor>& src,
                         const std::optional<at::Tensor>& loc,
                         const std::optional<at::Tensor>& rows, double alpha, double eps,
                         const std::optional<at::Tensor>& mean,
                         const std::optional<at::Tensor>& stdv, at::ScalarType out_dtype) {
  const Kind kind = parse_kind(std::string(kind_name));
  const ImageGeom g = check_image_op(images, kind, src, loc, rows, mean, stdv, out_dtype);
  check_cuda(images, "images");
  const c10::cuda::CUDAGuard guard(images.device());
  auto out = at::empty(images.sizes(), images.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const bool dbl = images.scalar_type() == at::kDouble ||
                   (src.has_value() && src->scalar_type() == at::kDouble);
  std::optional<at::Tensor> s;  // src in the compute dtype (contiguous was checked)
  if (src.has_value() && kind != Kind::None) {
    s = src->to(dbl ? at::kDouble : at::kFloat).contiguous();
  }
  cuda::ImageForwardArgs a{};
  a.g = g;
  a.kind = kind;
  a.img = images.data_ptr();
  a.img_t = dtype_of(images.scalar_type());
  a.src = opt_ptr(s);
  a.loc = kind == Kind::Patch ? opt_ptr<int64_t>(loc) : nullptr;
  a.rows = opt_ptr<bool>(rows);
  a.alpha = alpha;
  a.eps = eps;
  a.mean = opt_ptr<float>(mean);
  a.stdv = opt_ptr<float>(stdv);
  a.out = out.data_ptr();
  a.out_t = dtype_of(out_dtype);
  a.dbl = dbl;
  cuda::launch_image_forward(a, max_blocks(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor image_op_backward_cuda(const at::Tensor& grad_out, const at::Tensor& images,
                                  std::string_view kind_name, const at::Tensor& src,
                                  const std::optional<at::Tensor>& loc,
                                  const std::optional<at::Tensor>& rows, double alpha, double eps,
                                  const std::optional<at::Tensor>& stdv) {
  const Kind kind = parse_kind(std::string(kind_name));
  TORCH_CHECK(kind == Kind::Patch || kind == Kind::Blend || kind == Kind::Add,
              "image_op_backward: kind '", kind_name, "' has no gradient with respect to src");
  const ImageGeom g =
      check_image_op(images, kind, src, loc, rows, stdv, stdv, grad_out.scalar_type());
  TORCH_CHECK(grad_out.sizes() == images.sizes(), "image_op_backward: grad_out must match images");
  TORCH_CHECK(grad_out.device() == images.device(), "image_op_backward: grad_out must be on ",
              images.device());
  check_cuda(images, "images");
  const c10::cuda::CUDAGuard guard(images.device());
  const auto gout = grad_out.contiguous();
  auto gsrc = at::empty(src.sizes(), src.options());  // contiguous, like src
  if (gsrc.numel() == 0) return gsrc;

  // A shared src is read by every row: split the batch into chunks so that about 2^18
  // threads work (a 3x16x16 patch alone is only 768 elements), at most 1024 chunks.
  const int64_t E = g.C * g.h * g.w;
  int64_t nchunk = 1, rows_per_chunk = g.B;
  at::Tensor workspace;
  if (g.src_bstride == 0 && g.B > 1) {
    const int64_t want = std::min<int64_t>({g.B, int64_t(1024),
                                            std::max<int64_t>(1, ((int64_t(1) << 18) + E - 1) / E)});
    rows_per_chunk = (g.B + want - 1) / want;
    nchunk = (g.B + rows_per_chunk - 1) / rows_per_chunk;  // no empty chunk
    if (nchunk > 1) workspace = at::empty({nchunk * E}, src.options());
  }
  cuda::ImageBackwardArgs a{};
  a.g = g;
  a.kind = kind;
  a.gout = gout.data_ptr();
  a.gout_t = dtype_of(gout.scalar_type());
  a.img = images.data_ptr();
  a.img_t = dtype_of(images.scalar_type());
  a.src = src.data_ptr();
  a.loc = kind == Kind::Patch ? opt_ptr<int64_t>(loc) : nullptr;
  a.rows = opt_ptr<bool>(rows);
  a.alpha = alpha;
  a.eps = eps;
  a.stdv = opt_ptr<float>(stdv);
  a.gsrc = gsrc.data_ptr();
  a.dbl = src.scalar_type() == at::kDouble;  // as the CPU op: the compute dtype is src's
  a.nchunk = nchunk;
  a.rows_per_chunk = rows_per_chunk;
  a.workspace = nchunk > 1 ? workspace.data_ptr() : nullptr;
  cuda::launch_image_backward(a, max_blocks(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gsrc;
}

// ---- contrastive ---------------------------------------------------------------------------

// Columns per block: the [N, bc] fp32 tile stays near 16 MB (L2-sized on A100/H100, so the
// kernels re-reading it mostly hit L2), with at least 128 columns for GEMM efficiency.
int64_t block_cols(int64_t N, int64_t M) {
  const int64_t bc = std::max<int64_t>(128, ((int64_t(1) << 22) / N) / 64 * 64);
  return std::min(bc, M);
}

bool low_precision(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf;
}

// tile = q @ kb.T in the accumulation dtype (fp32 output for bf16/fp16 operands).
void dot_tile(at::Tensor& tile, const at::Tensor& q, const at::Tensor& kb) {
  if (low_precision(q)) {
    at::mm_out(tile, q, kb.t(), at::kFloat);
  } else {
    at::mm_out(tile, q, kb.t());
  }
}

// c += a @ b with a [m,k], b [k,n] bf16/fp16 row-major and c [m,n] fp32 row-major: tensor-core
// GEMM with fp32 accumulation and output, beta = 1 (no fp32 temporary for the product).
void gemm_accumulate_f32(const at::Tensor& a, const at::Tensor& b, at::Tensor& c) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0 || k == 0) return;
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous() &&
                  c.scalar_type() == at::kFloat && a.scalar_type() == b.scalar_type(),
              "abd_fast: internal GEMM layout error");
  TORCH_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX,
              "contrastive (CUDA): dimensions beyond 2^31 are not supported");
  const cudaDataType_t ab = a.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  const float one = 1.0f;
  // Row-major C = A B is column-major C^T = B^T A^T: cuBLAS sees b as [n,k] (ld n), a as
  // [k,m] (ld k) and c as [n,m] (ld n).
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n),
                                    static_cast<int>(m), static_cast<int>(k), &one, b.data_ptr(),
                                    ab, static_cast<int>(n), a.data_ptr(), ab,
                                    static_cast<int>(k), &one, c.data_ptr(), CUDA_R_32F,
                                    static_cast<int>(n), CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, int64_t offset,
    bool symmetric) {
  check_contrastive(q, k, scale, offset, symmetric);
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const DType acc_t = dtype_of(acc);
  const auto q_ = q.contiguous(), k_ = k.contiguous();
  const auto s = scale.reshape({}).to(acc).contiguous();  // stays on device
  const int64_t N = q.size(0), M = k.size(0);
  const auto opt = q.options().dtype(acc);
  auto row_m = at::empty({N}, opt);  // becomes row_lse
  auto row_s = at::empty({N}, opt);
  auto diag = at::empty({N}, opt);
  auto col_lse = at::empty({symmetric ? M : 0}, opt);
  auto loss = at::empty({}, opt);
  const int64_t bc = block_cols(N, M);
  auto buf = at::empty({N * bc}, opt);
  const int64_t chunks = symmetric ? cuda::lse_cols_chunks(N) : 0;
  auto part = at::empty({2 * chunks * bc}, opt);
  const auto stream = at::cuda::getCurrentCUDAStream();

  for (int64_t j0 = 0; j0 < M; j0 += bc) {
    const int64_t nb = std::min(bc, M - j0);
    auto tile = buf.narrow(0, 0, N * nb).view({N, nb});
    dot_tile(tile, q_, k_.narrow(0, j0, nb));
    cuda::launch_lse_rows(acc_t, tile.data_ptr(), N, nb, j0, offset, s.data_ptr(),
                          row_m.data_ptr(), row_s.data_ptr(), diag.data_ptr(), j0 == 0, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (symmetric) {
      cuda::launch_lse_cols(acc_t, tile.data_ptr(), N, nb, s.data_ptr(), part.data_ptr(),
                            part.narrow(0, chunks * bc, chunks * bc).data_ptr(),
                            col_lse.narrow(0, j0, nb).data_ptr(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  cuda::launch_contrastive_loss(acc_t, row_m.data_ptr(), row_s.data_ptr(), diag.data_ptr(),
                                symmetric ? col_lse.data_ptr() : nullptr, N, symmetric,
                                loss.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, row_m, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse, int64_t offset, bool symmetric) {
  check_contrastive(q, k, scale, offset, symmetric);
  check_cuda(q, "q");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(row_lse.scalar_type() == acc && row_lse.numel() == q.size(0) &&
                  (!symmetric || (col_lse.scalar_type() == acc && col_lse.numel() == k.size(0))),
              "contrastive_backward: row_lse/col_lse do not match contrastive_forward's outputs");
  TORCH_CHECK(grad_loss.numel() == 1, "contrastive_backward: grad_loss must hold one value");
  for (const auto* t : {&grad_loss, &row_lse, &col_lse}) {
    TORCH_CHECK(t->device() == q.device(), "contrastive_backward: all tensors must be on ",
                q.device());
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const DType acc_t = dtype_of(acc);
  const bool low = low_precision(q);
  const auto q_ = q.contiguous(), k_ = k.contiguous();
  const auto s = scale.reshape({}).to(acc).contiguous();
  const auto gl = grad_loss.reshape({}).to(acc).contiguous();
  const auto rl = row_lse.contiguous();
  const auto cl = symmetric ? col_lse.contiguous() : col_lse;
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  const auto opt = q.options().dtype(acc);
  const int64_t bc = block_cols(N, M);
  auto buf = at::empty({N * bc}, opt);
  auto ds_rows = at::empty({N}, opt);
  // dq accumulates over the column blocks (fp32 for bf16/fp16 features); dk blocks are final.
  auto dq = at::zeros({N, D}, low ? q.options().dtype(at::kFloat) : opt);
  auto dk = at::empty({M, D}, q.options());
  at::Tensor gbuf, dk_f32;
  if (low) {
    gbuf = at::empty({N * bc}, q.options());         // s * dLoss/dlogits in bf16/fp16
    dk_f32 = at::empty({bc * D}, opt);                 // fp32 output of one dk block
  }
  const auto stream = at::cuda::getCurrentCUDAStream();

  for (int64_t j0 = 0; j0 < M; j0 += bc) {
    const int64_t nb = std::min(bc, M - j0);
    auto tile = buf.narrow(0, 0, N * nb).view({N, nb});
    const auto kb = k_.narrow(0, j0, nb);
    dot_tile(tile, q_, kb);
    auto G = low ? gbuf.narrow(0, 0, N * nb).view({N, nb}) : tile;  // in place when !low
    cuda::launch_contrastive_grad_tile(
        acc_t, dtype_of(G.scalar_type()), tile.data_ptr(), G.data_ptr(), N, nb, j0, offset,
        symmetric, s.data_ptr(), gl.data_ptr(), rl.data_ptr(),
        symmetric ? cl.narrow(0, j0, nb).data_ptr() : nullptr, ds_rows.data_ptr(), j0 == 0,
        stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto dkb = dk.narrow(0, j0, nb);
    if (low) {
      gemm_accumulate_f32(G, kb, dq);  // dq += (s G) @ k_blk
      auto dkf = dk_f32.narrow(0, 0, nb * D).view({nb, D});
      at::mm_out(dkf, G.t(), q_, at::kFloat);  // dk_blk = (s G)^T @ q
      dkb.copy_(dkf);
    } else {
      dq.addmm_(G, kb);
      at::mm_out(dkb, G.t(), q_);
    }
  }
  auto gs = at::empty_like(scale);
  gs.copy_(ds_rows.sum());  // device-side; broadcasts the 0-dim sum to scale's shape
  return {low ? dq.to(q.scalar_type()) : dq, dk, gs};
}

}  // namespace

TORCH_LIBRARY_IMPL(abd_fast, CUDA, m) {
  m.impl("image_op", &image_op_cuda);
  m.impl("image_op_backward", &image_op_backward_cuda);
  m.impl("contrastive_forward", &contrastive_forward_cuda);
  m.impl("contrastive_backward", &contrastive_backward_cuda);
}

}  // namespace abd_fast
