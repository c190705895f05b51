// int4 or int8 weights x int8 activations for decode steps, with AVX512-VNNI dot products
// (subllm/inference/native.py: int4_pack / int8_pack, int4_matmul / int8_matmul).
//
// Both weight layouts are tiles of 16 output rows, 64 bytes each, so that one 64-byte load feeds
// vpdpbusd, which adds 4 byte products into each of 16 int32 lanes - one lane per output row: no
// horizontal sums, and the activations are 4-byte broadcasts.
// - int4: codes c in 0..15, w = c * d + m per group of 32 weights along `in` (d, m bf16 per row and
//   group, as torch's int4 kernel keeps them; quantize.py's (c - 8) * scale + zero rewritten). A tile covers 8 inputs: byte 4 j + i
//   holds row j's code for input i in its low nibble and for input i + 4 in its high one. The codes
//   are the unsigned operand, the int8 activations the signed one.
// - int8: q in -127..127, w = q * scale per row (Int8Linear). A tile covers 4 inputs: byte 4 j + i
//   is row j's weight for input i, stored as q + 128 (1..255): the weights are the unsigned operand
//   here too, and -128 * (the group's sum of activation codes) takes the offset back out - one number
//   per activation row and group, so nothing per weight group is stored (an earlier layout stored
//   -128 * (the group's sum of weights) in fp32 per row and group: 12.5% more bytes per int8 layer).
// Activations: each row of x is quantized per group of 32 to int8 with its own scale
// (s = max|x| / 127; llama.cpp's Q8 blocks), so a row's result does not depend on the other rows.
// int4: y[r, n] = sum_g s[r, g] * (d[n, g] * sum_k c[n, k] q[r, k] + m[n, g] * sum_k q[r, k]);
// int8: y[r, n] = scale[n] * sum_g s[r, g] * (sum_k (w + 128) q - 128 sum_k q). Both are w . (s q): the
// weights times the rounded activations.
// Products and their sums are exact integers; the rest is fp32.

#include "native.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include <immintrin.h>

namespace {

constexpr int64_t kGroup = 32;
constexpr int kRowsAtOnce = 4;  // activation rows sharing one pass over the weights
// int4: software prefetch this many bytes ahead of the tile being read (SmolLM2's 120 layers at one
// row, one thread: ~15% faster than none; 1024 and 4096 slower than 2048)
constexpr int64_t kPrefetch = 2048;
// int8: the same, further ahead (less work per byte; on 4 KiB pages an earlier test showed no gain).
// SmolLM2's int8 head on huge pages (32 MB, one row, one thread, after a 64 MB read; 2026-12-05):
// 1.29 ms without, 1.02 / 0.94-0.98 / 0.99 ms at 2048 / 4096 / 8192 bytes ahead
constexpr int64_t kPrefetch8 = 4096;
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

bool vnni_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
}

