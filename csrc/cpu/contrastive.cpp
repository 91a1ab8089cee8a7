// CPU kernels of contrastive_forward / contrastive_backward (InfoNCE and the CLIP loss).
//
// The logits s * q @ k.T are never materialized: the columns are processed in blocks of
// width bc. Each block's raw dot products T = q @ k_blk.T [N, bc] come from a BLAS GEMM into
// one reused buffer; the row log-sum-exp is updated online, and for the symmetric loss each
// block holds whole columns, so their log-sum-exp is final after the block. The backward
// recomputes each block and turns it in place into dLoss/dLogits before two GEMMs.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "cpu/dispatch.h"

namespace abd_fast {
namespace {

// exp for float in a form gcc vectorizes (Cephes expf: Cody-Waite reduction and a degree-6
// polynomial, relative error about 2e-7). Inputs below -87 give about 1.6e-38 instead of 0,
// which is harmless in sums of softmax terms.
inline float exp_fast(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_fast(double x) { return std::exp(x); }

// Columns per block: the [N, bc] tile stays near 8 MB (fp32) whatever the batch size.
int64_t block_cols(int64_t N, int64_t M) {
  const int64_t bc = std::max<int64_t>(64, ((int64_t(1) << 21) / N) / 16 * 16);
  return std::min(bc, M);
}

template <typename acc_t>
acc_t row_max(const acc_t* t, int64_t n, acc_t s) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s * t[j]);
  return mx;
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& q,
                                                            const at::Tensor& k, acc_t s,
                                                            int64_t offset, bool sym) {
  const int64_t N = q.size(0), M = k.size(0);
  const auto opt = q.options();
  auto row_m = at::full({N}, -std::numeric_limits<acc_t>::infinity(), opt);
  auto row_s = at::zeros({N}, opt);
  auto diag = at::empty({N}, opt);
  auto col_lse = at::empty({sym ? M : 0}, opt);
  const int64_t bc = block_cols(N, M);
  auto buf = at::empty({N * bc}, opt);
  acc_t *pm = row_m.template data_ptr<acc_t>(), *ps = row_s.template data_ptr<acc_t>(),
        *pd = diag.template data_ptr<acc_t>();
  const int64_t P = std::min<int64_t>(at::get_num_threads(), N);  // row chunks for column stats
  std::vector<acc_t> cmax(P * bc), csum(P * bc);

  for (int64_t j0 = 0; j0 < M; j0 += bc) {
    const int64_t nb = std::min(bc, M - j0);
    auto tile = buf.narrow(0, 0, N * nb).view({N, nb});
    at::mm_out(tile, q, k.narrow(0, j0, nb).t());
    const acc_t* T = tile.template data_ptr<acc_t>();
    at::parallel_for(0, N, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t* t = T + i * nb;
        const acc_t mnew = std::max(pm[i], row_max(t, nb, s));
        acc_t sum = ps[i] * exp_fast(pm[i] - mnew);
        for (int64_t j = 0; j < nb; ++j) sum += exp_fast(s * t[j] - mnew);
        pm[i] = mnew;
        ps[i] = sum;
        const int64_t pos = offset + i - j0;
        if (pos >= 0 && pos < nb) pd[i] = s * t[pos];
      }
    });
    if (!sym) continue;
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        acc_t *cm = cmax.data() + p * bc, *cs = csum.data() + p * bc;
        std::fill(cm, cm + nb, -std::numeric_limits<acc_t>::infinity());
        std::fill(cs, cs + nb, acc_t(0));
        const int64_t r0 = N * p / P, r1 = N * (p + 1) / P;
        for (int64_t i = r0; i < r1; ++i)
          for (int64_t j = 0; j < nb; ++j) cm[j] = std::max(cm[j], s * T[i * nb + j]);
        for (int64_t i = r0; i < r1; ++i)
          for (int64_t j = 0; j < nb; ++j) cs[j] += exp_fast(s * T[i * nb + j] - cm[j]);
      }
    });
    acc_t* cl = col_lse.template data_ptr<acc_t>() + j0;
    for (int64_t j = 0; j < nb; ++j) {
      acc_t mx = -std::numeric_limits<acc_t>::infinity(), sum = 0;
      for (int64_t p = 0; p < P; ++p) mx = std::max(mx, cmax[p * bc + j]);
      for (int64_t p = 0; p < P; ++p) sum += csum[p * bc + j] * std::exp(cmax[p * bc + j] - mx);
      cl[j] = mx + std::log(sum);
    }
  }
  auto row_lse = row_m + at::log(row_s);
  auto loss = (row_lse - diag).mean();
  if (sym) loss = (loss + (col_lse - diag).mean()) / 2;
  return {loss, row_lse, col_lse};
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, acc_t> backward_impl(acc_t gl, const at::Tensor& q,
                                                        const at::Tensor& k, acc_t s,
                                                        const at::Tensor& row_lse,
                                                        const at::Tensor& col_lse, int64_t offset,
                                                        bool sym) {
  const int64_t N = q.size(0), M = k.size(0);
  const auto opt = q.options();
  auto dq = at::zeros_like(q);
  auto dk = at::empty_like(k);
  auto ds_rows = at::zeros({N}, opt);
  const int64_t bc = block_cols(N, M);
  auto buf = at::empty({N * bc}, opt);
  // dLoss/dlogit_ij = w * (P_ij [+ Q_ij]) - w_pos [i, j positive]
  const acc_t w = gl / acc_t(sym ? 2 * N : N), w_pos = sym ? 2 * w : w;
  const acc_t* rl = row_lse.template data_ptr<acc_t>();
  const acc_t* cl = sym ? col_lse.template data_ptr<acc_t>() : nullptr;
  acc_t* dsr = ds_rows.template data_ptr<acc_t>();

  for (int64_t j0 = 0; j0 < M; j0 += bc) {
    const int64_t nb = std::min(bc, M - j0);
    auto tile = buf.narrow(0, 0, N * nb).view({N, nb});
    at::mm_out(tile, q, k.narrow(0, j0, nb).t());
    acc_t* T = tile.template data_ptr<acc_t>();
    at::parallel_for(0, N, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        acc_t* t = T + i * nb;
        const int64_t pos = offset + i - j0;
        acc_t ds = (pos >= 0 && pos < nb) ? -w_pos * t[pos] : acc_t(0);
        const acc_t r = rl[i];
        if (sym) {
          const acc_t* c = cl + j0;
          for (int64_t j = 0; j < nb; ++j) {
            const acc_t l = s * t[j];
            const acc_t g = w * (exp_fast(l - r) + exp_fast(l - c[j]));
            ds += g * t[j];
            t[j] = g;
          }
        } else {
          for (int64_t j = 0; j < nb; ++j) {
            const acc_t g = w * exp_fast(s * t[j] - r);
            ds += g * t[j];
            t[j] = g;
          }
        }
        if (pos >= 0 && pos < nb) t[pos] -= w_pos;
        dsr[i] += ds;
      }
    });
    const auto kb = k.narrow(0, j0, nb);
    dq.addmm_(tile, kb, 1, s);
    auto dkb = dk.narrow(0, j0, nb);
    at::mm_out(dkb, tile.t(), q);
    dkb.mul_(s);
  }
  return {dq, dk, ds_rows.sum().template item<acc_t>()};
}

