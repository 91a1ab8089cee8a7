// DALI CPU operator AbdResizeCHW: crop box -> S x S bicubic antialiased resize (Pillow's
// algorithm and fixed-point arithmetic, so the output equals PIL's Image.resize(box=...)
// up to the order of its two passes, below) -> optional horizontal flip -> uint8 CHW.
//
// Why: DALI 2.4's CPU fn.resize (float, generic separable resampler) is 2-4x slower than
// Pillow here, which made the DALI engine slower than the torch (PIL) engine on CPU-only
// machines; and resize + flip + HWC->CHW in one pass saves crop_mirror_normalize's pass.
//
// Inputs: 0 = uint8 HWC RGB image (the decoded slice: the crop plus the filter's margin),
//         1 = float32 [5] per sample: x0, y0, x1, y1 (the crop box in the slice's pixels,
//             as PIL's `box`), flip (0/1).
// Argument: size (int) = S.   Output: uint8 [3, S, S], layout CHW.
//
// Pillow (libImaging/Resample.c): per output pixel, taps from the filter centered at
// in0 + (i + 0.5) * scale, support 2 * max(scale, 1), normalized and rounded to 22-bit
// fixed point; two passes with rounding to uint8 in between. Pillow 13 picks the order of
// the passes per image; this op always runs the vertical one first (the cheaper layout
// here), so a pixel can differ from PIL's by a grey level or two where Pillow went
// horizontal-first. Taps are clamped to the slice, which equals clamping to the image
// because the slice is the crop widened by the filter's support and cut at the image's
// edges.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dali/pipeline/operator/operator.h"

