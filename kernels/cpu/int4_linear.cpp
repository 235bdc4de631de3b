// 4-bit weight linear layer for x86 CPUs with AVX2 and FMA, in float32.
//
// Why: torch's own CPU int4 kernel (aten::_weight_int4pack_mm_for_cpu) computes in bfloat16,
// which CPUs without AVX-512 BF16 emulate; on a 2-core AVX2 EPYC it reads weights at ~2 GB/s
// and takes ~29 ms of a ~48 ms SmolLM2-135M decode step (server/model/int4_avx2.py).
//
// How: 4-bit values are expanded to float32 weights w = q * scale + offset (one FMA each) by
// a per-lane shift of a broadcast 16-byte group, no shuffles (Nibbles::expand). Up to 16 input
// rows, each block of 8 weight rows is expanded in registers and used at once, input rows in
// tiles of up to 8 (fused_block); above 16, a block is expanded once into a buffer that stays
// in L1 and every input row's dot products read it (expand_row + dot_block). Weights are read
// from memory once per call whatever the row count.
//
// Row independence: output (m, n) is computed by the same operations in the same order for
// any row count M, either path, any block or tile it falls in and any thread count: its own
// accumulator, FMAs in input order, one horizontal sum. Speculative verification relies on
// that (a verify row must equal the decode row it stands for).
//
// Layout (made by pack() in server/model/int4_avx2.py): packed uint8 [N, K / 2]; the 16 bytes
// of a group of 32 are 4 little-endian dwords, and nibble t of dword d holds the value at
// position 8 (t / 2) + 4 (t % 2) + d of the group. Scales and offsets float32 [N, K / 32].
// int8_linear takes GGUF's Q8_0 weights as they are (int8 [N, K], w = q * scale + offset)
// through the same code (SignedBytes::expand).
#include <torch/extension.h>

#include <immintrin.h>

#include "work_pool.h"

namespace {

// The kernels' threads (work_pool.h): the calling thread plus set_threads(n) - 1 workers.
specd::WorkPool& pool() {
  static specd::WorkPool instance;
  return instance;
}

constexpr int64_t kGroup = 32;
constexpr int64_t kBlockN = 8;  // weight rows per block

inline float horizontal_sum(__m256 v) {
  const __m128 pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}

// The 4 vectors of float32 weights of group g of one row (w = q * scale + offset).
struct GroupWeights {
  __m256 v[4];
};

// 4-bit values in the nibble layout above: 16 bytes a group.
struct Nibbles {
  static constexpr int64_t kGroupBytes = 16;

  static GroupWeights expand(const uint8_t* q, float scale, float offset) {
    // Both 128-bit halves hold the group's 4 dwords; lane l of vector c takes nibble
    // 2 c + l / 4 of dword l % 4 (a per-lane shift: no shuffles, which were the bottleneck).
    const __m256i dwords =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    const __m256i low_mask = _mm256_set1_epi32(0x0F);
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 o = _mm256_set1_ps(offset);
    GroupWeights w;
    for (int c = 0; c < 4; ++c) {
      const __m256i shift = _mm256_setr_epi32(8 * c, 8 * c, 8 * c, 8 * c, 8 * c + 4, 8 * c + 4,
                                              8 * c + 4, 8 * c + 4);
      const __m256i nibbles = _mm256_and_si256(_mm256_srlv_epi32(dwords, shift), low_mask);
      w.v[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(nibbles), s, o);
    }
    return w;
  }
};

// 8-bit signed values in input order (GGUF's Q8_0: w = d * q): 32 bytes a group. Half the
// vector work of the same weights as two 4-bit planes, for the same bytes.
struct SignedBytes {
  static constexpr int64_t kGroupBytes = 32;

  static GroupWeights expand(const uint8_t* q, float scale, float offset) {
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 o = _mm256_set1_ps(offset);
    GroupWeights w;
    for (int c = 0; c < 4; ++c) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * c));
      w.v[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), s, o);
    }
    return w;
  }
};

// Expands the bytes of one row into K float32 weights (as F::expand does).
template <class F>
inline void expand_row(const uint8_t* q, const float* scale, const float* offset, int64_t groups,
                       float* w) {
  for (int64_t g = 0; g < groups; ++g) {
    const GroupWeights v = F::expand(q + F::kGroupBytes * g, scale[g], offset[g]);
    for (int64_t c = 0; c < 4; ++c) _mm256_storeu_ps(w + kGroup * g + 8 * c, v.v[c]);
  }
}

