// A run of consecutive decoder layers for one new token per row, in one call (subllm/inference/
// native_layers.py). Per layer, as subllm/model/layers.py Block computes it:
//   h = RMSNorm(x); q, k, v = split(h Wqkv^T); q, k rotated (RoPE, half-split); k, v stored at
//   (rows[i], :, slots[i]) of the layer's cache (or of row i's own buffer); a = attention of q over
//   each row's first lens[i] slots; x += a Wo^T; h = RMSNorm(x); x += (silu(h W1^T) * h W3^T) W2^T
// with the attention and the int4 / int8 matmuls of the other two files called directly and every
// element-wise step (norms, RoPE, the cache store, SwiGLU, residuals) a plain loop over the few rows
// of a decode step. What this removes is not arithmetic but the ~20 dispatched ops per layer and the
// Python between them (or a compiled graph's guards and small kernels): ~4 ms of a SmolLM2-135M
// token that the weights themselves read in ~6 ms (docs/RESULTS.md, "Native decode kernels").
//
// weights: 38 tensors per layer - attn norm weight, ffn norm weight, then Wqkv, Wo, W13, W2 as
// nine tensors each: (W, -, -) for a dense fp32 weight (out, in), native.py's int4 tiles (tiles,
// d, m) or int8 tiles (tiles, scale, -); then a low-rank correction y += (x D^T) U^T as D's and U's
// int8 tiles (int4_correction.py), or six empty tensors ("-": an empty tensor); kinds: 4 per layer,
// 0 dense / 1 int4 / 2 int8.
// The weights and kinds come bound once per run (`LayerWeights`, a torch custom class built by
// native_layers.py when it assembles a run): as a Tensor[] argument, SmolLM2's 1,140 tensors took
// ~93 us of conversion on every call (one thread, 2026-12-05) - ~2% of a token.
// x (n, C), cos / sin (n, head_dim): fp32. Arithmetic in fp32; the cache may hold fp32 or bf16.
// ks / vs: per layer one (B, Hkv, capacity, D) buffer indexed by rows, or per layer n buffers
// (1, Hkv, capacity_i, D), one per row of the step (a cache whose rows are stored apart; rows all 0).

#include "native.h"

#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kPerLinear = 9;  // the weight's three tensors, then the correction's D and U (three each)
constexpr int64_t kLinearsPerLayer = 4;
constexpr int64_t kTensorsPerLayer = 2 + kPerLinear * kLinearsPerLayer;

// outputs and inputs of a linear layer of each kind (dense (out, in); int4 / int8 tiles of 16 rows
// by 8 / 4 inputs)
int64_t outputs(int64_t kind, const at::Tensor& w) { return kind == 0 ? w.size(0) : w.size(0) * 16; }
int64_t inputs(int64_t kind, const at::Tensor& w) { return w.size(1) * (kind == 0 ? 1 : kind == 1 ? 8 : 4); }

// y (n, outputs) = x (n, inputs) W^T for one of the three kinds of weight, plus (x D^T) U^T where the
// linear has a correction (shapes checked up front); mid, tmp: scratch
void linear(const float* x, int64_t n, int64_t kind, const at::Tensor* w, int64_t passes, float* y,
            std::vector<float>& mid, std::vector<float>& tmp) {
  const int64_t K = inputs(kind, w[0]);
  switch (kind) {
    case 0: subllm_native::dense_matmul_into(x, n, K, w[0], y); break;
    case 1: subllm_native::int4_matmul_into(x, n, K, w[0], w[1], w[2], passes, y); break;
    default: subllm_native::int8_matmul_into(x, n, K, w[0], w[1], passes, y); break;
  }
  if (w[3].numel() == 0) return;
  const int64_t R = outputs(2, w[3]), N = outputs(kind, w[0]);
  mid.resize(n * R);
  tmp.resize(n * N);
  subllm_native::int8_matmul_into(x, n, K, w[3], w[4], passes, mid.data());
  subllm_native::int8_matmul_into(mid.data(), n, R, w[6], w[7], passes, tmp.data());
  for (int64_t j = 0; j < n * N; ++j) y[j] += tmp[j];
}

