// d·W for a few rows of A straight from the packed panels, for every weight format (KernelSet::xw_few_rows
// and xw_quantized_few_rows; avx512.h). No re-pairing of W and no dequantized copy of it:
//
// A packed vector holds 16 contraction rows n of one column pair. Widened to f32 (bf16: the low halves
// shifted up for the even column, the high halves masked for the odd one; int8/int4: the codes converted
// exactly), it is multiplied by the 16 matching A values of a row with f32 FMAs, and the lanes stay over
// n for the whole contraction: they are summed once per output element at the end. So W is never
// transposed (24 two-source word permutes per 16x16 block, what the re-pairing costs). Products are exact
// in f32, as VDPBF16PS's are.
//
// Quantized W (packed_matrix.h): W[n, c] = code·scale[n, g] + bias[n, g], g = c's group. The scale is folded
// into A (A[n]·scale[n, g], one vector product per panel and group), so the inner loop is the bf16 one on
// codes; the bias adds Σ_n A[n]·bias[n, g] to every column of group g, accumulated beside.
//
// One pass reads each panel's slice of the task's columns once, front to back, a group of G panels side by
// side; the 16-lane accumulators of every (row, column) live in an L1 buffer, loaded and stored once per
// group of panels. Nothing is read twice, so no cache has to hold a slice: the slices of consecutive panels
// sit a multiple of 4 KiB apart and would all compete for the same few cache sets.
//
#include "kernels/avx512/avx512.h"
#include "kernels/avx512/target.h"
#include "runtime/assert.h"

MOE_SFT_AVX512_BEGIN
#include <immintrin.h>

#include "kernels/avx512/vector.h"

namespace moe_sft::kernels::avx512 {

namespace {

constexpr int64_t P = PackedMatrix::kPanelRows;
// Scale groups a task's kColBlock columns can touch: whole groups inside, plus one cut at each end.
constexpr int64_t kMaxGroups = kColBlock / kFewRowsGroupMultiple + 1;

// Where the 16-lane sums go: acc[row][column] and, for formats with a bias, bias[row][group - first_group].
struct Accumulators {
  float (*acc)[kColBlock][16];
  float (*bias)[kMaxGroups][16];
  int64_t first_group;
};

// Prefetches the next group's slices into L2, a few lines per column pair, so they arrive spread out.
struct GroupPrefetch {
  const char* base;
  int64_t stride, lines_per_panel, lines, next;
  void issue(int64_t n) {
    for (const int64_t end = next + n < lines ? next + n : lines; next < end; ++next)
      _mm_prefetch(base + (next / lines_per_panel) * stride + (next % lines_per_panel) * 64, _MM_HINT_T1);
  }
};

// Bytes of one panel of the packed data, and the first byte of pair kp's slice in panel p.
int64_t panel_bytes(const PackedMatrix& w) {
  return w.format() == WeightFormat::bf16 ? P * w.padded_cols() * int64_t(sizeof(bf16)) : w.panel_code_bytes();
}
const char* slice(const PackedMatrix& w, int64_t p, int64_t kp) {
  if (w.format() == WeightFormat::bf16) return reinterpret_cast<const char*>(w.panel(p) + kp * 2 * P);
  return reinterpret_cast<const char*>(w.codes(p)) + (is_int4(w.format()) ? (kp / 4) * 4 * P : kp * 2 * P);
}

// Pair kp of a panel (`panel`: its packed data) as f32 values (bf16) or exact codes (quantized): lanes over
// the panel's 16 rows, the even column's in `even`, the odd column's in `odd`.
template <WeightFormat F>
inline void load_pair(const uint8_t* panel, int64_t kp, __m512& even, __m512& odd) {
  if constexpr (F == WeightFormat::bf16) {
    const __m512i v = _mm512_loadu_si512(panel + kp * 2 * P * int64_t(sizeof(bf16)));
    even = low_half_f32(v);
    odd = high_half_f32(v);
  } else if constexpr (F == WeightFormat::int8) {  // one signed byte per element, in bf16 lane order
    const __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + kp * 2 * P)));
    even = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 16));
    odd = _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 16));
  } else {  // int4: pair kp's nibble of every 16-bit word of its unit
    const __m512i unit = _mm512_loadu_si512(panel + (kp / 4) * 4 * P);
    const __m512i v = _mm512_srl_epi16(unit, _mm_cvtsi32_si128(int(4 * (kp % 4))));
    const __m512i nibble = _mm512_set1_epi32(0xF);
    even = _mm512_cvtepi32_ps(_mm512_and_si512(v, nibble));
    odd = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 16), nibble));
  }
}

