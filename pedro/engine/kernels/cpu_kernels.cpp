// The engine's CPU kernels for bf16, and decode attention, the norms and the gated activation in fp32
// (pedro/engine/cpu_kernels.py builds this file on first use).
//
// decode_attention: one query token per row, each row attending its own cached keys. q: (B, kv_heads, group,
// D), the query heads grouped onto their KV head; k_new, v_new: (B, kv_heads, D), the rows' new key and value
// (each row contiguous, the rows at any stride: column slices of one fused q/k/v product).
// q and k_new are rotated first (RoPE as pedro.compat.apply_rope computes it in bf16, bit for bit: x * cos +
// x.roll(D / 2) * sin, each product and the sum rounded to bf16; cos, sin: (B, D), sin as compat.rope_sin gives
// it), the key and value written into k, v, one layer's cache (slots, kv_heads, S, D), at slot slots[b], position
// lengths[b]. Row b then attends its slot's keys [lengths[b] - window + 1, lengths[b]] (from 0 without a window). Scores, softmax and the weighted sum of values stay in fp32 (the flash
// kernel of scaled_dot_product_attention rounds the probabilities to bf16), the output is rounded to bf16 once.
// The same for fp32 tensors (no scale tables), RoPE with fp32's roundings (each product, then the sum).
//
// prefill_attention: a prefill's tokens, rows of prompts (or chunks of prompts after positions their slots already
// hold) packed one after another. q: (N, kv_heads, group, D), k_new, v_new: (N, kv_heads, D), cos, sin: (N, D);
// rows: (R, 4) int64, each row's slot, first token, tokens and first position. Each row's new keys (rotated as in
// decode_attention) and values are written into its slot, then each of its queries (rotated) attends the slot's
// keys [position - window + 1, position]. Where the CPU has AVX512-BF16 the keys are packed 16 to a block with
// their element pairs interleaved, so that one bf16 dot product gives 16 keys' partial scores and a query's
// scores need no sums across lanes; the values are widened to fp32 once per row and head, and the probabilities
// stay in fp32. Four tokens' queries (times the group's heads) are computed together, each block of keys and
// each value loaded once for up to 8 and 6 of them. A query's output depends only on its own query and its slot's keys, so a prompt prefilled whole
// or in chunks gets the same bits.
//
// silu_mul: a gated MLP's silu(gate) * up in one pass, with torch's roundings (silu computed in fp32 as
// g / (1 + exp(-g)) and rounded to bf16, then the product rounded); gate and up may be column slices of one
// fused product. The same in fp32 (no scale table), where only exp's last bits may differ from torch's.
//
// scale_rows: PEDRO's (and (IA)3's) per-row scaling, out[n] = x[n] + x[n] * table[index[n]], computed in fp32 and
// rounded once, as torch's addcmul does (bit for bit): one call per point and layer where a prefill made one per
// prompt.
//
// rms_norm: a backbone's RMSNorm as one pass per row instead of ~8 tensor ops, with the same roundings as
// transformers' modules (LLaMA's form: weight * bf16(x * rsqrt(mean(x^2) + eps)); Gemma's: bf16(x * rsqrt(...) *
// (1 + weight)), 1 + weight given in fp32); only the order of the squares' sum differs. The same in fp32.
//
// Every row (and (row, KV head)) is computed alone, in a fixed order, so a row's output never depends on the
// other rows of its batch nor on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <initializer_list>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && !defined(PEDRO_PORTABLE)  // PEDRO_PORTABLE: the plain loops only, for their test
#include <immintrin.h>
#define PEDRO_X86 1
#define PEDRO_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))
#else
#define PEDRO_AVX512  // the "avx512" variants are the plain loops again, and never chosen
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

