// MOE_SFT_FAULT_INJECTION builds only (see fault_injection.h). The library's own operator new and delete,
// bound inside libmoe_sft by -Bsymbolic-functions (CMakeLists.txt) so that the library's calls reach them
// whatever the host process defines (a sanitizer's runtime, loaded first, keeps serving the rest of the
// process): every allocation a std container makes in library code passes through allocation_fails().
// Counting happens only while armed, so allocations of the host that land here outside a sweep cost nothing.
#include "runtime/fault_injection.h"

#include <atomic>
#include <cstdlib>
#include <new>

namespace moe_sft::fault_injection {

namespace {
std::atomic<bool> armed{false};
std::atomic<int64_t> fail_at{0};
std::atomic<int64_t> counted{0};
}  // namespace

bool allocation_fails() {
  if (!armed.load(std::memory_order_acquire)) return false;
  const int64_t n = counted.fetch_add(1, std::memory_order_acq_rel) + 1;
  return n == fail_at.load(std::memory_order_relaxed);
}

}  // namespace moe_sft::fault_injection

extern "C" {

__attribute__((visibility("default"))) void moe_sft_fault_arm(int64_t n) {
  using namespace moe_sft::fault_injection;
  fail_at.store(n, std::memory_order_relaxed);
  counted.store(0, std::memory_order_relaxed);
  armed.store(true, std::memory_order_release);
}

__attribute__((visibility("default"))) void moe_sft_fault_disarm(void) {
  moe_sft::fault_injection::armed.store(false, std::memory_order_release);
}

__attribute__((visibility("default"))) int64_t moe_sft_fault_count(void) {
  return moe_sft::fault_injection::counted.load(std::memory_order_acquire);
}

}  // extern "C"

namespace {

void* checked(void* p) {
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

void* allocate(std::size_t n) noexcept {
  if (moe_sft::fault_injection::allocation_fails()) return nullptr;
  return std::malloc(n == 0 ? 1 : n);
}

void* allocate_aligned(std::size_t n, std::align_val_t align) noexcept {
  if (moe_sft::fault_injection::allocation_fails()) return nullptr;
  const std::size_t a = std::size_t(align);
  return std::aligned_alloc(a, (n + a - 1) / a * a + (n == 0 ? a : 0));
}

}  // namespace

void* operator new(std::size_t n) { return checked(allocate(n)); }
void* operator new[](std::size_t n) { return checked(allocate(n)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void* operator new(std::size_t n, std::align_val_t a) { return checked(allocate_aligned(n, a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return checked(allocate_aligned(n, a)); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
