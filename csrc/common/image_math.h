// Per-pixel math of the image op, shared verbatim by the CPU and CUDA kernels so that the
// CPU tests also check the arithmetic the GPU runs. No ATen or CUDA headers here.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define ABD_HD __host__ __device__ __forceinline__
#else
#define ABD_HD inline
#endif

namespace abd_fast {

enum class Kind : int { None = 0, Patch = 1, Blend = 2, Add = 3, Warp = 4 };

// Shapes of one image_op call. src is the patch [C,h,w], the pattern [C,H,W] or the grid
// [H,W,2], with a leading batch dimension when per sample (src_bstride != 0).
struct ImageGeom {
  int64_t B, C, H, W;
  int64_t h, w;         // patch height and width (kind patch), else H and W
  int64_t src_bstride;  // elements between consecutive samples' src; 0 when shared
};

template <typename T>
ABD_HD T clamp01(T v) {
  // Same as torch.clamp(v, 0, 1), NaN propagates.
  v = v < T(0) ? T(0) : v;
  return v > T(1) ? T(1) : v;
}

// torch.clamp's backward passes the gradient where lo <= v <= hi (bounds included).
template <typename T>
ABD_HD bool clamp_passes(T v, T lo, T hi) { return v >= lo && v <= hi; }

template <typename T>
ABD_HD T clamp_sym(T v, T eps) {
  v = v < -eps ? -eps : v;
  return v > eps ? eps : v;
}

template <typename T>
ABD_HD T uint8_to_unit(uint8_t v) { return T(v) * T(1.0 / 255.0); }

// Bilinear taps of grid point (gx, gy) in [-1, 1] (x then y, as grid_sample) on an H x W
// plane, align_corners=True, zeros outside: corners (y0, x0), (y0, x0+1), (y0+1, x0),
// (y0+1, x0+1) with weights w[0..3]; a corner outside the plane has weight 0.
template <typename T>
struct BilinearTaps {
  int64_t y0, x0;
  T w[4];
};

template <typename T>
ABD_HD BilinearTaps<T> bilinear_taps(int64_t H, int64_t W, T gx, T gy) {
  T ix = (gx + T(1)) / T(2) * T(W - 1);
  T iy = (gy + T(1)) / T(2) * T(H - 1);
  // Points beyond one pixel outside sample only zeros; clamping keeps the casts defined.
  ix = ix < T(-2) ? T(-2) : (ix > T(W + 1) ? T(W + 1) : ix);
  iy = iy < T(-2) ? T(-2) : (iy > T(H + 1) ? T(H + 1) : iy);
  // floor without <cmath>
  int64_t x0 = static_cast<int64_t>(ix);
  if (T(x0) > ix) --x0;
  int64_t y0 = static_cast<int64_t>(iy);
  if (T(y0) > iy) --y0;
  const T wx1 = ix - T(x0), wx0 = T(x0 + 1) - ix;
  const T wy1 = iy - T(y0), wy0 = T(y0 + 1) - iy;
  const bool xin0 = x0 >= 0 && x0 < W, xin1 = x0 + 1 >= 0 && x0 + 1 < W;
  const bool yin0 = y0 >= 0 && y0 < H, yin1 = y0 + 1 >= 0 && y0 + 1 < H;
  BilinearTaps<T> t;
  t.y0 = y0;
  t.x0 = x0;
  t.w[0] = (yin0 && xin0) ? wy0 * wx0 : T(0);
  t.w[1] = (yin0 && xin1) ? wy0 * wx1 : T(0);
  t.w[2] = (yin1 && xin0) ? wy1 * wx0 : T(0);
  t.w[3] = (yin1 && xin1) ? wy1 * wx1 : T(0);
  return t;
}

// Bilinear sample of one plane; load(y, x) returns the pixel in [0,1] and is only called
// for corners inside the plane.
template <typename T, typename Load>
ABD_HD T bilinear_zeros(const Load& load, int64_t H, int64_t W, T gx, T gy) {
  const BilinearTaps<T> t = bilinear_taps(H, W, gx, gy);
  T v = T(0);
  if (t.w[0] != T(0)) v += t.w[0] * load(t.y0, t.x0);
  if (t.w[1] != T(0)) v += t.w[1] * load(t.y0, t.x0 + 1);
  if (t.w[2] != T(0)) v += t.w[2] * load(t.y0 + 1, t.x0);
  if (t.w[3] != T(0)) v += t.w[3] * load(t.y0 + 1, t.x0 + 1);
  return v;
}

// Pre-clamp value of a pixel of a selected row for the pointwise kinds.
template <typename T>
ABD_HD T pointwise_value(Kind kind, T x, T s, T alpha, T eps) {
  switch (kind) {
    case Kind::Blend: return (T(1) - alpha) * x + alpha * s;
    case Kind::Add: return x + clamp_sym(s, eps);
    default: return x;
  }
}

// d(pre-clamp value)/d(src) for the pointwise kinds, given the src value.
template <typename T>
ABD_HD T pointwise_dsrc(Kind kind, T s, T alpha, T eps) {
  switch (kind) {
    case Kind::Blend: return alpha;
    case Kind::Add: return clamp_passes(s, -eps, eps) ? T(1) : T(0);
    default: return T(1);  // patch: the value is the src itself
  }
}

}  // namespace abd_fast
