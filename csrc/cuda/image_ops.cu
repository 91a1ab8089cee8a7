// CUDA kernels of image_op and image_op_backward (same semantics as csrc/cpu/image_ops.cpp;
// the per-pixel arithmetic is common/image_math.h, shared with the CPU kernels).
//
// Forward: one read and one write per pixel. Each thread of a grid-stride loop handles one
// vector of VEC = 16 / sizeof(in_t) pixels (16 uint8, 8 bf16/fp16, 4 fp32, 2 fp64) loaded with
// one 16-byte access and stored with VEC * sizeof(out_t) bytes of aligned stores. The vector
// path needs H*W % VEC == 0 (a vector never straddles two planes, so b, c, the row selection,
// mean and std are per vector) and 16-byte aligned images / output / pattern pointers; other
// calls run the same kernel with VEC = 1. Rows wrap inside a vector when W % VEC != 0: kinds
// none/blend/add/warp use the flat in-plane index only, patch walks (y, x) element by element.
//
// Backward (gradient w.r.t. src, kinds patch/blend/add): deterministic, no atomics. A thread
// owns one src element and loops over the batch rows that read it. For a src shared by the
// batch, the rows are split into chunks (grid.y) that write partial sums to a workspace, and
// a second kernel adds the chunks in order, so the result does not depend on scheduling.
#include "cuda/device_utils.cuh"