inline uint16_t float_to_bf16(float f) {  // round to nearest even; a NaN stays a NaN (branch-free: vectorises)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet = (bits >> 16) | 0x40u;
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

// exp over the whole float range, Cephes' expf polynomial: inf above 88.72, 0 below -87.3, a NaN stays a NaN.
// Branch-free, integer selects included, so that a loop of it vectorises.
inline float exp_any(float x) {
  const float t = x * 1.44269504088896341f + 0.5f;
  int32_t i = static_cast<int32_t>(t);
  i -= static_cast<float>(i) > t ? 1 : 0;  // floor(t)
  i = i < -126 ? -126 : i;
  i = i > 128 ? 128 : i;
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
  uint32_t bits = static_cast<uint32_t>(i - 1 + 127) << 23;  // 2^(n - 1), times 2 below: n up to 128
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float value = y * scale * 2.f;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t big = 0u - static_cast<uint32_t>(x > 88.72f), tiny = 0u - static_cast<uint32_t>(x < -87.3f);
  bits = ((bits & ~big) | (0x7f800000u & big)) & ~tiny;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// A decode attention kernel's elements as fp32 and back: bf16 (the engine's fast mode) or fp32 itself
inline float to_float(uint16_t x) { return bf16_to_float(x); }
inline float to_float(float x) { return x; }
template <typename T>
inline T from_float(float f);
template <>
inline uint16_t from_float<uint16_t>(float f) { return float_to_bf16(f); }
template <>
inline float from_float<float>(float f) { return f; }

// A tensor's elements as a kernel's element type T (uint16_t: bf16's bits; float)
template <typename T>
T* data(const at::Tensor& t);
template <>
uint16_t* data<uint16_t>(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }
template <>
float* data<float>(const at::Tensor& t) { return t.data_ptr<float>(); }


bool cpu_has_avx512_bf16() {
#ifdef PEDRO_X86
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// RoPE of one head, as compat.apply_rope computes it in bf16
inline uint16_t rope_bf16(uint16_t x, uint16_t partner, uint16_t cos, uint16_t sin) {
  const float a = bf16_to_float(float_to_bf16(bf16_to_float(x) * bf16_to_float(cos)));
  const float b = bf16_to_float(float_to_bf16(bf16_to_float(partner) * bf16_to_float(sin)));
  return float_to_bf16(a + b);
}

template <int D>
__attribute__((always_inline)) inline void rotate(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, uint16_t* out) {
  constexpr int half = D / 2;
#pragma omp simd
  for (int d = 0; d < half; ++d) out[d] = rope_bf16(x[d], x[d + half], cos[d], sin[d]);
#pragma omp simd
  for (int d = half; d < D; ++d) out[d] = rope_bf16(x[d], x[d - half], cos[d], sin[d]);
}

// RoPE of one fp32 head, as compat.apply_rope computes it in fp32: each product rounded, then the sum (no fused
// multiply-add, which would round once). Not inlined: the attribute holds for this function's own code only.
template <int D>
__attribute__((noinline, optimize("fp-contract=off"))) void rotate(const float* x, const float* cos,
                                                                   const float* sin, float* out) {
  constexpr int half = D / 2;
  for (int d = 0; d < D; ++d) {
    const float a = x[d] * cos[d];
    const float b = x[d < half ? d + half : d - half] * sin[d];
    out[d] = a + b;
  }
}

// PEDRO's scaling of one element, x + x * z in fp32 rounded to bf16 once (scale_rows: torch's addcmul's numbers)
__attribute__((always_inline)) inline uint16_t scaled(uint16_t x, uint16_t z) {
  const float h = bf16_to_float(x);
  return float_to_bf16(h + h * bf16_to_float(z));
}

// A head's elements scaled by z into `buffer` (returned), or x itself where there is no z
template <int D>
__attribute__((always_inline)) inline const uint16_t* scale_head(const uint16_t* x, const uint16_t* z,
                                                                 uint16_t* buffer) {
  if (z == nullptr) return x;
#pragma omp simd
  for (int d = 0; d < D; ++d) buffer[d] = scaled(x[d], z[d]);
  return buffer;
}

// Per-row scale tables the attention kernels apply to the queries and values they read (PEDRO's scaling of the
// q and v projections' outputs, fused into the pass that reads them): row (or token) n reads table row index[n].
struct Scales {
  const uint16_t *q = nullptr, *v = nullptr;  // (table rows, heads * group * D), (table rows, kv_heads * D)
  int64_t q_row = 0, v_row = 0;
  const int64_t* index = nullptr;
  const uint16_t* q_of(int64_t n, int64_t h, int64_t group, int64_t dim) const {
    return q == nullptr ? nullptr : q + index[n] * q_row + h * group * dim;
  }
  const uint16_t* v_of(int64_t n, int64_t h, int64_t dim) const {
    return v == nullptr ? nullptr : v + index[n] * v_row + h * dim;
  }
};

// Checks the optional tables against `rows` rows (or tokens) of q_width and v_width elements
Scales scales_of(const std::optional<at::Tensor>& q_scale, const std::optional<at::Tensor>& v_scale,
                 const std::optional<at::Tensor>& index, int64_t rows, int64_t q_width, int64_t v_width,
                 const char* q_name = "q_scale") {
  Scales scales;
  if (!q_scale.has_value() && !v_scale.has_value()) return scales;
  TORCH_CHECK(index.has_value() && index->scalar_type() == at::kLong && index->dim() == 1 &&
                  index->size(0) == rows && index->is_contiguous() && index->device().is_cpu(),
              "scale_index must be a contiguous int64 tensor of one table row per query row");
  scales.index = index->data_ptr<int64_t>();
  int64_t table_rows = -1;
  for (auto [table, width, name] : {std::make_tuple(&q_scale, q_width, q_name), std::make_tuple(&v_scale, v_width, "v_scale")}) {
    if (!table->has_value()) continue;
    const at::Tensor& t = **table;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.size(1) == width &&
                    t.stride(1) == 1,
                name, " must be a bfloat16 (table rows, width) table with contiguous rows, as wide as its heads");
    TORCH_CHECK(table_rows < 0 || t.size(0) == table_rows, "the scale tables must have the same rows");
    table_rows = t.size(0);
  }
  for (int64_t n = 0; n < rows; ++n)
    TORCH_CHECK(scales.index[n] >= 0 && scales.index[n] < table_rows, "a scale_index is outside the tables");
  if (q_scale.has_value()) scales.q = data<uint16_t>(*q_scale), scales.q_row = q_scale->stride(0);
  if (v_scale.has_value()) scales.v = data<uint16_t>(*v_scale), scales.v_row = v_scale->stride(0);
  return scales;
}

// Runs fast(begin, end) over [0, items) in parallel where the CPU has AVX512-BF16, portable(begin, end) elsewhere.
template <typename Fast, typename Portable>
void run_parallel(int64_t items, int64_t grain, const Fast& fast, const Portable& portable) {
  if (cpu_has_avx512_bf16())
    at::parallel_for(0, items, grain, fast);
  else
    at::parallel_for(0, items, grain, portable);
}

// Runs a row kernel (an always-inline function of (job, begin, end)) over [0, items) in parallel: compiled for
// AVX-512 where the CPU has AVX512-BF16, as plain loops elsewhere (run_parallel)
template <auto Rows, typename J>
PEDRO_AVX512 void rows_avx512(const J& job, int64_t begin, int64_t end) { Rows(job, begin, end); }

template <auto Rows, typename J>
void rows_portable(const J& job, int64_t begin, int64_t end) { Rows(job, begin, end); }

template <auto Rows, typename J>
void run_rows(const J& job, int64_t items, int64_t grain) {
  run_parallel(
      items, grain, [&](int64_t begin, int64_t end) { rows_avx512<Rows>(job, begin, end); },
      [&](int64_t begin, int64_t end) { rows_portable<Rows>(job, begin, end); });
}

template <typename T>  // uint16_t: bf16, or float
struct Job {
  const T *q, *k_new, *v_new, *cos, *sin;
  T *k, *v, *out;
  const int64_t *slots, *lengths;
  int64_t heads, group, k_row, k_head, v_row, v_head, window;
  int64_t q_row, k_new_row, v_new_row;  // the rows' strides (each row's heads contiguous)
  float scale;
  Scales scales;
};

#ifdef PEDRO_X86

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

// One query head in registers, and its products with a key as 16 lanes of partial sums: bf16 element pairs
// through the CPU's bf16 dot products (fp32 sums), fp32 through multiply-adds
template <int D, typename T>
struct QueryLanes;

template <int D>
struct QueryLanes<D, uint16_t> {
  static constexpr int P = D / 32;  // 32 bf16 to a register
  __m512bh r[P];
  PEDRO_AVX512 inline void load(const uint16_t* q) {
    for (int p = 0; p < P; ++p) r[p] = (__m512bh)_mm512_loadu_si512(q + p * 32);
  }
  PEDRO_AVX512 inline __m512 dot(const uint16_t* k) const {
    __m512 acc = _mm512_setzero_ps();
    for (int p = 0; p < P; ++p) acc = _mm512_dpbf16_ps(acc, r[p], (__m512bh)_mm512_loadu_si512(k + p * 32));
    return acc;
  }
};

template <int D>
struct QueryLanes<D, float> {
  static constexpr int P = D / 16;  // 16 floats to a register
  __m512 r[P];
  PEDRO_AVX512 inline void load(const float* q) {
    for (int p = 0; p < P; ++p) r[p] = _mm512_loadu_ps(q + p * 16);
  }
  PEDRO_AVX512 inline __m512 dot(const float* k) const {
    __m512 acc = _mm512_setzero_ps();
    for (int p = 0; p < P; ++p) acc = _mm512_fmadd_ps(r[p], _mm512_loadu_ps(k + p * 16), acc);
    return acc;
  }
};

// scores[g * n + j] = (q_g . k_j) * scale, 16 keys at a time, their 16 partial sums reduced together; the
// values those keys weight are fetched meanwhile
template <int D, typename T>
PEDRO_AVX512 inline void score_avx512(const T* q, const T* k, const T* v, int64_t n, int group, float scale,
                                      float* scores) {
  for (int g = 0; g < group; ++g) {
    QueryLanes<D, T> lanes;
    lanes.load(q + g * D);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int m = n - j0 < 16 ? static_cast<int>(n - j0) : 16;
      if (g == 0)
        for (int line = 0; line < m * D * static_cast<int>(sizeof(T)); line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(v + j0 * D) + line, _MM_HINT_T0);
      __m512 part[16];
      for (int jj = 0; jj < 16; ++jj) part[jj] = jj < m ? lanes.dot(k + (j0 + jj) * D) : _mm512_setzero_ps();
      const __m512 s = _mm512_mul_ps(sum_lanes16(part), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores + g * n + j0, static_cast<__mmask16>((1u << m) - 1u), s);
    }
  }
}
#endif

template <int D, typename T>
__attribute__((always_inline)) inline void score_portable(const T* q, const T* k, int64_t n, int group, float scale, float* scores) {
  float qf[kMaxGroup][D];
  for (int g = 0; g < group; ++g)
    for (int d = 0; d < D; ++d) qf[g][d] = to_float(q[g * D + d]);
  for (int64_t j = 0; j < n; ++j) {
    float kf[D];
#pragma omp simd
    for (int d = 0; d < D; ++d) kf[d] = to_float(k[j * D + d]);
    for (int g = 0; g < group; ++g) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int d = 0; d < D; ++d) s += qf[g][d] * kf[d];
      scores[g * n + j] = s * scale;
    }
  }
}

