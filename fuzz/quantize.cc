// Fuzz target: moe_sft_quantize for every format (and invalid ones) on fuzzed bf16 matrices (any bit
// pattern), shapes and group sizes. Checks: on error nothing written (canaries) and a message; on success the
// codes are in range and the documented dequantization (moe_sft_weight_format) reconstructs every element to
// within half a quantization step (plus f32 rounding); a second call gives the same bits.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "fuzz_input.h"
#include "moe_sft.h"

using namespace moe_sft_fuzz;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzInput in(data, size);
  const int format = int(in.range(-1, 4));
  static const int32_t groups[] = {0, 2, 4, 8, 16, 6, 3, -2, 32};
  const int32_t g = in.pick(groups);
  const int64_t rows = in.range(0, 9) == 0 ? in.range(-2, 0) : in.range(1, 8);
  const int64_t cols = in.range(0, 9) == 0 ? in.range(-2, 0) : in.range(1, 40);
  const size_t n = size_t(std::max<int64_t>(rows, 0) * std::max<int64_t>(cols, 0));
  const bool raw_bits = in.flag();
  std::vector<uint16_t> w(n);
  for (auto& v : w) v = raw_bits ? in.raw<uint16_t>() : bf16_bits(in.range(0, 15) == 0 ? in.value() : in.value() * 0.1f);
  // Output blocks large enough for any format's layout of this shape.
  std::vector<uint8_t> q[2] = {canary<uint8_t>(n + 1), canary<uint8_t>(n + 1)};
  std::vector<float> scale[2] = {canary<float>(n + 1), canary<float>(n + 1)};
  std::vector<uint8_t> zero[2] = {canary<uint8_t>(n + 1), canary<uint8_t>(n + 1)};
  const bool pass_zero = in.flag();
  moe_sft_status st[2];
  for (int k = 0; k < 2; ++k)
    st[k] = moe_sft_quantize(moe_sft_weight_format(format), g, rows, cols, w.data(), q[k].data(), scale[k].data(),
                             pass_zero ? zero[k].data() : nullptr);
  FUZZ_CHECK(st[0] == st[1], "quantize: two calls gave %d and %d", int(st[0]), int(st[1]));
  if (st[0] != MOE_SFT_OK) {
    FUZZ_CHECK(moe_sft_last_error()[0] != '\0', "quantize failed with %d and no message", int(st[0]));
    FUZZ_CHECK(is_canary(q[0]) && is_canary(scale[0]) && is_canary(zero[0]), "failed quantize (%d) wrote", int(st[0]));
    return 0;
  }
  FUZZ_CHECK(same_bits(q[0], q[1]) && same_bits(scale[0], scale[1]) && same_bits(zero[0], zero[1]),
             "quantize: two calls differ");
  FUZZ_CHECK(format == MOE_SFT_WEIGHT_INT8 || format == MOE_SFT_WEIGHT_INT4_AWQ, "quantize accepted format %d", format);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float x = bf16_value(w[size_t(r * cols + c)]);
      FUZZ_CHECK(std::isfinite(x), "quantize accepted w[%lld, %lld] = %g", (long long)r, (long long)c, double(x));
      float s;
      double deq;  // in double: at bf16's extremes the format's own f32 product can overflow (see the test)
      if (format == MOE_SFT_WEIGHT_INT8) {
        const int code = int8_t(q[0][size_t(r * cols + c)]);
        s = scale[0][size_t(r)];
        FUZZ_CHECK(code >= -127 && code <= 127, "int8 code %d", code);
        deq = double(code) * s;
      } else {
        const int64_t gi = r * (cols / g) + c / g;
        const int code = (q[0][size_t((r * cols + c) / 2)] >> (4 * (c % 2))) & 0xF;
        const int z = zero[0][size_t(gi)];
        s = scale[0][size_t(gi)];
        FUZZ_CHECK(z <= 15, "zero point %d", z);
        deq = double(code - z) * s;
      }
      FUZZ_CHECK(std::isfinite(s) && s > 0.0f, "scale %g", double(s));
      const double err = std::fabs(deq - double(x)), bound = 0.5 * s * (1 + 1e-5) + 1e-6 * std::fabs(x);
      FUZZ_CHECK(err <= bound, "w[%lld, %lld] = %g comes back as %g (scale %g)", (long long)r, (long long)c,
                 double(x), double(deq), double(s));
    }
  return 0;
}
