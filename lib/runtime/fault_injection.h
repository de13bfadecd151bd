// Allocation-failure injection for tests (build option MOE_SFT_FAULT_INJECTION): the N-th allocation the
// library makes after moe_sft_fault_arm(N) fails, as a real out-of-memory would: operator new throws
// std::bad_alloc, the aligned allocations of the scratch arena and packed weights return null. A sweep over
// every N of a call (tests/reliability/alloc_sweep.c) then checks that each site ends in
// MOE_SFT_ERR_OUT_OF_MEMORY with nothing written and nothing leaked. In a normal build allocation_fails() is
// a constant false and the hooks below do not exist.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
namespace moe_sft::fault_injection {
#if defined(MOE_SFT_FAULT_INJECTION)
bool allocation_fails();  // counts one allocation; true for the armed one
#else
inline bool allocation_fails() { return false; }
#endif
}  // namespace moe_sft::fault_injection
extern "C" {
#endif

/* Test hooks, exported only by a MOE_SFT_FAULT_INJECTION build. Counting starts at arm; fail_at <= 0 counts
 * without failing (to learn how many allocations a call makes). */
void moe_sft_fault_arm(int64_t fail_at);
void moe_sft_fault_disarm(void);
int64_t moe_sft_fault_count(void); /* allocations counted since the last arm */

#ifdef __cplusplus
}
#endif