// Few input rows (kRows): weights are expanded in registers and used at once, kRowsN weight
// rows at a time so that kRowsN * kRows accumulator chains run side by side. The same
// operations per output as expand_row + dot_block.
template <class F, int64_t kRowsN, int64_t kRows>
inline void fused_block(const float* x, int64_t k, const uint8_t* q, const float* scale,
                        const float* offset, float* out, int64_t out_stride) {
  const int64_t groups = k / kGroup;
  const int64_t row_bytes = groups * F::kGroupBytes;
  __m256 acc[kRowsN][kRows];
  for (int64_t i = 0; i < kRowsN; ++i)
    for (int64_t m = 0; m < kRows; ++m) acc[i][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < kRowsN; ++i) {
      const GroupWeights w = F::expand(q + i * row_bytes + F::kGroupBytes * g,
                                       scale[i * groups + g], offset[i * groups + g]);
      for (int64_t m = 0; m < kRows; ++m) {
        const float* xg = x + m * k + kGroup * g;
        for (int64_t c = 0; c < 4; ++c) {
          acc[i][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 8 * c), w.v[c], acc[i][m]);
        }
      }
    }
  }
  for (int64_t i = 0; i < kRowsN; ++i)
    for (int64_t m = 0; m < kRows; ++m) out[m * out_stride + i] = horizontal_sum(acc[i][m]);
}

// out[m, i] for i < kCount from the expanded weights w [kCount, K]. A template so that the
// accumulators live in registers; a block's tail rows go through kCount = 1 one at a time,
// with the same operations per output.
template <int64_t kCount>
inline void dot_block(const float* x, int64_t rows, int64_t k, const float* w, float* out,
                      int64_t out_stride) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * k;
    __m256 acc[kCount];
    for (int64_t i = 0; i < kCount; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k; c += 8) {
      const __m256 xv = _mm256_loadu_ps(xm + c);
      for (int64_t i = 0; i < kCount; ++i) {
        acc[i] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + i * k + c), acc[i]);
      }
    }
    for (int64_t i = 0; i < kCount; ++i) out[m * out_stride + i] = horizontal_sum(acc[i]);
  }
}

// Up to this many input rows, weights are expanded in registers (fused_block, input rows in
// tiles of up to kTileRows, each tile expanding the block's weights again); above it, once
// per block into a buffer that every row then reads (expand_row + dot_block).
constexpr int64_t kFusedRows = 16;
constexpr int64_t kTileRows = 8;

// fused_block over `count` (<= kBlockN) weight rows for kRows input rows: kBlockN / kRows
// weight rows at a time (at least one), the rest one by one. kRowsN * kRows accumulators and
// 4 weight vectors stay within the 16 ymm registers.
template <class F, int64_t kRows>
inline void fused_rows_n(const float* x, int64_t k, const uint8_t* q, const float* s,
                         const float* o, int64_t count, float* out, int64_t out_stride) {
  constexpr int64_t kRowsN = kRows >= kBlockN ? 1 : kBlockN / kRows;
  const int64_t groups = k / kGroup;
  const int64_t row_bytes = groups * F::kGroupBytes;
  int64_t i = 0;
  for (; i + kRowsN <= count; i += kRowsN) {
    fused_block<F, kRowsN, kRows>(x, k, q + i * row_bytes, s + i * groups, o + i * groups,
                                  out + i, out_stride);
  }
  for (; i < count; ++i) {
    fused_block<F, 1, kRows>(x, k, q + i * row_bytes, s + i * groups, o + i * groups, out + i,
                             out_stride);
  }
}

template <class F>
inline void fused_rows(const float* x, int64_t rows, int64_t k, const uint8_t* q, const float* s,
                       const float* o, int64_t count, float* out, int64_t out_stride) {
  for (int64_t m = 0; m < rows; m += kTileRows) {
    const float* xt = x + m * k;
    float* ot = out + m * out_stride;
    switch (std::min(kTileRows, rows - m)) {
      case 1: fused_rows_n<F, 1>(xt, k, q, s, o, count, ot, out_stride); break;
      case 2: fused_rows_n<F, 2>(xt, k, q, s, o, count, ot, out_stride); break;
      case 3: fused_rows_n<F, 3>(xt, k, q, s, o, count, ot, out_stride); break;
      case 4: fused_rows_n<F, 4>(xt, k, q, s, o, count, ot, out_stride); break;
      case 5: fused_rows_n<F, 5>(xt, k, q, s, o, count, ot, out_stride); break;
      case 6: fused_rows_n<F, 6>(xt, k, q, s, o, count, ot, out_stride); break;
      case 7: fused_rows_n<F, 7>(xt, k, q, s, o, count, ot, out_stride); break;
      default: fused_rows_n<F, 8>(xt, k, q, s, o, count, ot, out_stride); break;
    }
  }
}


