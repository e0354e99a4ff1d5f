// Random sampling over the vocabulary: inverse-CDF sampling of softmax(logits), rows split over the threads.
// torch's exp over 64 x 49152 logits plus the block sums and searches of a two-level CDF cost ~3.4 ms per step;
// this reads each row twice (the exp pass, then the walk to the drawn position), vectorised.

#include "cpu_kernels.h"

namespace {

// Inverse-CDF sample of softmax(x) over entries with x >= threshold, with the uniform number u in [0, 1).
int64_t sample_row(const float* x, int64_t n, float u, float threshold, std::vector<float>& w) {
  w.resize(static_cast<size_t>(n));
  float m = -INFINITY;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + j));
  m = _mm512_reduce_max_ps(mv);
#endif
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  if (!(m > -INFINITY)) return argmax_f32(x, n);  // nothing to sample from: the torch path's choice
  float sum = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 mm = _mm512_set1_ps(m), th = _mm512_set1_ps(threshold);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, th, _CMP_GE_OQ), exp16(_mm512_sub_ps(v, mm)));
    _mm512_storeu_ps(w.data() + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) {
    w[i] = x[i] >= threshold ? std::exp(x[i] - m) : 0.f;
    sum += w[i];
  }
  const float target = u * sum;
  float run = 0.f;
  for (i = 0; i + 16 <= n; i += 16) {  // skip whole chunks, then walk the chunk that crosses the target
#if defined(__AVX512F__)
    const float chunk = _mm512_reduce_add_ps(_mm512_loadu_ps(w.data() + i));
#else
    float chunk = 0.f;
    for (int64_t k = i; k < i + 16; ++k) chunk += w[k];
#endif
    if (run + chunk <= target) {
      run += chunk;
      continue;
    }
    for (int64_t k = i; k < i + 16; ++k) {
      run += w[k];
      if (w[k] > 0.f && run > target) return k;
    }
  }
  for (; i < n; ++i) {
    run += w[i];
    if (w[i] > 0.f && run > target) return i;
  }
  // Rounding left the target at the total: the last entry with weight.
  for (int64_t k = n - 1; k >= 0; --k)
    if (w[k] > 0.f) return k;
  return argmax_f32(x, n);
}

}  // namespace

extern "C" {

// out[r] = a sample of softmax(row r) restricted to entries >= threshold[r] (null: no threshold), drawn with
// uniform[r] in [0, 1).
void pagoda_sample_rows(const float* logits, int64_t rows, int64_t n, int64_t stride, const float* uniform,
                        const float* threshold, int64_t* out, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> w;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      out[r] = sample_row(logits + r * stride, n, uniform[r], threshold ? threshold[r] : -INFINITY, w);
  }
}

}  // extern "C"
