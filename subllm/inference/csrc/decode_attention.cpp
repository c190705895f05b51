// One-query attention for decode steps over a KV cache (subllm/inference/native.py).
//
// q (n, H, 1, D) float; k, v (B, Hkv, capacity, D) float or bfloat16, last dim contiguous;
// rows (n,) int64: query i reads cache row rows[i] (all rows of a step, or the subset a level's S
// kept - no gather of the cache); lens (n,) int64: it attends to that row's first lens[i] slots.
// Or k, v as n buffers (1, Hkv, capacity_i, D), query i reading the i-th (rows all 0): a cache whose
// rows are stored apart, each as long as it holds (subllm/inference/cache_rows.py).
// -> (n, H, 1, D) in q's dtype.
// The H / Hkv query heads of one K/V head share each key and value read (grouped-query
// attention). Work is split over (row, K/V head, block of keys); each block keeps its running
// max, sum of exponentials and weighted sum of values, merged at the end as in flash-decoding.
// Arithmetic in fp32. K/V in bf16 are widened on the fly (half the bytes read per token).

#include "native.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// keys per work item: a row's keys in at most kSplit blocks of at least kMinBlock (a multiple of 64)
// and at most kMaxBlock keys. Long blocks stream each head's K and V in one run each: at one
// thread, SmolLM2's 2k-token attention took 2.45 ms in blocks of 2,048 keys against 2.75 ms in
// blocks of 256 (a C++ timing of the kernel over 30 layers' bf16 K/V, 2026-12-05; the prefetchers
// restart with every block). Two blocks a row keep two threads busy at batch 1 with 3 K/V heads;
// the split depends on the row's own length only - not on the thread count, nor on the other rows
// of the step - so results do not change with threads or with the batch a request decodes in.
constexpr int64_t kMinBlock = 256, kMaxBlock = 4096, kSplit = 2;
constexpr int64_t kMaxGroup = 16;

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// scores (G, n) -> exp(score - max) in place; the max and the sum of each row into m, l
inline void softmax_rows(float* scores, int64_t G, int64_t n, float* out_m, float* out_l) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * n;
    float m = -INFINITY;
    for (int64_t t = 0; t < n; ++t) m = sg[t] > m ? sg[t] : m;
    float l = 0.f;
#pragma omp simd reduction(+ : l)
    for (int64_t t = 0; t < n; ++t) {
      sg[t] = std::exp(sg[t] - m);
      l += sg[t];
    }
    out_m[g] = m;
    out_l[g] = l;
  }
}

template <typename KV>
void block_attend(const float* q, int64_t G, int64_t D, const KV* k, const KV* v, int64_t kv_stride,
                  int64_t n, float scale, float* scores, float* out_m, float* out_l, float* out_acc) {
  // scores (G, n); out_acc (G, D)
  for (int64_t t = 0; t < n; ++t) {
    const KV* kt = k + t * kv_stride;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[d] * widen(kt[d]);
      scores[g * n + t] = s * scale;
    }
  }
  softmax_rows(scores, G, n, out_m, out_l);
  for (int64_t i = 0; i < G * D; ++i) out_acc[i] = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    const KV* vt = v + t * kv_stride;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * n + t];
      float* acc = out_acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += p * widen(vt[d]);
    }
  }
}


#if defined(__AVX512F__)
// A row of D = 16 * C values as C fp32 vectors. fp32: in order. bf16: each 64-byte load of 32
// values gives its even-indexed values by a shift and its odd-indexed ones by a mask - two plain
// integer ops, where widening 16 values (vpmovzxwd + shift) took a shuffle each, on the ports the
// FMAs and the score sums need too. So for bf16 vector 2i holds values 32i + 0, 2, .., 30 and vector
// 2i + 1 values 32i + 1, 3, .., 31: q is loaded in the same order (dot products do not care) and the
// weighted sum of V is put back in order when stored.
template <int C>
inline void load_row(const float* p, __m512* out) {
  for (int c = 0; c < C; ++c) out[c] = _mm512_loadu_ps(p + c * 16);
}
template <int C>
inline void load_row(const at::BFloat16* p, __m512* out) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int c = 0; c < C; c += 2) {
    const __m512i raw = _mm512_loadu_si512(p + c * 16);
    out[c] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    out[c + 1] = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
  }
}
// fp32 values at p in load_row's order for KV
template <typename KV, int C>
inline void load_like(const float* p, __m512* out) {
  if constexpr (std::is_same_v<KV, float>) {
    load_row<C>(p, out);
  } else {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int c = 0; c < C; c += 2) {
      const __m512 a = _mm512_loadu_ps(p + c * 16), b = _mm512_loadu_ps(p + c * 16 + 16);
      out[c] = _mm512_permutex2var_ps(a, even, b);
      out[c + 1] = _mm512_permutex2var_ps(a, odd, b);
    }
  }
}
// C vectors in load_row's order for KV -> D fp32 values in order at p
template <typename KV, int C>
inline void store_like(const __m512* v, float* p) {
  if constexpr (std::is_same_v<KV, float>) {
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(p + c * 16, v[c]);
  } else {
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    for (int c = 0; c < C; c += 2) {
      _mm512_storeu_ps(p + c * 16, _mm512_permutex2var_ps(v[c], lo, v[c + 1]));
      _mm512_storeu_ps(p + c * 16 + 16, _mm512_permutex2var_ps(v[c], hi, v[c + 1]));
    }
  }
}

