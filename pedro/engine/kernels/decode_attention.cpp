// Decode attention on a CPU in bf16: one query token per row, each row attending its own cached keys.
//
// q: (B, kv_heads, group, D), the query heads grouped onto their KV head; k, v: one layer's cache,
// (slots, kv_heads, S, D), row b of the batch in slot b; lengths[b]: the position of row b's newest key. Row b
// attends keys [lengths[b] - window + 1, lengths[b]] (from 0 without a window). Scores, softmax and the
// weighted sum of values stay in fp32 (the flash kernel of scaled_dot_product_attention rounds the
// probabilities to bf16), the output is rounded to bf16 once. Every (row, KV head) is computed alone, in a
// fixed order, so a row's output never depends on the other rows of its batch.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && !defined(PEDRO_PORTABLE)  // PEDRO_PORTABLE: the plain loops only, for their test
#include <immintrin.h>
#define PEDRO_X86 1
#endif
#ifndef PEDRO_NAMESPACE
#define PEDRO_NAMESPACE pedro
#endif

namespace {

constexpr int kMaxGroup = 16;

inline float bf16_to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; a NaN stays a NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// exp(x) for x <= 0 (a score minus its row's maximum): Cephes' expf polynomial, branch-free so that a loop of
// it vectorises. A NaN stays a NaN.
inline float exp_nonpositive(float x) {
  const float t = x * 1.44269504088896341f + 0.5f;
  int32_t i = static_cast<int32_t>(t < -127.f ? -127.f : t);
  i -= static_cast<float>(i) > t ? 1 : 0;  // floor(t)
  const float n = static_cast<float>(i);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(i + 127) << 23;  // 2^n; n = -127 gives 0
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.f : y * scale;
}

struct Job {
  const uint16_t *q, *k, *v;
  uint16_t* out;
  const int64_t* lengths;
  int64_t heads, group, k_row, k_head, v_row, v_head, window;
  float scale;
};

#ifdef PEDRO_X86
#define PEDRO_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))

// r[j] = the sum of v[j]'s 16 lanes, for 16 vectors, always in the same order
PEDRO_AVX512 inline __m512 sum_lanes16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// scores[g * n + j] = (q_g . k_j) * scale with the CPU's bf16 dot products (fp32 sums), 16 keys at a time;
// the values those keys weight are fetched meanwhile
template <int D>
PEDRO_AVX512 inline void score_avx512(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t n, int group,
                                      float scale, float* scores) {
  constexpr int P = D / 32;  // 32 bf16 to a register
  for (int g = 0; g < group; ++g) {
    __m512bh qv[P];
    for (int p = 0; p < P; ++p) qv[p] = (__m512bh)_mm512_loadu_si512(q + g * D + p * 32);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int m = n - j0 < 16 ? static_cast<int>(n - j0) : 16;
      if (g == 0)
        for (int line = 0; line < m * D * 2; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(v + j0 * D) + line, _MM_HINT_T0);
      __m512 part[16];
      for (int jj = 0; jj < 16; ++jj) {
        __m512 acc = _mm512_setzero_ps();
        if (jj < m)
          for (int p = 0; p < P; ++p)
            acc = _mm512_dpbf16_ps(acc, qv[p], (__m512bh)_mm512_loadu_si512(k + (j0 + jj) * D + p * 32));
        part[jj] = acc;
      }
      const __m512 s = _mm512_mul_ps(sum_lanes16(part), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores + g * n + j0, static_cast<__mmask16>((1u << m) - 1u), s);
    }
  }
}
#endif

template <int D>
inline void score_portable(const uint16_t* q, const uint16_t* k, int64_t n, int group, float scale, float* scores) {
  float qf[kMaxGroup][D];
  for (int g = 0; g < group; ++g)
    for (int d = 0; d < D; ++d) qf[g][d] = bf16_to_float(q[g * D + d]);
  for (int64_t j = 0; j < n; ++j) {
    float kf[D];
#pragma omp simd
    for (int d = 0; d < D; ++d) kf[d] = bf16_to_float(k[j * D + d]);
    for (int g = 0; g < group; ++g) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int d = 0; d < D; ++d) s += qf[g][d] * kf[d];
      scores[g * n + j] = s * scale;
    }
  }
}

