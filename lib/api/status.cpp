// The ABI's error channel: the thread-local message of each thread's most recent call.
#include <string>

#include "api/status.h"

namespace moe_sft::api {

namespace {
thread_local std::string last_error_message;
}

void set_last_error(const std::string& message) { last_error_message = message; }
void clear_last_error() { last_error_message.clear(); }
const char* last_error() { return last_error_message.c_str(); }

}  // namespace moe_sft::api

extern "C" {

const char* moe_sft_last_error(void) { return moe_sft::api::last_error(); }

}  // extern "C"