template <int C>
inline __m512 dot(const __m512* q, const __m512* k) {  // 16 lanes whose sum is q . k
  __m512 s = _mm512_mul_ps(q[0], k[0]);
  for (int c = 1; c < C; ++c) s = _mm512_fmadd_ps(q[c], k[c], s);
  return s;
}

// Horizontal sums of 16 vectors v0..v15 into one vector (lane i = the sum of v_i's lanes) in three
// steps of pairwise adds - 45 instructions for 16 keys where one _mm512_reduce_add_ps per key took
// ~8 each, the largest part of the scores loop. Within each 128-bit chunk: sum_pairs32(a, b) =
// [a0+a2, b0+b2, a1+a3, b1+b3]; sum_pairs64 of two such = [a, b, c, d] partial sums; sum_chunks
// then adds across the four chunks: chunk j of the result holds v_4j .. v_4j+3.
inline __m512 sum_pairs32(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
inline __m512 sum_pairs64(__m512 a, __m512 b) {
  const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}
inline __m512 sum_chunks(__m512 a, __m512 b) {  // [a0+a1, a2+a3, b0+b1, b2+b3] in 128-bit chunks
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}

// block_attend for G query heads and D = 16 * C, the accumulators held in registers
template <typename KV, int G, int C>
void block_attend_avx512(const float* q, const KV* k, const KV* v, int64_t kv_stride, int64_t n, float scale,
                         float* scores, float* out_m, float* out_l, float* out_acc) {
  __m512 qv[G][C];
  for (int g = 0; g < G; ++g) {
    load_like<KV, C>(q + g * C * 16, qv[g]);
    for (int c = 0; c < C; ++c) qv[g][c] = _mm512_mul_ps(qv[g][c], _mm512_set1_ps(scale));
  }
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {  // 16 keys: their 16 products per head summed as one transpose tree
    __m512 x[G][4];
    for (int j = 0; j < 4; ++j) {
      __m512 s[G][4];
      for (int i = 0; i < 4; ++i) {
        __m512 kk[C];
        load_row<C>(k + (t + 4 * j + i) * kv_stride, kk);
        for (int g = 0; g < G; ++g) s[g][i] = dot<C>(qv[g], kk);
      }
      for (int g = 0; g < G; ++g) x[g][j] = sum_pairs64(sum_pairs32(s[g][0], s[g][1]), sum_pairs32(s[g][2], s[g][3]));
    }
    for (int g = 0; g < G; ++g)
      _mm512_storeu_ps(scores + g * n + t,
                       sum_chunks(sum_chunks(x[g][0], x[g][1]), sum_chunks(x[g][2], x[g][3])));
  }
  for (; t < n; ++t) {
    __m512 kk[C];
    load_row<C>(k + t * kv_stride, kk);
    for (int g = 0; g < G; ++g) scores[g * n + t] = _mm512_reduce_add_ps(dot<C>(qv[g], kk));
  }
  softmax_rows(scores, G, n, out_m, out_l);
  __m512 acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    __m512 vv[C];
    load_row<C>(v + t * kv_stride, vv);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * n + t]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g) store_like<KV, C>(acc[g], out_acc + g * C * 16);
}

using BlockFn = void (*)(const float*, const void*, const void*, int64_t, int64_t, float, float*, float*, float*,
                         float*);

template <typename KV, int G, int C>
void block_fast(const float* q, const void* k, const void* v, int64_t st, int64_t n, float scale, float* s,
                float* m, float* l, float* acc) {
  block_attend_avx512<KV, G, C>(q, static_cast<const KV*>(k), static_cast<const KV*>(v), st, n, scale, s, m, l, acc);
}

