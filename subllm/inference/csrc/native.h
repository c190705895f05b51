// The native decode kernels callable from each other's translation units (decode_layers.cpp runs
// whole layers through the attention and matmul kernels without going back through the dispatcher).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstddef>
#include <vector>

namespace subllm_native {

// A buffer of at least n elements for the calling thread, kept from call to call: a decode step
// makes ~150 kernel calls, and their temporaries were a measured 2-3% of a SmolLM2 token in malloc.
// Each use that can be live at the same time as another needs its own Slot.
template <typename T, int Slot>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// 1 / sqrt(mean(x^2) + eps) over one row of C: RMSNorm's factor (decode_layers.cpp's norms, the score
// layer's norm in decode_select.cpp)
inline float rms_scale(const float* x, int64_t C, float eps) {
  float ss = 0.f;
  for (int64_t c = 0; c < C; ++c) ss += x[c] * x[c];
  return 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
}

// decode_attention.cpp: q (n, H, 1, D); k, v: one (B, Hkv, capacity, D) buffer each, query i reading
// its row rows[i], or n buffers (1, Hkv, capacity_i, D), query i reading the i-th (a cache whose rows
// are stored apart, cache_rows.py; rows all 0); query i attends to the first lens[i] slots
// -> (n, H, 1, D)
at::Tensor decode_attention(const at::Tensor& q, at::TensorList k, at::TensorList v, const at::Tensor& rows,
                            const at::Tensor& lens);
// the same on raw fp32 rows: q (n, H, D) contiguous -> out (n, H, D)
void decode_attention_into(const float* q, int64_t n, int64_t H, at::TensorList k, at::TensorList v,
                           const int64_t* rows, const int64_t* lens, float* out);

// vnni_matmul.cpp: x (rows, in) -> (rows, out) through int4 / int8 tiles (native.py int4_pack / int8_pack)
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d, const at::Tensor& m,
                       int64_t passes);
at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t passes);
// the same on raw fp32 rows: x (M, K) contiguous -> y (M, 16 * w.size(0))
void int4_matmul_into(const float* x, int64_t M, int64_t K, const at::Tensor& w, const at::Tensor& d,
                      const at::Tensor& m, int64_t passes, float* y);
void int8_matmul_into(const float* x, int64_t M, int64_t K, const at::Tensor& w, const at::Tensor& scale,
                      int64_t passes, float* y);

// dense_matmul.cpp: y (M, out) = x (M, K) w^T, w a contiguous fp32 (out, K); each output summed in one
// order whatever M is (a row's result does not depend on the other rows of the step)
void dense_matmul_into(const float* x, int64_t M, int64_t K, const at::Tensor& w, float* y);

}  // namespace subllm_native
