// The fuzz harnesses' view of their input: a byte stream read front to back into the values of one test
// case. Past the end every read gives zero, so any prefix of a case is a case too (libFuzzer shrinks inputs by
// cutting them). Also used by the reliability drivers to draw random cases from a seeded byte source.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace moe_sft_fuzz {

class FuzzInput {
 public:
  FuzzInput(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  template <class T>
  T raw() {
    T v{};
    const size_t n = pos_ < size_ ? std::min(sizeof(T), size_ - pos_) : 0;
    if (n > 0) std::memcpy(&v, data_ + pos_, n);
    pos_ += sizeof(T);
    return v;
  }
  bool flag() { return raw<uint8_t>() & 1; }
  // An integer in [lo, hi].
  int64_t range(int64_t lo, int64_t hi) { return lo + int64_t(raw<uint32_t>() % uint64_t(hi - lo + 1)); }
  // One of the listed values.
  template <class T, size_t N>
  T pick(const T (&values)[N]) {
    return values[raw<uint8_t>() % N];
  }
  // A float that is mostly O(1), sometimes NaN, +-Inf, zero, huge or tiny.
  float value() {
    const uint8_t kind = raw<uint8_t>();
    const float x = float(int16_t(raw<uint16_t>())) / 8192.0f;
    switch (kind % 32) {
      case 0: return NAN;
      case 1: return INFINITY;
      case 2: return -INFINITY;
      case 3: return 0.0f;
      case 4: return x * 1e30f;
      case 5: return x * 1e-30f;
      default: return x;
    }
  }
  bool exhausted() const { return pos_ >= size_; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

inline uint16_t bf16_bits(float f) {  // truncation: the harnesses want any bit pattern, not rounding
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}

inline float bf16_value(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A byte array that must come back unchanged from a failed call: filled with a canary pattern.
template <class T>
std::vector<T> canary(size_t count) {
  std::vector<T> v(count);
  if (count > 0) std::memset(v.data(), 0xA5, count * sizeof(T));
  return v;
}

template <class T>
bool is_canary(const std::vector<T>& v) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(v.data());
  for (size_t i = 0; i < v.size() * sizeof(T); ++i)
    if (p[i] != 0xA5) return false;
  return true;
}

// Bitwise equality of two arrays (NaN payloads included): the library's results do not depend on threads.
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

}  // namespace moe_sft_fuzz

// Stops the harness with a message: libFuzzer (and the replay program) report it as a crash with the input.
#define FUZZ_CHECK(cond, ...)                                                          \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::fprintf(stderr, "FUZZ_CHECK failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, "  " __VA_ARGS__);                                          \
      std::fprintf(stderr, "\n  last error: %s\n", moe_sft_last_error());             \
      std::abort();                                                                    \
    }                                                                                  \
  } while (0)
