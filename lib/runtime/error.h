// Internal error type. Code anywhere below the ABI throws moe_sft::Error; lib/api turns it into a status
// and the thread-local message, so no exception ever crosses the C ABI.
#pragma once
#include <stdexcept>
#include <string>

#include "moe_sft.h"

namespace moe_sft {

class Error : public std::runtime_error {
 public:
  Error(moe_sft_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  moe_sft_status status() const { return status_; }

 private:
  moe_sft_status status_;
};

}  // namespace moe_sft