// One (row, KV head): its `group` queries over keys [first, last]; `scores` holds group * n floats. bf16 rows
// may carry PEDRO's scales (applied as read); fp32 rows never do (the checks refuse them).
template <int D, bool kAvx512, typename T>
__attribute__((always_inline)) inline void attend_one(const Job<T>& job, int64_t item, std::vector<float>& scores) {
  constexpr bool kBf16 = std::is_same_v<T, uint16_t>;
  const int64_t b = item / job.heads, h = item % job.heads, group = job.group;
  const int64_t last = job.lengths[b];
  const int64_t first = job.window > 0 && last - job.window + 1 > 0 ? last - job.window + 1 : 0;
  const int64_t n = last - first + 1;
  T q[kMaxGroup * D];
  const T* q_in = job.q + b * job.q_row + h * group * D;
  T* k_head = job.k + job.slots[b] * job.k_row + h * job.k_head;
  T* v_head = job.v + job.slots[b] * job.v_row + h * job.v_head;
  const T* v_new = job.v_new + b * job.v_new_row + h * D;
  rotate<D>(job.k_new + b * job.k_new_row + h * D, job.cos + b * D, job.sin + b * D, k_head + last * D);
  if constexpr (kBf16) {
    const uint16_t* z_q = job.scales.q_of(b, h, group, D);
    uint16_t buffer[D];
    for (int64_t g = 0; g < group; ++g)
      rotate<D>(scale_head<D>(q_in + g * D, z_q == nullptr ? nullptr : z_q + g * D, buffer), job.cos + b * D,
                job.sin + b * D, q + g * D);
    std::memcpy(v_head + last * D, scale_head<D>(v_new, job.scales.v_of(b, h, D), buffer), D * sizeof(T));
  } else {
    for (int64_t g = 0; g < group; ++g) rotate<D>(q_in + g * D, job.cos + b * D, job.sin + b * D, q + g * D);
    std::memcpy(v_head + last * D, v_new, D * sizeof(T));
  }
  const T* k = k_head + first * D;
  const T* v = v_head + first * D;
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
    for (int64_t j = 0; j < n; ++j) row[j] = exp_any(row[j] - top);
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) total += row[j];
    sums[g] = total;
    for (int d = 0; d < D; ++d) acc[g][d] = 0.f;
  }
  for (int64_t j = 0; j < n; ++j) {
    float vf[D];
#pragma omp simd
    for (int d = 0; d < D; ++d) vf[d] = to_float(v[j * D + d]);
    for (int64_t g = 0; g < group; ++g) {
      const float p = s[g * n + j];
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[g][d] += p * vf[d];
    }
  }
  T* out = job.out + item * group * D;
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / sums[g];
    for (int d = 0; d < D; ++d) out[g * D + d] = from_float<T>(acc[g][d] * inv);
  }
}

template <int D, typename T>
void attend_portable(const Job<T>& job, int64_t begin, int64_t end) {
  std::vector<float> scores;
  for (int64_t item = begin; item < end; ++item) attend_one<D, false>(job, item, scores);
}

template <int D, typename T>
PEDRO_AVX512 void attend_avx512(const Job<T>& job, int64_t begin, int64_t end) {
  std::vector<float> scores;
  for (int64_t item = begin; item < end; ++item) attend_one<D, true>(job, item, scores);
}

template <int D, typename T>
void attend(const Job<T>& job, int64_t items) {
  run_parallel(
      items, 1,
      [&](int64_t begin, int64_t end) { attend_avx512<D>(job, begin, end); },
      [&](int64_t begin, int64_t end) { attend_portable<D>(job, begin, end); });
}


