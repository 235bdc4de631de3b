// Attention of decode and verify rows straight from the paged KV cache, for x86 CPUs with AVX2
// and FMA, in float32.
//
// Why: torch's CPU path gathers each request's K/V blocks into a contiguous copy (two
// aten::index a layer) and makes one SDPA call per request, and per verify row, since SDPA's
// result for a row depends on how many keys the call holds (a verify row must equal the decode
// row it stands for, bit for bit). On SmolLM2-135M at 256 cached tokens that was ~10 ms of a
// ~45 ms decode step, and a 5-row verify step made 150 SDPA calls. Here every such row of a step
// is computed in one call per layer, reading keys and values where they lie in the cache.
//
// What: row t attends exactly the keys key_slots[row_starts[t] .. row_starts[t + 1]) (slots of
// the flattened cache, block * block_size + offset, in the order plain decoding sees them), with
// grouped-query heads (query head h reads KV head h / (Hq / Hk)):
//   s_j = scale * q . k_j;  p_j = exp(s_j - max_j s_j);  out = sum_j p_j v_j / sum_j p_j.
// Row independence: a row's result depends only on its query and its keys' values, in the
// order given: the same operations in the same order whatever other rows, requests, threads or
// slots the call holds (each dot product with one accumulator per 8 lanes, FMAs in dimension
// order and one horizontal sum; scores, exponentials and the weighted sum of values in key
// order). A verify row and the decode row it stands for are then equal bit for bit.
#include <torch/extension.h>

#include <immintrin.h>

#include <cmath>
#include <vector>

#include "shared_pool.h"
#include "vec_math.h"

namespace {

inline float dot(const float* a, const float* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) {
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
  }
  return specd::horizontal_sum(acc);
}

// Keys whose scores are computed side by side (independent FMA chains: one key's dot product
// is a chain of D / 8 dependent FMAs, too slow alone).
constexpr int64_t kKeys = 8;

// One query row and head over its keys: scores in `scores` (scratch of n + 8 floats).
void attend_row(const float* q, const float* k_base, const float* v_base, int64_t slot_stride,
                const int64_t* slots, int64_t n, int64_t d, float scale, float* scores,
                float* out) {
  // Scores: each key's dot product is its own accumulator, FMAs in dimension order, whether it
  // falls in a block of kKeys or the tail.
  int64_t j = 0;
  for (; j + kKeys <= n; j += kKeys) {
    __m256 acc[kKeys];
    const float* key[kKeys];
    for (int64_t u = 0; u < kKeys; ++u) {
      acc[u] = _mm256_setzero_ps();
      key[u] = k_base + slots[j + u] * slot_stride;
    }
    for (int64_t c = 0; c < d; c += 8) {
      const __m256 qv = _mm256_loadu_ps(q + c);
      for (int64_t u = 0; u < kKeys; ++u) {
        acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key[u] + c), acc[u]);
      }
    }
    for (int64_t u = 0; u < kKeys; ++u) scores[j + u] = scale * specd::horizontal_sum(acc[u]);
  }
  for (; j < n; ++j) scores[j] = scale * dot(q, k_base + slots[j] * slot_stride, d);
  float high = -INFINITY;
  for (j = 0; j < n; ++j) high = scores[j] > high ? scores[j] : high;
  // Exponentials 8 at a time (the tail padded with -inf, whose lanes are dropped), summed in
  // 8 lanes then across them: the order depends only on n.
  for (j = n; j < n + 8; ++j) scores[j] = -INFINITY;
  const __m256 top = _mm256_set1_ps(high);
  __m256 lanes = _mm256_setzero_ps();
  for (j = 0; j < n; j += 8) {
    const __m256 e = specd::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top));
    const int64_t valid = n - j < 8 ? n - j : 8;
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
        _mm256_set1_epi32(static_cast<int>(valid)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    const __m256 kept = _mm256_and_ps(e, keep);
    _mm256_storeu_ps(scores + j, kept);
    lanes = _mm256_add_ps(lanes, kept);
  }
  const float total = specd::horizontal_sum(lanes);
  // d <= 256: up to 32 vector accumulators, one per 8 dimensions, in key order.
  __m256 acc[32];
  const int64_t vecs = d / 8;
  for (int64_t c = 0; c < vecs; ++c) acc[c] = _mm256_setzero_ps();
  for (j = 0; j < n; ++j) {
    const float* v = v_base + slots[j] * slot_stride;
    const __m256 p = _mm256_set1_ps(scores[j]);
    for (int64_t c = 0; c < vecs; ++c) {
      acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * c), acc[c]);
    }
  }
  const __m256 inv = _mm256_set1_ps(1.0f / total);
  for (int64_t c = 0; c < vecs; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], inv));
}

}  // namespace

// q float32 [T, Hq, D]; k_cache, v_cache float32 [blocks, block_size, Hk, D]; key_slots int64
// [S]; row_starts int64 [T + 1] (row t's keys are key_slots[row_starts[t]:row_starts[t + 1]]).
// Returns float32 [T, Hq, D].
torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                              const torch::Tensor& v_cache, const torch::Tensor& key_slots,
                              const torch::Tensor& row_starts, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32, "q must be float32 [T, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == torch::kFloat32 &&
                  v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == torch::kFloat32,
              "k_cache and v_cache must be float32 [blocks, block_size, Hk, D], the same shape");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(key_slots.scalar_type() == torch::kInt64 && row_starts.scalar_type() == torch::kInt64,
              "key_slots and row_starts must be int64");
  const int64_t rows = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && d % 8 == 0 && d <= 256, "head size must match, <= 256, x8");
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(row_starts.numel() == rows + 1, "row_starts must have T + 1 entries");
  const torch::Tensor qc = q.contiguous(), slots_c = key_slots.contiguous();
  const torch::Tensor starts_c = row_starts.contiguous();
  torch::Tensor out = torch::empty_like(qc);
  if (rows == 0) return out;
  const int64_t* starts = starts_c.data_ptr<int64_t>();
  const int64_t* slots = slots_c.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  int64_t most = 0;
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t n = starts[t + 1] - starts[t];
    TORCH_CHECK(n >= 1 && starts[t] >= 0 && starts[t + 1] <= slots_c.numel(),
                "every row needs at least one key within key_slots");
    most = n > most ? n : most;
  }
  for (int64_t i = 0; i < slots_c.numel(); ++i) {
    TORCH_CHECK(slots[i] >= 0 && slots[i] < num_slots, "key slot out of the cache");
  }
  const float* qp = qc.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = heads / kv_heads, slot_stride = kv_heads * d;
  const float s = static_cast<float>(scale);
  const auto attend = [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(most + 8));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / heads, h = i % heads, kvh = h / group;
      attend_row(qp + i * d, kp + kvh * d, vp + kvh * d, slot_stride, slots + starts[t],
                 starts[t + 1] - starts[t], d, s, scores.data(), op + i * d);
    }
  };
  specd::parallel_rows(rows * heads, attend);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("use_pool", &specd::use_pool, "run on the threads of the int4 extension's pool_handle()");
  m.def("paged_attention", &paged_attention,
        "float32 attention of query rows over their own keys in the paged cache (AVX2, FMA)");
}