// x (M, K) fp32 -> `passes` rows of int8 q per row of x, with their scales s and per group
// s * sum(q) (`int8`: -128 * sum(q), the int8 kernel's offset); row r's pass p is row r * passes + p.
// Pass 1 rounds x onto max|x| / 127; pass 2 rounds what pass 1 left (at most half a step) onto a grid 254 times
// finer, so the two rows add up to x within max|x| / 64516 per group. The sum is that of the
// rounded activations, so that the int4 offset term multiplies the same activations as the codes
// do and y is exactly w . (s q) - with the exact sum, the rounding errors of a group would add up
// through the offset m (the codes are 0..15, not centred) instead of cancelling.
// One group is two 16-lane vectors; rounding to nearest even, as std::nearbyint (the scalar loop
// this replaced, as the compiler vectorized it: 0.15 / 0.4 us more per call through the op at 576 /
// 1,536 inputs, one thread).
VNNI_TARGET void quantize_rows(const float* x, int64_t M, int64_t K, int passes, bool int8, uint8_t* q, float* s,
                               float* sum) {
  const int64_t G = K / kGroup;
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + r * K + g * kGroup;
      __m512 left0 = _mm512_loadu_ps(xg), left1 = _mm512_loadu_ps(xg + 16);
      float step = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(left0), _mm512_abs_ps(left1))) / 127.f;
      for (int p = 0; p < passes; ++p, step /= 254.f) {
        const int64_t row = r * passes + p;
        const __m512 inv = _mm512_set1_ps(step > 0.f ? 1.f / step : 0.f), st = _mm512_set1_ps(step);
        constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        const __m512i v0 = _mm512_min_epi32(
            hi, _mm512_max_epi32(lo, _mm512_cvt_roundps_epi32(_mm512_mul_ps(left0, inv), kNearest)));
        const __m512i v1 = _mm512_min_epi32(
            hi, _mm512_max_epi32(lo, _mm512_cvt_roundps_epi32(_mm512_mul_ps(left1, inv), kNearest)));
        uint8_t* qg = q + row * K + g * kGroup;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qg), _mm512_cvtepi32_epi8(v0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qg + 16), _mm512_cvtepi32_epi8(v1));
        left0 = _mm512_sub_ps(left0, _mm512_mul_ps(st, _mm512_cvtepi32_ps(v0)));
        left1 = _mm512_sub_ps(left1, _mm512_mul_ps(st, _mm512_cvtepi32_ps(v1)));
        s[row * G + g] = step;
        const float total = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(v0, v1)));
        sum[row * G + g] = int8 ? -128.f * total : step * total;  // |128 total| <= 520,192: exact
      }
    }
  }
}

// output row r / P of the tile column: the sum of its P passes, times `factor`
template <int R, int P>
VNNI_TARGET inline void store(const __m512* acc, __m512 factor, float* y, int64_t N, int64_t nb) {
  for (int o = 0; o < R / P; ++o) {
    __m512 v = acc[o * P];
    for (int p = 1; p < P; ++p) v = _mm512_add_ps(v, acc[o * P + p]);
    _mm512_storeu_ps(y + o * N + nb * 16, _mm512_mul_ps(v, factor));
  }
}

// 16 bf16 -> 16 fp32
VNNI_TARGET inline __m512 load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512i VNNI_TARGET broadcast4(const uint8_t* p) {
  int32_t a;
  __builtin_memcpy(&a, p, 4);
  return _mm512_set1_epi32(a);
}

// the 16 output rows of tile column `nb`, for R quantized activation rows = R / P rows of x
// (P passes each, added up when stored)
template <int R, int P>
VNNI_TARGET void int4_tiles(const uint8_t* w, const void* d_, const void* m_, const uint8_t* q, const float* s,
                            const float* sum, int64_t K, int64_t N, float* y, int64_t nb) {
  const uint16_t* d = static_cast<const uint16_t*>(d_);  // bf16
  const uint16_t* m = static_cast<const uint16_t*>(m_);
  const int64_t G = K / kGroup;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const uint8_t* wt = w + nb * (K / 8) * 64;
  for (int64_t g = 0; g < G; ++g) {
    __m512i lo_acc[R], hi_acc[R];
    for (int r = 0; r < R; ++r) lo_acc[r] = hi_acc[r] = _mm512_setzero_si512();
    for (int step = 0; step < kGroup / 8; ++step) {
      _mm_prefetch(reinterpret_cast<const char*>(wt + (g * (kGroup / 8) + step) * 64 + kPrefetch), _MM_HINT_T0);
      const __m512i b = _mm512_loadu_si512(wt + (g * (kGroup / 8) + step) * 64);
      const __m512i lo = _mm512_and_si512(b, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
      for (int r = 0; r < R; ++r) {
        const uint8_t* qk = q + r * K + g * kGroup + step * 8;
        lo_acc[r] = _mm512_dpbusd_epi32(lo_acc[r], lo, broadcast4(qk));
        hi_acc[r] = _mm512_dpbusd_epi32(hi_acc[r], hi, broadcast4(qk + 4));
      }
    }
    const __m512 dv = load_bf16(d + (nb * G + g) * 16);
    const __m512 mv = load_bf16(m + (nb * G + g) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[r], hi_acc[r]));
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dv, _mm512_set1_ps(s[r * G + g])), acc[r]);
      acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sum[r * G + g]), acc[r]);
    }
  }
  store<R, P>(acc, _mm512_set1_ps(1.f), y, N, nb);
}

