#include "runtime/numa.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace moe_sft {

namespace {

std::string read_file(const std::string& path) {
  std::string text;
  if (FILE* f = std::fopen(path.c_str(), "r")) {
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
    std::fclose(f);
  }
  return text;
}

NumaTopology detect() {
  NumaTopology t;
#if defined(__linux__)
  cpu_set_t allowed;  // the process's own affinity (taskset, cgroups): pinning must stay inside it
  CPU_ZERO(&allowed);
  const bool have_allowed = sched_getaffinity(0, sizeof allowed, &allowed) == 0;
  const std::string online = read_file("/sys/devices/system/node/online");
  for (int node : parse_cpu_list(online.c_str())) {
    std::vector<int> cpus;
    for (int cpu : parse_cpu_list(read_file("/sys/devices/system/node/node" + std::to_string(node) + "/cpulist").c_str()))
      if (!have_allowed || (cpu < CPU_SETSIZE && CPU_ISSET(cpu, &allowed))) cpus.push_back(cpu);
    if (cpus.empty()) continue;  // memory-only, or none of its CPUs is ours: no threads to place there
    t.node_ids.push_back(node);
    t.node_cpus.push_back(std::move(cpus));
  }
#endif
  return t;
}

}  // namespace

std::vector<int> parse_cpu_list(const char* text) {
  std::vector<int> out;
  const char* p = text;
  while (*p) {
    char* end;
    long lo = std::strtol(p, &end, 10);
    if (end == p) break;
    long hi = lo;
    p = end;
    if (*p == '-') {
      hi = std::strtol(p + 1, &end, 10);
      if (end == p + 1) break;
      p = end;
    }
    for (long v = lo; v <= hi && v - lo < 65536; ++v) out.push_back(int(v));
    while (*p == ',' || *p == '\n' || *p == ' ') ++p;
  }
  return out;
}

const NumaTopology& numa_topology() {
  static const NumaTopology topology = detect();
  return topology;
}

void prefer_numa_node(void* p, size_t bytes, int node) {
#if defined(__linux__) && defined(SYS_mbind)
  const NumaTopology& t = numa_topology();
  if (node < 0 || t.nodes() < 2) return;
  const int id = t.node_ids[size_t(node % t.nodes())];
  if (id >= 64) return;  // beyond the one-word node mask passed below
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (uintptr_t(p) + page - 1) / page * page, end = (uintptr_t(p) + bytes) / page * page;
  if (end <= begin) return;
  const unsigned long mask = 1ul << id;
  constexpr int kMpolPreferred = 1;
  syscall(SYS_mbind, begin, end - begin, kMpolPreferred, &mask, sizeof mask * 8, 0);  // best effort
#else
  (void)p, (void)bytes, (void)node;
#endif
}

void pin_thread_to_numa_node(int node) {
#if defined(__linux__)
  const NumaTopology& t = numa_topology();
  if (t.nodes() < 2 || node < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int cpu : t.node_cpus[size_t(node % t.nodes())])
    if (cpu < CPU_SETSIZE) CPU_SET(cpu, &set);
  sched_setaffinity(0, sizeof set, &set);  // best effort
#else
  (void)node;
#endif
}

}  // namespace moe_sft