// The layouts both attention kernels read: q (rows, kv_heads, group, D), the new keys and values (rows,
// kv_heads, D), each row contiguous at any row stride; cos, sin (rows, D); one layer's cache (slots, kv_heads, S,
// D). `rows` names the first dimension in the messages (B decode rows, N prefill tokens); `float32`: fp32
// tensors are served too (decode attention), all of one dtype.
void check_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& cos,
                     const at::Tensor& sin, const at::Tensor& k, const at::Tensor& v, const char* rows,
                     bool float32 = false) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q: (", rows,
              ", kv_heads, group, D); k, v: (slots, kv_heads, S, D)");
  for (const at::Tensor* t : {&q, &k_new, &v_new, &cos, &sin, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "CPU tensors only");
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && (q.scalar_type() == at::kBFloat16 || float32),
                float32 ? "q, keys, values, cos and sin all bfloat16 or all float32"
                        : "bfloat16 q, keys, values, cos and sin only");
  }
  const int64_t n = q.size(0), heads = q.size(1), group = q.size(2), dim = q.size(3);
  TORCH_CHECK(q.stride(3) == 1 && q.stride(2) == q.size(3) && q.stride(1) == q.size(2) * q.size(3),
              "each row of q must be contiguous");
  TORCH_CHECK(k_new.dim() == 3 && k_new.size(0) == n && k_new.size(1) == heads && k_new.size(2) == dim &&
                  v_new.sizes() == k_new.sizes(),
              "the new keys and values must be (", rows, ", kv_heads, D)");
  TORCH_CHECK(k_new.stride(2) == 1 && k_new.stride(1) == dim && v_new.stride(2) == 1 && v_new.stride(1) == dim,
              "each row of the new keys and values must be contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == n && cos.size(1) == dim && sin.sizes() == cos.sizes() &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous (", rows, ", D)");
  TORCH_CHECK(k.size(1) == heads && v.size(1) == heads && k.size(3) == dim && v.size(3) == dim &&
                  v.size(0) == k.size(0) && v.size(2) == k.size(2),
              "k and v must be (slots, kv_heads, S, D)");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == dim && v.stride(3) == 1 && v.stride(2) == dim,
              "each head's keys and values must be contiguous");
  TORCH_CHECK(group >= 1 && group <= kMaxGroup, "1 to 16 query heads per KV head");
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                            const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k, at::Tensor& v,
                            const at::Tensor& slots, const at::Tensor& lengths, int64_t window, double scale,
                            const std::optional<at::Tensor>& q_scale, const std::optional<at::Tensor>& v_scale,
                            const std::optional<at::Tensor>& scale_index) {
  check_attention(q, k_new, v_new, cos, sin, k, v, "B", true);
  for (const at::Tensor* t : {&slots, &lengths}) TORCH_CHECK(t->device().is_cpu(), "CPU tensors only");
  const int64_t batch = q.size(0), heads = q.size(1), group = q.size(2), dim = q.size(3);
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == batch &&
                  lengths.is_contiguous(),
              "lengths must be a contiguous int64 tensor of B positions");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == batch && slots.is_contiguous(),
              "slots must be a contiguous int64 tensor of B cache slots");
  const int64_t* lp = lengths.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] < k.size(2), "a row's position is outside the cache");
    TORCH_CHECK(sp[b] >= 0 && sp[b] < k.size(0), "a row's slot is outside the cache");
  }
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, whatever q's row stride
  const Scales scales = scales_of(q_scale, v_scale, scale_index, batch, heads * group * dim, heads * dim);
  const auto run = [&](auto element) {  // element: a value of the kernel's element type
    using T = decltype(element);
    const Job<T> job{data<T>(q), data<T>(k_new), data<T>(v_new), data<T>(cos), data<T>(sin), data<T>(k),
                     data<T>(v), data<T>(out), sp, lp, heads, group, k.stride(0), k.stride(1), v.stride(0),
                     v.stride(1), window, q.stride(0), k_new.stride(0), v_new.stride(0), static_cast<float>(scale),
                     scales};
    switch (dim) {
      case 64: attend<64>(job, batch * heads); break;
      case 128: attend<128>(job, batch * heads); break;
      case 256: attend<256>(job, batch * heads); break;
      default: TORCH_CHECK(false, "head_dim must be 64, 128 or 256");
    }
  };
  if (q.scalar_type() == at::kFloat) {
    TORCH_CHECK(scales.q == nullptr && scales.v == nullptr, "scale tables are served in bfloat16 only");
    run(0.f);
  } else {
    run(uint16_t{0});
  }
  return out;
}

// ------------------------------------------------------------------------------------------------ silu_mul

template <typename T>  // uint16_t: bf16, or float
struct GateJob {
  const T *gate, *up;
  T* out;
  int64_t width, gate_row, up_row;
  const uint16_t* z = nullptr;  // PEDRO's scaling of up (row n: table row index[n]), or none (bf16 only)
  int64_t z_row = 0;
  const int64_t* index = nullptr;
};

template <typename T>
__attribute__((always_inline)) inline void gate_rows(const GateJob<T>& job, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const T* g = job.gate + row * job.gate_row;
    const T* u = job.up + row * job.up_row;
    T* out = job.out + row * job.width;
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (job.z != nullptr) {  // up scaled first, as the up projection's output is where PEDRO scales it
        const uint16_t* z = job.z + job.index[row] * job.z_row;
#pragma omp simd
        for (int64_t i = 0; i < job.width; ++i) {
          const float x = bf16_to_float(g[i]);
          const float act = bf16_to_float(float_to_bf16(x / (1.f + exp_any(-x))));
          out[i] = float_to_bf16(act * bf16_to_float(scaled(u[i], z[i])));
        }
        continue;
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < job.width; ++i) {
      const float x = to_float(g[i]);
      const float act = to_float(from_float<T>(x / (1.f + exp_any(-x))));
      out[i] = from_float<T>(act * to_float(u[i]));
    }
  }
}

