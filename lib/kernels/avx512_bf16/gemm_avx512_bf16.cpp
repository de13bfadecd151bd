// The AVX-512 families (avx512_bf16, avx512_fma): the panel GEMM with either way of forming bf16 products,
// AVX-512 re-pairing for d·W, vectorized SiLU rows and rank-r products.
//
// Everything here is compiled for AVX-512 BF16 through the target pragma below, and is reached only after
// dispatch checked CPUID and XCR0. No std:: templates are instantiated inside the pragma region: a copy
// compiled for AVX-512 could be picked by the linker for code that runs on any CPU.
#include <cstring>
#include <utility>

#include "kernels/avx512_bf16/avx512_bf16.h"
#include "kernels/avx512_bf16/panel_gemm.h"
#include "kernels/repack.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#include <immintrin.h>

#include "kernels/avx512_bf16/widen.h"

namespace moe_sft::kernels {

namespace avx512 {

namespace {

constexpr int kMaxRows = 6;     // rows per register block
constexpr int kMaxPanels = 4;   // 16-column panels per register block
constexpr int64_t kPairsPerBlock = 128;  // K block: 4 panels x 128 pairs x 64 B = 32 KiB of B stays in L1
constexpr int64_t kPrefetchPairs = 32;  // B lines fetched this many pairs (2 KiB of a panel) ahead

inline void store_f32_as_bf16(bf16* p, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
}
inline __m512 round_to_bf16(__m512 v) {  // what a bf16 store and reload would give
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// A's pair (2 kp, 2 kp + 1) of row r as one 32-bit word. `full_pairs` is K / 2: a pair at kp == full_pairs
// exists only for odd K and holds a single element (its partner, past the row, is never read).
inline int32_t a_pair(const bf16* row, int64_t kp, int64_t full_pairs) {
  int32_t pair = 0;
  if (kp < full_pairs) std::memcpy(&pair, row + 2 * kp, sizeof pair);
  else pair = int32_t(row[2 * kp].bits);
  return pair;
}

// acc[r][p] += A[r, 2kp..2kp+1] · B pair kp of panel p by VDPBF16PS.
template <int ROWS, int PANELS>
inline void pair_step_dpbf16(__m512 (&acc)[ROWS][PANELS], const bf16* a, int64_t lda, int64_t kp, int64_t full_pairs,
                             const bf16* b, int64_t panel_stride) {
  __m512bh bv[PANELS];
#pragma GCC unroll 4
  for (int p = 0; p < PANELS; ++p) bv[p] = (__m512bh)_mm512_loadu_si512(b + p * panel_stride + kp * 32);
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r) {
    const __m512bh av = (__m512bh)_mm512_set1_epi32(a_pair(a + r * lda, kp, full_pairs));
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], av, bv[p]);
  }
}

// The same by two f32 FMAs on B's widened halves, with A already widened (af: row r's pair i at
// af[r * lda + 2i], 2i + 1). Even elements first, then odd, so only PANELS widened B vectors are live next
// to the accumulators; A's values are broadcast straight from memory (a load, no ALU work).
template <int ROWS, int PANELS>
inline void pair_step_fma(__m512 (&acc)[ROWS][PANELS], const float* af, int64_t lda, int64_t i, const bf16* b,
                          int64_t panel_stride, int64_t kp) {
  __m512 bv[PANELS];
#pragma GCC unroll 4
  for (int p = 0; p < PANELS; ++p) bv[p] = low_half_f32(_mm512_loadu_si512(b + p * panel_stride + kp * 32));
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r) {
    const __m512 lo = _mm512_set1_ps(af[r * lda + 2 * i]);
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p) acc[r][p] = _mm512_fmadd_ps(lo, bv[p], acc[r][p]);
  }
#pragma GCC unroll 4
  for (int p = 0; p < PANELS; ++p) bv[p] = high_half_f32(_mm512_loadu_si512(b + p * panel_stride + kp * 32));
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r) {
    const __m512 hi = _mm512_set1_ps(af[r * lda + 2 * i + 1]);
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p) acc[r][p] = _mm512_fmadd_ps(hi, bv[p], acc[r][p]);
  }
}