namespace abd_fast {
namespace cuda {
namespace {

template <typename in_t, typename acc_t, typename out_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    image_forward_kernel(const ImageGeom g, const Kind kind, const in_t* __restrict__ img,
                         const acc_t* __restrict__ src, const int64_t* __restrict__ loc,
                         const bool* __restrict__ rows, const acc_t alpha, const acc_t eps,
                         const float* __restrict__ mean, const float* __restrict__ stdv,
                         out_t* __restrict__ out) {
  const int64_t HW = g.H * g.W;
  const int64_t units = g.B * g.C * HW / VEC;  // host guarantees HW % VEC == 0
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
       u += step) {
    const int64_t off = u * VEC;          // flat index of the vector's first pixel
    const int64_t bc = off / HW;          // plane b * C + c
    const int64_t pix = off - bc * HW;    // in-plane index y * W + x
    const int64_t c = bc % g.C, b = bc / g.C;
    const acc_t m = mean ? acc_t(mean[c]) : acc_t(0);
    const acc_t inv = mean ? acc_t(1) / acc_t(stdv[c]) : acc_t(1);
    const bool sel = kind != Kind::None && (rows == nullptr || rows[b]);
    acc_t v[VEC];
    if (sel && kind == Kind::Warp) {
      // Gathers from the whole plane; the vector's own pixels are not needed.
      const in_t* plane = img + bc * HW;
      const acc_t* grid = src + b * g.src_bstride + pix * 2;  // [H,W,2] of this sample
      const int64_t W = g.W;
      auto load = [plane, W](int64_t yy, int64_t xx) { return to_acc<acc_t>(plane[yy * W + xx]); };
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        v[e] = bilinear_zeros<acc_t>(load, g.H, g.W, grid[2 * e], grid[2 * e + 1]);
    } else {
      const Pack<in_t, VEC> x = *reinterpret_cast<const Pack<in_t, VEC>*>(img + off);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = to_acc<acc_t>(x.v[e]);
      if (sel) {
        const acc_t* s = src + b * g.src_bstride;
        if (kind == Kind::Patch) {
          const int64_t ly = loc[2 * b], lx = loc[2 * b + 1];
          int64_t yy = pix / g.W, xx = pix - (pix / g.W) * g.W;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const int64_t py = yy - ly, px = xx - lx;
            if (py >= 0 && py < g.h && px >= 0 && px < g.w) v[e] = s[(c * g.h + py) * g.w + px];
            if (++xx == g.W) {  // the vector continues on the next image row
              xx = 0;
              ++yy;
            }
          }
        } else {  // blend, add: the pattern has the image's layout
          const Pack<acc_t, VEC> p = *reinterpret_cast<const Pack<acc_t, VEC>*>(s + c * HW + pix);
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[e] = pointwise_value(kind, v[e], p.v[e], alpha, eps);
        }
      }
    }
    Pack<out_t, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = from_acc<out_t>((clamp01(v[e]) - m) * inv);
    *reinterpret_cast<Pack<out_t, VEC>*>(out + off) = o;
  }
}

// dst: gsrc, or the workspace [nchunk, C*h*w] (shared src, grid.y = chunk).
template <typename in_t, typename acc_t, typename gout_t>
__global__ void __launch_bounds__(kThreads)
    image_backward_kernel(const ImageGeom g, const Kind kind, const gout_t* __restrict__ gout,
                          const in_t* __restrict__ img, const acc_t* __restrict__ src,
                          const int64_t* __restrict__ loc, const bool* __restrict__ rows,
                          const acc_t alpha, const acc_t eps, const float* __restrict__ stdv,
                          const int64_t rows_per_chunk, acc_t* __restrict__ dst) {
  const int64_t H = g.H, W = g.W, HW = H * W, hw = g.h * g.w;
  const int64_t E = g.C * hw;  // elements of one src sample
  const bool shared = g.src_bstride == 0;
  const int64_t total = shared ? E : g.B * E;
  const int64_t chunk = blockIdx.y;
  acc_t* d = dst + chunk * total;  // chunk > 0 only for a shared src
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += step) {
    const int64_t sb = t / E, e = t - sb * E;  // src sample, element within it
    const int64_t c = e / hw, pyx = e - c * hw;
    const acc_t s = src[t];  // src is contiguous: sample sb starts at sb * E
    const acc_t inv = stdv ? acc_t(1) / acc_t(stdv[c]) : acc_t(1);
    int64_t b0 = sb, b1 = sb + 1;
    if (shared) {
      b0 = chunk * rows_per_chunk;
      b1 = b0 + rows_per_chunk < g.B ? b0 + rows_per_chunk : g.B;
    }
    acc_t acc = acc_t(0);
    if (kind == Kind::Patch) {
      // The output pixel is the src value itself: d/dsrc passes where 0 <= src <= 1.
      if (clamp_passes(s, acc_t(0), acc_t(1))) {
        const int64_t py = pyx / g.w, px = pyx - py * g.w;
        for (int64_t b = b0; b < b1; ++b) {
          if (rows && !rows[b]) continue;
          const int64_t y = loc[2 * b] + py, x = loc[2 * b + 1] + px;
          if (y < 0 || y >= H || x < 0 || x >= W) continue;  // patch pixel outside the image
          acc += to_acc<acc_t>(gout[((b * g.C + c) * H + y) * W + x]) * inv;
        }
      }
    } else {  // blend, add: src has the image's layout, pyx is the in-plane pixel
      const acc_t dsv = pointwise_dsrc(kind, s, alpha, eps);
      for (int64_t b = b0; b < b1; ++b) {
        if (rows && !rows[b]) continue;
        const int64_t off = (b * g.C + c) * HW + pyx;
        const acc_t v = pointwise_value(kind, to_acc<acc_t>(img[off]), s, alpha, eps);
        acc += clamp_passes(v, acc_t(0), acc_t(1)) ? to_acc<acc_t>(gout[off]) * inv * dsv
                                                   : acc_t(0);
      }
    }
    d[t] = acc;
  }
}

// gsrc[e] = sum over chunks k (in order) of ws[k, e].
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_chunks_kernel(const acc_t* __restrict__ ws, int64_t nchunk, int64_t E,
                      acc_t* __restrict__ gsrc) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < E;
       e += step) {
    acc_t acc = acc_t(0);
    for (int64_t k = 0; k < nchunk; ++k) acc += ws[k * E + e];
    gsrc[e] = acc;
  }
}