at::Tensor silu_mul(const at::Tensor& gate_in, const at::Tensor& up, const std::optional<at::Tensor>& up_scale,
                    const std::optional<at::Tensor>& scale_index) {
  TORCH_CHECK(gate_in.device().is_cpu() && up.device().is_cpu(), "CPU tensors only");
  const bool float32 = gate_in.scalar_type() == at::kFloat;
  TORCH_CHECK(up.scalar_type() == gate_in.scalar_type() && (float32 || gate_in.scalar_type() == at::kBFloat16),
              "gate and up both bfloat16 or both float32");
  TORCH_CHECK(gate_in.dim() == 2 && gate_in.sizes() == up.sizes(), "gate and up must be (rows, width), the same shape");
  TORCH_CHECK(gate_in.stride(1) == 1 && up.stride(1) == 1, "gate's and up's rows must be contiguous");
  const int64_t rows = gate_in.size(0), width = gate_in.size(1);
  at::Tensor out = at::empty({rows, width}, gate_in.options());
  if (out.numel() == 0) return out;
  const Scales scales = scales_of(up_scale, std::nullopt, scale_index, rows, width, 0, "up_scale");
  TORCH_CHECK(!float32 || scales.q == nullptr, "scale tables are served in bfloat16 only");
  const auto run = [&](auto element) {
    using T = decltype(element);
    run_rows<gate_rows<T>>(GateJob<T>{data<T>(gate_in), data<T>(up), data<T>(out), width, gate_in.stride(0),
                                      up.stride(0), scales.q, scales.q_row, scales.index},
                           rows, std::max<int64_t>(1, 16384 / width));
  };
  if (float32)
    run(0.f);
  else
    run(uint16_t{0});
  return out;
}

// ------------------------------------------------------------------------------------------------ scale_rows

struct ScaleJob {
  const uint16_t *x, *table;
  uint16_t* out;
  const int64_t* index;
  int64_t width, x_row, table_row, out_row;
};

__attribute__((always_inline)) inline void scale_range(const ScaleJob& job, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const uint16_t* x = job.x + row * job.x_row;
    const uint16_t* z = job.table + job.index[row] * job.table_row;
    uint16_t* out = job.out + row * job.out_row;
#pragma omp simd
    for (int64_t i = 0; i < job.width; ++i) out[i] = scaled(x[i], z[i]);
  }
}


void scale_rows(const at::Tensor& x, const at::Tensor& table, const at::Tensor& index, at::Tensor& out) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &table, &index, &out})
    TORCH_CHECK(t->device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && table.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16,
              "bfloat16 x, table and out only");
  TORCH_CHECK(x.dim() == 2 && table.dim() == 2 && out.sizes() == x.sizes() && table.size(1) == x.size(1),
              "x and out must be (rows, width), the table (slots, width)");
  TORCH_CHECK(x.stride(1) == 1 && table.stride(1) == 1 && out.stride(1) == 1, "rows must be contiguous");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) == x.size(0) &&
                  index.is_contiguous(),
              "index must be a contiguous int64 tensor of one table row per row of x");
  const int64_t* ip = index.data_ptr<int64_t>();
  for (int64_t n = 0; n < x.size(0); ++n)
    TORCH_CHECK(ip[n] >= 0 && ip[n] < table.size(0), "an index is outside the table");
  if (x.numel() == 0) return;
  const ScaleJob job{data<uint16_t>(x), data<uint16_t>(table), data<uint16_t>(out), ip, x.size(1), x.stride(0), table.stride(0),
                     out.stride(0)};
  run_rows<scale_range>(job, x.size(0), std::max<int64_t>(1, 32768 / x.size(1)));
}

// ------------------------------------------------------------------------------------------------ rms_norm

template <typename T>  // uint16_t: bf16, or float
struct NormJob {
  const T* x;
  T* out;
  const T* weight;      // LLaMA's form
  const float* scale;  // Gemma's form (1 + weight)
  int64_t width;
  float eps;
};

template <typename T>
__attribute__((always_inline)) inline void norm_rows(const NormJob<T>& job, int64_t begin, int64_t end) {
  const int64_t n = job.width;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = job.x + row * n;
    T* out = job.out + row * n;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < n; ++i) {
      const float h = to_float(x[i]);
      squares += h * h;
    }
    const float r = 1.f / std::sqrt(squares / static_cast<float>(n) + job.eps);
    if (job.scale != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(to_float(x[i]) * r * job.scale[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i)
        out[i] = from_float<T>(to_float(job.weight[i]) * to_float(from_float<T>(to_float(x[i]) * r)));
    }
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  const bool float32 = x.scalar_type() == at::kFloat;
  TORCH_CHECK((float32 || x.scalar_type() == at::kBFloat16) && x.is_contiguous() && x.dim() >= 1,
              "x must be contiguous bfloat16 or float32");
  const int64_t width = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == width && weight.is_contiguous(),
              "weight must be contiguous and as wide as x's last dimension");
  TORCH_CHECK(gemma ? weight.scalar_type() == at::kFloat : weight.scalar_type() == x.scalar_type(),
              "weight: x's dtype (LLaMA's form) or float32 1 + weight (Gemma's form)");
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t rows = x.numel() / width;
  const auto run = [&](auto element) {
    using T = decltype(element);
    run_rows<norm_rows<T>>(NormJob<T>{data<T>(x), data<T>(out), gemma ? nullptr : data<T>(weight),
                                      gemma ? weight.data_ptr<float>() : nullptr, width, static_cast<float>(eps)},
                           rows, std::max<int64_t>(1, 32768 / width));
  };
  if (float32)
    run(0.f);
  else
    run(uint16_t{0});
  return out;
}

// ------------------------------------------------------------------------------------------------ prefill_attention

struct PrefillJob {
  const uint16_t *q, *k_new, *v_new, *cos, *sin;
  uint16_t *k, *v, *out;
  const int64_t* rows;  // (R, 4): slot, first token, tokens, position of the first token
  int64_t heads, group, k_row, k_head, v_row, v_head, window;
  int64_t q_row, k_new_row, v_new_row;
  float scale;
  uint16_t* packed;            // each (row, KV head)'s keys, 16 to a block, key pairs interleaved (AVX512 only)
  float* values;               // each (row, KV head)'s values in fp32
  const int64_t* space;        // each row's first key in the two above (multiples of 16)
  Scales scales;
};

