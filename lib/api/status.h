// The ABI's error channel: a thread-local message beside every returned status, and guard(), which runs a
// call body and turns anything it throws into a status so that no exception crosses the C ABI.
#pragma once
#include <new>
#include <string>

#include "moe_sft.h"
#include "runtime/error.h"

namespace moe_sft::api {

void set_last_error(const std::string& message);
void clear_last_error();
const char* last_error();

inline moe_sft_status fail(moe_sft_status status, const std::string& message) {
  set_last_error(message);
  return status;
}

template <class Body>
moe_sft_status guard(const char* function, Body&& body) noexcept {
  try {
    clear_last_error();
    body();
    return MOE_SFT_OK;
  } catch (const Error& e) {
    return fail(e.status(), std::string(function) + ": " + e.what());
  } catch (const std::bad_alloc&) {
    return fail(MOE_SFT_ERR_OUT_OF_MEMORY, std::string(function) + ": out of memory");
  } catch (const std::exception& e) {
    return fail(MOE_SFT_ERR_INTERNAL, std::string(function) + ": internal error: " + e.what());
  } catch (...) {
    return fail(MOE_SFT_ERR_INTERNAL, std::string(function) + ": internal error (unknown exception)");
  }
}

}  // namespace moe_sft::api