namespace abd_fast {

constexpr int kBits = 22;  // Pillow's PRECISION_BITS: 32 - 8 - 2

struct Taps {
  int ksize = 0;
  std::vector<int> first, count;  // per output pixel: first input index, number of taps
  std::vector<int32_t> w;         // [out][ksize], fixed point
};

inline double bicubic(double x) {  // Pillow's bicubic_filter, a = -0.5
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc.
inline void make_taps(int in_size, double in0, double in1, int out_size, Taps &t) {
  const double scale = (in1 - in0) / out_size;
  const double fscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * fscale;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.w.assign(static_cast<size_t>(out_size) * t.ksize, 0);
  std::vector<double> k(t.ksize);
  for (int i = 0; i < out_size; i++) {
    const double center = in0 + (i + 0.5) * scale, ss = 1.0 / fscale;
    int lo = static_cast<int>(center - support + 0.5);
    if (lo < 0) lo = 0;
    int hi = static_cast<int>(center + support + 0.5);
    if (hi > in_size) hi = in_size;
    const int n = hi - lo;
    double sum = 0.0;
    for (int x = 0; x < n; x++) {
      k[x] = bicubic((x + lo - center + 0.5) * ss);
      sum += k[x];
    }
    int32_t *w = &t.w[static_cast<size_t>(i) * t.ksize];
    for (int x = 0; x < n; x++) {
      const double v = sum != 0.0 ? k[x] / sum : k[x];
      w[x] = v < 0 ? static_cast<int>(-0.5 + v * (1 << kBits))
                   : static_cast<int>(0.5 + v * (1 << kBits));
    }
    t.first[i] = lo;
    t.count[i] = n;
  }
}

inline uint8_t clip8(int32_t v) {  // Pillow's clip8: v >> 22 clamped to [0, 255]
  v >>= kBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// out[c * out_stride + r] = in[r * in_stride + c] for r < rows, c < cols; in tiles that stay
// in L1 (a plain transpose's strided stores miss the cache on every byte).
inline void transpose_u8(const uint8_t *in, int rows, int cols, size_t in_stride, uint8_t *out,
                         size_t out_stride) {
  constexpr int T = 32;
  for (int r0 = 0; r0 < rows; r0 += T)
    for (int c0 = 0; c0 < cols; c0 += T) {
      const int r1 = std::min(rows, r0 + T), c1 = std::min(cols, c0 + T);
      for (int c = c0; c < c1; c++)
        for (int r = r0; r < r1; r++) out[c * out_stride + r] = in[r * in_stride + c];
    }
}

// One pass of taps t over `n` lanes: dst[i] = clip8(sum_k t.w[i][k] * src(first[i] + k)[:]),
// where src(j) is the contiguous run of n uint8 at base + j * stride.
inline void pass(const Taps &t, int out_size, const uint8_t *base, size_t stride, int n,
                 int32_t *acc, uint8_t *dst, size_t dst_stride, bool reverse) {
  for (int i = 0; i < out_size; i++) {
    const int32_t *k = &t.w[static_cast<size_t>(i) * t.ksize];
    for (int j = 0; j < n; j++) acc[j] = 1 << (kBits - 1);
    for (int x = 0; x < t.count[i]; x++) {
      const uint8_t *src = base + static_cast<size_t>(t.first[i] + x) * stride;
      const int32_t kx = k[x];
      for (int j = 0; j < n; j++) acc[j] += src[j] * kx;
    }
    uint8_t *o = dst + static_cast<size_t>(reverse ? out_size - 1 - i : i) * dst_stride;
    for (int j = 0; j < n; j++) o[j] = clip8(acc[j]);
  }
}

// Per-thread scratch, reused across samples and iterations.
struct Scratch {
  std::vector<uint8_t> tmp, tmpT, outT;
  std::vector<int32_t> acc;
  Taps th, tv;
};

// src: h x w x 3. box (x0, y0, x1, y1) in src pixels. dst: 3 x S x S.
// Vertical pass first, on contiguous rows; then the horizontal pass, also on contiguous
// runs, after a tiled transpose; a last transpose gives CHW (the flip is folded in there).
// As in Pillow, a pass that maps the box onto itself (same size, no offset) is skipped.
inline void resize_chw(const uint8_t *src, int h, int w, const float *box, bool flip, int S,
                       uint8_t *dst, Scratch &s) {
  const bool need_h = S != w || box[0] != 0 || box[2] != S;
  const bool need_v = S != h || box[1] != 0 || box[3] != S;
  make_taps(w, box[0], box[2], S, s.th);
  make_taps(h, box[1], box[3], S, s.tv);
  const int c0 = need_h ? s.th.first[0] : 0;
  const int c1 = need_h ? s.th.first[S - 1] + s.th.count[S - 1] : S;
  const int n = (c1 - c0) * 3;  // the columns (x 3 channels) the horizontal pass reads
  for (auto &f : s.th.first) f -= c0;
  // Vertical: rows[yy][j] over the needed columns, HWC.
  const uint8_t *rows = src + c0 * 3;
  size_t stride = static_cast<size_t>(w) * 3;
  s.acc.resize(std::max(n, S));
  if (need_v) {
    s.tmp.resize(static_cast<size_t>(S) * n);
    pass(s.tv, S, rows, stride, n, s.acc.data(), s.tmp.data(), n, false);
    rows = s.tmp.data();
    stride = n;
  }
  const size_t plane = static_cast<size_t>(S) * S;
  if (!need_h) {  // HWC -> CHW (+ flip)
    for (int yy = 0; yy < S; yy++)
      for (int c = 0; c < 3; c++) {
        const uint8_t *r = rows + yy * stride + c;
        uint8_t *o = dst + c * plane + static_cast<size_t>(yy) * S;
        for (int xx = 0; xx < S; xx++) o[flip ? S - 1 - xx : xx] = r[xx * 3];
      }
    return;
  }
  // Horizontal on the transpose: tmpT[x * 3 + c][yy] -> outT[c][xx][yy] (xx reversed to flip).
  s.tmpT.resize(static_cast<size_t>(n) * S);
  transpose_u8(rows, S, n, stride, s.tmpT.data(), S);
  s.outT.resize(3 * plane);
  for (int c = 0; c < 3; c++)
    pass(s.th, S, s.tmpT.data() + static_cast<size_t>(c) * S, 3 * static_cast<size_t>(S), S,
         s.acc.data(), s.outT.data() + c * plane, S, flip);
  for (int c = 0; c < 3; c++) transpose_u8(s.outT.data() + c * plane, S, S, S, dst + c * plane, S);
}

class AbdResizeCHW : public ::dali::Operator<::dali::CPUBackend> {
 public:
  explicit AbdResizeCHW(const ::dali::OpSpec &spec)
      : ::dali::Operator<::dali::CPUBackend>(spec), size_(spec.GetArgument<int>("size")) {}

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &out, const ::dali::Workspace &ws) override {
    const auto &in = ws.Input<::dali::CPUBackend>(0);
    const auto &par = ws.Input<::dali::CPUBackend>(1);
    DALI_ENFORCE(in.type() == DALI_UINT8, "AbdResizeCHW: input 0 must be uint8");
    DALI_ENFORCE(par.type() == DALI_FLOAT, "AbdResizeCHW: input 1 must be float32");
    const int n = in.num_samples();
    for (int i = 0; i < n; i++) {
      const auto sh = in.tensor_shape(i);
      DALI_ENFORCE(sh.size() == 3 && sh[2] == 3, "AbdResizeCHW: input 0 must be HWC RGB");
      DALI_ENFORCE(par.tensor_shape(i).num_elements() == 5,
                   "AbdResizeCHW: input 1 must be [x0, y0, x1, y1, flip]");
    }
    out.resize(1);
    out[0] = {::dali::uniform_list_shape(n, ::dali::TensorShape<3>{3, size_, size_}),
              DALI_UINT8};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    const auto &in = ws.Input<::dali::CPUBackend>(0);
    const auto &par = ws.Input<::dali::CPUBackend>(1);
    auto &out = ws.Output<::dali::CPUBackend>(0);
    out.SetLayout("CHW");
    auto &tp = ws.GetThreadPool();
    for (int i = 0; i < in.num_samples(); i++) {
      const auto sh = in.tensor_shape(i);
      tp.AddWork([&, i, sh](int) {
        thread_local Scratch scratch;  // per DALI thread, reused across samples
        const float *p = par.tensor<float>(i);
        resize_chw(in.tensor<uint8_t>(i), static_cast<int>(sh[0]), static_cast<int>(sh[1]), p,
                   p[4] != 0.0f, size_, out.mutable_tensor<uint8_t>(i), scratch);
      }, sh.num_elements());
    }
    tp.RunAll();
  }

 private:
  int size_;
};

}  // namespace abd_fast

DALI_REGISTER_OPERATOR(AbdResizeCHW, ::abd_fast::AbdResizeCHW, ::dali::CPU);

DALI_SCHEMA(AbdResizeCHW)
    .DocStr("Crop box -> size x size bicubic antialiased resize (Pillow's arithmetic) -> "
            "horizontal flip -> uint8 CHW. Inputs: uint8 HWC RGB; float32 [x0, y0, x1, y1, flip].")
    .NumInput(2)
    .NumOutput(1)
    .AddArg("size", "Output side length", DALI_INT32);
