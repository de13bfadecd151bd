// NUMA placement, best effort and without libnuma: the node list and CPU sets come from sysfs, memory
// placement from the mbind system call, thread placement from sched_setaffinity. On one-node machines (or
// where any of it is unavailable) everything here is a no-op and the layer's parts are purely logical.
#pragma once
#include <cstddef>
#include <vector>

namespace moe_sft {

struct NumaTopology {
  std::vector<int> node_ids;                // the kernel's ids of the online nodes that have CPUs
  std::vector<std::vector<int>> node_cpus;  // their CPUs, allowed for this process; empty when unknown
  int nodes() const { return node_cpus.empty() ? 1 : int(node_cpus.size()); }
};

const NumaTopology& numa_topology();

// Asks the kernel to place the pages of [p, p + bytes) on `node` (an index into node_ids; preferred, not
// strict). Call before the memory is first touched. Does nothing for node < 0 or on one-node machines.
void prefer_numa_node(void* p, size_t bytes, int node);

// Restricts the calling thread to the CPUs of `node` (an index into node_ids) that the process may use.
// Does nothing on one-node machines.
void pin_thread_to_numa_node(int node);

// Parses a sysfs CPU/node list such as "0-3,8,10-11".
std::vector<int> parse_cpu_list(const char* text);

}  // namespace moe_sft
