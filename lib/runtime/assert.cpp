#include "runtime/assert.h"

#include <cstdio>
#include <cstdlib>

namespace moe_sft {

void assert_failed(const char* condition, const char* file, int line) {
  std::fprintf(stderr, "moe_sft: internal check failed: %s (%s:%d)\n", condition, file, line);
  std::fflush(stderr);
  std::abort();
}

}  // namespace moe_sft