constexpr int64_t kBlock = 16;    // keys to a packed block: one register of fp32 scores
constexpr int64_t kPrefillChunk = 16;  // queries to a work item

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Row r's new keys and values rotated and written into its slot at its positions, then its KV head h's keys
// (every cached position up to its last) packed for the dot products and its values widened to fp32.
template <int D, bool kPack>
__attribute__((always_inline)) inline void stage_one(const PrefillJob& job, int64_t item) {
  const int64_t r = item / job.heads, h = item % job.heads;
  const int64_t* row = job.rows + 4 * r;
  const int64_t slot = row[0], first = row[1], n = row[2], offset = row[3];
  uint16_t* k_head = job.k + slot * job.k_row + h * job.k_head;
  uint16_t* v_head = job.v + slot * job.v_row + h * job.v_head;
  uint16_t buffer[D];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = first + i;
    rotate<D>(job.k_new + t * job.k_new_row + h * D, job.cos + t * D, job.sin + t * D, k_head + (offset + i) * D);
    std::memcpy(v_head + (offset + i) * D,
                scale_head<D>(job.v_new + t * job.v_new_row + h * D, job.scales.v_of(t, h, D), buffer),
                D * sizeof(uint16_t));
  }
  const int64_t keys = offset + n, capacity = round_up(keys, kBlock);
  const int64_t base = (job.space[r] * job.heads + h * capacity) * D;
  float* values = job.values + base;
  for (int64_t j = 0; j < keys; ++j) {
#pragma omp simd
    for (int d = 0; d < D; ++d) values[j * D + d] = bf16_to_float(v_head[j * D + d]);
  }
  if constexpr (kPack) {
    // block b, pair p: the 16 keys' elements 2p and 2p + 1, key by key (what one bf16 dot product reads)
    uint32_t* packed = reinterpret_cast<uint32_t*>(job.packed + base);
    for (int64_t j = 0; j < capacity; ++j) {
      uint32_t* lane = packed + (j / kBlock) * (D / 2) * kBlock + j % kBlock;
      for (int p = 0; p < D / 2; ++p) {
        uint32_t pair = 0;
        if (j < keys) std::memcpy(&pair, k_head + j * D + 2 * p, sizeof pair);
        lane[p * kBlock] = pair;
      }
    }
  }
}

