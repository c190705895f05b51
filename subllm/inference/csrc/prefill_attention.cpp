// Causal attention of a prefill in bf16 with AVX512-BF16 dot products (subllm/inference/native.py).
//
// q (B, H, Tq, D), k and v (B, Hkv, Tk, D), all bf16 with the last dim contiguous; query t attends to
// keys 0 .. offset + t (offset = Tk - Tq: a chunk of a prompt whose first `offset` tokens are cached)
// -> (B, H, Tq, D) bf16, a view of a (B, Tq, H, D) tensor (the output projection reads it as is).
//
// Why: torch's CPU flash attention ran SmolLM2's 1,024-token prefill attention at ~48 GFLOP/s on one
// core of an AVX512-BF16 EPYC, against ~250 GFLOP/s for the bf16 matmuls around it - a third of the
// prefill's time for a seventh of its FLOPs (docs/RESULTS.md, "Waiting prompts prefilled together").
//
// How: flash attention. Each K/V head's keys are packed once per call into the layout of
// `vdpbf16ps` (pairs of head dims of 16 keys per 512-bit vector for Q K^T, pairs of keys of 16 head
// dims for P V). A work item is (batch row, K/V head, block of kBQ query positions) with the H / Hkv
// query heads of that K/V head as rows of one tile, so every packed key is read once per item for all
// of them. Per block of kBK keys: scores of 6 rows x 64 keys in registers, the running max and sum of
// each row (online softmax, base 2), the probabilities rounded to bf16 (as torch's bf16 kernels do)
// and P V accumulated in fp32. Blocks past a query block's last key are skipped; the diagonal block
// is masked key by key.
//
// Needs AVX512-BF16 at run time (`bf16_available`); native.py falls back to SDPA without it.

#include "native.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

namespace {

constexpr int64_t kBK = 64;  // keys per block (4 vectors of 16 scores per row)
constexpr int64_t kBQ = 32;  // query positions per work item
constexpr int64_t kMR = 6;   // rows per Q K^T micro-tile (6 x 4 accumulators)
constexpr int64_t kRowPad = 12;  // row count padded to a multiple of both micro-tiles' heights

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

bool bf16_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
}

// 2^x for x <= 0 (or -inf -> 0): 2^floor(x) * p(frac(x)), p the degree-7 Taylor series of 2^f on
// [0, 1) (relative error < 2e-6; the probabilities are rounded to bf16 after it)
BF16_TARGET inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.525273e-5f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.540353e-4f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.333355e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550411e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

BF16_TARGET inline __m512bh bcast_pair(const uint16_t* p) {
  uint32_t u;
  std::memcpy(&u, p, sizeof u);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(u));
}