// One (row, KV head): its `group` queries over keys [first, last]; `scores` holds group * n floats.
template <int D, bool kAvx512>
__attribute__((always_inline)) inline void attend_one(const Job& job, int64_t item, std::vector<float>& scores) {
  const int64_t b = item / job.heads, h = item % job.heads, group = job.group;
  const int64_t last = job.lengths[b];
  const int64_t first = job.window > 0 && last - job.window + 1 > 0 ? last - job.window + 1 : 0;
  const int64_t n = last - first + 1;
  const uint16_t* q = job.q + item * group * D;
  const uint16_t* k = job.k + b * job.k_row + h * job.k_head + first * D;
  const uint16_t* v = job.v + b * job.v_row + h * job.v_head + first * D;
  scores.resize(static_cast<size_t>(group * n));
  float* s = scores.data();
#ifdef PEDRO_X86
  if constexpr (kAvx512)
    score_avx512<D>(q, k, v, n, static_cast<int>(group), job.scale, s);
  else
#endif
    score_portable<D>(q, k, n, static_cast<int>(group), job.scale, s);
  float acc[kMaxGroup][D];
  float sums[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) {
    float* row = s + g * n;
    float top = row[0];
    for (int64_t j = 1; j < n; ++j) top = row[j] > top ? row[j] : top;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = exp_nonpositive(row[j] - top);
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) total += row[j];
    sums[g] = total;
    for (int d = 0; d < D; ++d) acc[g][d] = 0.f;
  }
  for (int64_t j = 0; j < n; ++j) {
    float vf[D];
#pragma omp simd
    for (int d = 0; d < D; ++d) vf[d] = bf16_to_float(v[j * D + d]);
    for (int64_t g = 0; g < group; ++g) {
      const float p = s[g * n + j];
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[g][d] += p * vf[d];
    }
  }
  uint16_t* out = job.out + item * group * D;
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / sums[g];
    for (int d = 0; d < D; ++d) out[g * D + d] = float_to_bf16(acc[g][d] * inv);
  }
}

template <int D>
void attend_portable(const Job& job, int64_t begin, int64_t end) {
  std::vector<float> scores;
  for (int64_t item = begin; item < end; ++item) attend_one<D, false>(job, item, scores);
}

#ifdef PEDRO_X86
template <int D>
PEDRO_AVX512 void attend_avx512(const Job& job, int64_t begin, int64_t end) {
  std::vector<float> scores;
  for (int64_t item = begin; item < end; ++item) attend_one<D, true>(job, item, scores);
}
#endif

template <int D>
void attend(const Job& job, int64_t items) {
#ifdef PEDRO_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512bf16");
  if (avx512) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) { attend_avx512<D>(job, begin, end); });
    return;
  }
#endif
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) { attend_portable<D>(job, begin, end); });
}

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                            int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q: (B, kv_heads, group, D); k, v: (slots, kv_heads, S, D)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && lengths.device().is_cpu(),
              "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "bfloat16 q, k and v only");
  const int64_t batch = q.size(0), heads = q.size(1), group = q.size(2), dim = q.size(3);
  TORCH_CHECK(q.is_contiguous(), "q must be contiguous");
  TORCH_CHECK(k.size(1) == heads && v.size(1) == heads && k.size(3) == dim && v.size(3) == dim &&
                  k.size(0) >= batch && v.size(0) >= batch,
              "k and v must be (slots >= B, kv_heads, S, D)");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == dim && v.stride(3) == 1 && v.stride(2) == dim,
              "each head's keys and values must be contiguous");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == batch &&
                  lengths.is_contiguous(),
              "lengths must be a contiguous int64 tensor of B positions");
  TORCH_CHECK(group >= 1 && group <= kMaxGroup, "1 to 16 query heads per KV head");
  const int64_t* lp = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(lp[b] >= 0 && lp[b] < k.size(2), "a row's position is outside the cache");
  at::Tensor out = at::empty_like(q);
  const Job job{bits(q), bits(k), bits(v), reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), lp,
                heads, group, k.stride(0), k.stride(1), v.stride(0), v.stride(1), window,
                static_cast<float>(scale)};
  switch (dim) {
    case 64: attend<64>(job, batch * heads); break;
    case 128: attend<128>(job, batch * heads); break;
    case 256: attend<256>(job, batch * heads); break;
    default: TORCH_CHECK(false, "head_dim must be 64, 128 or 256");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(PEDRO_NAMESPACE, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(PEDRO_NAMESPACE, CPU, m) { m.impl("decode_attention", &decode_attention); }
