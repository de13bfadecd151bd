// Run-time choice of the kernel family: the best one the CPU and OS support, or the one MOE_SFT_ISA forces
// (for tests and benchmarks), failing clearly when the machine or this build cannot run it.
#include <cstdlib>
#include <string>

#include "kernels/gemm.h"
#include "runtime/error.h"

namespace moe_sft::kernels {

namespace {

struct Family {
  const char* name;
  const KernelSet* (*get)(std::string* why_not);  // nullptr + reason when unavailable here
};

const KernelSet* get_generic(std::string*) { return &generic_kernels(); }

const KernelSet* not_built(std::string* why_not) {
  *why_not = "this build has no kernels for it yet";
  return nullptr;
}

// Best first. Families listed here but not yet built report so instead of silently falling back.
const Family kFamilies[] = {
    {"amx", not_built},
    {"avx512_bf16", not_built},
    {"amx-emulated", not_built},
    {"generic", get_generic},
};

}  // namespace

const KernelSet& select_kernels() {
  const char* forced = std::getenv("MOE_SFT_ISA");
  if (forced == nullptr || forced[0] == '\0') {
    std::string ignored;
    for (const Family& f : kFamilies) {
      if (std::string(f.name) == "amx-emulated") continue;  // a test vehicle, never picked by itself
      if (const KernelSet* set = f.get(&ignored)) return *set;
    }
    return generic_kernels();
  }
  std::string known;
  for (const Family& f : kFamilies) {
    if (std::string(f.name) == forced) {
      std::string why_not;
      if (const KernelSet* set = f.get(&why_not)) return *set;
      throw Error(MOE_SFT_ERR_UNSUPPORTED, std::string("MOE_SFT_ISA=") + forced + " cannot run: " + why_not);
    }
    known += known.empty() ? f.name : std::string(", ") + f.name;
  }
  throw Error(MOE_SFT_ERR_INVALID_ARGUMENT,
              std::string("MOE_SFT_ISA=") + forced + " is not a kernel family (known: " + known + ")");
}

}  // namespace moe_sft::kernels