BF16_TARGET inline __m512bh load_bh(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// K of one head (Tk, D) -> kp: for each block of 16 keys and each pair of dims (d, d + 1) one vector
// of 32 bf16, key j's pair at 2j; keys past Tk are 0
void pack_k(const uint16_t* k, int64_t stride, int64_t Tk, int64_t Tpad, int64_t D, uint16_t* kp) {
  for (int64_t j0 = 0; j0 < Tpad; j0 += 16)
    for (int64_t dp = 0; dp < D / 2; ++dp) {
      uint16_t* out = kp + (j0 / 16 * (D / 2) + dp) * 32;
      for (int64_t j = 0; j < 16; ++j) {
        const bool in = j0 + j < Tk;
        out[2 * j] = in ? k[(j0 + j) * stride + 2 * dp] : 0;
        out[2 * j + 1] = in ? k[(j0 + j) * stride + 2 * dp + 1] : 0;
      }
    }
}

// V of one head (Tk, D) -> vp: for each pair of keys (2 jp, 2 jp + 1) and each block of 16 dims one
// vector of 32 bf16, dim d's pair at 2d; keys past Tk are 0
void pack_v(const uint16_t* v, int64_t stride, int64_t Tk, int64_t Tpad, int64_t D, uint16_t* vp) {
  for (int64_t jp = 0; jp < Tpad / 2; ++jp)
    for (int64_t d = 0; d < D; ++d) {
      uint16_t* out = vp + (jp * (D / 16) + d / 16) * 32 + 2 * (d % 16);
      for (int64_t e = 0; e < 2; ++e) {
        const int64_t j = 2 * jp + e;
        out[e] = j < Tk ? v[j * stride + d] : 0;
      }
    }
}

// scores of rows r0 .. r0 + 5 (qp: (rows, D) bf16) against keys j0 .. j0 + 63 -> s (rows, kBK) fp32,
// times `scale`
BF16_TARGET void qk_tile(const uint16_t* qp, const uint16_t* kp, int64_t D, int64_t j0, float scale,
                         float* s) {
  __m512 acc[kMR][4];
  for (int i = 0; i < kMR; ++i)
    for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps();
  const uint16_t* kb = kp + j0 / 16 * (D / 2) * 32;
  for (int64_t dp = 0; dp < D / 2; ++dp) {
    __m512bh kv[4];
    for (int c = 0; c < 4; ++c) kv[c] = load_bh(kb + (c * (D / 2) + dp) * 32);
    for (int i = 0; i < kMR; ++i) {
      const __m512bh a = bcast_pair(qp + i * D + 2 * dp);
      for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], a, kv[c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int i = 0; i < kMR; ++i)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + i * kBK + c * 16, _mm512_mul_ps(acc[i][c], sc));
}

// o (rows, D) fp32 of MR rows: o = o * alpha + P V over keys j0 .. j0 + 63 (pb: (rows, kBK) bf16)
template <int MR, int NV>
BF16_TARGET void pv_tile(const uint16_t* pb, const uint16_t* vp, const float* alpha, int64_t j0, float* o) {
  constexpr int64_t D = NV * 16;
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i) {
    const __m512 a = _mm512_set1_ps(alpha[i]);
    for (int c = 0; c < NV; ++c) acc[i][c] = _mm512_mul_ps(_mm512_loadu_ps(o + i * D + c * 16), a);
  }
  const uint16_t* vb = vp + j0 / 2 * NV * 32;
  for (int64_t jp = 0; jp < kBK / 2; ++jp) {
    __m512bh vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load_bh(vb + (jp * NV + c) * 32);
    for (int i = 0; i < MR; ++i) {
      const __m512bh p = bcast_pair(pb + i * kBK + 2 * jp);
      for (int c = 0; c < NV; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], p, vv[c]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + i * D + c * 16, acc[i][c]);
}

// one block of keys for every row: mask keys past each row's last key, update the running max m and
// sum l, write the rounded probabilities to pb and each row's rescale factor to alpha
BF16_TARGET void softmax_block(float* s, const int64_t* last, int64_t rows, int64_t j0, float* m, float* l,
                               float* alpha, uint16_t* pb) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = s + r * kBK;
    __m512 x[4];
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c < 4; ++c) {
      x[c] = _mm512_loadu_ps(sr + c * 16);
      const int64_t first = j0 + c * 16;
      if (first + 15 > last[r]) {  // keys j with first + lane > last -> -inf
        const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(first - last[r])));
        const __mmask16 out = _mm512_cmpgt_epi32_mask(idx, _mm512_setzero_si512());
        x[c] = _mm512_mask_mov_ps(x[c], out, _mm512_set1_ps(-INFINITY));
      }
      mx = _mm512_max_ps(mx, x[c]);
    }
    const float bm = _mm512_reduce_max_ps(mx);
    uint16_t* pr = pb + r * kBK;
    if (bm == -INFINITY) {  // every key of the block is past this row's last one
      std::memset(pr, 0, kBK * sizeof(uint16_t));
      alpha[r] = 1.f;
      continue;
    }
    const float mn = std::max(m[r], bm);
    alpha[r] = std::exp2(m[r] - mn);
    const __m512 mv = _mm512_set1_ps(mn);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      const __m512 p = exp2_ps(_mm512_sub_ps(x[c], mv));
      const __m256bh pbh = _mm512_cvtneps_pbh(p);
      // the sum of the rounded probabilities: the same weights as P V multiplies
      sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(pbh));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + c * 16), (__m256i)pbh);
    }
    l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
    m[r] = mn;
  }
}

template <int NV>
BF16_TARGET void pv_block(const uint16_t* pb, const uint16_t* vp, const float* alpha, int64_t rows, int64_t j0,
                          float* o) {
  constexpr int MR = 24 / NV;  // 24 accumulators: 12 rows at D 32, 6 at 64, 3 at 128
  static_assert(kRowPad % MR == 0, "rows are padded to a multiple of the tile height");
  for (int64_t r = 0; r < rows; r += MR)
    pv_tile<MR, NV>(pb + r * kBK, vp, alpha + r, j0, o + r * NV * 16);
}

struct Shapes {
  int64_t B, H, Hkv, Tq, Tk, D, offset, Tpad;
};