// A's elements [2 kp0, 2 kp0 + n) of ROWS rows widened to f32 into af (row stride 2 kPairsPerBlock), with
// zeros up to a whole pair: the partner of an odd K's lone last element.
template <int ROWS>
inline void widen_a(const bf16* a, int64_t lda, int64_t kp0, int64_t n, float* af) {
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r)
    for (int64_t e = 0; e < n; e += 16)
      _mm512_store_ps(af + r * 2 * kPairsPerBlock + e, load_bf16_as_f32(a + r * lda + 2 * kp0 + e, tail_mask(n - e)));
}

// One register block: ROWS rows x PANELS panels over pairs [kp0, kp1) (at most kPairsPerBlock of them).
template <Products kProducts, int ROWS, int PANELS>
void block(const bf16* a, int64_t lda, int64_t kp0, int64_t kp1, int64_t full_pairs, const bf16* b,
           int64_t panel_stride, float* c, int64_t ldc, __mmask16 last_mask, bool load_c) {
  __m512 acc[ROWS][PANELS];
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p) {
      const __mmask16 mask = p == PANELS - 1 ? last_mask : __mmask16(0xffff);
      acc[r][p] = load_c ? _mm512_maskz_loadu_ps(mask, c + r * ldc + 16 * p) : _mm512_setzero_ps();
    }
  alignas(64) float af[kProducts == Products::fma ? ROWS : 1][2 * kPairsPerBlock];
  if constexpr (kProducts == Products::fma) {
    const int64_t elements = (kp1 > full_pairs ? 2 * full_pairs + 1 : 2 * kp1) - 2 * kp0;
    widen_a<ROWS>(a, lda, kp0, elements, af[0]);
  }
  auto step = [&](int64_t kp) {
    if constexpr (kProducts == Products::fma)
      pair_step_fma(acc, af[0], 2 * kPairsPerBlock, kp - kp0, b, panel_stride, kp);
    else
      pair_step_dpbf16(acc, a, lda, kp, full_pairs, b, panel_stride);
  };
  const int64_t kend = kp1 < full_pairs ? kp1 : full_pairs;
  for (int64_t kp = kp0; kp < kend; ++kp) {
    // B streams from memory with little work per line when rows are few: fetch the panels' lines ahead
    // (with many rows they are in L1 already, and the prefetch costs a load slot per 2·ROWS FMAs).
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p)
      _mm_prefetch(reinterpret_cast<const char*>(b + p * panel_stride + (kp + kPrefetchPairs) * 32), _MM_HINT_T0);
    step(kp);
  }
  if (kp1 > full_pairs) step(full_pairs);  // odd K
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p) {
      const __mmask16 mask = p == PANELS - 1 ? last_mask : __mmask16(0xffff);
      _mm512_mask_storeu_ps(c + r * ldc + 16 * p, mask, acc[r][p]);
    }
}

using BlockFn = void (*)(const bf16*, int64_t, int64_t, int64_t, int64_t, const bf16*, int64_t, float*, int64_t,
                         __mmask16, bool);
struct BlockTable {
  BlockFn fn[kMaxRows][kMaxPanels];
};

template <Products kProducts, int ROWS, int... P>
constexpr void fill_row(BlockFn (&row)[kMaxPanels], std::integer_sequence<int, P...>) {
  ((row[P] = &block<kProducts, ROWS, P + 1>), ...);
}
template <Products kProducts, int... R>
constexpr BlockTable make_table(std::integer_sequence<int, R...>) {
  BlockTable t{};
  ((fill_row<kProducts, R + 1>(t.fn[R], std::make_integer_sequence<int, kMaxPanels>{})), ...);
  return t;
}
// kBlocks<products>.fn[rows - 1][panels - 1]: every tail shape is a template instance, not a run-time branch.
template <Products kProducts>
constexpr BlockTable kBlocks = make_table<kProducts>(std::make_integer_sequence<int, kMaxRows>{});

}  // namespace

