// Scratch arena: one buffer for the per-call temporaries of every layer in the process, grown to the largest
// request seen.
//
// Two temporaries of one call must never share bytes, and nothing may be allocated once a call has begun
// writing its outputs. So a call first describes all its temporaries in a ScratchLayout, which gives each
// one its own aligned, non-overlapping range, and only then asks the arena for the total. Nothing that must
// outlive a call (packed weights, forward caches) ever lives here. With MOE_SFT_DEBUG_SCRATCH=1 every fresh
// frame is filled with NaN bytes, so a read of a temporary that was never written shows up in the results.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe_sft {

template <class T>
struct ScratchSlot {
  size_t offset = 0;
  size_t count = 0;
  T* in(std::byte* base) const { return reinterpret_cast<T*>(base + offset); }
};

class ScratchLayout {
 public:
  static constexpr size_t kAlign = 64;  // a cache line: no two temporaries share one

  template <class T>
  ScratchSlot<T> add(size_t count) {
    ScratchSlot<T> slot{bytes_, count};
    bytes_ += (count * sizeof(T) + kAlign - 1) / kAlign * kAlign;
    return slot;
  }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_ = 0;
};

class ScratchArena {
 public:
  ScratchArena() = default;
  ~ScratchArena();
  ScratchArena(const ScratchArena&) = delete;
  ScratchArena& operator=(const ScratchArena&) = delete;

  // Base of a frame of at least layout.bytes() bytes, valid until the next frame() call. Contents are
  // undefined (NaN in debug mode). Throws std::bad_alloc when it cannot grow.
  std::byte* frame(const ScratchLayout& layout);

 private:
  std::byte* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace moe_sft
