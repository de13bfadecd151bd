// d·W's re-pairing of a block of W (repack.h) as a 16x16 bf16 transpose per block: three levels of
// two-source word permutes (VPERMT2W), 24 per block.
#include "kernels/avx512/avx512.h"
#include "kernels/avx512/target.h"
#include "kernels/repack.h"
#include "runtime/assert.h"

MOE_SFT_AVX512_BEGIN
#include <immintrin.h>

#include "kernels/avx512/vector.h"

namespace moe_sft::kernels {

namespace avx512 {

namespace {

// Index vectors for the three levels of a 16x16 bf16 transpose done with VPERMT2W (see transpose_block).
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
//
// Every level's inputs are two registers whose 32 elements are rows of `width` columns side by side (2, 4,
// then 8 columns); side_by_side tags them: a holds columns [0, width), b columns [width, 2 width).
void side_by_side(int width, int (&a)[32], int (&b)[32]) {
  for (int e = 0; e < 32; ++e) {
    a[e] = (e / width) * 16 + e % width;
    b[e] = a[e] + width;
  }
}

const TransposeIndex& transpose_index() {
  static const TransposeIndex index = [] {
    TransposeIndex t{};
    int a[32], b[32], want[32];
    // Levels 1 and 2: rows of `width` columns in, the upper (h = 0) or lower (h = 1) half of the rows of
    // 2 width columns out.
    __m512i* const levels[2] = {t.level1, t.level2};
    for (int level = 0, width = 2; level < 2; ++level, width *= 2) {
      side_by_side(width, a, b);
      const int out_width = 2 * width, out_rows = 32 / out_width;
      for (int h = 0; h < 2; ++h) {
        for (int e = 0; e < 32; ++e) want[e] = (out_rows * h + e / out_width) * 16 + e % out_width;
        make_index(a, b, want, &levels[level][h]);
      }
    }
    // Level 3: rows of 8 columns in, row pair j of the block out (element 2c + a = (row 2j + a, col c)).
    side_by_side(8, a, b);
    for (int o = 0; o < 2; ++o) {
      for (int e = 0; e < 32; ++e) want[e] = (2 * o + e % 2) * 16 + e / 2;
      make_index(a, b, want, &t.level3[o]);
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

void repack_transposed(const PackedMatrix& w, int64_t c0, int64_t width, bf16* out) {
  constexpr int64_t P = PackedMatrix::kPanelRows;
  MOE_SFT_ASSERT(repack_block_ok(w, c0, width));
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

}  // namespace avx512

}  // namespace moe_sft::kernels

MOE_SFT_AVX512_END