#ifdef PEDRO_X86
// scores[r][j] = (q[r] . key j) * scale for NR query rows and the keys of blocks [0, blocks) of `packed`: each
// block of keys is loaded once for all the rows
template <int D, int NR>
PEDRO_AVX512 inline void prefill_scores_avx512(const uint16_t* const* q, const uint16_t* packed, int64_t blocks,
                                               float scale, float* const* scores) {
  constexpr int P = D / 2;
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint16_t* kb = packed + b * P * 32;
    __m512 a[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) a[r] = _mm512_setzero_ps();
    for (int p = 0; p < P; ++p) {
      const __m512bh k = (__m512bh)_mm512_loadu_si512(kb + p * 32);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        int pair;
        std::memcpy(&pair, q[r] + 2 * p, sizeof pair);
        a[r] = _mm512_dpbf16_ps(a[r], k, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(scores[r] + b * 16, _mm512_mul_ps(a[r], s));
  }
}

// acc[r] = sum over j in [lo[r], hi[r]] of probs[r][j] * values[j], for NR rows, 64 elements of a head at a time,
// each row's sum in ascending j: the keys all rows attend are loaded once for all of them
template <int D, int NR>
PEDRO_AVX512 inline void prefill_values_avx512(const float* const* probs, const int64_t* lo, const int64_t* hi,
                                               const float* values, float* const* acc) {
  int64_t shared_lo = lo[0], shared_hi = hi[0];
  for (int r = 1; r < NR; ++r) shared_lo = std::max(shared_lo, lo[r]), shared_hi = std::min(shared_hi, hi[r]);
  if (shared_lo > shared_hi) {  // no key every row attends (windows apart): one row at a time
    if constexpr (NR > 1)
      for (int r = 0; r < NR; ++r) prefill_values_avx512<D, 1>(probs + r, lo + r, hi + r, values, acc + r);
    return;
  }
  for (int d0 = 0; d0 < D; d0 += 64) {
    __m512 a[NR][4];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
      for (int64_t j = lo[r]; j < shared_lo; ++j) {
        const __m512 p = _mm512_set1_ps(probs[r][j]);
        for (int i = 0; i < 4; ++i) a[r][i] = _mm512_fmadd_ps(p, _mm512_loadu_ps(values + j * D + d0 + 16 * i), a[r][i]);
      }
    for (int64_t j = shared_lo; j <= shared_hi; ++j) {
      const float* row = values + j * D + d0;
      const __m512 v0 = _mm512_loadu_ps(row), v1 = _mm512_loadu_ps(row + 16), v2 = _mm512_loadu_ps(row + 32),
                   v3 = _mm512_loadu_ps(row + 48);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        const __m512 p = _mm512_set1_ps(probs[r][j]);
        a[r][0] = _mm512_fmadd_ps(p, v0, a[r][0]);
        a[r][1] = _mm512_fmadd_ps(p, v1, a[r][1]);
        a[r][2] = _mm512_fmadd_ps(p, v2, a[r][2]);
        a[r][3] = _mm512_fmadd_ps(p, v3, a[r][3]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
      for (int64_t j = shared_hi + 1; j <= hi[r]; ++j) {
        const __m512 p = _mm512_set1_ps(probs[r][j]);
        for (int i = 0; i < 4; ++i) a[r][i] = _mm512_fmadd_ps(p, _mm512_loadu_ps(values + j * D + d0 + 16 * i), a[r][i]);
      }
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < 4; ++i) _mm512_storeu_ps(acc[r] + d0 + 16 * i, a[r][i]);
  }
}

// The two above over `rows` query rows, in tiles of 8 rows (scores) and 6 (values: 24 accumulators)
template <int D>
PEDRO_AVX512 inline void prefill_scores_tiles(int64_t rows, const uint16_t* const* q, const uint16_t* packed,
                                              int64_t blocks, float scale, float* const* scores) {
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    const uint16_t* const* qr = q + r0;
    float* const* sr = scores + r0;
    switch (std::min<int64_t>(8, rows - r0)) {
      case 8: prefill_scores_avx512<D, 8>(qr, packed, blocks, scale, sr); break;
      case 7: prefill_scores_avx512<D, 7>(qr, packed, blocks, scale, sr); break;
      case 6: prefill_scores_avx512<D, 6>(qr, packed, blocks, scale, sr); break;
      case 5: prefill_scores_avx512<D, 5>(qr, packed, blocks, scale, sr); break;
      case 4: prefill_scores_avx512<D, 4>(qr, packed, blocks, scale, sr); break;
      case 3: prefill_scores_avx512<D, 3>(qr, packed, blocks, scale, sr); break;
      case 2: prefill_scores_avx512<D, 2>(qr, packed, blocks, scale, sr); break;
      default: prefill_scores_avx512<D, 1>(qr, packed, blocks, scale, sr); break;
    }
  }
}

template <int D>
PEDRO_AVX512 inline void prefill_values_tiles(int64_t rows, const float* const* probs, const int64_t* lo,
                                              const int64_t* hi, const float* values, float* const* acc) {
  for (int64_t r0 = 0; r0 < rows; r0 += 6) {
    switch (std::min<int64_t>(6, rows - r0)) {
      case 6: prefill_values_avx512<D, 6>(probs + r0, lo + r0, hi + r0, values, acc + r0); break;
      case 5: prefill_values_avx512<D, 5>(probs + r0, lo + r0, hi + r0, values, acc + r0); break;
      case 4: prefill_values_avx512<D, 4>(probs + r0, lo + r0, hi + r0, values, acc + r0); break;
      case 3: prefill_values_avx512<D, 3>(probs + r0, lo + r0, hi + r0, values, acc + r0); break;
      case 2: prefill_values_avx512<D, 2>(probs + r0, lo + r0, hi + r0, values, acc + r0); break;
      default: prefill_values_avx512<D, 1>(probs + r0, lo + r0, hi + r0, values, acc + r0); break;
    }
  }
}
#endif

constexpr int64_t kPrefillTokens = 4;  // queries computed together (times the group's heads: rows)

// Queries [c * kPrefillChunk, ...) of row r's KV head h, kPrefillTokens tokens at a time: each token's `group`
// query heads rotated (and scaled), then each attends keys [position - window + 1, position] (from 0 without a
// window) of the slot, probabilities in fp32. A query's numbers do not depend on the tokens it is computed with.
template <int D, bool kAvx512>
__attribute__((always_inline)) inline void prefill_one(const PrefillJob& job, int64_t r, int64_t h, int64_t c,
                                                       std::vector<float>& scores) {
  const int64_t* row = job.rows + 4 * r;
  const int64_t first_token = row[1], n = row[2], offset = row[3];
  const int64_t group = job.group;
  const int64_t capacity = round_up(offset + n, kBlock);
  const int64_t base = (job.space[r] * job.heads + h * capacity) * D;
  const uint16_t* k_head = job.k + row[0] * job.k_row + h * job.k_head;
  const int64_t end = std::min(n, (c + 1) * kPrefillChunk);
  constexpr int64_t kRows = kPrefillTokens * kMaxGroup;
  alignas(64) uint16_t q[kRows * D];
  alignas(64) float acc[kRows][D];
  const uint16_t* q_rows[kRows];
  float* score_rows[kRows];
  float* acc_rows[kRows];
  int64_t lo[kRows], hi[kRows];
  float sums[kRows];
  for (int64_t i0 = c * kPrefillChunk; i0 < end; i0 += kPrefillTokens) {
    const int64_t tokens = std::min(kPrefillTokens, end - i0), rows = tokens * group;
    const int64_t first = job.window > 0 && offset + i0 - job.window + 1 > 0 ? offset + i0 - job.window + 1 : 0;
    const int64_t last = offset + i0 + tokens - 1;  // the keys any of these queries attends: [first, last]
    const int64_t b0 = first / kBlock, blocks = last / kBlock - b0 + 1, stride = blocks * kBlock;
    const int64_t key0 = b0 * kBlock;  // scores and probabilities from this key on
    scores.resize(static_cast<size_t>(rows * stride));
    uint16_t buffer[D];
    for (int64_t tk = 0; tk < tokens; ++tk) {
      const int64_t t = first_token + i0 + tk, position = offset + i0 + tk;
      const int64_t own_first = job.window > 0 && position - job.window + 1 > 0 ? position - job.window + 1 : 0;
      const uint16_t* q_in = job.q + t * job.q_row + h * group * D;
      const uint16_t* z_q = job.scales.q_of(t, h, group, D);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t x = tk * group + g;
        rotate<D>(scale_head<D>(q_in + g * D, z_q == nullptr ? nullptr : z_q + g * D, buffer), job.cos + t * D,
                  job.sin + t * D, q + x * D);
        q_rows[x] = q + x * D;
        score_rows[x] = scores.data() + x * stride;
        acc_rows[x] = acc[x];
        lo[x] = own_first - key0;
        hi[x] = position - key0;
      }
    }
#ifdef PEDRO_X86
    if constexpr (kAvx512) {
      const uint16_t* packed = job.packed + base + key0 * D;
      prefill_scores_tiles<D>(rows, q_rows, packed, blocks, job.scale, score_rows);
    } else
#endif
    {
      for (int64_t x = 0; x < rows; ++x)
        score_portable<D>(q_rows[x], k_head + (key0 + lo[x]) * D, hi[x] - lo[x] + 1, 1, job.scale, score_rows[x] + lo[x]);
    }
    for (int64_t x = 0; x < rows; ++x) {
      float* p = score_rows[x];
      float top = p[lo[x]];
      for (int64_t j = lo[x] + 1; j <= hi[x]; ++j) top = p[j] > top ? p[j] : top;
#pragma omp simd
      for (int64_t j = lo[x]; j <= hi[x]; ++j) p[j] = exp_any(p[j] - top);
      float total = 0.f;
      for (int64_t j = lo[x]; j <= hi[x]; ++j) total += p[j];
      sums[x] = total;
    }
    const float* values = job.values + base + key0 * D;
#ifdef PEDRO_X86
    if constexpr (kAvx512) {
      prefill_values_tiles<D>(rows, score_rows, lo, hi, values, acc_rows);
    } else
#endif
    {
      for (int64_t x = 0; x < rows; ++x) {
        for (int d = 0; d < D; ++d) acc[x][d] = 0.f;
        for (int64_t j = lo[x]; j <= hi[x]; ++j) {
          const float p = score_rows[x][j];
#pragma omp simd
          for (int d = 0; d < D; ++d) acc[x][d] += p * values[j * D + d];
        }
      }
    }
    for (int64_t x = 0; x < rows; ++x) {
      const int64_t t = first_token + i0 + x / group, g = x % group;
      uint16_t* out = job.out + ((t * job.heads + h) * group + g) * D;
      const float inv = 1.f / sums[x];
      for (int d = 0; d < D; ++d) out[d] = float_to_bf16(acc[x][d] * inv);
    }
  }
}