// one work item: batch row b, K/V head g, query positions t0 .. t0 + kBQ - 1
BF16_TARGET void attend_block(const at::Tensor& q, const uint16_t* kp, const uint16_t* vp, const Shapes& sh,
                              int64_t b, int64_t g, int64_t t0, uint16_t* out) {
  const int64_t R = sh.H / sh.Hkv, D = sh.D;
  const int64_t tn = std::min(kBQ, sh.Tq - t0);
  const int64_t rows = (R * tn + kRowPad - 1) / kRowPad * kRowPad;  // row = t * R + head in the group
  uint16_t* qp = subllm_native::scratch<uint16_t, 0>(rows * D);
  float* o = subllm_native::scratch<float, 1>(rows * D);
  float* s = subllm_native::scratch<float, 2>(rows * kBK);
  uint16_t* pb = subllm_native::scratch<uint16_t, 3>(rows * kBK);
  float* ml = subllm_native::scratch<float, 4>(3 * rows);
  int64_t* last = subllm_native::scratch<int64_t, 5>(rows);
  float *m = ml, *l = ml + rows, *alpha = ml + 2 * rows;
  const uint16_t* qd = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = std::min(r / R, tn - 1), h = g * R + r % R;
    const uint16_t* src = qd + b * q.stride(0) + h * q.stride(1) + (t0 + t) * q.stride(2);
    if (r < R * tn)
      std::memcpy(qp + r * D, src, D * sizeof(uint16_t));
    else
      std::memset(qp + r * D, 0, D * sizeof(uint16_t));
    last[r] = sh.offset + t0 + t;
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  std::memset(o, 0, rows * D * sizeof(float));
  const float scale = static_cast<float>(M_LOG2E / std::sqrt(static_cast<double>(D)));
  const int64_t end = sh.offset + t0 + tn;  // keys this item reads: 0 .. end - 1
  for (int64_t j0 = 0; j0 < end; j0 += kBK) {
    for (int64_t r = 0; r < rows; r += kMR) qk_tile(qp + r * D, kp, D, j0, scale, s + r * kBK);
    softmax_block(s, last, rows, j0, m, l, alpha, pb);
    if (D == 32)
      pv_block<2>(pb, vp, alpha, rows, j0, o);
    else if (D == 64)
      pv_block<4>(pb, vp, alpha, rows, j0, o);
    else
      pv_block<8>(pb, vp, alpha, rows, j0, o);
  }
  for (int64_t r = 0; r < R * tn; ++r) {  // out (B, Tq, H, D)
    const int64_t t = r / R, h = g * R + r % R;
    uint16_t* dst = out + ((b * sh.Tq + t0 + t) * sh.H + h) * D;
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    for (int64_t c = 0; c < D; c += 16) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + r * D + c), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), (__m256i)y);
    }
  }
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t offset) {
  TORCH_CHECK(bf16_available(), "prefill_attention: this CPU lacks AVX512-BF16");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prefill_attention: q, k, v must be 4-d");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->stride(3) == 1,
                "prefill_attention: bf16 tensors with the last dim contiguous");
  const Shapes sh{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), offset,
                  (k.size(2) + kBK - 1) / kBK * kBK};
  TORCH_CHECK(sh.D == 32 || sh.D == 64 || sh.D == 128, "prefill_attention: head dim 32, 64 or 128");
  TORCH_CHECK(k.size(0) == sh.B && v.sizes() == k.sizes() && k.size(3) == sh.D && sh.H % sh.Hkv == 0,
              "prefill_attention: shapes do not match");
  TORCH_CHECK(offset >= 0 && offset + sh.Tq <= sh.Tk, "prefill_attention: query ", offset + sh.Tq,
              " positions past ", sh.Tk, " keys");
  auto out = at::empty({sh.B, sh.Tq, sh.H, sh.D}, q.options());
  if (sh.Tq == 0) return out.transpose(1, 2);
  auto kp = at::empty({sh.B, sh.Hkv, sh.Tpad * sh.D}, k.options());
  auto vp = at::empty({sh.B, sh.Hkv, sh.Tpad * sh.D}, v.options());
  auto u16 = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
  const uint16_t *kd = u16(k), *vd = u16(v);
  uint16_t *kpd = u16(kp), *vpd = u16(vp);
  const int64_t n_kv = sh.B * sh.Hkv, span = sh.Tpad * sh.D;
  at::parallel_for(0, n_kv, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / sh.Hkv, g = i % sh.Hkv;
      pack_k(kd + b * k.stride(0) + g * k.stride(1), k.stride(2), sh.Tk, sh.Tpad, sh.D, kpd + i * span);
      pack_v(vd + b * v.stride(0) + g * v.stride(1), v.stride(2), sh.Tk, sh.Tpad, sh.D, vpd + i * span);
    }
  });
  const int64_t nqb = (sh.Tq + kBQ - 1) / kBQ;
  uint16_t* od = u16(out);
  // items (b, g, p): p alternates short and long query blocks (0, n-1, 1, n-2, ...), so that the
  // contiguous ranges parallel_for hands the threads carry about equal causal work
  at::parallel_for(0, n_kv * nqb, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t bg = i / nqb, p = i % nqb;
      const int64_t qb = p % 2 == 0 ? p / 2 : nqb - 1 - p / 2;
      attend_block(q, kpd + bg * span, vpd + bg * span, sh, bg / sh.Hkv, bg % sh.Hkv, qb * kBQ, od);
    }
  });
  return out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(subllm_native, lib) {
  lib.def("prefill_attention(Tensor q, Tensor k, Tensor v, int offset) -> Tensor");
  lib.def("bf16_available() -> bool", &bf16_available);
}

TORCH_LIBRARY_IMPL(subllm_native, CPU, lib) { lib.impl("prefill_attention", &prefill_attention); }