// out = w * (x / sqrt(mean(x^2) + eps)), one row of C
void rms_norm(const float* x, const float* w, float eps, int64_t C, float* out) {
  const float r = subllm_native::rms_scale(x, C, eps);
  for (int64_t c = 0; c < C; ++c) out[c] = w[c] * (x[c] * r);
}

// one head of D in place: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2])
void rope(float* x, const float* cos, const float* sin, int64_t D, float* tmp) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < D; ++d) tmp[d] = x[d];
  for (int64_t d = 0; d < h; ++d) x[d] = tmp[d] * cos[d] - tmp[d + h] * sin[d];
  for (int64_t d = h; d < D; ++d) x[d] = tmp[d] * cos[d] + tmp[d - h] * sin[d];
}

template <typename T>
void store(const at::Tensor& cache, int64_t row, int64_t slot, int64_t Hkv, int64_t D, const float* src) {
  T* base = cache.data_ptr<T>() + row * cache.stride(0) + slot * cache.stride(2);
  for (int64_t h = 0; h < Hkv; ++h)
    for (int64_t d = 0; d < D; ++d) base[h * cache.stride(1) + d] = static_cast<T>(src[h * D + d]);
}

void store_kv(const at::Tensor& cache, int64_t row, int64_t slot, int64_t Hkv, int64_t D, const float* src) {
  if (cache.scalar_type() == at::kFloat) {
    store<float>(cache, row, slot, Hkv, D, src);
  } else {
    store<at::BFloat16>(cache, row, slot, Hkv, D, src);  // round to nearest even, as Tensor.to
  }
}