template <typename KV, int C>
BlockFn pick_g(int64_t G) {
  switch (G) {
    case 1: return &block_fast<KV, 1, C>;
    case 2: return &block_fast<KV, 2, C>;
    case 3: return &block_fast<KV, 3, C>;
    case 4: return &block_fast<KV, 4, C>;
    default: return nullptr;
  }
}

template <typename KV>
BlockFn pick_fast(int64_t G, int64_t D) {
  switch (D) {
    case 32: return pick_g<KV, 2>(G);
    case 64: return pick_g<KV, 4>(G);
    case 128: return pick_g<KV, 8>(G);
    default: return nullptr;
  }
}
#else
using BlockFn = void (*)(const float*, const void*, const void*, int64_t, int64_t, float, float*, float*, float*,
                         float*);
template <typename KV>
BlockFn pick_fast(int64_t, int64_t) { return nullptr; }
#endif

template <typename KV>
void run(const float* qp, int64_t B, int64_t H, at::TensorList k, at::TensorList v, const int64_t* rows,
         const int64_t* lens, float* op) {
  const int64_t D = k[0].size(3);
  const int64_t Hkv = k[0].size(1), G = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // each row's block length from its own length only, so that a row's result does not depend on the
  // other rows of the step (a request decodes the same alone and in any batch); the grid of work
  // items has the most blocks any row has, a row's items past its own blocks are empty
  int64_t* row_block = subllm_native::scratch<int64_t, 6>(static_cast<size_t>(B));
  int64_t nblocks = 1, kBlock = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t half = ((lens[b] + kSplit - 1) / kSplit + 63) / 64 * 64;
    row_block[b] = std::min(kMaxBlock, std::max(kMinBlock, half));
    nblocks = std::max(nblocks, (lens[b] + row_block[b] - 1) / row_block[b]);
    kBlock = std::max(kBlock, row_block[b]);
  }
  // partials: (B, Hkv, nblocks, G, D + 2) - m, l, acc
  const int64_t P = D + 2;
  float* part = subllm_native::scratch<float, 0>(static_cast<size_t>(B * Hkv * nblocks * G * P));
  // each query row's K and V: (row rows[b] of one buffer) or (row 0 of its own buffer)
  const bool own = k.size() > 1;
  const KV** kr = subllm_native::scratch<const KV*, 4>(static_cast<size_t>(2 * B));
  const KV** vr = kr + B;
  int64_t* ksh = subllm_native::scratch<int64_t, 5>(static_cast<size_t>(2 * B));
  int64_t* vsh = ksh + B;
  const int64_t kst = k[0].stride(2);
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor& kt = k[own ? b : 0];
    const at::Tensor& vt = v[own ? b : 0];
    const int64_t r = own ? 0 : rows[b];
    TORCH_CHECK(kt.stride(2) == kst && vt.stride(2) == kst, "decode_attention: k and v need one slot stride");
    kr[b] = kt.data_ptr<KV>() + r * kt.stride(0);
    vr[b] = vt.data_ptr<KV>() + r * vt.stride(0);
    ksh[b] = kt.stride(1);
    vsh[b] = vt.stride(1);
  }
  const BlockFn fast = pick_fast<KV>(G, D);
  at::parallel_for(0, B * Hkv * nblocks, 1, [&](int64_t begin, int64_t end) {
    float* scores = subllm_native::scratch<float, 1>(static_cast<size_t>(G * kBlock));
    float* ml = subllm_native::scratch<float, 2>(static_cast<size_t>(2 * G));
    float* acc = subllm_native::scratch<float, 3>(static_cast<size_t>(G * D));
    for (int64_t w = begin; w < end; ++w) {
      const int64_t blk = w % nblocks, bh = w / nblocks, h = bh % Hkv, b = bh / Hkv;
      const int64_t t0 = blk * row_block[b];
      const int64_t n = std::min(row_block[b], lens[b] - t0);
      float* pw = part + w * G * P;
      if (n <= 0) {
        for (int64_t g = 0; g < G; ++g) pw[g * P] = -INFINITY, pw[g * P + 1] = 0.f;
        continue;
      }
      const float* qbh = qp + (b * H + h * G) * D;
      const KV* kbh = kr[b] + h * ksh[b] + t0 * kst;
      const KV* vbh = vr[b] + h * vsh[b] + t0 * kst;
      if (fast != nullptr) {
        fast(qbh, kbh, vbh, kst, n, scale, scores, ml, ml + G, acc);
      } else {
        block_attend<KV>(qbh, G, D, kbh, vbh, kst, n, scale, scores, ml, ml + G, acc);
      }
      for (int64_t g = 0; g < G; ++g) {
        pw[g * P] = ml[g];
        pw[g * P + 1] = ml[G + g];
        std::memcpy(pw + g * P + 2, acc + g * D, D * sizeof(float));
      }
    }
  });
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    for (int64_t g = 0; g < G; ++g) {
      float m = -INFINITY;
      for (int64_t blk = 0; blk < nblocks; ++blk) m = std::max(m, part[((bh * nblocks + blk) * G + g) * P]);
      float l = 0.f;
      float* o = op + (bh * G + g) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const float* pw = part + ((bh * nblocks + blk) * G + g) * P;
        if (pw[1] == 0.f) continue;
        const float c = std::exp(pw[0] - m);
        l += c * pw[1];
        for (int64_t d = 0; d < D; ++d) o[d] += c * pw[2 + d];
      }
      const float inv = 1.f / l;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  }
}

}  // namespace

