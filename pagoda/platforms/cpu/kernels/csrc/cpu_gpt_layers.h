// The GPT-style decoders' elementwise layers (OPT, GPT-2): LayerNorm (+ residual add) and plain activations.
// Like cpu_elementwise.h: one pass per row, float32 inside, one rounding on output.
#pragma once

#include "cpu_elementwise.h"

namespace {

// residual_out = x + residual (rounded to T, as torch's add); out = (v - mean) * rsqrt(var + eps) * weight + bias
// over each row v (the sum, or x alone without a residual), with the biased variance as torch's LayerNorm takes it.
// weight and bias may be null (a LayerNorm without elementwise affine).
template <typename T>
void layer_norm(T* out, T* residual_out, const T* x, const T* residual, const T* weight, const T* bias, int64_t rows,
                int64_t hidden, float eps, int num_threads) {
  share_tasks((rows + kRowChunk - 1) / kRowChunk, num_threads, [&](int64_t chunk) {
    std::vector<float> buf(hidden);
    const int64_t end = (chunk + 1) * kRowChunk < rows ? (chunk + 1) * kRowChunk : rows;
    for (int64_t r = chunk * kRowChunk; r < end; ++r) {
      const T* xr = x + r * hidden;
      float sum = 0.f;
      int64_t i = 0;
#if defined(__AVX512F__)
      __m512 sumv = _mm512_setzero_ps();
      for (; i + 16 <= hidden; i += 16) {
        __m512 v = load16(xr + i);
        if (residual) {
          v = round_like<T>(_mm512_add_ps(v, load16(residual + r * hidden + i)));
          store16(residual_out + r * hidden + i, v);
        }
        _mm512_storeu_ps(buf.data() + i, v);
        sumv = _mm512_add_ps(sumv, v);
      }
      sum = _mm512_reduce_add_ps(sumv);
#endif
      for (; i < hidden; ++i) {
        float v = load(xr, i);
        if (residual) {
          v = load_rounded<T>(v + load(residual + r * hidden, i));
          store(residual_out + r * hidden, i, v);
        }
        buf[i] = v;
        sum += v;
      }
      const float mean = sum / static_cast<float>(hidden);
      // The variance from the centred values (a second pass over the row in cache): no cancellation.
      float sq = 0.f;
      i = 0;
#if defined(__AVX512F__)
      const __m512 mv = _mm512_set1_ps(mean);
      __m512 sqv = _mm512_setzero_ps();
      for (; i + 16 <= hidden; i += 16) {
        const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(buf.data() + i), mv);
        sqv = _mm512_fmadd_ps(c, c, sqv);
      }
      sq = _mm512_reduce_add_ps(sqv);
#endif
      for (; i < hidden; ++i) sq += (buf[i] - mean) * (buf[i] - mean);
      const float rstd = 1.f / std::sqrt(sq / static_cast<float>(hidden) + eps);
      T* o = out + r * hidden;
      i = 0;
#if defined(__AVX512F__)
      const __m512 rv = _mm512_set1_ps(rstd);
      for (; i + 16 <= hidden; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf.data() + i), mv), rv);
        if (weight) v = _mm512_mul_ps(v, load16(weight + i));
        if (bias) v = _mm512_add_ps(v, load16(bias + i));
        store16(o + i, v);
      }
#endif
      for (; i < hidden; ++i) {
        float v = (buf[i] - mean) * rstd;
        if (weight) v *= load(weight, i);
        if (bias) v += load(bias, i);
        store(o, i, v);
      }
    }
  });
}

enum Activation { kRelu = 0, kGeluTanh = 1 };
constexpr int64_t kActivationChunk = 4096;  // elements per task: enough to outweigh claiming it

// out[i] = act(x[i]) over n elements (gelu_tanh: cpu_elementwise.h's).
template <typename T>
void activation(T* out, const T* x, int64_t n, int kind, int num_threads) {
  share_tasks((n + kActivationChunk - 1) / kActivationChunk, num_threads, [&](int64_t chunk) {
    const int64_t begin = chunk * kActivationChunk;
    const int64_t end = begin + kActivationChunk < n ? begin + kActivationChunk : n;
    int64_t i = begin;
#if defined(__AVX512F__)
    const __m512 zero = _mm512_setzero_ps();
    for (; i + 16 <= end; i += 16) {
      const __m512 v = load16(x + i);
      store16(out + i, kind == kRelu ? _mm512_max_ps(zero, v) : gelu_tanh16(v));  // relu: NaN stays NaN, as in torch
    }
#endif
    for (; i < end; ++i) {
      const float v = load(x, i);
      store(out, i, kind == kRelu ? (v < 0.f ? 0.f : v) : gelu_tanh1(v));
    }
  });
}

}  // namespace