template <Products kProducts>
void panel_gemm(const bf16* a, int64_t lda, int64_t m, int64_t k, const bf16* b, int64_t panel_stride, int64_t width,
                float* c, int64_t ldc, bool accumulate) {
  const int64_t full_pairs = k / 2, pairs = (k + 1) / 2;
  for (int64_t kp0 = 0; kp0 < pairs || kp0 == 0; kp0 += kPairsPerBlock) {
    const int64_t kp1 = kp0 + kPairsPerBlock < pairs ? kp0 + kPairsPerBlock : pairs;
    const bool load_c = accumulate || kp0 > 0;
    for (int64_t n0 = 0; n0 < width; n0 += 16 * kMaxPanels) {
      const int64_t cols = width - n0 < 16 * kMaxPanels ? width - n0 : 16 * kMaxPanels;
      const int panels = int((cols + 15) / 16);
      const __mmask16 last_mask = tail_mask(cols - 16 * (panels - 1));
      const bf16* bp = b + (n0 / 16) * panel_stride;
      for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
        const int rows = int(m - m0 < kMaxRows ? m - m0 : kMaxRows);
        kBlocks<kProducts>.fn[rows - 1][panels - 1](a + m0 * lda, lda, kp0, kp1, full_pairs, bp, panel_stride,
                                                    c + m0 * ldc + n0, ldc, last_mask, load_c);
      }
    }
    if (pairs == 0) break;
  }
}

// ---- elementwise SiLU rows ----

namespace {

// exp(x) to ~1 ulp: x = n ln2 + r with |r| <= ln2/2, degree-6 polynomial for e^r, scaled by 2^n.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.5f)), _mm512_set1_ps(-88.5f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split in two for exactness
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 sigmoid_ps(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

}  // namespace

void silu_mul_row(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out, bf16* h_out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 gv = round_to_bf16(_mm512_maskz_loadu_ps(mask, g + i));
    const __m512 uv = round_to_bf16(_mm512_maskz_loadu_ps(mask, u + i));
    store_f32_as_bf16(g_out + i, gv, mask);
    store_f32_as_bf16(u_out + i, uv, mask);
    store_f32_as_bf16(h_out + i, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid_ps(gv)), uv), mask);
  }
}

float silu_mul_backward_row(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h, bf16* dg,
                            bf16* du) {
  const __m512 one = _mm512_set1_ps(1.0f), wv = _mm512_set1_ps(w);
  __m512 dot = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 gv = load_bf16_as_f32(g + i, mask), uv = load_bf16_as_f32(u + i, mask);
    const __m512 d = _mm512_maskz_loadu_ps(mask, dh_raw + i);
    const __m512 s = sigmoid_ps(gv);
    const __m512 silu = _mm512_mul_ps(gv, s);
    const __m512 hv = round_to_bf16(_mm512_mul_ps(silu, uv));
    _mm512_mask_storeu_ps(h + i, mask, hv);
    dot = _mm512_fmadd_ps(d, hv, dot);
    const __m512 dh = _mm512_mul_ps(wv, d);
    // d silu / dg = s (1 + g (1 - s))
    const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
    store_f32_as_bf16(dg + i, _mm512_mul_ps(_mm512_mul_ps(dh, uv), dsilu), mask);
    store_f32_as_bf16(du + i, _mm512_mul_ps(dh, silu), mask);
  }
  return _mm512_reduce_add_ps(dot);
}

}  // namespace avx512

// ---- rank-r products (see low_rank.h) ----