bool use_double(const at::Tensor& q) { return q.scalar_type() == at::kDouble; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, int64_t offset,
    bool symmetric) {
  check_contrastive(q, k, scale, offset, symmetric);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  dispatch_acc(use_double(q), [&](auto tag) {
    using acc_t = decltype(tag);
    const auto dt = c10::CppTypeToScalarType<acc_t>::value;
    out = forward_impl<acc_t>(q.to(dt).contiguous(), k.to(dt).contiguous(),
                              scale.item<acc_t>(), offset, symmetric);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse, int64_t offset, bool symmetric) {
  check_contrastive(q, k, scale, offset, symmetric);
  at::Tensor dq, dk, ds;
  dispatch_acc(use_double(q), [&](auto tag) {
    using acc_t = decltype(tag);
    const auto dt = c10::CppTypeToScalarType<acc_t>::value;
    TORCH_CHECK(row_lse.scalar_type() == dt && row_lse.numel() == q.size(0) &&
                    (!symmetric || (col_lse.scalar_type() == dt && col_lse.numel() == k.size(0))),
                "contrastive_backward: row_lse/col_lse do not match contrastive_forward's outputs");
    auto [gq, gk, gs] = backward_impl<acc_t>(
        grad_loss.item<acc_t>(), q.to(dt).contiguous(), k.to(dt).contiguous(),
        scale.item<acc_t>(), row_lse.contiguous(), col_lse.contiguous(), offset, symmetric);
    dq = gq.to(q.scalar_type());
    dk = gk.to(k.scalar_type());
    ds = at::full_like(scale, gs);
  });
  return {dq, dk, ds};
}

}  // namespace

TORCH_LIBRARY_IMPL(abd_fast, CPU, m) {
  m.impl("contrastive_forward", &contrastive_forward_cpu);
  m.impl("contrastive_backward", &contrastive_backward_cpu);
}

}  // namespace abd_fast
