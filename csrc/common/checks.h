// Argument validation shared by the CPU and CUDA host code (ATen, host only).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>

#include "common/image_math.h"

namespace abd_fast {

inline Kind parse_kind(const std::string& kind) {
  if (kind == "none") return Kind::None;
  if (kind == "patch") return Kind::Patch;
  if (kind == "blend") return Kind::Blend;
  if (kind == "add") return Kind::Add;
  if (kind == "warp") return Kind::Warp;
  TORCH_CHECK(false, "abd_fast::image_op: unknown kind '", kind,
              "'; expected none, patch, blend, add or warp");
}

inline bool is_supported_image_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kFloat || t == at::kDouble || t == at::kBFloat16 ||
         t == at::kHalf;
}

inline bool is_supported_out_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Validates an image_op call and returns its geometry.
inline ImageGeom check_image_op(const at::Tensor& images, Kind kind,
                                const std::optional<at::Tensor>& src,
                                const std::optional<at::Tensor>& loc,
                                const std::optional<at::Tensor>& rows,
                                const std::optional<at::Tensor>& mean,
                                const std::optional<at::Tensor>& std, at::ScalarType out_dtype) {
  TORCH_CHECK(images.dim() == 4, "image_op: images must be [B,C,H,W], got ", images.sizes());
  TORCH_CHECK(images.is_contiguous(), "image_op: images must be contiguous");
  TORCH_CHECK(is_supported_image_dtype(images.scalar_type()),
              "image_op: images must be uint8, float32, float64, bfloat16 or float16, got ",
              images.scalar_type());
  TORCH_CHECK(is_supported_out_dtype(out_dtype),
              "image_op: out_dtype must be float32, float64, bfloat16 or float16");
  ImageGeom g{images.size(0), images.size(1), images.size(2), images.size(3),
              images.size(2), images.size(3), 0};
  const auto dev = images.device();
  if (kind != Kind::None) {
    TORCH_CHECK(src.has_value(), "image_op: kind needs src");
    const auto& s = *src;
    TORCH_CHECK(s.device() == dev, "image_op: src must be on ", dev);
    TORCH_CHECK(s.is_contiguous(), "image_op: src must be contiguous");
    TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
                "image_op: src must be float32 or float64");
    if (kind == Kind::Warp) {
      TORCH_CHECK((s.dim() == 3 || s.dim() == 4) && s.size(-1) == 2 && s.size(-3) == g.H &&
                      s.size(-2) == g.W,
                  "image_op: warp grid must be [H,W,2] or [B,H,W,2] with H,W of the images");
    } else {
      TORCH_CHECK(s.dim() == 3 || s.dim() == 4, "image_op: src must be [C,h,w] or [B,C,h,w]");
      TORCH_CHECK(s.size(-3) == g.C, "image_op: src has ", s.size(-3), " channels, images ", g.C);
      if (kind == Kind::Patch) {
        g.h = s.size(-2);
        g.w = s.size(-1);
        TORCH_CHECK(loc.has_value() && loc->dim() == 2 && loc->size(0) == g.B &&
                        loc->size(1) == 2 && loc->scalar_type() == at::kLong &&
                        loc->is_contiguous() && loc->device() == dev,
                    "image_op: patch needs loc, int64 [B,2] (top-left y, x) on ", dev);
      } else {
        TORCH_CHECK(s.size(-2) == g.H && s.size(-1) == g.W,
                    "image_op: pattern must match the image size");
      }
    }
    if (s.dim() == 4) {
      TORCH_CHECK(s.size(0) == g.B, "image_op: per-sample src has ", s.size(0), " rows, images ",
                  g.B);
      g.src_bstride = s.stride(0);
    }
  }
  if (rows.has_value()) {
    TORCH_CHECK(rows->dim() == 1 && rows->size(0) == g.B && rows->scalar_type() == at::kBool &&
                    rows->device() == dev && rows->is_contiguous(),
                "image_op: rows must be a bool [B] tensor on ", dev);
  }
  TORCH_CHECK(mean.has_value() == std.has_value(), "image_op: give both mean and std or neither");
  if (mean.has_value()) {
    for (const auto* t : {&*mean, &*std}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == g.C && t->scalar_type() == at::kFloat &&
                      t->device() == dev && t->is_contiguous(),
                  "image_op: mean and std must be float32 [C] on ", dev);
    }
  }
  return g;
}

// Validates a contrastive_forward / contrastive_backward call.
inline void check_contrastive(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                              int64_t offset, bool symmetric) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1),
              "contrastive: q [N,D] and k [M,D] must share D, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "contrastive: q and k must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble ||
                  q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "contrastive: features must be float32, float64, bfloat16 or float16");
  TORCH_CHECK(q.device() == k.device() && scale.device() == q.device(),
              "contrastive: q, k and scale must be on one device");
  TORCH_CHECK(scale.numel() == 1, "contrastive: scale must hold one value");
  TORCH_CHECK(q.size(0) > 0, "contrastive: empty batch");
  if (symmetric) {
    TORCH_CHECK(q.size(0) == k.size(0) && offset == 0,
                "contrastive: the symmetric loss needs N == M and offset 0");
  } else {
    TORCH_CHECK(offset >= 0 && offset + q.size(0) <= k.size(0), "contrastive: positives offset ",
                offset, " + N ", q.size(0), " exceed M ", k.size(0));
  }
}

}  // namespace abd_fast
