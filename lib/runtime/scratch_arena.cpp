#include "scratch_arena.h"

#include "runtime/assert.h"
#include "runtime/fault_injection.h"

#include <cstdlib>
#include <cstring>
#include <new>

namespace moe_sft {

namespace {
bool debug_fill_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("MOE_SFT_DEBUG_SCRATCH");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return enabled;
}
}  // namespace

ScratchArena::~ScratchArena() { std::free(data_); }

std::byte* ScratchArena::frame(const ScratchLayout& layout) {
  size_t need = layout.bytes();
  if (need > capacity_) {
    // Grow geometrically so a slowly rising T does not reallocate on every call.
    size_t grown = need + need / 4 + 4096;
    grown = (grown + ScratchLayout::kAlign - 1) / ScratchLayout::kAlign * ScratchLayout::kAlign;
    void* p = fault_injection::allocation_fails() ? nullptr : std::aligned_alloc(ScratchLayout::kAlign, grown);
    if (p == nullptr) throw std::bad_alloc();
    std::free(data_);
    data_ = static_cast<std::byte*>(p);
    capacity_ = grown;
  }
  MOE_SFT_ASSERT(MOE_SFT_ALIGNED(data_, ScratchLayout::kAlign));
  if (debug_fill_enabled() && need > 0) std::memset(data_, 0xff, need);  // 0xffff.. is NaN in f32 and bf16
  return data_;
}

}  // namespace moe_sft
