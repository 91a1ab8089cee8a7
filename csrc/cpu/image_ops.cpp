// CPU kernels of image_op and image_op_backward: one pass over the batch, parallel over
// image rows (OpenMP through at::parallel_for), inner loops over contiguous pixels.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "cpu/dispatch.h"
#include "cpu/output_pool.h"

namespace abd_fast {
namespace {

// Writes out[i] = (clamp(value(i), 0, 1) - m) * inv for i < n: the last step of every kind,
// a straight loop the compiler vectorizes once value() is inlined.
template <typename acc_t, typename out_t, typename F>
inline void emit(out_t* o, int64_t n, acc_t m, acc_t inv, const F& value) {
  for (int64_t i = 0; i < n; ++i) o[i] = out_t((clamp01(value(i)) - m) * inv);
}

// Bilinear taps of a block of grid points in separable form: pixel i samples the 2x2 input
// pixels at base[i] + {0, dx} + {0, dy} with weights wy0*wx0, wy0*wx1, wy1*wx0, wy1*wx1. The
// two taps of each axis are moved into the plane (x0 clamped to [0, W-2]) and a tap outside
// the plane gets weight 0, which is grid_sample's zero padding (same arithmetic as
// bilinear_taps in image_math.h). Written as straight loops over arrays (branch-free).
template <typename acc_t>
struct WarpTaps {
  std::vector<int32_t> base;
  std::vector<acc_t> wx0, wx1, wy0, wy1;
  // per group of 16 pixels: the smallest base of the group when every tap of the group lies
  // in the 64 bytes of a row from there (and those bytes inside the plane), else -1
  std::vector<int32_t> window;
  explicit WarpTaps(int64_t n) : base(n), wx0(n), wx1(n), wy0(n), wy1(n), window(n / 16) {}

  // the weights at positions s and s+1 of the two taps at t0 and t0+1 with weights a0, a1
  static void axis(acc_t coord, int32_t size, int32_t& s, acc_t& w_s, acc_t& w_s1) {
    coord = coord >= acc_t(-2) ? (coord <= acc_t(size + 1) ? coord : acc_t(size + 1)) : acc_t(-2);
    const acc_t f = std::floor(coord);  // NaN was mapped to -2 above: only zeros sampled
    const int32_t t0 = static_cast<int32_t>(f);
    const acc_t a1 = coord - f, a0 = (f + acc_t(1)) - coord;
    const acc_t v0 = (t0 >= 0) & (t0 < size) ? a0 : acc_t(0);
    const acc_t v1 = (t0 + 1 >= 0) & (t0 + 1 < size) ? a1 : acc_t(0);
    s = std::min(std::max(t0, 0), std::max(size - 2, 0));
    w_s = (t0 == s ? v0 : acc_t(0)) + (t0 + 1 == s ? v1 : acc_t(0));
    w_s1 = (t0 == s + 1 ? v0 : acc_t(0)) + (t0 + 1 == s + 1 ? v1 : acc_t(0));
  }

  // taps [i0, i1) of the block from the grid points grid[0 .. 2 (i1 - i0))
  void compute(const acc_t* grid, int64_t i0, int64_t i1, int32_t H, int32_t W) {
    for (int64_t i = i0; i < i1; ++i, grid += 2) {
      const acc_t ix = (grid[0] + acc_t(1)) / acc_t(2) * acc_t(W - 1);
      const acc_t iy = (grid[1] + acc_t(1)) / acc_t(2) * acc_t(H - 1);
      int32_t xs, ys;
      axis(ix, W, xs, wx0[i], wx1[i]);
      axis(iy, H, ys, wy0[i], wy1[i]);
      base[i] = ys * W + xs;
    }
  }

