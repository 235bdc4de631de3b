// The k likeliest next tokens of each logit row and their probabilities, for x86 CPUs with AVX2
// and FMA, in float32: what Token Recycling records at every row a step computes
// (server/model/spec_step.py top_tokens).
//
// Why: torch computes it as topk plus logsumexp over [N, V]; on one thread (the engine's torch
// threads) that was 0.12 ms at 1 row of a 49k vocabulary, 0.8 ms at 8 (a plain decode step at
// batch 8) and 8.4 ms at 72 (8 requests' 9-node trees); this kernel 0.025, 0.10 and 1.24 ms
// (python -m loadtest.bench_top_k, loadtest/results/engine/top-k.md). Here each row is read
// twice, both passes vectorised, and rows are spread over specd's kernel threads.
//
// What, per row x of V logits:
//   pass 1: the maximum and the k largest values, best first (a vector of 8 logits is compared
//           with the current k-th best, and only lanes above it are inserted; ties keep the
//           lower index, as a stable sort would);
//   pass 2: sum_j exp(x_j - max), through the same exp routine as the attention kernel;
//   probs_i = exp(top_i - max) / sum.
// NaN logits are never inserted (a comparison with NaN is false); the runner fails rows with
// non-finite logits before this is called.
#include <torch/extension.h>

#include <immintrin.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "shared_pool.h"
#include "vec_math.h"

namespace {

// Inserts (value, index) into the descending top list of `k` entries (value > vals[k - 1]).
inline void insert(float value, int32_t index, float* vals, int32_t* ids, int64_t k) {
  int64_t i = k - 1;
  while (i > 0 && vals[i - 1] < value) {
    vals[i] = vals[i - 1];
    ids[i] = ids[i - 1];
    --i;
  }
  vals[i] = value;
  ids[i] = index;
}

void top_k_row(const float* x, int64_t v, int64_t k, int32_t* ids, float* probs) {
  float vals[64];
  for (int64_t i = 0; i < k; ++i) {
    vals[i] = -std::numeric_limits<float>::infinity();
    ids[i] = -1;
  }
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= v; j += 8) {
    const __m256 chunk = _mm256_loadu_ps(x + j);
    vmax = _mm256_max_ps(vmax, chunk);
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(chunk, _mm256_set1_ps(vals[k - 1]), _CMP_GT_OQ));
    while (mask != 0) {
      const int lane = __builtin_ctz(mask);
      mask &= mask - 1;
      if (x[j + lane] > vals[k - 1]) insert(x[j + lane], static_cast<int32_t>(j + lane), vals, ids, k);
    }
  }
  float top = -std::numeric_limits<float>::infinity();
  {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    for (float lane : lanes) top = std::max(top, lane);
  }
  for (; j < v; ++j) {
    top = std::max(top, x[j]);
    if (x[j] > vals[k - 1]) insert(x[j], static_cast<int32_t>(j), vals, ids, k);
  }
  // Four accumulators: independent add chains, and shorter sums (less float32 rounding).
  const __m256 shift = _mm256_set1_ps(top);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  j = 0;
  for (; j + 32 <= v; j += 32) {
    for (int u = 0; u < 4; ++u) {
      const __m256 e = specd::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8 * u), shift));
      acc[u] = _mm256_add_ps(acc[u], e);
    }
  }
  for (; j + 8 <= v; j += 8) {
    acc[0] = _mm256_add_ps(acc[0], specd::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), shift)));
  }
  float total = specd::horizontal_sum(
      _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; j < v; ++j) total += std::exp(x[j] - top);
  for (int64_t i = 0; i < k; ++i) {
    probs[i] = ids[i] < 0 ? 0.0f : std::exp(vals[i] - top) / total;
  }
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> top_k_probs(const torch::Tensor& logits, int64_t k) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32,
              "logits must be float32 [N, V]");
  TORCH_CHECK(k >= 1 && k <= 64 && k <= logits.size(1), "k must be in 1..min(64, V)");
  const torch::Tensor x = logits.contiguous();
  const int64_t rows = x.size(0), v = x.size(1);
  torch::Tensor ids = torch::empty({rows, k}, x.options().dtype(torch::kInt32));
  torch::Tensor probs = torch::empty({rows, k}, x.options());
  const float* xp = x.data_ptr<float>();
  int32_t* ip = ids.data_ptr<int32_t>();
  float* pp = probs.data_ptr<float>();
  const auto run = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) top_k_row(xp + r * v, v, k, ip + r * k, pp + r * k);
  };
  specd::parallel_rows(rows, run);
  return {ids, probs};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("use_pool", &specd::use_pool, "run on the threads of the int4 extension's pool_handle()");
  m.def("top_k_probs", &top_k_probs,
        "per row of float32 logits [N, V]: the k largest (int32 ids) and their softmax "
        "probabilities, best first (AVX2, FMA)");
}
