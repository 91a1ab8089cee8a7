// CPU kernels of image_op and image_op_backward: one pass over the batch, parallel over
// image rows (OpenMP through at::parallel_for), inner loops over contiguous pixels.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "cpu/dispatch.h"

namespace abd_fast {
namespace {

// Writes out[i] = (clamp(value(i), 0, 1) - m) * inv for i < n: the last step of every kind,
// a straight loop the compiler vectorizes once value() is inlined.
template <typename acc_t, typename out_t, typename F>
inline void emit(out_t* o, int64_t n, acc_t m, acc_t inv, const F& value) {
  for (int64_t i = 0; i < n; ++i) o[i] = out_t((clamp01(value(i)) - m) * inv);
}

// Warp: tasks are image rows y of one grid. The bilinear taps of the row (same formula as
// bilinear_taps in image_math.h) are computed once and applied to every channel of every
// sample that uses the grid: a shared grid (WaNet's) costs one tap computation per pixel
// position for the whole batch. Corner indices are clamped into the plane and corners
// outside it get weight 0.
template <typename in_t, typename acc_t, typename out_t>
void warp_forward(const ImageGeom g, const in_t* img, const acc_t* src, const bool* rows,
                  const float* mean, const float* stdv, out_t* out) {
  const int64_t H = g.H, W = g.W, HW = H * W;
  TORCH_CHECK(HW < (int64_t(1) << 31), "image_op: warp needs planes of fewer than 2^31 pixels");
  const int32_t Hi = static_cast<int32_t>(H), Wi = static_cast<int32_t>(W);
  const int64_t n_grids = g.src_bstride ? g.B : 1;
  at::parallel_for(0, n_grids * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> idx(4 * W);  // corner k of pixel x at idx[k * W + x]
    std::vector<acc_t> wt(4 * W);
    int32_t *i0 = idx.data(), *i1 = i0 + W, *i2 = i1 + W, *i3 = i2 + W;
    acc_t *w0 = wt.data(), *w1 = w0 + W, *w2 = w1 + W, *w3 = w2 + W;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t gb = r / H, y = r % H;
      const acc_t* grid = src + gb * g.src_bstride + y * W * 2;
      for (int64_t x = 0; x < W; ++x) {
        acc_t ix = (grid[2 * x] + acc_t(1)) / acc_t(2) * acc_t(W - 1);
        acc_t iy = (grid[2 * x + 1] + acc_t(1)) / acc_t(2) * acc_t(H - 1);
        // beyond one pixel outside only zeros are sampled; NaN samples zeros too
        ix = ix >= acc_t(-2) ? (ix <= acc_t(W + 1) ? ix : acc_t(W + 1)) : acc_t(-2);
        iy = iy >= acc_t(-2) ? (iy <= acc_t(H + 1) ? iy : acc_t(H + 1)) : acc_t(-2);
        const acc_t fx = std::floor(ix), fy = std::floor(iy);
        const int32_t x0 = static_cast<int32_t>(fx), y0 = static_cast<int32_t>(fy);
        const acc_t wx1 = ix - fx, wx0 = (fx + acc_t(1)) - ix;
        const acc_t wy1 = iy - fy, wy0 = (fy + acc_t(1)) - iy;
        // bitwise & and min/max instead of && and branches: the loop stays branch-free
        const bool xa = (x0 >= 0) & (x0 < Wi), xb = (x0 + 1 >= 0) & (x0 + 1 < Wi);
        const bool ya = (y0 >= 0) & (y0 < Hi), yb = (y0 + 1 >= 0) & (y0 + 1 < Hi);
        w0[x] = (ya & xa) ? wy0 * wx0 : acc_t(0);
        w1[x] = (ya & xb) ? wy0 * wx1 : acc_t(0);
        w2[x] = (yb & xa) ? wy1 * wx0 : acc_t(0);
        w3[x] = (yb & xb) ? wy1 * wx1 : acc_t(0);
        const int32_t xc0 = std::min(std::max(x0, 0), Wi - 1);
        const int32_t xc1 = std::min(std::max(x0 + 1, 0), Wi - 1);
        const int32_t yc0 = std::min(std::max(y0, 0), Hi - 1);
        const int32_t yc1 = std::min(std::max(y0 + 1, 0), Hi - 1);
        i0[x] = yc0 * Wi + xc0;
        i1[x] = yc0 * Wi + xc1;
        i2[x] = yc1 * Wi + xc0;
        i3[x] = yc1 * Wi + xc1;
      }
      const int64_t b0 = g.src_bstride ? gb : 0, b1 = g.src_bstride ? gb + 1 : g.B;
      for (int64_t bc = b0 * g.C; bc < b1 * g.C; ++bc) {
        const int64_t b = bc / g.C, c = bc % g.C;
        const bool sel = rows == nullptr || rows[b];
        const in_t* plane = img + bc * HW;
        out_t* o = out + bc * HW + y * W;
        const acc_t m = mean ? acc_t(mean[c]) : acc_t(0);
        const acc_t inv = mean ? acc_t(1) / acc_t(stdv[c]) : acc_t(1);
        if (!sel) {
          emit(o, W, m, inv, [&](int64_t x) { return to_unit<acc_t>(plane[y * W + x]); });
          continue;
        }
        // a corner with weight 0 adds exactly 0, even where its clamped pixel is NaN
        auto tap = [&](const acc_t* w, const int32_t* i, int64_t x) {
          const acc_t p = to_unit<acc_t>(plane[i[x]]);  // i is always inside the plane
          return w[x] != acc_t(0) ? w[x] * p : acc_t(0);
        };
        emit(o, W, m, inv, [&](int64_t x) {
          return tap(w0, i0, x) + tap(w1, i1, x) + tap(w2, i2, x) + tap(w3, i3, x);
        });
      }
    }
  });
}