  // window[] of the full groups of 16 among the first n pixels (dy: offset of the lower row)
  void find_windows(int64_t n, int64_t HW, int64_t dy) {
    for (int64_t k = 0; k < n / 16; ++k) {
      const int32_t* b = base.data() + 16 * k;
      const int32_t lo = *std::min_element(b, b + 16), hi = *std::max_element(b, b + 16);
      window[k] = hi + 1 - lo < 64 && lo + dy + 64 <= HW ? lo : -1;
    }
  }
};

// Planes sharing taps are done together, up to kMaxPlanes (the channels of a sample, or of
// two to eight samples of a shared grid), so that the taps (20 bytes a pixel) are read from
// L2 once per group rather than per plane.
constexpr int kMaxPlanes = 8;

// Output pixel i of one plane from its taps (any element type). A zero-weight tap adds
// exactly 0, even where its pixel is NaN or inf (as grid_sample).
template <typename in_t, typename acc_t>
inline acc_t warp_pixel(const in_t* plane, const WarpTaps<acc_t>& t, int64_t i, int64_t dx,
                        int64_t dy) {
  auto tap = [&](acc_t w, int64_t k) {
    const acc_t p = to_unit<acc_t>(plane[k]);
    if constexpr (std::is_same_v<in_t, uint8_t>) {
      return w * p;  // always finite
    } else {
      return w != acc_t(0) ? w * p : acc_t(0);
    }
  };
  auto row = [&](acc_t w, acc_t v) {  // a row with weight 0 adds 0 even if v is NaN
    if constexpr (std::is_same_v<in_t, uint8_t>) {
      return w * v;
    } else {
      return w != acc_t(0) ? w * v : acc_t(0);
    }
  };
  const int64_t b = t.base[i];
  const acc_t top = tap(t.wx0[i], b) + tap(t.wx1[i], b + dx);
  const acc_t bot = tap(t.wx0[i], b + dy) + tap(t.wx1[i], b + dy + dx);
  return row(t.wy0[i], top) + row(t.wy1[i], bot);
}

#ifdef __AVX2__
// uint8 -> fp32 fast path, 8 pixels at a time: one 32-bit gather at base fetches the two
// horizontal neighbours of the top row, one at base + W those of the bottom row. The gathers
// read 2 bytes past the 2x2 window, so the caller keeps this off the last plane of the batch.
inline void warp_block_u8_avx2(const uint8_t* plane, const WarpTaps<float>& t, int64_t n,
                               int64_t W, float m, float inv, float* o) {
  const __m256i lo = _mm256_set1_epi32(0xFF);
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f);
  const __m256 k255 = _mm256_set1_ps(1.f / 255.f), vm = _mm256_set1_ps(m), vinv = _mm256_set1_ps(inv);
  const int* top_row = reinterpret_cast<const int*>(plane);
  const int* bot_row = reinterpret_cast<const int*>(plane + W);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.base.data() + i));
    const __m256i top = _mm256_i32gather_epi32(top_row, b, 1);
    const __m256i bot = _mm256_i32gather_epi32(bot_row, b, 1);
    auto px = [&](__m256i v, int shift) {
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, shift), lo));
    };
    const __m256 wx0 = _mm256_loadu_ps(t.wx0.data() + i), wx1 = _mm256_loadu_ps(t.wx1.data() + i);
    const __m256 up = _mm256_add_ps(_mm256_mul_ps(wx0, px(top, 0)), _mm256_mul_ps(wx1, px(top, 8)));
    const __m256 dn = _mm256_add_ps(_mm256_mul_ps(wx0, px(bot, 0)), _mm256_mul_ps(wx1, px(bot, 8)));
    __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(t.wy0.data() + i), up),
                             _mm256_mul_ps(_mm256_loadu_ps(t.wy1.data() + i), dn));
    v = _mm256_mul_ps(v, k255);
    v = _mm256_min_ps(_mm256_max_ps(v, zero), one);
    _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_sub_ps(v, vm), vinv));
  }
  for (; i < n; ++i) o[i] = (clamp01(warp_pixel(plane, t, i, 1, W)) - m) * inv;
}
#endif

