// y (M, N) = x (M, K) W^T for the few rows of a decode step, fp32, with each output computed the same
// way whatever M is (subllm/inference/native.py `dense_matmul`).
//
// Why: ATen's fp32 matmul takes a matrix-vector kernel for one row and a blocked GEMM for more, and
// the two sum in different orders (SmolLM2's layers: |dy| up to 5e-5 between a row alone and the same
// row among 2-3 others). So a request decoded in a batch got slightly different logits than alone -
// rarely a different greedy token with fp32 K/V, 2 of 32 requests at 1k-token prompts with bf16 K/V,
// whose rounding turns a 1e-6 difference into one bf16 step (docs/RESULTS.md, "A request decodes the
// same alone and in a batch"). Here every output y[r, n] is one fixed sequence: 16 lanes accumulate
// x[r, k] W[n, k] over k in steps of 16 (the last step masked), then one `reduce_add` - the same for
// every M, tile and thread count, so a row's result depends on its own x only.
//
// Tiles of 4 outputs x 4 rows (16 accumulators): each 64-byte piece of W is loaded once per 4 rows;
// the weights stream from memory once per step for any M, a chunk of outputs at a time whose weights
// the previous chunk's tiles prefetched into L2 (`dense_matmul_into`). SmolLM2's 121 weights per step
// (540 MB, one thread; benchmarks/dense_matmul.py): 24.7 ms for 1 row (22 GB/s), 58 ms for 16 rows,
// against ATen's 43 / 92 ms.

#include "native.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTileN = 4, kTileM = 4;

#if defined(__AVX512F__)
// y[r, n] for rows r0 .. r0 + mr - 1 and outputs n0 .. n0 + nr - 1 (mr, nr <= 4); ldy: y's row stride;
// rows j of `next` with bit j of `pf` set are prefetched into L2 along the way
template <int MR, int NR>
void tile(const float* x, int64_t K, const float* w, float* y, int64_t ldy, const float* next, int pf) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int j = 0; j < kTileN; ++j)  // rows of the next chunk's weights this tile brings into L2
      if (pf >> j & 1) _mm_prefetch(reinterpret_cast<const char*>(next + j * K + k), _MM_HINT_T1);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(w + j * K + k);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + k);
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_ps(m, w + j * K + k);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + r * K + k);
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) y[r * ldy + j] = _mm512_reduce_add_ps(acc[r][j]);
}

using TileFn = void (*)(const float*, int64_t, const float*, float*, int64_t, const float*, int);

template <int MR>
TileFn pick_n(int64_t nr) {
  switch (nr) {
    case 1: return &tile<MR, 1>;
    case 2: return &tile<MR, 2>;
    case 3: return &tile<MR, 3>;
    default: return &tile<MR, 4>;
  }
}

TileFn pick(int64_t mr, int64_t nr) {
  switch (mr) {
    case 1: return pick_n<1>(nr);
    case 2: return pick_n<2>(nr);
    case 3: return pick_n<3>(nr);
    default: return pick_n<4>(nr);
  }
}
#else
// without AVX-512: every output through this one function, never inlined, so that however the
// compiler vectorises its sum (-ffast-math lets it reorder) that order is the same for every M and tile
__attribute__((noinline)) float dot(const float* x, const float* w, int64_t K) {
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) s += x[k] * w[k];
  return s;
}

void tile_any(const float* x, int64_t mr, int64_t K, const float* w, int64_t nr, float* y, int64_t ldy) {
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t j = 0; j < nr; ++j) y[r * ldy + j] = dot(x + r * K, w + j * K, K);
}
#endif

}  // namespace

namespace subllm_native {

void dense_matmul_into(const float* x, int64_t M, int64_t K, const at::Tensor& w, float* y) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(1) == K && w.is_contiguous(),
              "dense_matmul: w must be a contiguous fp32 (out, ", K, ") matrix");
  const int64_t N = w.size(0);
  const float* wd = w.data_ptr<float>();
  const int64_t groups = (N + kTileN - 1) / kTileN;
  // groups of outputs in chunks whose weights fit in L2 (~128 KiB): per chunk, each tile of rows
  // (kept in L1) runs over all its groups, the weights read from L2 after the first tile. While a
  // chunk computes, its tiles bring the next chunk's weights into L2 - tile t of the rows the weight
  // rows j = t, t + tiles, ... of each group - so that the stream from memory spreads over the
  // whole computation instead of stalling the first tile of every chunk
  const int64_t per_chunk = std::max<int64_t>(1, (int64_t{128} << 10) / (kTileN * K * 4));
  const int64_t chunks = (groups + per_chunk - 1) / per_chunk;
  const int64_t tiles = (M + kTileM - 1) / kTileM;
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t g_end = std::min(groups, (c + 1) * per_chunk);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t r0 = t * kTileM, mr = std::min(kTileM, M - r0);
        int pf = 0;
        for (int64_t j = t; j < kTileN; j += tiles) pf |= 1 << j;
        for (int64_t g = c * per_chunk; g < g_end; ++g) {
          const int64_t n0 = g * kTileN, nr = std::min(kTileN, N - n0);
          const int64_t nn = n0 + per_chunk * kTileN;  // this group's place in the next chunk
          const float* next = nn + kTileN <= N ? wd + nn * K : nullptr;
#if defined(__AVX512F__)
          pick(mr, nr)(x + r0 * K, K, wd + n0 * K, y + r0 * N + n0, N, next, next ? pf : 0);
#else
          tile_any(x + r0 * K, mr, K, wd + n0 * K, nr, y + r0 * N + n0, N);
#endif
        }
      }
    }
  });
}

at::Tensor dense_matmul(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "dense_matmul: x must be fp32 (rows, in)");
  const at::Tensor xc = x.contiguous();
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  dense_matmul_into(xc.data_ptr<float>(), x.size(0), x.size(1), w, y.data_ptr<float>());
  return y;
}

}  // namespace subllm_native

TORCH_LIBRARY_FRAGMENT(subllm_native, lib) { lib.def("dense_matmul(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(subllm_native, CPU, lib) { lib.impl("dense_matmul", &subllm_native::dense_matmul); }