// Tasks are runs of about 16K pixels inside one (b, c) plane, so the pointwise kinds and the
// unselected rows run as long contiguous loops.
template <typename in_t, typename acc_t, typename out_t>
void image_forward(const ImageGeom g, Kind kind, const in_t* img, const acc_t* src,
                   const int64_t* loc, const bool* rows, acc_t alpha, acc_t eps,
                   const float* mean, const float* stdv, out_t* out) {
  const int64_t H = g.H, W = g.W, HW = H * W;
  if (kind == Kind::Warp) {
    warp_forward(g, img, src, rows, mean, stdv, out);
    return;
  }
  const int64_t rows_per_task = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(W, 1));
  const int64_t tasks_per_plane = (H + rows_per_task - 1) / rows_per_task;
  at::parallel_for(0, g.B * g.C * tasks_per_plane, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t plane = t / tasks_per_plane, b = plane / g.C, c = plane % g.C;
      const int64_t y0 = (t % tasks_per_plane) * rows_per_task;
      const int64_t y1 = std::min(H, y0 + rows_per_task);
      const in_t* xin = img + plane * HW;
      out_t* o = out + plane * HW;
      const acc_t m = mean ? acc_t(mean[c]) : acc_t(0);
      const acc_t inv = mean ? acc_t(1) / acc_t(stdv[c]) : acc_t(1);
      // clean pixels [i0, i1) of the plane
      auto plain = [&](int64_t i0, int64_t i1) {
        emit(o + i0, i1 - i0, m, inv, [&](int64_t i) { return to_unit<acc_t>(xin[i0 + i]); });
      };
      const bool sel = kind != Kind::None && (rows == nullptr || rows[b]);
      if (!sel) {
        plain(y0 * W, y1 * W);
        continue;
      }
      const acc_t* s = src + b * g.src_bstride;
      switch (kind) {
        case Kind::Patch: {
          const int64_t ly = loc[2 * b], lx = loc[2 * b + 1];
          const int64_t by0 = std::max(y0, ly), by1 = std::min(y1, ly + g.h);
          const int64_t x0 = std::max<int64_t>(0, lx), x1 = std::min<int64_t>(W, lx + g.w);
          if (by0 >= by1 || x0 >= x1) {
            plain(y0 * W, y1 * W);
            break;
          }
          plain(y0 * W, by0 * W);
          for (int64_t y = by0; y < by1; ++y) {
            const acc_t* p = s + (c * g.h + y - ly) * g.w + (x0 - lx);  // patch at column x0
            plain(y * W, y * W + x0);
            emit(o + y * W + x0, x1 - x0, m, inv, [&](int64_t i) { return p[i]; });
            plain(y * W + x1, (y + 1) * W);
          }
          plain(by1 * W, y1 * W);
          break;
        }
        case Kind::Blend: {
          const acc_t* p = s + c * HW;
          emit(o + y0 * W, (y1 - y0) * W, m, inv, [&](int64_t i) {
            const int64_t j = y0 * W + i;
            return pointwise_value(Kind::Blend, to_unit<acc_t>(xin[j]), p[j], alpha, eps);
          });
          break;
        }
        case Kind::Add: {
          const acc_t* p = s + c * HW;
          emit(o + y0 * W, (y1 - y0) * W, m, inv, [&](int64_t i) {
            const int64_t j = y0 * W + i;
            return pointwise_value(Kind::Add, to_unit<acc_t>(xin[j]), p[j], alpha, eps);
          });
          break;
        }
        default: break;
      }
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