#ifdef __AVX512F__
// The same with 16 pixels per step (the gathers are the cost, and one 16-lane gather is
// cheaper than two 8-lane ones). Built with AVX512-VBMI (setup.py's widest tier), a group of
// 16 pixels whose taps lie in 64 bytes of a row (window[]: the common case of a smooth warp
// such as WaNet's) loads those 64 bytes of its two rows and picks its taps with byte
// permutes instead of gathers, which takes far fewer cycles.
#ifdef __AVX512VBMI__
constexpr bool kVbmi = true;
inline __m512i pick_bytes(__m512i idx, __m512i row) {  // into byte 0 of each dword
  return _mm512_maskz_permutexvar_epi8(0x1111111111111111ULL, idx, row);
}
#else
constexpr bool kVbmi = false;
inline __m512i pick_bytes(__m512i, __m512i row) { return row; }  // never called
#endif

// Planes that share taps, done together.
struct PlaneSet {
  int n = 0;
  const uint8_t* in[kMaxPlanes];
  float* out[kMaxPlanes];
  float m[kMaxPlanes], inv[kMaxPlanes];
};

inline void warp_block_u8_avx512(const PlaneSet& ps, const WarpTaps<float>& t, int64_t n,
                                 int64_t W) {
  const __m512i lo = _mm512_set1_epi32(0xFF), one_i = _mm512_set1_epi32(1);
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
  const __m512 k255 = _mm512_set1_ps(1.f / 255.f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i b = _mm512_loadu_si512(t.base.data() + i);
    const int32_t w0 = kVbmi ? t.window[i / 16] : -1;
    const __m512i idx = _mm512_sub_epi32(b, _mm512_set1_epi32(w0));
    const __m512i idx1 = _mm512_add_epi32(idx, one_i);
    const __m512 wx0 = _mm512_loadu_ps(t.wx0.data() + i), wx1 = _mm512_loadu_ps(t.wx1.data() + i);
    const __m512 wy0 = _mm512_loadu_ps(t.wy0.data() + i), wy1 = _mm512_loadu_ps(t.wy1.data() + i);
    for (int p = 0; p < ps.n; ++p) {
      const uint8_t* plane = ps.in[p];
      __m512 p00, p01, p10, p11;  // taps (top, bottom row) x (left, right), 0..255
      if (w0 >= 0) {
        const __m512i top = _mm512_loadu_si512(plane + w0), bot = _mm512_loadu_si512(plane + w0 + W);
        p00 = _mm512_cvtepi32_ps(pick_bytes(idx, top));
        p01 = _mm512_cvtepi32_ps(pick_bytes(idx1, top));
        p10 = _mm512_cvtepi32_ps(pick_bytes(idx, bot));
        p11 = _mm512_cvtepi32_ps(pick_bytes(idx1, bot));
      } else {
        const __m512i top = _mm512_i32gather_epi32(b, plane, 1);
        const __m512i bot = _mm512_i32gather_epi32(b, plane + W, 1);
        auto px = [&](__m512i v, int shift) {
          return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, shift), lo));
        };
        p00 = px(top, 0), p01 = px(top, 8), p10 = px(bot, 0), p11 = px(bot, 8);
      }
      const __m512 up = _mm512_add_ps(_mm512_mul_ps(wx0, p00), _mm512_mul_ps(wx1, p01));
      const __m512 dn = _mm512_add_ps(_mm512_mul_ps(wx0, p10), _mm512_mul_ps(wx1, p11));
      __m512 v = _mm512_add_ps(_mm512_mul_ps(wy0, up), _mm512_mul_ps(wy1, dn));
      v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, k255), zero), one);
      v = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_set1_ps(ps.m[p])), _mm512_set1_ps(ps.inv[p]));
      _mm512_storeu_ps(ps.out[p] + i, v);
    }
  }
  for (int p = 0; p < ps.n; ++p)
    for (int64_t k = i; k < n; ++k)
      ps.out[p][k] = (clamp01(warp_pixel(ps.in[p], t, k, 1, W)) - ps.m[p]) * ps.inv[p];
}

