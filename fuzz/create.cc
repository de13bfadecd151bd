// Fuzz target: moe_sft_create from a fuzzed config. Every field is drawn from its valid range, its edges and
// beyond; struct_size from the published sizes, a newer caller's longer struct (zero or non-zero tail) and
// arbitrary values, in a block of exactly that many bytes; weight, scale and zero pointers are NULL,
// misaligned or small buffers of fuzzed bytes (large enough for any layout of the drawn shape, so a read
// past a real caller's array would be an ASan report). Checks: the call never crashes; on error *out is
// NULL and the message is set; on success the layer runs a forward after the caller freed its arrays.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "fuzz_input.h"
#include "moe_sft.h"

using moe_sft_fuzz::FuzzInput;

namespace {

constexpr int64_t kMaxBufferElements = 4 * 64 * 64;  // E * I * H above this: weight pointers stay NULL

int32_t dimension(FuzzInput& in) {
  static const int32_t extremes[] = {0, -1, INT32_MIN, INT32_MAX, 1 << 20, 65536};
  return in.range(0, 15) == 0 ? in.pick(extremes) : int32_t(in.range(1, 64));
}

// A buffer for one pointer field, or NULL / misaligned, per the fuzz input.
const void* buffer_field(FuzzInput& in, std::vector<std::unique_ptr<uint8_t[]>>& keep, size_t bytes, bool small) {
  const uint8_t how = in.raw<uint8_t>() % 8;
  if (how == 0 || bytes == 0) return nullptr;
  auto block = std::make_unique<uint8_t[]>(bytes + 8);
  const uint8_t fill = in.raw<uint8_t>();
  const uint8_t mask = small ? 0x0F : 0xFF;  // zero points in [0, 15] and small bf16 exponents, mostly
  for (size_t i = 0; i < bytes + 8; ++i) block[i] = uint8_t((fill * 131 + i * 29 + (i >> 3)) & mask);
  const uint8_t* p = block.get() + (how == 1 ? 1 : 0);  // 1: misaligned
  keep.push_back(std::move(block));
  return p;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzInput in(data, size);
  moe_sft_config cfg;
  moe_sft_config_init(&cfg);
  cfg.expert_num = dimension(in);
  cfg.hidden_size = dimension(in);
  cfg.intermediate_size = dimension(in);
  cfg.lora_rank = int32_t(in.range(-2, 8));
  cfg.lora_alpha = in.value();
  static const int32_t depths[] = {0, 1, 2, 3, -1, INT32_MAX};
  cfg.max_cache_depth = in.pick(depths);
  static const int32_t threads[] = {0, 1, 2, 3, -1, 4097};
  cfg.num_threads = in.pick(threads);
  static const int32_t tp[] = {1, 2, 3, 4, 0, -1, 8, INT32_MAX};
  cfg.tp_count = in.pick(tp);
  cfg.check_finite = int32_t(in.range(0, 2));
  cfg.weight_format = moe_sft_weight_format(in.range(-1, 4));
  static const int32_t groups[] = {0, 2, 4, 8, 16, 32, 3, -2, 64};
  cfg.group_size = in.pick(groups);
  cfg.prequantized = int32_t(in.range(0, 2));

  const int64_t E = cfg.expert_num, H = cfg.hidden_size, I = cfg.intermediate_size;
  const bool small = E >= 1 && H >= 1 && I >= 1 && E <= 64 && H <= 64 && I <= 64 && E * H * I <= kMaxBufferElements;
  // Enough bytes for every layout of any format (at most 4 bytes per weight, scales and zeros included).
  const size_t bytes = small ? size_t(E * H * I * 4) : 0;
  std::vector<std::unique_ptr<uint8_t[]>> keep;
  const bool small_values = in.flag();
  cfg.gate_proj = buffer_field(in, keep, bytes, small_values);
  cfg.up_proj = buffer_field(in, keep, bytes, small_values);
  cfg.down_proj = buffer_field(in, keep, bytes, small_values);
  const bool scales = in.flag();
  if (scales) {
    cfg.gate_scale = buffer_field(in, keep, bytes, small_values);
    cfg.up_scale = buffer_field(in, keep, bytes, small_values);
    cfg.down_scale = buffer_field(in, keep, bytes, small_values);
  }
  if (in.flag()) {
    cfg.gate_zero = static_cast<const uint8_t*>(buffer_field(in, keep, bytes, true));
    cfg.up_zero = static_cast<const uint8_t*>(buffer_field(in, keep, bytes, true));
    cfg.down_zero = static_cast<const uint8_t*>(buffer_field(in, keep, bytes, true));
  }

  // struct_size: the published versions' sizes, a newer caller's, or anything; the block holds exactly that.
  const size_t v1 = offsetof(moe_sft_config, down_proj) + sizeof(void*);
  const size_t v2 = (offsetof(moe_sft_config, check_finite) + 4 + alignof(moe_sft_config) - 1) /
                    alignof(moe_sft_config) * alignof(moe_sft_config);
  const size_t sizes[] = {sizeof(moe_sft_config), v1, v2, 0, sizeof(moe_sft_config) + 8, sizeof(moe_sft_config) + 64,
                          size_t(in.range(1, 300))};
  const size_t struct_size = in.pick(sizes);
  const bool dirty_tail = in.flag();
  const size_t block_size = std::max(struct_size, sizeof(size_t));
  std::unique_ptr<uint8_t[]> block(new uint8_t[block_size]);
  std::memset(block.get(), 0, block_size);
  cfg.struct_size = struct_size;
  std::memcpy(block.get(), &cfg, std::min(block_size, sizeof cfg));
  if (dirty_tail && block_size > sizeof cfg) block[block_size - 1] = 1;

  moe_sft_layer* layer = reinterpret_cast<moe_sft_layer*>(&cfg);  // must be overwritten
  const moe_sft_status status = moe_sft_create(reinterpret_cast<const moe_sft_config*>(block.get()), &layer);
  if (status != MOE_SFT_OK) {
    FUZZ_CHECK(layer == nullptr, "create failed with %d but left *out set", int(status));
    FUZZ_CHECK(moe_sft_last_error()[0] != '\0', "create failed with %d and no message", int(status));
    FUZZ_CHECK(status == MOE_SFT_ERR_INVALID_ARGUMENT || status == MOE_SFT_ERR_UNSUPPORTED ||
                   status == MOE_SFT_ERR_NON_FINITE || status == MOE_SFT_ERR_OUT_OF_MEMORY,
               "create failed with unexpected status %d", int(status));
    return 0;
  }
  FUZZ_CHECK(layer != nullptr && small, "create succeeded on E=%lld H=%lld I=%lld", (long long)E, (long long)H,
             (long long)I);
  keep.clear();  // the caller may free its arrays once create returned
  const int64_t ids[2] = {0, int64_t(E - 1)};
  const float weights[2] = {0.5f, 0.25f};
  std::vector<uint16_t> x(size_t(2 * H), 0x3f80), y(size_t(2 * H));
  const moe_sft_status fwd = moe_sft_forward(layer, 2, 1, ids, weights, x.data(), y.data(), 0);
  FUZZ_CHECK(fwd == MOE_SFT_OK || fwd == MOE_SFT_ERR_NON_FINITE, "forward on a created layer gave %d", int(fwd));
  moe_sft_destroy(layer);
  return 0;
}