// x float32 [M, K] -> float32 [M, N] for weights in format F: q [N, K / 32 * kGroupBytes]
// bytes, scales and offsets float32 [N, K / 32].
template <class F>
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                     const torch::Tensor& offsets) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be float32 [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.element_size() == 1, "weights: one byte an element, [N, bytes]");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && offsets.scalar_type() == torch::kFloat32,
              "scales and offsets must be float32");
  const int64_t rows = x.size(0), k = x.size(1), n = q.size(0);
  const int64_t groups = k / kGroup;
  TORCH_CHECK(k % kGroup == 0 && q.size(1) == groups * F::kGroupBytes,
              "K must be a multiple of 32 and match");
  TORCH_CHECK(scales.size(0) == n && scales.size(1) == groups && offsets.sizes() == scales.sizes(),
              "scales and offsets must be [N, K/32]");
  const torch::Tensor xc = x.contiguous();
  const torch::Tensor qc = q.contiguous(), sc = scales.contiguous(), oc = offsets.contiguous();
  torch::Tensor out = torch::empty({rows, n}, x.options());
  if (rows == 0 || n == 0) return out;
  const float* xp = xc.data_ptr<float>();
  const uint8_t* qp = static_cast<const uint8_t*>(qc.data_ptr());
  const float* sp = sc.data_ptr<float>();
  const float* op = oc.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t row_bytes = groups * F::kGroupBytes;
  const int64_t blocks = (n + kBlockN - 1) / kBlockN;
  // A block of 8 weight rows at one input row is ~1 us of work: chunks of a few blocks.
  pool().parallel_for(blocks, 4, [&](int64_t begin, int64_t end) {
    if (rows <= kFusedRows) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n0 = b * kBlockN, count = std::min(kBlockN, n - n0);
        fused_rows<F>(xp, rows, k, qp + n0 * row_bytes, sp + n0 * groups, op + n0 * groups,
                      count, yp + n0, n);
      }
      return;
    }
    std::vector<float> w(static_cast<size_t>(kBlockN * k));
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kBlockN, count = std::min(kBlockN, n - n0);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t row = n0 + i;
        expand_row<F>(qp + row * row_bytes, sp + row * groups, op + row * groups, groups,
                      w.data() + i * k);
      }
      if (count == kBlockN) {
        dot_block<kBlockN>(xp, rows, k, w.data(), yp + n0, n);
      } else {
        for (int64_t i = 0; i < count; ++i) {
          dot_block<1>(xp, rows, k, w.data() + i * k, yp + n0 + i, n);
        }
      }
    }
  });
  return out;
}

}  // namespace

torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& packed,
                          const torch::Tensor& scales, const torch::Tensor& offsets) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8, "packed must be uint8 [N, K/2]");
  return linear<Nibbles>(x, packed, scales, offsets);
}

torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& q8,
                          const torch::Tensor& scales, const torch::Tensor& offsets) {
  TORCH_CHECK(q8.scalar_type() == torch::kInt8, "q8 must be int8 [N, K]");
  return linear<SignedBytes>(x, q8, scales, offsets);
}

void set_threads(int64_t threads, int64_t spin_us) {
  TORCH_CHECK(threads >= 1, "threads must be >= 1");
  pool().set_spin_us(spin_us);
  if (pool().workers() != threads - 1) pool().set_workers(threads - 1);
}

int64_t get_threads() { return pool().workers() + 1; }

// The pool for the other kernels' extensions to share (paged_attention.cpp's use_pool): the
// same header compiled with the same flags, so the same class. It lives as long as the process.
py::capsule pool_handle() { return py::capsule(&pool(), "specd.WorkPool"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_threads", &set_threads, "threads running each kernel call (the caller's included)",
        py::arg("threads"), py::arg("spin_us") = 200);
  m.def("get_threads", &get_threads, "threads running each kernel call");
  m.def("pool_handle", &pool_handle, "this extension's threads, for use_pool of the others");
  m.def("int4_linear", &int4_linear, "float32 x [M, K] @ int4 weight [N, K].T (AVX2, FMA)");
  m.def("int8_linear", &int8_linear, "float32 x [M, K] @ int8 weight [N, K].T (AVX2, FMA)");
}