#endif

// One block of output pixels [i0, i0 + n) of the planes [bc0, bc1) (bc1 - bc0 <= kMaxPlanes,
// of one or several samples) from the taps of the block; planes of unselected rows get the
// clean image.
template <typename in_t, typename acc_t, typename out_t>
void warp_planes_block(const ImageGeom& g, const in_t* img, const WarpTaps<acc_t>& taps,
                       int64_t i0, int64_t n, int64_t bc0, int64_t bc1, const bool* rows,
                       const float* mean, const float* stdv, out_t* out) {
  const int64_t HW = g.H * g.W, W = g.W;
  const int64_t dx = W >= 2 ? 1 : 0, dy = g.H >= 2 ? W : 0;  // neighbour offsets of a tap pair
  auto m_of = [&](int64_t bc) { return mean ? acc_t(mean[bc % g.C]) : acc_t(0); };
  auto inv_of = [&](int64_t bc) { return mean ? acc_t(1) / acc_t(stdv[bc % g.C]) : acc_t(1); };
  auto selected = [&](int64_t bc) { return !rows || rows[bc / g.C]; };
  for (int64_t bc = bc0; bc < bc1; ++bc) {
    if (selected(bc)) continue;
    const in_t* plane = img + bc * HW + i0;
    emit(out + bc * HW + i0, n, m_of(bc), inv_of(bc),
         [&](int64_t i) { return to_unit<acc_t>(plane[i]); });
  }
  int64_t scalar_from = bc0;  // the selected planes from here on are done without vectors
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (std::is_same_v<in_t, uint8_t> && std::is_same_v<acc_t, float> &&
                std::is_same_v<out_t, float>) {
    if (dx == 1 && dy == W) {
      // the vector paths gather 4 bytes at a tap, 2 past the 2x2 window: not on the last
      // plane of the batch, which the scalar loop below does
      const int64_t vec_end = std::min(bc1, g.B * g.C - 1);
#if defined(__AVX512F__)
      PlaneSet ps;
      for (int64_t bc = bc0; bc < vec_end; ++bc) {
        if (!selected(bc)) continue;
        ps.in[ps.n] = img + bc * HW;
        ps.out[ps.n] = out + bc * HW + i0;
        ps.m[ps.n] = m_of(bc);
        ps.inv[ps.n] = inv_of(bc);
        ++ps.n;
      }
      if (ps.n) warp_block_u8_avx512(ps, taps, n, W);
#else
      for (int64_t bc = bc0; bc < vec_end; ++bc)
        if (selected(bc))
          warp_block_u8_avx2(img + bc * HW, taps, n, W, m_of(bc), inv_of(bc), out + bc * HW + i0);
#endif
      scalar_from = std::max(bc0, vec_end);
    }
  }
#endif
  for (int64_t bc = scalar_from; bc < bc1; ++bc) {
    if (!selected(bc)) continue;
    const in_t* plane = img + bc * HW;
    emit(out + bc * HW + i0, n, m_of(bc), inv_of(bc),
         [&](int64_t i) { return warp_pixel(plane, taps, i, dx, dy); });
  }
}

