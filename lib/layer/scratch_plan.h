// A pass's temporaries, each declared once: place(pointer, count) reserves its own aligned range in the
// pass's ScratchLayout, and bind(base) points every placed pointer into the arena frame. The whole layout
// is known before the frame is taken, so no temporary can overlap another and a failure to get memory
// happens before the first write to the caller's arrays.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "runtime/scratch_arena.h"

namespace moe_sft::layer {

class ScratchPlan {
 public:
  template <class T>
  void place(T*& pointer, int64_t count) {
    places_.push_back({layout_.add<T>(size_t(count)).offset, &pointer, &point<T>});
  }
  const ScratchLayout& layout() const { return layout_; }
  void bind(std::byte* base) const {
    for (const Place& p : places_) p.point(p.pointer, base + p.offset);
  }

 private:
  template <class T>
  static void point(void* pointer, std::byte* at) {
    *static_cast<T**>(pointer) = reinterpret_cast<T*>(at);
  }
  struct Place {
    size_t offset;
    void* pointer;
    void (*point)(void*, std::byte*);
  };
  ScratchLayout layout_;
  std::vector<Place> places_;
};

}  // namespace moe_sft::layer