template <WeightFormat F>
constexpr bool kHasBias = F == WeightFormat::int4_awq || F == WeightFormat::int4_k2;

// Panels [p0, p0 + G), the task's pairs [kp0, kp0 + pairs), ROWS rows of a_f32 (A in f32, from panel p0's row).
template <WeightFormat F, int ROWS, int G>
void xw_group(const float* a_f32, int64_t ld_a_f32, const PackedMatrix& w, int64_t p0, int64_t kp0, int64_t pairs,
              const Accumulators& out, GroupPrefetch prefetch) {
  const int64_t prefetch_per_pair = prefetch.lines / (pairs > 0 ? pairs : 1) + 1;
  const uint8_t* panel[G];  // (locals: nothing the loop stores can alias them)
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) panel[g] = reinterpret_cast<const uint8_t*>(slice(w, p0 + g, 0));
  float (*const acc)[kColBlock][16] = out.acc;
  for (int64_t kp = 0; kp < pairs;) {
    // A for this run of pairs: as is for bf16; times the group's scale for quantized W (one run per group).
    __m512 d[G][ROWS];
    int64_t run_end = pairs;
    if constexpr (F == WeightFormat::bf16) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; ++r) d[g][r] = _mm512_loadu_ps(a_f32 + r * ld_a_f32 + g * P);
    } else {
      const int64_t group = 2 * (kp0 + kp) / w.group(), group_end = ((group + 1) * w.group() + 1) / 2 - kp0;
      run_end = group_end < pairs ? group_end : pairs;
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const __m512 scale = group_scale(w, p0 + g, group);
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; ++r) d[g][r] = _mm512_mul_ps(_mm512_loadu_ps(a_f32 + r * ld_a_f32 + g * P), scale);
        if constexpr (kHasBias<F>) {
          const __m512 bias = group_bias(w, p0 + g, group, scale);
          for (int r = 0; r < ROWS; ++r) {
            float* b = out.bias[r][group - out.first_group];
            _mm512_store_ps(b, _mm512_fmadd_ps(_mm512_loadu_ps(a_f32 + r * ld_a_f32 + g * P), bias, _mm512_load_ps(b)));
          }
        }
      }
    }
    for (; kp < run_end; ++kp) {
      prefetch.issue(prefetch_per_pair);
      __m512 even[G], odd[G];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) load_pair<F>(panel[g], kp0 + kp, even[g], odd[g]);
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        float* sums = acc[r][2 * kp];
        __m512 e = _mm512_load_ps(sums), o = _mm512_load_ps(sums + 16);
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
          e = _mm512_fmadd_ps(d[g][r], even[g], e);
          o = _mm512_fmadd_ps(d[g][r], odd[g], o);
        }
        _mm512_store_ps(sums, e);
        _mm512_store_ps(sums + 16, o);
      }
    }
  }
}

// All panels for ROWS rows: groups of G (as many as the registers hold A values for), then single panels.
template <WeightFormat F, int ROWS>
void xw_panels(const float* a_f32, int64_t ld_a_f32, const PackedMatrix& w, int64_t kp0, int64_t pairs,
               const Accumulators& out) {
  constexpr int G = ROWS <= 4 ? 4 : 2;
  const int64_t panels = (w.rows() + P - 1) / P;
  const int64_t slice_bytes = slice(w, 0, kp0 + pairs - 1) + 64 - slice(w, 0, kp0);
  const int64_t lines_per_panel = (slice_bytes + 63) / 64;
  int64_t p = 0;
  for (; p + G <= panels; p += G) {
    const int64_t ahead = panels - p - G < G ? panels - p - G : G;
    GroupPrefetch prefetch{slice(w, p + G, kp0), panel_bytes(w), lines_per_panel, ahead * lines_per_panel, 0};
    xw_group<F, ROWS, G>(a_f32 + p * P, ld_a_f32, w, p, kp0, pairs, out, prefetch);
  }
  for (; p < panels; ++p) {
    GroupPrefetch none{nullptr, 0, 1, 0, 0};
    xw_group<F, ROWS, 1>(a_f32 + p * P, ld_a_f32, w, p, kp0, pairs, out, none);
  }
}

