// Storage types and scalar loads/stores to the accumulation type, written so gcc vectorises them:
// bfloat16 is handled as raw uint16_t bits (c10::BFloat16's own conversions keep loops scalar);
// float -> bfloat16 rounds to nearest even and keeps NaN a NaN, without branches.
#pragma once
#include <c10/util/BFloat16.h>
#include <cstdint>
#include <cstring>

// Hot loops are built for AVX-512, AVX2 and baseline x86-64 and picked at load time: a wheel cannot
// assume the CPU it runs on.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPERC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTPERC_CLONES
#endif

namespace fastperc {

template <typename T>
struct Storage { using type = T; };
template <>
struct Storage<c10::BFloat16> { using type = uint16_t; };

template <typename acc_t, typename S>
inline acc_t load_acc(S x) { return static_cast<acc_t>(x); }

template <>
inline float load_acc<float, uint16_t>(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename S, typename acc_t>
inline S store_as(acc_t v) { return static_cast<S>(v); }

template <>
inline uint16_t store_as<uint16_t, float>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = (f != f) ? 0x7FC0u : r;  // quiet NaN
  return static_cast<uint16_t>(r);
}

// Pointer to the storage representation of a tensor's data.
template <typename scalar_t, typename P>
inline auto storage_ptr(P* p) {
  using S = typename Storage<scalar_t>::type;
  if constexpr (std::is_const_v<P>) return reinterpret_cast<const S*>(p);
  else return reinterpret_cast<S*>(p);
}

}  // namespace fastperc