template <int R, int P>
VNNI_TARGET void int8_tiles(const uint8_t* w, const void* scale_, const void*, const uint8_t* q, const float* s,
                            const float* off, int64_t K, int64_t N, float* y, int64_t nb) {
  const float* scale = static_cast<const float*>(scale_);
  const int64_t G = K / kGroup;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const uint8_t* wt = w + nb * (K / 4) * 64;
  for (int64_t g = 0; g < G; ++g) {
    __m512i even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_si512();
    for (int step = 0; step < kGroup / 4; step += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(wt + (g * (kGroup / 4) + step) * 64 + kPrefetch8), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wt + (g * (kGroup / 4) + step) * 64 + kPrefetch8 + 64), _MM_HINT_T0);
      const __m512i b0 = _mm512_loadu_si512(wt + (g * (kGroup / 4) + step) * 64);
      const __m512i b1 = _mm512_loadu_si512(wt + (g * (kGroup / 4) + step + 1) * 64);
      for (int r = 0; r < R; ++r) {
        const uint8_t* qk = q + r * K + g * kGroup + step * 4;
        even[r] = _mm512_dpbusd_epi32(even[r], b0, broadcast4(qk));
        odd[r] = _mm512_dpbusd_epi32(odd[r], b1, broadcast4(qk + 4));
      }
    }
    for (int r = 0; r < R; ++r) {  // the dot (< 2^24) and the offset are exact in fp32: so is their sum
      const __m512i dot_i = _mm512_add_epi32(even[r], odd[r]);
      const __m512 dot = _mm512_add_ps(_mm512_cvtepi32_ps(dot_i), _mm512_set1_ps(off[r * G + g]));
      acc[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(s[r * G + g]), acc[r]);
    }
  }
  store<R, P>(acc, _mm512_loadu_ps(scale + nb * 16), y, N, nb);
}

using TileFn = void (*)(const uint8_t*, const void*, const void*, const uint8_t*, const float*, const float*,
                        int64_t, int64_t, float*, int64_t);

template <int R, int P>
struct Int4 {
  static constexpr TileFn fn = &int4_tiles<R, P>;
};
template <int R, int P>
struct Int8 {
  static constexpr TileFn fn = &int8_tiles<R, P>;
};

// R quantized rows (a multiple of the passes P)
template <template <int, int> class Kind>
TileFn by_rows(int R, int64_t P) {
  if (P == 2) return R == 2 ? Kind<2, 2>::fn : Kind<4, 2>::fn;
  switch (R) {
    case 1: return Kind<1, 1>::fn;
    case 2: return Kind<2, 1>::fn;
    case 3: return Kind<3, 1>::fn;
    default: return Kind<4, 1>::fn;
  }
}