at::Tensor decode_layers(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                         const at::Tensor& rows_in, const at::Tensor& slots_in, const at::Tensor& lens,
                         at::TensorList weights, at::IntArrayRef kinds, at::TensorList ks, at::TensorList vs,
                         double eps_d, int64_t n_heads, int64_t passes) {
  const int64_t L = static_cast<int64_t>(kinds.size()) / kLinearsPerLayer;
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(kinds.size()) == kLinearsPerLayer * L &&
                  static_cast<int64_t>(weights.size()) == kTensorsPerLayer * L,
              "decode_layers: 38 weight tensors and 4 kinds per layer");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "decode_layers: x must be (n, C) float32 on the CPU");
  const int64_t n = x_in.size(0), C = x_in.size(1);
  const int64_t R = static_cast<int64_t>(ks.size()) / L;  // buffers per layer: 1, or one per row
  TORCH_CHECK((R == 1 || R == n) && static_cast<int64_t>(ks.size()) == R * L && vs.size() == ks.size(),
              "decode_layers: per layer one k and one v cache, or one per row");
  const int64_t Hkv = ks[0].size(1), D = ks[0].size(3), H = n_heads;
  TORCH_CHECK(H * D == C && H % Hkv == 0, "decode_layers: heads x head_dim must equal the width");
  TORCH_CHECK(cos_in.dim() == 2 && cos_in.sizes() == sin_in.sizes() && cos_in.size(0) == n && cos_in.size(-1) == D &&
                  cos_in.scalar_type() == at::kFloat,
              "decode_layers: cos / sin must be (n, head_dim) float32");
  for (const at::Tensor* t : {&rows_in, &slots_in, &lens})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == at::kLong,
                "decode_layers: rows, slots and lens must be (n,) int64");
  const at::Tensor rows = rows_in.contiguous(), slots = slots_in.contiguous();
  const int64_t *rp = rows.data_ptr<int64_t>(), *sp = slots.data_ptr<int64_t>();
  const auto buffer = [R](int64_t l, int64_t i) { return l * R + (R == 1 ? 0 : i); };  // layer l, row i
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t j = l * R; j < (l + 1) * R; ++j)
      for (const at::Tensor* c : {&ks[j], &vs[j]})
        TORCH_CHECK(c->dim() == 4 && c->size(1) == Hkv && c->size(3) == D && c->stride(3) == 1 &&
                        c->sizes() == ks[j].sizes() &&
                        (c->scalar_type() == at::kFloat || c->scalar_type() == at::kBFloat16),
                    "decode_layers: caches must be (B, Hkv, capacity, head_dim) float32 or bfloat16");
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& c = ks[buffer(l, i)];
      TORCH_CHECK(rp[i] >= 0 && rp[i] < c.size(0) && (R == 1 || rp[i] == 0) && sp[i] >= 0 && sp[i] < c.size(2),
                  "decode_layers: rows or slots out of the cache's range");
    }
    for (int64_t j = 0; j < 2; ++j) {
      const at::Tensor& w = weights[l * kTensorsPerLayer + j];
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.numel() == C && w.is_contiguous(),
                  "decode_layers: norm weights must be (C,) float32");
    }
    // every shape checked before the first cache store: a bad run leaves the cache as it was
    const int64_t* kind = kinds.data() + l * kLinearsPerLayer;
    const at::Tensor* lin = &weights[l * kTensorsPerLayer + 2];
    for (int64_t j = 0; j < kLinearsPerLayer; ++j) {
      const at::Tensor* w = &lin[kPerLinear * j];
      TORCH_CHECK(kind[j] >= 0 && kind[j] <= 2 && w[0].dim() >= 2, "decode_layers: unknown linear kind");
      TORCH_CHECK(kind[j] != 0 || (w[0].dim() == 2 && w[0].scalar_type() == at::kFloat),
                  "decode_layers: a dense weight must be (out, in) float32");
      TORCH_CHECK(w[3].numel() == 0 ||
                      (w[3].dim() == 3 && w[6].dim() == 3 && w[3].element_size() == 1 && w[6].element_size() == 1 &&
                       inputs(2, w[3]) == inputs(kind[j], w[0]) && outputs(2, w[3]) % 32 == 0 &&
                       inputs(2, w[6]) == outputs(2, w[3]) && outputs(2, w[6]) == outputs(kind[j], w[0])),
                  "decode_layers: a correction's int8 tiles do not fit its layer");
    }
    const at::Tensor *qkv = lin, *wo = lin + kPerLinear, *w13 = lin + 2 * kPerLinear, *w2 = lin + 3 * kPerLinear;
    const int64_t F2 = outputs(kind[2], *w13);
    TORCH_CHECK(outputs(kind[0], *qkv) == (H + 2 * Hkv) * D && inputs(kind[0], *qkv) == C &&
                    outputs(kind[1], *wo) == C && inputs(kind[1], *wo) == C && inputs(kind[2], *w13) == C &&
                    F2 % 2 == 0 && inputs(kind[3], *w2) == F2 / 2 && outputs(kind[3], *w2) == C,
                "decode_layers: layer ", l, "'s linear shapes do not fit (heads, kv heads, head_dim, width)");
  }
  TORCH_CHECK(H / Hkv <= 16, "decode_layers: more than 16 query heads per K/V head");
  const at::Tensor lens_c = lens.contiguous();
  const int64_t* lp = lens_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t l = 0; l < L; ++l)
      TORCH_CHECK(lp[i] >= 1 && lp[i] <= ks[buffer(l, i)].size(2), "decode_layers: lens out of the cache's range");
  const float eps = static_cast<float>(eps_d);
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const float *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  at::Tensor x = x_in.contiguous().clone();
  float* xp = x.data_ptr<float>();
  const int64_t QKV = (H + 2 * Hkv) * D;
  int64_t widest = std::max(QKV, C);  // the widest linear output of the run: one buffer for all
  for (int64_t l = 0; l < L; ++l)
    for (int64_t j = 0; j < kLinearsPerLayer; ++j)
      widest = std::max(widest, outputs(kinds[l * kLinearsPerLayer + j], weights[l * kTensorsPerLayer + 2 + kPerLinear * j]));
  std::vector<float> h(n * C), q(n * C), a(n * C), out(n * widest), act(n * widest), tmp(D), mid, extra;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[l * kTensorsPerLayer];
    const int64_t* kind = kinds.data() + l * kLinearsPerLayer;
    const float *attn_norm = w[0].data_ptr<float>(), *ffn_norm = w[1].data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) rms_norm(xp + i * C, attn_norm, eps, C, h.data() + i * C);
    linear(h.data(), n, kind[0], w + 2, passes, out.data(), mid, extra);
    for (int64_t i = 0; i < n; ++i) {
      float* row = out.data() + i * QKV;
      for (int64_t head = 0; head < H + Hkv; ++head) rope(row + head * D, cp + i * D, snp + i * D, D, tmp.data());
      store_kv(ks[buffer(l, i)], rp[i], sp[i], Hkv, D, row + H * D);
      store_kv(vs[buffer(l, i)], rp[i], sp[i], Hkv, D, row + (H + Hkv) * D);
      std::copy(row, row + C, q.data() + i * C);
    }
    subllm_native::decode_attention_into(q.data(), n, H, ks.slice(l * R, R), vs.slice(l * R, R), rp, lp, a.data());
    linear(a.data(), n, kind[1], w + 2 + kPerLinear, passes, out.data(), mid, extra);
    for (int64_t j = 0; j < n * C; ++j) xp[j] += out[j];
    for (int64_t i = 0; i < n; ++i) rms_norm(xp + i * C, ffn_norm, eps, C, h.data() + i * C);
    linear(h.data(), n, kind[2], w + 2 + 2 * kPerLinear, passes, out.data(), mid, extra);
    const int64_t F = outputs(kind[2], w[2 + 2 * kPerLinear]) / 2;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t f = 0; f < F; ++f) {
        const float g = out[i * 2 * F + f];
        act[i * F + f] = g / (1.f + std::exp(-g)) * out[i * 2 * F + F + f];
      }
    linear(act.data(), n, kind[3], w + 2 + 3 * kPerLinear, passes, out.data(), mid, extra);
    for (int64_t j = 0; j < n * C; ++j) xp[j] += out[j];
  }
  return x;
}