// Warp. The taps of a block of up to 64K output pixels (all of a 224x224 plane) are computed
// once per grid, then every plane that uses the grid (all B*C planes of a shared grid, such
// as WaNet's, or the C planes of one sample) writes the block. With one block per plane, each
// thread writes its planes in memory order: a fresh output page is written while the
// kernel's zeroing of it is still in cache, and the taps (20 bytes a pixel) stay in L2.
template <typename in_t, typename acc_t, typename out_t>
void warp_forward(const ImageGeom g, const in_t* img, const acc_t* src, const bool* rows,
                  const float* mean, const float* stdv, out_t* out) {
  const int64_t H = g.H, W = g.W, HW = H * W;
  TORCH_CHECK(HW < (int64_t(1) << 31), "image_op: warp needs planes of fewer than 2^31 pixels");
  const int64_t block = std::min<int64_t>(HW, int64_t(1) << 16);
  const int64_t dy = H >= 2 ? W : 0;
  const int64_t n_blocks = (HW + block - 1) / block;
  if (g.src_bstride == 0) {  // shared grid: taps once (in parallel), then all planes
    WarpTaps<acc_t> taps(block);
    for (int64_t k = 0; k < n_blocks; ++k) {
      const int64_t i0 = k * block, n = std::min(block, HW - i0);
      at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
        taps.compute(src + (i0 + begin) * 2, begin, end, static_cast<int32_t>(H),
                     static_cast<int32_t>(W));
      });
      taps.find_windows(n, HW, dy);
      // a thread's samples as one run of planes, kMaxPlanes at a time across samples: one
      // read of a group's taps serves up to kMaxPlanes planes, not the C of one sample
      at::parallel_for(0, g.B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bc = begin * g.C; bc < end * g.C; bc += kMaxPlanes)
          warp_planes_block(g, img, taps, i0, n, bc, std::min(end * g.C, bc + kMaxPlanes),
                            rows, mean, stdv, out);
      });
    }
    return;
  }
  at::parallel_for(0, g.B, 1, [&](int64_t begin, int64_t end) {  // a grid per sample
    WarpTaps<acc_t> taps(block);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t k = 0; k < n_blocks; ++k) {
        const int64_t i0 = k * block, n = std::min(block, HW - i0);
        if (!rows || rows[b]) {
          taps.compute(src + b * g.src_bstride + i0 * 2, 0, n, static_cast<int32_t>(H),
                       static_cast<int32_t>(W));
          taps.find_windows(n, HW, dy);
        }
        for (int64_t c = 0; c < g.C; c += kMaxPlanes)
          warp_planes_block(g, img, taps, i0, n, b * g.C + c,
                            b * g.C + std::min<int64_t>(g.C, c + kMaxPlanes), rows, mean,
                            stdv, out);
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

// gs[i] += d out[i] / d src[i] for a contiguous run of a pointwise kind (blend, add): the
// upstream gradient where the final clamp passes, times 1/std and d value / d src.
template <Kind kind, typename in_t, typename acc_t, typename gout_t>
inline void pointwise_grad_run(acc_t* gs, const gout_t* go, const in_t* xin, const acc_t* s,
                               int64_t n, acc_t inv, acc_t alpha, acc_t eps) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = pointwise_value(kind, to_unit<acc_t>(xin[i]), s[i], alpha, eps);
    const acc_t d = pointwise_dsrc(kind, s[i], alpha, eps);
    gs[i] += clamp_passes(v, acc_t(0), acc_t(1)) ? acc_t(go[i]) * inv * d : acc_t(0);
  }
}