namespace avx512 {

namespace {

inline __m512 load_f32(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load_f32(const bf16* p, __mmask16 mask) { return load_bf16_as_f32(p, mask); }

// ROWS rows of C x VECS vectors of 16 columns, over all K: A elements broadcast, B rows loaded once per k
// and shared by the ROWS rows.
template <int ROWS, int VECS, class TA, class TB>
void axpy_block(int64_t K, const TA* a, Strided as, const TB* b, int64_t ldb, __mmask16 last, float alpha, float* c,
                int64_t ldc, bool accumulate) {
  __m512 acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[VECS];
    for (int v = 0; v < VECS; ++v) bv[v] = load_f32(b + k * ldb + 16 * v, v == VECS - 1 ? last : __mmask16(0xffff));
    for (int r = 0; r < ROWS; ++r) {
      const __m512 av = _mm512_set1_ps(to_float(a[r * as.row_stride + k * as.col_stride]));
      for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) {
      const __mmask16 mask = v == VECS - 1 ? last : __mmask16(0xffff);
      float* cp = c + r * ldc + 16 * v;
      const __m512 prior = accumulate ? _mm512_maskz_loadu_ps(mask, cp) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(cp, mask, _mm512_fmadd_ps(al, acc[r][v], prior));
    }
}

template <int ROWS, class TA, class TB>
void axpy_rows(int vecs, int64_t K, const TA* a, Strided as, const TB* b, int64_t ldb, __mmask16 last, float alpha,
               float* c, int64_t ldc, bool accumulate) {
  switch (vecs) {
    case 1: return axpy_block<ROWS, 1>(K, a, as, b, ldb, last, alpha, c, ldc, accumulate);
    case 2: return axpy_block<ROWS, 2>(K, a, as, b, ldb, last, alpha, c, ldc, accumulate);
    case 3: return axpy_block<ROWS, 3>(K, a, as, b, ldb, last, alpha, c, ldc, accumulate);
    default: return axpy_block<ROWS, 4>(K, a, as, b, ldb, last, alpha, c, ldc, accumulate);
  }
}

template <class TA, class TB>
void axpy(int64_t M, int64_t N, int64_t K, const TA* a, Strided as, const TB* b, int64_t ldb, float alpha, float* c,
          int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t cols = N - n0 < 64 ? N - n0 : 64;
    const int vecs = int((cols + 15) / 16);
    const __mmask16 last = tail_mask(cols - 16 * (vecs - 1));
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4)
      axpy_rows<4>(vecs, K, a + m0 * as.row_stride, as, b + n0, ldb, last, alpha, c + m0 * ldc + n0, ldc, accumulate);
    for (; m0 < M; ++m0)
      axpy_rows<1>(vecs, K, a + m0 * as.row_stride, as, b + n0, ldb, last, alpha, c + m0 * ldc + n0, ldc, accumulate);
  }
}

// One row of X against up to 16 rows of Y: one accumulator per Y row, reduced at the end.
template <class TY>
void dot(int64_t M, int64_t J, int64_t K, const bf16* x, int64_t ldx, const TY* y, int64_t ldy, float alpha, float* c,
         int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j0 = 0; j0 < J; j0 += 16) {
      const int jn = int(J - j0 < 16 ? J - j0 : 16);
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const __mmask16 mask = tail_mask(K - k0);
        const __m512 xv = load_bf16_as_f32(x + m * ldx + k0, mask);
        for (int j = 0; j < jn; ++j) acc[j] = _mm512_fmadd_ps(xv, load_f32(y + (j0 + j) * ldy + k0, mask), acc[j]);
      }
      for (int j = 0; j < jn; ++j) {
        float* cp = c + m * ldc + j0 + j;
        *cp = (accumulate ? *cp : 0.0f) + alpha * _mm512_reduce_add_ps(acc[j]);
      }
    }
}

}  // namespace

}  // namespace avx512

// ---- re-pairing for d·W (see repack.h) ----