// a run's weights and kinds, held from step to step (the tensors themselves: a weight changed in
// place is read)
struct LayerWeights : torch::CustomClassHolder {
  std::vector<at::Tensor> weights;
  std::vector<int64_t> kinds;
  LayerWeights(std::vector<at::Tensor> w, std::vector<int64_t> k)
      : weights(std::move(w)), kinds(std::move(k)) {}
};

at::Tensor decode_layers_bound(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                               const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& lens,
                               const c10::intrusive_ptr<LayerWeights>& bound, at::TensorList ks, at::TensorList vs,
                               double eps, int64_t n_heads, int64_t passes) {
  return decode_layers(x, cos, sin, rows, slots, lens, bound->weights, bound->kinds, ks, vs, eps, n_heads, passes);
}

// x (n, C) float32 -> rms_norm of each row with weight w (C,) float32
at::Tensor rms_norm_rows(const at::Tensor& x_in, const at::Tensor& w, double eps) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "rms_norm: x must be (rows, C) float32 on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x_in.size(1),
              "rms_norm: the weight must be (C,) float32");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), C = x.size(1);
  at::Tensor y = at::empty({n, C}, x.options());
  for (int64_t i = 0; i < n; ++i)
    rms_norm(x.data_ptr<float>() + i * C, w.data_ptr<float>(), static_cast<float>(eps), C, y.data_ptr<float>() + i * C);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(subllm_native, lib) {
  lib.class_<LayerWeights>("LayerWeights")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>>())
      .def_pickle(  // a model holding its runs can be deep-copied
          [](const c10::intrusive_ptr<LayerWeights>& self) { return std::make_tuple(self->weights, self->kinds); },
          [](std::tuple<std::vector<at::Tensor>, std::vector<int64_t>> state) {
            return c10::make_intrusive<LayerWeights>(std::get<0>(state), std::get<1>(state));
          });
  lib.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  lib.def(
      "decode_layers(Tensor x, Tensor cos, Tensor sin, Tensor rows, Tensor slots, Tensor lens, "
      "__torch__.torch.classes.subllm_native.LayerWeights weights, Tensor(a!)[] ks, Tensor(b!)[] vs, float eps, "
      "int n_heads, int passes) -> Tensor");
}

TORCH_LIBRARY_IMPL(subllm_native, CPU, lib) {
  lib.impl("decode_layers", &decode_layers_bound);
  lib.impl("rms_norm", &rms_norm_rows);
}