using PanelsFn = void (*)(const float*, int64_t, const PackedMatrix&, int64_t, int64_t, const Accumulators&);
template <WeightFormat F>
struct PanelsInstances {
  template <int ROWS, int>
  static constexpr PanelsFn at() { return &xw_panels<F, ROWS>; }
};
// kPanels<format>.fn[rows - 1][0]
template <WeightFormat F>
constexpr auto kPanels = Instances<PanelsInstances<F>, PanelsFn, int(kXwFewRows), 1>;

PanelsFn panels_fn(WeightFormat f, int64_t rows) {
  switch (f) {
    case WeightFormat::bf16: return kPanels<WeightFormat::bf16>.fn[rows - 1][0];
    case WeightFormat::int8: return kPanels<WeightFormat::int8>.fn[rows - 1][0];
    case WeightFormat::int4_awq: return kPanels<WeightFormat::int4_awq>.fn[rows - 1][0];
    case WeightFormat::int4_k2: return kPanels<WeightFormat::int4_k2>.fn[rows - 1][0];
  }
  return nullptr;
}

}  // namespace

// A's rows widened to f32, each padded to whole panels.
int64_t xw_few_rows_scratch_elems(int64_t rows, int64_t w_rows) {
  return rows * ((w_rows + P - 1) / P * P) * int64_t(sizeof(float) / sizeof(bf16));
}

// A widened to f32 in scratch (zeros past W's rows, so the panels' zero padding rows never meet stale
// values), the one pass, and one lane sum per output element.
void gemm_xw_few_rows(const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  MOE_SFT_ASSERT(g.m <= kXwFewRows && g.c1 - g.c0 <= kColBlock);
  MOE_SFT_ASSERT(g.scratch_elems < 0 || g.scratch_elems >= xw_few_rows_scratch_elems(g.m, w.rows()));
  MOE_SFT_ASSERT(w.format() == WeightFormat::bf16 || w.group() % kFewRowsGroupMultiple == 0);
  if (g.m == 0) return;
  const int64_t panels = (w.rows() + P - 1) / P, ld_a_f32 = panels * P, width = g.c1 - g.c0, pairs = (width + 1) / 2;
  float* a_f32 = reinterpret_cast<float*>(g.scratch);
  for (int64_t r = 0; r < g.m; ++r) {
    for (int64_t n = 0; n < w.rows(); ++n) a_f32[r * ld_a_f32 + n] = to_float(g.a[r * g.lda + n]);
    for (int64_t n = w.rows(); n < ld_a_f32; ++n) a_f32[r * ld_a_f32 + n] = 0.0f;
  }
  alignas(64) float acc[kXwFewRows][kColBlock][16];
  alignas(64) float bias[kXwFewRows][kMaxGroups][16];
  const bool quantized = w.format() != WeightFormat::bf16;
  const int64_t first_group = quantized ? g.c0 / w.group() : 0;
  const int64_t groups = quantized ? (g.c1 - 1) / w.group() - first_group + 1 : 0;
  MOE_SFT_ASSERT(groups <= kMaxGroups);
  for (int64_t r = 0; r < g.m; ++r) {
    for (int64_t j = 0; j < 2 * pairs; ++j) _mm512_store_ps(acc[r][j], _mm512_setzero_ps());
    for (int64_t j = 0; j < groups; ++j) _mm512_store_ps(bias[r][j], _mm512_setzero_ps());
  }
  panels_fn(w.format(), g.m)(a_f32, ld_a_f32, w, g.c0 / 2, pairs, Accumulators{acc, bias, first_group});
  for (int64_t r = 0; r < g.m; ++r)
    for (int64_t j = 0; j < width; ++j) {
      float sum = _mm512_reduce_add_ps(_mm512_load_ps(acc[r][j]));
      if (quantized) sum += _mm512_reduce_add_ps(_mm512_load_ps(bias[r][(g.c0 + j) / w.group() - first_group]));
      float* cp = g.c + r * g.ldc + j;
      *cp = g.accumulate ? *cp + sum : sum;
    }
}

}  // namespace moe_sft::kernels::avx512

MOE_SFT_AVX512_END
