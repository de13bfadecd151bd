// Run-time choice of the kernel family: the best one the CPU and OS support, or the one MOE_SFT_ISA forces
// (tests, benchmarks), failing clearly when this machine cannot run it.
#include <cstdlib>
#include <iterator>
#include <string>

#include "kernels/amx/amx.h"
#include "kernels/avx512/avx512.h"
#include "kernels/gemm.h"
#include "kernels/generic/generic.h"
#include "runtime/cpu_features.h"
#include "runtime/error.h"

namespace moe_sft::kernels {

namespace {

const KernelSet* amx_native(const char** why_not) {
  return amx_native_usable(why_not) ? &amx_native_kernels() : nullptr;
}

const KernelSet* avx512_bf16(const char** why_not) {
  const CpuFeatures& f = cpu_features();
  if (!f.avx512_bf16_usable()) {
    *why_not = f.os_avx512 || !f.avx512f ? "this CPU lacks one of AVX-512 F/BW/VL/DQ/BF16 or FMA (CPUID)"
                                          : "the OS does not enable AVX-512 state (XCR0)";
    return nullptr;
  }
  return &avx512_bf16_kernels();
}

// The FMA-products variant of the AVX-512 family: it runs wherever avx512_bf16 does.
const KernelSet* avx512_fma(const char** why_not) {
  return avx512_bf16(why_not) != nullptr ? &avx512_fma_kernels() : nullptr;
}

bool always() { return true; }
bool never() { return false; }

const KernelSet* amx_emulated(const char**) { return &amx_emulated_kernels(); }
const KernelSet* generic(const char**) { return &generic_kernels(); }

struct Family {
  const char* name;
  const KernelSet* (*get)(const char** why_not);
  // Considered without MOE_SFT_ISA when this says so (the emulation is a test vehicle, never chosen by
  // itself; avx512_fma is chosen over avx512_bf16 where it measures faster).
  bool (*automatic)();
};

// Best first.
const Family kFamilies[] = {
    {"amx", amx_native, always},
    {"avx512_fma", avx512_fma, vdpbf16ps_is_slow},
    {"avx512_bf16", avx512_bf16, always},
    {"amx-emulated", amx_emulated, never},
    {"generic", generic, always},
};

// MOE_SFT_MAX_ISA=NAME (like oneDNN's ONEDNN_MAX_CPU_ISA) makes every family listed before NAME unusable, as if
// this machine lacked it: the automatic choice skips them and MOE_SFT_ISA naming one is UNSUPPORTED. Tests use
// it to run the "cannot run here" path on machines that run every family.
const Family* capped_above(const char** cap_name) {
  const char* cap = std::getenv("MOE_SFT_MAX_ISA");
  *cap_name = cap;
  if (cap == nullptr || cap[0] == '\0') return kFamilies;
  for (const Family& f : kFamilies)
    if (std::string(f.name) == cap) return &f;
  std::string known;
  for (const Family& f : kFamilies) known += known.empty() ? f.name : std::string(", ") + f.name;
  throw Error(MOE_SFT_ERR_INVALID_ARGUMENT,
              std::string("MOE_SFT_MAX_ISA=") + cap + " is not a kernel family (known: " + known + ")");
}

}  // namespace

const KernelSet& select_kernels() {
  const char* cap_name = nullptr;
  const Family* first_usable = capped_above(&cap_name);
  const char* forced = std::getenv("MOE_SFT_ISA");
  const char* why_not = "";
  if (forced == nullptr || forced[0] == '\0') {
    for (const Family* f = first_usable; f != std::end(kFamilies); ++f) {
      const KernelSet* set = f->get(&why_not);  // first: `automatic` may time the family's instructions
      if (set != nullptr && f->automatic()) return *set;
    }
    return generic_kernels();
  }
  std::string known;
  for (const Family& f : kFamilies) {
    if (std::string(f.name) == forced) {
      if (&f < first_usable)
        throw Error(MOE_SFT_ERR_UNSUPPORTED, std::string("MOE_SFT_ISA=") + forced +
                                                 " cannot run here: above MOE_SFT_MAX_ISA=" + cap_name);
      if (const KernelSet* set = f.get(&why_not)) return *set;
      throw Error(MOE_SFT_ERR_UNSUPPORTED, std::string("MOE_SFT_ISA=") + forced + " cannot run here: " + why_not);
    }
    known += known.empty() ? f.name : std::string(", ") + f.name;
  }
  throw Error(MOE_SFT_ERR_INVALID_ARGUMENT,
              std::string("MOE_SFT_ISA=") + forced + " is not a kernel family (known: " + known + ")");
}

}  // namespace moe_sft::kernels
