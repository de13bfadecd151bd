// What the CPU and the OS let us run, read once from CPUID and XCR0.
#pragma once

namespace moe_sft {

struct CpuFeatures {
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512dq = false;
  bool fma = false;
  bool avx512vl = false;
  bool avx512_bf16 = false;
  bool avx512_vnni = false;
  bool amx_tile = false;
  bool amx_bf16 = false;
  bool amx_int8 = false;
  bool os_avx512 = false;  // XCR0 has opmask, ZMM_Hi256 and Hi16_ZMM state enabled
  bool os_amx = false;     // XCR0 has XTILECFG and XTILEDATA enabled

  // Everything the avx512_bf16 family is compiled for (its target pragma), usable by the OS.
  bool avx512_bf16_usable() const {
    return avx512f && avx512bw && avx512vl && avx512dq && avx512_bf16 && fma && os_avx512;
  }
};

const CpuFeatures& cpu_features();

}  // namespace moe_sft