// Work item i -> (row, KV head, chunk of queries): items are dealt to threads in turn, so that a long prompt's
// costlier later chunks do not all land on one thread
struct PrefillItems {
  std::vector<int64_t> row, head, chunk;
};

template <int D>
void stage_portable(const PrefillJob& job, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) stage_one<D, false>(job, i);
}
template <int D>
PEDRO_AVX512 void stage_avx512(const PrefillJob& job, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) stage_one<D, true>(job, i);
}
template <int D>
void prefill_portable(const PrefillJob& job, const PrefillItems& items, int64_t thread, int64_t threads) {
  std::vector<float> scores;
  for (size_t i = thread; i < items.row.size(); i += threads)
    prefill_one<D, false>(job, items.row[i], items.head[i], items.chunk[i], scores);
}
template <int D>
PEDRO_AVX512 void prefill_avx512(const PrefillJob& job, const PrefillItems& items, int64_t thread,
                                 int64_t threads) {
  std::vector<float> scores;
  for (size_t i = thread; i < items.row.size(); i += threads)
    prefill_one<D, true>(job, items.row[i], items.head[i], items.chunk[i], scores);
}

template <int D>
void prefill(const PrefillJob& job, int64_t n_rows) {
  run_parallel(
      n_rows * job.heads, 1,
      [&](int64_t begin, int64_t end) { stage_avx512<D>(job, begin, end); },
      [&](int64_t begin, int64_t end) { stage_portable<D>(job, begin, end); });
  PrefillItems items;
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t h = 0; h < job.heads; ++h)
      for (int64_t c = 0; c * kPrefillChunk < job.rows[4 * r + 2]; ++c) {
        items.row.push_back(r);
        items.head.push_back(h);
        items.chunk.push_back(c);
      }
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items.row.size()));
  run_parallel(
      threads, 1,
      [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) prefill_avx512<D>(job, items, t, threads);
      },
      [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) prefill_portable<D>(job, items, t, threads);
      });
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                             const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k, at::Tensor& v,
                             const at::Tensor& rows, int64_t window, double scale,
                             const std::optional<at::Tensor>& q_scale, const std::optional<at::Tensor>& v_scale,
                             const std::optional<at::Tensor>& scale_index) {
  check_attention(q, k_new, v_new, cos, sin, k, v, "N");
  TORCH_CHECK(rows.device().is_cpu(), "CPU tensors only");
  const int64_t tokens = q.size(0), heads = q.size(1), group = q.size(2), dim = q.size(3);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 2 && rows.size(1) == 4 && rows.is_contiguous(),
              "rows must be a contiguous int64 (R, 4) tensor: slot, first token, tokens, first position");
  const int64_t n_rows = rows.size(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  std::vector<int64_t> space(static_cast<size_t>(n_rows));
  std::vector<int64_t> slots(static_cast<size_t>(n_rows));
  int64_t total = 0, covered = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t slot = rp[4 * r], first = rp[4 * r + 1], n = rp[4 * r + 2], offset = rp[4 * r + 3];
    TORCH_CHECK(slot >= 0 && slot < k.size(0), "a row's slot is outside the cache");
    TORCH_CHECK(n >= 1 && first == covered, "rows must name q's tokens in order, each row at least one");
    covered += n;
    TORCH_CHECK(offset >= 0 && offset + n <= k.size(2), "a row's positions are outside the cache");
    space[r] = total;
    slots[r] = slot;
    total += round_up(offset + n, kBlock);
  }
  TORCH_CHECK(covered == tokens, "rows must name q's tokens in order, each row at least one");
  std::sort(slots.begin(), slots.end());
  TORCH_CHECK(std::adjacent_find(slots.begin(), slots.end()) == slots.end(), "two rows write the same slot");
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, whatever q's token stride
  if (n_rows == 0) return out;
  const bool pack = cpu_has_avx512_bf16();
  at::Tensor packed = at::empty({pack ? total * heads * dim : 0}, q.options());
  at::Tensor values = at::empty({total * heads * dim}, q.options().dtype(at::kFloat));
  const PrefillJob job{data<uint16_t>(q), data<uint16_t>(k_new), data<uint16_t>(v_new), data<uint16_t>(cos), data<uint16_t>(sin), data<uint16_t>(k), data<uint16_t>(v),
                       data<uint16_t>(out), rp, heads, group, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                       window, q.stride(0), k_new.stride(0), v_new.stride(0), static_cast<float>(scale),
                       pack ? data<uint16_t>(packed) : nullptr, values.data_ptr<float>(), space.data(),
                       scales_of(q_scale, v_scale, scale_index, tokens, heads * group * dim, heads * dim)};
  switch (dim) {
    case 64: prefill<64>(job, n_rows); break;
    case 128: prefill<128>(job, n_rows); break;
    case 256: prefill<256>(job, n_rows); break;
    default: TORCH_CHECK(false, "head_dim must be 64, 128 or 256");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(PEDRO_NAMESPACE, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor cos, Tensor sin, Tensor(a!) k, Tensor(b!) v, "
      "Tensor slots, Tensor lengths, int window, float scale, Tensor? q_scale=None, Tensor? v_scale=None, "
      "Tensor? scale_index=None) -> Tensor");
  m.def(
      "prefill_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor cos, Tensor sin, Tensor(a!) k, Tensor(b!) v, "
      "Tensor rows, int window, float scale, Tensor? q_scale=None, Tensor? v_scale=None, "
      "Tensor? scale_index=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool gemma) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up, Tensor? up_scale=None, Tensor? scale_index=None) -> Tensor");
  m.def("scale_rows(Tensor x, Tensor table, Tensor index, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(PEDRO_NAMESPACE, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("prefill_attention", &prefill_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("scale_rows", &scale_rows);
}