// Gradient with respect to a pointwise src (blend, add). Per-sample src: each sample's plane
// is its own gradient. Shared src: a task owns a run of 4K pixels of the src and sums the
// samples into it in order b = 0, 1, ..., so the result does not depend on the number of
// threads (deterministic), and there are no partial sums to allocate and add up.
template <Kind kind, typename in_t, typename acc_t, typename gout_t>
void pointwise_backward(const ImageGeom g, const gout_t* gout, const in_t* img,
                        const acc_t* src, const bool* rows, acc_t alpha, acc_t eps,
                        const float* stdv, acc_t* gsrc) {
  const int64_t HW = g.H * g.W, C = g.C;
  auto inv_std = [&](int64_t c) { return stdv ? acc_t(1) / acc_t(stdv[c]) : acc_t(1); };
  auto selected = [&](int64_t b) { return rows == nullptr || rows[b]; };
  if (g.src_bstride) {
    at::parallel_for(0, g.B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        acc_t* gs = gsrc + bc * HW;
        std::fill(gs, gs + HW, acc_t(0));
        if (selected(bc / C))
          pointwise_grad_run<kind>(gs, gout + bc * HW, img + bc * HW, src + bc * HW, HW,
                                   inv_std(bc % C), alpha, eps);
      }
    });
    return;
  }
  constexpr int64_t run = 4096;
  const int64_t runs_per_plane = (HW + run - 1) / run;
  at::parallel_for(0, C * runs_per_plane, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / runs_per_plane, i0 = (t % runs_per_plane) * run;
      const int64_t n = std::min(run, HW - i0);
      acc_t* gs = gsrc + c * HW + i0;
      std::fill(gs, gs + n, acc_t(0));
      for (int64_t b = 0; b < g.B; ++b) {
        if (!selected(b)) continue;
        const int64_t off = (b * C + c) * HW + i0;
        pointwise_grad_run<kind>(gs, gout + off, img + off, src + c * HW + i0, n, inv_std(c),
                                 alpha, eps);
      }
    }
  });
}

// Gradient with respect to the patch. Each patch row is owned by one task, which loops over
// the samples that read it, so the sum over a shared patch has a fixed order (deterministic).
template <typename in_t, typename acc_t, typename gout_t>
void patch_backward(const ImageGeom g, const gout_t* gout, const acc_t* src, const int64_t* loc,
                    const bool* rows, const float* stdv, acc_t* gsrc) {
  const int64_t H = g.H, W = g.W, h = g.h, w = g.w;
  const int64_t nsrc = g.src_bstride ? g.B : 1;  // patch samples
  at::parallel_for(0, nsrc * g.C * h, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t py = r % h, c = (r / h) % g.C, sb = r / (h * g.C);
      const acc_t* s = src + r * w;
      acc_t* gs = gsrc + r * w;
      std::fill(gs, gs + w, acc_t(0));
      const acc_t inv = stdv ? acc_t(1) / acc_t(stdv[c]) : acc_t(1);
      const int64_t b0 = g.src_bstride ? sb : 0, b1 = g.src_bstride ? sb + 1 : g.B;
      for (int64_t b = b0; b < b1; ++b) {
        if (rows && !rows[b]) continue;
        const int64_t y = loc[2 * b] + py, lx = loc[2 * b + 1];
        if (y < 0 || y >= H) continue;
        const gout_t* go = gout + ((b * g.C + c) * H + y) * W + lx;  // go[px] at column lx+px
        const int64_t p0 = std::max<int64_t>(0, -lx), p1 = std::min<int64_t>(w, W - lx);
        for (int64_t px = p0; px < p1; ++px)
          gs[px] += clamp_passes(s[px], acc_t(0), acc_t(1)) ? acc_t(go[px]) * inv : acc_t(0);
      }
    }
  });
}

template <typename in_t, typename acc_t, typename gout_t>
void image_backward(const ImageGeom g, Kind kind, const gout_t* gout, const in_t* img,
                    const acc_t* src, const int64_t* loc, const bool* rows, acc_t alpha,
                    acc_t eps, const float* stdv, acc_t* gsrc) {
  if (kind == Kind::Patch)
    patch_backward<in_t>(g, gout, src, loc, rows, stdv, gsrc);
  else if (kind == Kind::Blend)
    pointwise_backward<Kind::Blend>(g, gout, img, src, rows, alpha, eps, stdv, gsrc);
  else
    pointwise_backward<Kind::Add>(g, gout, img, src, rows, alpha, eps, stdv, gsrc);
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
  auto out = pooled_empty(images.sizes(), out_dtype);
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
  auto gsrc = pooled_empty(src.sizes(), src.scalar_type());
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