namespace subllm_native {

void decode_attention_into(const float* q, int64_t n, int64_t H, at::TensorList k, at::TensorList v,
                           const int64_t* rows, const int64_t* lens, float* out) {
  const bool own = k.size() > 1;
  TORCH_CHECK(k.size() >= 1 && v.size() == k.size() && (!own || static_cast<int64_t>(k.size()) == n),
              "decode_attention: one k and v buffer, or one per query row");
  for (size_t i = 0; i < k.size(); ++i) {
    TORCH_CHECK(k[i].device().is_cpu() && v[i].device().is_cpu(), "decode_attention: CPU tensors only");
    TORCH_CHECK(k[i].dim() == 4 && v[i].sizes() == k[i].sizes() && k[i].size(1) == k[0].size(1) &&
                    k[i].size(3) == k[0].size(3),
                "decode_attention: k and v must be (B, Hkv, capacity, D), alike");
    TORCH_CHECK(k[i].stride(3) == 1 && v[i].stride(3) == 1, "decode_attention: k, v need a contiguous last dim");
    TORCH_CHECK(k[i].scalar_type() == k[0].scalar_type() && v[i].scalar_type() == k[0].scalar_type(),
                "decode_attention: k and v dtypes differ");
  }
  TORCH_CHECK(H % k[0].size(1) == 0 && H / k[0].size(1) <= kMaxGroup, "decode_attention: bad head grouping");
  for (int64_t b = 0; b < n; ++b) {
    const at::Tensor& kt = k[own ? b : 0];
    TORCH_CHECK(own ? rows[b] == 0 && kt.size(0) == 1 : rows[b] >= 0 && rows[b] < kt.size(0),
                "decode_attention: rows out of range");
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= kt.size(2), "decode_attention: lens out of range");
  }
  if (k[0].scalar_type() == at::kFloat) {
    run<float>(q, n, H, k, v, rows, lens, out);
  } else if (k[0].scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(q, n, H, k, v, rows, lens, out);
  } else {
    TORCH_CHECK(false, "decode_attention: k, v must be float32 or bfloat16");
  }
}

at::Tensor decode_attention(const at::Tensor& q, at::TensorList k, at::TensorList v, const at::Tensor& rows,
                            const at::Tensor& lens) {
  TORCH_CHECK(q.device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be (B, H, 1, D)");
  TORCH_CHECK(!k.empty() && k[0].dim() == 4 && k[0].size(3) == q.size(3), "decode_attention: q and k disagree on D");
  for (const at::Tensor* t : {&rows, &lens})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == q.size(0) && t->scalar_type() == at::kLong,
                "decode_attention: rows and lens must be (n,) int64, one per query row");
  const at::Tensor rows_c = rows.contiguous(), lens_c = lens.contiguous();
  const at::Tensor q32 = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  decode_attention_into(q32.data_ptr<float>(), q.size(0), q.size(1), k, v, rows_c.data_ptr<int64_t>(),
                        lens_c.data_ptr<int64_t>(), out.data_ptr<float>());
  return out.to(q.scalar_type());
}

}  // namespace subllm_native

TORCH_LIBRARY(subllm_native, m) { m.def("decode_attention(Tensor q, Tensor[] k, Tensor[] v, Tensor rows, Tensor lens) -> Tensor"); }

TORCH_LIBRARY_IMPL(subllm_native, CPU, m) { m.impl("decode_attention", &subllm_native::decode_attention); }