// x (M0, K) fp32 rows -> y (M0, 16 * NB) fp32: quantize x (`passes` rows each), then tile columns
// in parallel, kRowsAtOnce quantized rows per pass over the weights, and add up each row's passes
template <template <int, int> class Kind>
void run(const float* x, int64_t M0, int64_t K, const at::Tensor& w, int64_t inputs_per_tile, const at::Tensor& a,
         const at::Tensor& b, int64_t passes, bool int8, const char* name, float* y) {
  TORCH_CHECK(passes == 1 || passes == 2, name, ": passes must be 1 or 2");
  TORCH_CHECK(vnni_available(), name, ": this CPU lacks AVX512-VNNI");
  const int64_t M = M0 * passes, NB = w.size(0), N = NB * 16, G = K / kGroup;
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 64 && w.element_size() == 1 && w.is_contiguous(), name,
              ": packed weights must be (out / 16, in / ", inputs_per_tile, ", 64) bytes");
  TORCH_CHECK(K % kGroup == 0 && w.size(1) * inputs_per_tile == K, name, ": x's width does not match the weights");
  for (const at::Tensor* t : {&a, &b})
    TORCH_CHECK(t->is_contiguous() && t->size(0) == NB && t->size(-1) == 16, name,
                ": scales must be contiguous, one block per 16 output rows");
  uint8_t* q = subllm_native::scratch<uint8_t, 10>(static_cast<size_t>(M * K));
  float* s = subllm_native::scratch<float, 11>(static_cast<size_t>(M * G));
  float* sum = subllm_native::scratch<float, 12>(static_cast<size_t>(M * G));
  quantize_rows(x, M0, K, static_cast<int>(passes), int8, q, s, sum);
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const void *ap = a.data_ptr(), *bp = b.data_ptr();
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < M; r0 += kRowsAtOnce) {
      const TileFn fn = by_rows<Kind>(static_cast<int>(std::min<int64_t>(kRowsAtOnce, M - r0)), passes);
      for (int64_t nb = begin; nb < end; ++nb)
        fn(wp, ap, bp, q + r0 * K, s + r0 * G, sum + r0 * G, K, N, y + r0 / passes * N, nb);
    }
  });
}

void check_int4(const at::Tensor& d, const at::Tensor& m, int64_t K) {
  TORCH_CHECK(d.dim() == 3 && d.sizes() == m.sizes() && d.size(2) == 16 && d.size(1) * kGroup == K &&
                  d.scalar_type() == at::kBFloat16 && m.scalar_type() == at::kBFloat16,
              "int4_matmul: d and m must be (out / 16, in / 32, 16) bfloat16");
}

void check_int8(const at::Tensor& scale) {
  TORCH_CHECK(scale.dim() == 2 && scale.size(1) == 16 && scale.scalar_type() == at::kFloat,
              "int8_matmul: scale must be (out / 16, 16) float32");
}

// the ops' Tensor form: x (rows, in) of any float dtype -> (rows, out) in x's dtype
template <typename Matmul>
at::Tensor with_tensors(const at::Tensor& x, const at::Tensor& w, const char* name, Matmul matmul) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), name, ": x must be (rows, in) on the CPU");
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x.size(0), w.size(0) * 16}, x.options().dtype(at::kFloat));
  matmul(x32.data_ptr<float>(), y.data_ptr<float>());
  return y.to(x.scalar_type());
}

}  // namespace

namespace subllm_native {

void int4_matmul_into(const float* x, int64_t M, int64_t K, const at::Tensor& w, const at::Tensor& d,
                      const at::Tensor& m, int64_t passes, float* y) {
  check_int4(d, m, K);
  run<Int4>(x, M, K, w, 8, d, m, passes, false, "int4_matmul", y);
}

void int8_matmul_into(const float* x, int64_t M, int64_t K, const at::Tensor& w, const at::Tensor& scale,
                      int64_t passes, float* y) {
  check_int8(scale);
  run<Int8>(x, M, K, w, 4, scale, scale, passes, true, "int8_matmul", y);
}

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d, const at::Tensor& m,
                       int64_t passes) {
  return with_tensors(x, w, "int4_matmul", [&](const float* xp, float* yp) {
    int4_matmul_into(xp, x.size(0), x.size(1), w, d, m, passes, yp);
  });
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t passes) {
  return with_tensors(x, w, "int8_matmul", [&](const float* xp, float* yp) {
    int8_matmul_into(xp, x.size(0), x.size(1), w, scale, passes, yp);
  });
}

}  // namespace subllm_native

TORCH_LIBRARY_FRAGMENT(subllm_native, lib) {
  lib.def("int4_matmul(Tensor x, Tensor w, Tensor d, Tensor m, int passes) -> Tensor");
  lib.def("int8_matmul(Tensor x, Tensor w, Tensor scale, int passes) -> Tensor");
  lib.def("vnni_available() -> bool", &vnni_available);
}

TORCH_LIBRARY_IMPL(subllm_native, CPU, lib) {
  lib.impl("int4_matmul", &subllm_native::int4_matmul);
  lib.impl("int8_matmul", &subllm_native::int8_matmul);
}
