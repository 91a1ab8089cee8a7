// CPU kernels of image_op and image_op_backward: one pass over the batch, parallel over
// image rows (OpenMP through at::parallel_for), inner loops over contiguous pixels.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "cpu/dispatch.h"

namespace abd_fast {
namespace {

template <typename in_t, typename acc_t, typename out_t>
void image_forward(const ImageGeom g, Kind kind, const in_t* img, const acc_t* src,
                   const int64_t* loc, const bool* rows, acc_t alpha, acc_t eps,
                   const float* mean, const float* stdv, out_t* out) {
  const int64_t H = g.H, W = g.W, HW = H * W;
  at::parallel_for(0, g.B * g.C * H, 8, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(W);
    acc_t* v = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = r % H, bc = r / H, c = bc % g.C, b = bc / g.C;
      const in_t* xin = img + r * W;
      out_t* o = out + r * W;
      const acc_t m = mean ? acc_t(mean[c]) : acc_t(0);
      const acc_t inv = mean ? acc_t(1) / acc_t(stdv[c]) : acc_t(1);
      const bool sel = kind != Kind::None && (rows == nullptr || rows[b]);
      if (!sel) {
        for (int64_t x = 0; x < W; ++x) o[x] = out_t((clamp01(to_unit<acc_t>(xin[x])) - m) * inv);
        continue;
      }
      const acc_t* s = src + b * g.src_bstride;
      switch (kind) {
        case Kind::Patch: {
          for (int64_t x = 0; x < W; ++x) v[x] = to_unit<acc_t>(xin[x]);
          const int64_t ly = y - loc[2 * b], lx = loc[2 * b + 1];
          if (ly >= 0 && ly < g.h) {
            const acc_t* p = s + (c * g.h + ly) * g.w - lx;  // p[x] is the patch at column x
            const int64_t x0 = std::max<int64_t>(0, lx), x1 = std::min<int64_t>(W, lx + g.w);
            for (int64_t x = x0; x < x1; ++x) v[x] = p[x];
          }
          break;
        }
        case Kind::Blend: {
          const acc_t* p = s + c * HW + y * W;
          for (int64_t x = 0; x < W; ++x)
            v[x] = pointwise_value(Kind::Blend, to_unit<acc_t>(xin[x]), p[x], alpha, eps);
          break;
        }
        case Kind::Add: {
          const acc_t* p = s + c * HW + y * W;
          for (int64_t x = 0; x < W; ++x)
            v[x] = pointwise_value(Kind::Add, to_unit<acc_t>(xin[x]), p[x], alpha, eps);
          break;
        }
        case Kind::Warp: {
          const in_t* plane = img + bc * HW;
          const acc_t* grid = s + y * W * 2;
          auto load = [&](int64_t yy, int64_t xx) { return to_unit<acc_t>(plane[yy * W + xx]); };
          for (int64_t x = 0; x < W; ++x)
            v[x] = bilinear_zeros<acc_t>(load, H, W, grid[2 * x], grid[2 * x + 1]);
          break;
        }
        default: break;
      }
      for (int64_t x = 0; x < W; ++x) o[x] = out_t((clamp01(v[x]) - m) * inv);
    }
  });
}

// Gradient with respect to src. Each src row is owned by one task, which loops over the
// samples that read it, so the sum over a shared src has a fixed order (deterministic).
template <typename in_t, typename acc_t, typename gout_t>
void image_backward(const ImageGeom g, Kind kind, const gout_t* gout, const in_t* img,
                    const acc_t* src, const int64_t* loc, const bool* rows, acc_t alpha,
                    acc_t eps, const float* stdv, acc_t* gsrc) {
  const int64_t H = g.H, W = g.W, h = g.h, w = g.w;
  const int64_t nsrc = g.src_bstride ? g.B : 1;  // src samples
  at::parallel_for(0, nsrc * g.C * h, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t py = r % h, c = (r / h) % g.C, sb = r / (h * g.C);
      const acc_t* s = src + r * w;
      acc_t* gs = gsrc + r * w;
      for (int64_t x = 0; x < w; ++x) gs[x] = acc_t(0);
      const acc_t inv = stdv ? acc_t(1) / acc_t(stdv[c]) : acc_t(1);
      const int64_t b0 = g.src_bstride ? sb : 0, b1 = g.src_bstride ? sb + 1 : g.B;
      for (int64_t b = b0; b < b1; ++b) {
        if (rows && !rows[b]) continue;
        if (kind == Kind::Patch) {
          const int64_t y = loc[2 * b] + py, lx = loc[2 * b + 1];
          if (y < 0 || y >= H) continue;
          const gout_t* go = gout + ((b * g.C + c) * H + y) * W + lx;  // go[px] at column lx+px
          const int64_t p0 = std::max<int64_t>(0, -lx), p1 = std::min<int64_t>(w, W - lx);
          for (int64_t px = p0; px < p1; ++px)
            gs[px] += clamp_passes(s[px], acc_t(0), acc_t(1)) ? acc_t(go[px]) * inv : acc_t(0);
        } else {
          const int64_t off = ((b * g.C + c) * H + py) * W;
          const gout_t* go = gout + off;
          const in_t* xin = img + off;
          for (int64_t x = 0; x < W; ++x) {
            const acc_t v = pointwise_value(kind, to_unit<acc_t>(xin[x]), s[x], alpha, eps);
            const acc_t d = pointwise_dsrc(kind, s[x], alpha, eps);
            gs[x] += clamp_passes(v, acc_t(0), acc_t(1)) ? acc_t(go[x]) * inv * d : acc_t(0);
          }
        }
      }
    }
  });
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

