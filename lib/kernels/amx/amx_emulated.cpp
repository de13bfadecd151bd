// amx-emulated: the AMX kernel on software tiles (a test vehicle: runs anywhere, never picked by itself).
#include "kernels/amx/amx.h"
#include "kernels/amx/amx_family.h"
#include "kernels/amx/tiles_emulated.h"

namespace moe_sft::kernels {

const KernelSet& amx_emulated_kernels() {
  static const KernelSet set = amx::Family<amx::EmulatedTiles>::make("amx-emulated");
  return set;
}

}  // namespace moe_sft::kernels