template <typename in_t, typename acc_t, typename out_t, int VEC>
void launch_forward_typed(const ImageForwardArgs& a, int64_t n, int64_t max_blocks,
                          cudaStream_t stream) {
  image_forward_kernel<in_t, acc_t, out_t, VEC>
      <<<grid_1d(n / VEC, max_blocks), kThreads, 0, stream>>>(
          a.g, a.kind, static_cast<const in_t*>(a.img), static_cast<const acc_t*>(a.src), a.loc,
          a.rows, static_cast<acc_t>(a.alpha), static_cast<acc_t>(a.eps), a.mean, a.stdv,
          static_cast<out_t*>(a.out));
}

}  // namespace

int image_vec_width(DType img_t) {
  int v = 1;
  dispatch_image(img_t, [&](auto tag) { v = 16 / static_cast<int>(sizeof(typename decltype(tag)::type)); });
  return v;
}

void launch_image_forward(const ImageForwardArgs& a, int64_t max_blocks, cudaStream_t stream) {
  const int64_t HW = a.g.H * a.g.W, n = a.g.B * a.g.C * HW;
  if (n == 0) return;
  dispatch_acc(a.dbl, [&](auto acc_tag) {
    using acc_t = typename decltype(acc_tag)::type;
    dispatch_image(a.img_t, [&](auto in_tag) {
      using in_t = typename decltype(in_tag)::type;
      dispatch_float(a.out_t, [&](auto out_tag) {
        using out_t = typename decltype(out_tag)::type;
        constexpr int V = 16 / sizeof(in_t);
        const bool pattern = a.kind == Kind::Blend || a.kind == Kind::Add;
        const bool vec = HW % V == 0 && is_aligned(a.img, alignof(Pack<in_t, V>)) &&
                         is_aligned(a.out, alignof(Pack<out_t, V>)) &&
                         (!pattern || (is_aligned(a.src, alignof(Pack<acc_t, V>)) &&
                                       a.g.src_bstride % V == 0));
        if (vec) {
          launch_forward_typed<in_t, acc_t, out_t, V>(a, n, max_blocks, stream);
        } else {
          launch_forward_typed<in_t, acc_t, out_t, 1>(a, n, max_blocks, stream);
        }
      });
    });
  });
}

void launch_image_backward(const ImageBackwardArgs& a, int64_t max_blocks, cudaStream_t stream) {
  const int64_t E = a.g.C * a.g.h * a.g.w;
  const bool shared = a.g.src_bstride == 0;
  const int64_t total = shared ? E : a.g.B * E;
  if (total == 0) return;
  const bool chunked = shared && a.nchunk > 1;
  dispatch_acc(a.dbl, [&](auto acc_tag) {
    using acc_t = typename decltype(acc_tag)::type;
    acc_t* dst = static_cast<acc_t*>(chunked ? a.workspace : a.gsrc);
    dispatch_image(a.img_t, [&](auto in_tag) {
      using in_t = typename decltype(in_tag)::type;
      dispatch_float(a.gout_t, [&](auto g_tag) {
        using gout_t = typename decltype(g_tag)::type;
        const dim3 grid(grid_1d(total, max_blocks), chunked ? static_cast<unsigned>(a.nchunk) : 1u);
        image_backward_kernel<in_t, acc_t, gout_t><<<grid, kThreads, 0, stream>>>(
            a.g, a.kind, static_cast<const gout_t*>(a.gout), static_cast<const in_t*>(a.img),
            static_cast<const acc_t*>(a.src), a.loc, a.rows, static_cast<acc_t>(a.alpha),
            static_cast<acc_t>(a.eps), a.stdv, shared ? a.rows_per_chunk : int64_t(1), dst);
      });
    });
    if (chunked) {
      sum_chunks_kernel<acc_t><<<grid_1d(E, max_blocks), kThreads, 0, stream>>>(
          dst, a.nchunk, E, static_cast<acc_t*>(a.gsrc));
    }
  });
}

}  // namespace cuda
}  // namespace abd_fast