namespace {

// Index vectors for the three levels of a 16x16 bf16 transpose done with VPERMT2W (see repack_block).
struct TransposeIndex {
  __m512i level1[2], level2[2], level3[2];
};

// Element tags: (row, col) of the 16x16 block, encoded row * 16 + col. For each output element of a
// two-source permute, find its tag among the 64 source elements.
void make_index(const int (&a)[32], const int (&b)[32], const int (&want)[32], __m512i* out) {
  alignas(64) int16_t idx[32];
  for (int e = 0; e < 32; ++e) {
    idx[e] = -1;
    for (int s = 0; s < 32 && idx[e] < 0; ++s) {
      if (a[s] == want[e]) idx[e] = int16_t(s);
      else if (b[s] == want[e]) idx[e] = int16_t(32 + s);
    }
  }
  *out = _mm512_load_si512(idx);
}

// Source register t holds pairs along columns: element 2i + b is (row i, col 2t + b).
// Level 1 merges sources (2p, 2p+1), keeping rows [8h, 8h+8) of their 4 columns, ordered (row, col).
// Level 2 merges two level-1 outputs of the same h, keeping rows [8h + 4g, 8h + 4g + 4) of 8 columns.
// Level 3 merges the two level-2 outputs of the same (h, g) into two final registers: row pair j holds
// element 2c + a = (row 2j + a, col c). The tags are relative: they do not depend on p, r or h.
const TransposeIndex& transpose_index() {
  static const TransposeIndex index = [] {
    TransposeIndex t{};
    int s0[32], s1[32];
    for (int e = 0; e < 32; ++e) {
      s0[e] = (e / 2) * 16 + (e % 2);      // source t = 0: cols 0, 1
      s1[e] = (e / 2) * 16 + 2 + (e % 2);  // source t = 1: cols 2, 3
    }
    int l1[2][32];
    for (int h = 0; h < 2; ++h) {
      for (int e = 0; e < 32; ++e) l1[h][e] = (8 * h + e / 4) * 16 + e % 4;
      make_index(s0, s1, l1[h], &t.level1[h]);
    }
    // Level 2 inputs: level-1 outputs for columns 0-3 and 4-7 (same h; use h = 0, rows relative).
    int a2[32], b2[32], l2[2][32];
    for (int e = 0; e < 32; ++e) {
      a2[e] = (e / 4) * 16 + e % 4;
      b2[e] = (e / 4) * 16 + 4 + e % 4;
    }
    for (int g = 0; g < 2; ++g) {
      for (int e = 0; e < 32; ++e) l2[g][e] = (4 * g + e / 8) * 16 + e % 8;
      make_index(a2, b2, l2[g], &t.level2[g]);
    }
    // Level 3 inputs: level-2 outputs for columns 0-7 and 8-15 (rows relative, g = 0).
    int a3[32], b3[32], l3[2][32];
    for (int e = 0; e < 32; ++e) {
      a3[e] = (e / 8) * 16 + e % 8;
      b3[e] = (e / 8) * 16 + 8 + e % 8;
    }
    for (int o = 0; o < 2; ++o) {
      for (int e = 0; e < 32; ++e) l3[o][e] = (2 * o + e % 2) * 16 + e / 2;
      make_index(a3, b3, l3[o], &t.level3[o]);
    }
    return t;
  }();
  return index;
}

// Transposes one 16x16 block: 8 source registers (row-pairs along columns) to 8 outputs (column-pairs
// along rows), 24 two-source permutes. out[j] holds row pair j: element 2c + a = (row 2j + a, column c).
inline void transpose_block(const bf16* src, const TransposeIndex& ix, __m512i (&out)[8]) {
  __m512i s[8], v[4][2], w[2][2][2];
  for (int t = 0; t < 8; ++t) s[t] = _mm512_loadu_si512(src + t * 32);
  for (int p = 0; p < 4; ++p)
    for (int h = 0; h < 2; ++h) v[p][h] = _mm512_permutex2var_epi16(s[2 * p], ix.level1[h], s[2 * p + 1]);
  for (int r = 0; r < 2; ++r)
    for (int h = 0; h < 2; ++h)
      for (int g = 0; g < 2; ++g) w[r][h][g] = _mm512_permutex2var_epi16(v[2 * r][h], ix.level2[g], v[2 * r + 1][h]);
  for (int h = 0; h < 2; ++h)
    for (int g = 0; g < 2; ++g)
      for (int o = 0; o < 2; ++o) out[4 * h + 2 * g + o] = _mm512_permutex2var_epi16(w[0][h][g], ix.level3[o], w[1][h][g]);
}

// Software prefetch of the chunk a block walk reads `ahead` source panels later: the chunks sit a whole
// panel (tens of KiB) apart, too far for the hardware prefetcher to follow.
inline void prefetch_chunk(const PackedMatrix& w, int64_t panel, int64_t c0, int64_t elements) {
  const char* p = reinterpret_cast<const char*>(w.panel(panel) + c0 * PackedMatrix::kPanelRows);
  for (int64_t line = 0; line < elements * int64_t(sizeof(bf16)); line += 64) _mm_prefetch(p + line, _MM_HINT_T0);
}
constexpr int64_t kPrefetchPanels = 2;

}  // namespace

