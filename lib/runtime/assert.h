// MOE_SFT_ASSERT(cond): checks a precondition that only a bug inside the library can break (a kernel's
// column block, a scratch size, an alignment). Built with -DMOE_SFT_ASSERTS=ON (CMake; the sanitizer CI
// build turns it on) a failed check prints the condition and its place and aborts: it is a test build.
// Otherwise it compiles to nothing (the condition is not evaluated) and never aborts.
//
// Safe inside a kernel file's target region: it expands to a call of a function defined outside it.
#pragma once

namespace moe_sft {
[[noreturn]] void assert_failed(const char* condition, const char* file, int line);
}  // namespace moe_sft

#if defined(MOE_SFT_ASSERTS) && MOE_SFT_ASSERTS
#define MOE_SFT_ASSERT(cond) \
  (__builtin_expect(!!(cond), 1) ? void(0) : ::moe_sft::assert_failed(#cond, __FILE__, __LINE__))
#else
#define MOE_SFT_ASSERT(cond) static_cast<void>(sizeof(!(cond)))  // type-checked, never evaluated
#endif

// Whether p sits on an `alignment`-byte boundary (for MOE_SFT_ASSERT).
#define MOE_SFT_ALIGNED(p, alignment) (reinterpret_cast<__UINTPTR_TYPE__>(p) % (alignment) == 0)
