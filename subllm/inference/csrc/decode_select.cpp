// S's decision and U + B for the rows of a decode step (subllm/inference/native_layers.py `decide`,
// `bypass`; engine.py `_decode_sub`): the same arithmetic as Subsample.decide and the engine's
// U + B formula, as one op each instead of ~8 and ~4 dispatched ones (the score layer alone took
// ~50 us of a SmolLM2 SUBLLM token per S, its RMS norm being six small ops).

#include "native.h"

#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

// x (n, C) float32, w (C,), b (1,) or (0,) -> (n, 2): the score s = w . x' + b (x' = x / rms(x)
// when eps >= 0, else x) and the weight clamp(s, 0, 1)
at::Tensor decode_decide(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& b, double eps) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "decode_decide: x must be (rows, C) float32 on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x_in.size(1),
              "decode_decide: the score weight must be (C,) float32");
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() <= 1, "decode_decide: the bias must be (1,) or (0,) float32");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), C = x.size(1);
  const float* wp = w.data_ptr<float>();
  const float bias = b.numel() ? b.data_ptr<float>()[0] : 0.f;
  at::Tensor out = at::empty({n, 2}, x.options());
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x.data_ptr<float>() + i * C;
    const float r = eps >= 0 ? subllm_native::rms_scale(xi, C, static_cast<float>(eps)) : 1.f;
    float s = 0.f;
    for (int64_t c = 0; c < C; ++c) s += wp[c] * (xi[c] * r);
    s += bias;
    op[2 * i] = s;
    op[2 * i + 1] = std::min(1.f, std::max(0.f, s));
  }
  return out;
}

// x, h (n, C) float32, weight (n,), scale (C,) -> x + (weight * (h - x)) * scale
at::Tensor decode_bypass(const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& weight_in,
                         const at::Tensor& scale) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.sizes() == h_in.sizes() && x_in.scalar_type() == at::kFloat &&
                  h_in.scalar_type() == at::kFloat && x_in.device().is_cpu() && h_in.device().is_cpu(),
              "decode_bypass: x and h must be (rows, C) float32 on the CPU");
  TORCH_CHECK(weight_in.scalar_type() == at::kFloat && weight_in.numel() == x_in.size(0),
              "decode_bypass: one float32 weight per row");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == x_in.size(1),
              "decode_bypass: the bypass scale must be (C,) float32");
  const at::Tensor x = x_in.contiguous(), h = h_in.contiguous(), weight = weight_in.contiguous();
  const int64_t n = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({n, C}, x.options());
  const float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float wi = weight.data_ptr<float>()[i];
    for (int64_t c = 0; c < C; ++c) op[i * C + c] = xp[i * C + c] + (wi * (hp[i * C + c] - xp[i * C + c])) * sp[c];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(subllm_native, lib) {
  lib.def("decode_decide(Tensor x, Tensor w, Tensor b, float eps) -> Tensor");
  lib.def("decode_bypass(Tensor x, Tensor h, Tensor weight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(subllm_native, CPU, lib) {
  lib.impl("decode_decide", &decode_decide);
  lib.impl("decode_bypass", &decode_bypass);
}