void repack_transposed_avx512(const PackedMatrix& w, int64_t c0, int64_t width, bf16* out) {
  constexpr int64_t P = PackedMatrix::kPanelRows;
  const TransposeIndex& ix = transpose_index();
  const int64_t stride = repacked_panel_stride(w);
  const int64_t out_panels = (width + P - 1) / P, panels = w.padded_rows() / P;
  // Source panel by source panel, so each reads one contiguous chunk (all the output panels' columns).
  for (int64_t panel = 0; panel < panels; ++panel) {
    if (panel + kPrefetchPanels < panels) prefetch_chunk(w, panel + kPrefetchPanels, c0, out_panels * P * P);
    const bf16* src = w.panel(panel) + c0 * P;
    for (int64_t q = 0; q < out_panels; ++q) {
      __m512i t[8];
      transpose_block(src + q * P * P, ix, t);
      bf16* dst = out + q * stride + panel * P * P;
      for (int j = 0; j < 8; ++j) _mm512_storeu_si512(dst + j * 32, t[j]);
    }
  }
}

// ---- the families ----

namespace {

template <avx512::Products kProducts>
void gemm_xwt(const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  const int64_t stride = PackedMatrix::kPanelRows * w.padded_cols();
  avx512::panel_gemm<kProducts>(g.a, g.lda, g.m, w.cols(), w.panel(g.c0 / PackedMatrix::kPanelRows), stride,
                                g.c1 - g.c0, g.c, g.ldc, g.accumulate);
}

// Up to this many rows d·W takes the small-M path (no re-pairing, f32 FMAs); above, the block is re-paired
// once and the panel GEMM runs over it. With VDPBF16PS at a quarter of the FMA rate (measured here) the
// small-M path is the faster one up to the size of its accumulator buffer. With VDPBF16PS at the FMA rate
// (Zen 4) it spends two FMAs where the panel GEMM spends one VDPBF16PS, so it should stop paying off at
// about 4 rows, where the re-pairing's 3 permutes per vector are shared by enough rows (an estimate from
// instruction counts: no such core was at hand).
template <avx512::Products kProducts>
constexpr int64_t kSmallM = kProducts == avx512::Products::fma ? avx512::kXwFewRows : 4;

template <avx512::Products kProducts>
void gemm_xw(const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  if (g.m <= kSmallM<kProducts>) return avx512::gemm_xw_few_rows(g);
  repack_transposed_avx512(w, g.c0, g.c1 - g.c0, g.scratch);
  avx512::panel_gemm<kProducts>(g.a, g.lda, g.m, w.rows(), g.scratch, repacked_panel_stride(w), g.c1 - g.c0, g.c,
                                g.ldc, g.accumulate);
}

template <avx512::Products kProducts>
KernelSet make_family(const char* name) {
  return KernelSet{name, gemm_xwt<kProducts>, gemm_xw<kProducts>, avx512::silu_mul_row,
                   avx512::silu_mul_backward_row,
                   LowRankKernels{avx512::axpy<float, float>, avx512::axpy<float, bf16>, avx512::axpy<bf16, float>,
                                  avx512::axpy<bf16, bf16>, avx512::dot<float>, avx512::dot<bf16>},
                   dequantize_avx512, avx512::gemm_xwt_quantized_few_rows, avx512::gemm_xw_few_rows};
}

}  // namespace

const KernelSet& avx512_bf16_kernels() {
  static const KernelSet set = make_family<avx512::Products::dpbf16>("avx512_bf16");
  return set;
}

const KernelSet& avx512_fma_kernels() {
  static const KernelSet set = make_family<avx512::Products::fma>("avx512_fma");
  return set;
}

}  // namespace moe_sft::kernels

#pragma GCC pop_options
