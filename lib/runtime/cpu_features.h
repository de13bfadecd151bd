// What the CPU and the OS let us run, read once from CPUID and XCR0.
#pragma once

namespace moe_sft {

struct CpuFeatures {
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512_bf16 = false;
  bool avx512_vnni = false;
  bool amx_tile = false;
  bool amx_bf16 = false;
  bool amx_int8 = false;
  bool os_avx512 = false;  // XCR0 has opmask, ZMM_Hi256 and Hi16_ZMM state enabled
  bool os_amx = false;     // XCR0 has XTILECFG and XTILEDATA enabled
};

const CpuFeatures& cpu_features();

}  // namespace moe_sft