at::Tensor image_op_cpu(const at::Tensor& images, std::string_view kind_name,
                        const std::optional<at::Tensor>& src, const std::optional<at::Tensor>& loc,
                        const std::optional<at::Tensor>& rows, double alpha, double eps,
                        const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& stdv,
                        at::ScalarType out_dtype) {
  const Kind kind = parse_kind(std::string(kind_name));
  const ImageGeom g = check_image_op(images, kind, src, loc, rows, mean, stdv, out_dtype);
  auto out = at::empty(images.sizes(), images.options().dtype(out_dtype));
  const bool dbl = images.scalar_type() == at::kDouble ||
                   (src.has_value() && src->scalar_type() == at::kDouble);
  dispatch_acc(dbl, [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    std::optional<at::Tensor> s;
    if (src.has_value()) s = src->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    dispatch_image_dtype(images.scalar_type(), [&](auto in_tag) {
      using in_t = decltype(in_tag);
      dispatch_float_dtype(out_dtype, [&](auto out_tag) {
        using out_t = decltype(out_tag);
        image_forward<in_t, acc_t, out_t>(g, kind, images.data_ptr<in_t>(), opt_ptr<acc_t>(s),
                                          opt_ptr<int64_t>(loc), opt_ptr<bool>(rows),
                                          acc_t(alpha), acc_t(eps), opt_ptr<float>(mean),
                                          opt_ptr<float>(stdv), out.data_ptr<out_t>());
      });
    });
  });
  return out;
}

at::Tensor image_op_backward_cpu(const at::Tensor& grad_out, const at::Tensor& images,
                                 std::string_view kind_name, const at::Tensor& src,
                                 const std::optional<at::Tensor>& loc,
                                 const std::optional<at::Tensor>& rows, double alpha, double eps,
                                 const std::optional<at::Tensor>& stdv) {
  const Kind kind = parse_kind(std::string(kind_name));
  TORCH_CHECK(kind == Kind::Patch || kind == Kind::Blend || kind == Kind::Add,
              "image_op_backward: kind '", kind_name, "' has no gradient with respect to src");
  const ImageGeom g = check_image_op(images, kind, src, loc, rows, stdv, stdv, grad_out.scalar_type());
  TORCH_CHECK(grad_out.sizes() == images.sizes(), "image_op_backward: grad_out must match images");
  const auto gout = grad_out.contiguous();
  auto gsrc = at::empty_like(src);
  dispatch_acc(src.scalar_type() == at::kDouble, [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    dispatch_image_dtype(images.scalar_type(), [&](auto in_tag) {
      using in_t = decltype(in_tag);
      dispatch_float_dtype(gout.scalar_type(), [&](auto g_tag) {
        using gout_t = decltype(g_tag);
        image_backward<in_t, acc_t, gout_t>(g, kind, gout.data_ptr<gout_t>(),
                                            images.data_ptr<in_t>(), src.data_ptr<acc_t>(),
                                            opt_ptr<int64_t>(loc), opt_ptr<bool>(rows),
                                            acc_t(alpha), acc_t(eps), opt_ptr<float>(stdv),
                                            gsrc.data_ptr<acc_t>());
      });
    });
  });
  return gsrc;
}

}  // namespace

TORCH_LIBRARY_IMPL(abd_fast, CPU, m) {
  m.impl("image_op", &image_op_cpu);
  m.impl("image_op_backward", &image_op_backward_cpu);
}

}  // namespace abd_fast
