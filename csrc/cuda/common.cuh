// Shared CUDA helpers: accumulation type, block reductions, 16-byte vector loads and stores.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>

namespace fastperc {
namespace cuda_detail {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; the result is valid in thread 0. Fixed order: deterministic.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_totals[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? warp_totals[lane] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// Elements of T in one 16-byte vector access.
template <typename T>
__host__ __device__ constexpr int vec_width() { return 16 / sizeof(T); }

// 16 bytes of T moved as one uint4. Element-wise stores into a struct of c10::Half/BFloat16 compile
// to one 4-byte STG per pair; building the register as a uint4 and storing it with one vector
// instruction gives STG.E.128 (checked in tests/test_build_checks.py).
template <typename T>
struct Vec16 {
  static constexpr int N = vec_width<T>();
  uint4 raw;
  __device__ __forceinline__ T& operator[](int k) { return reinterpret_cast<T*>(&raw)[k]; }
  __device__ __forceinline__ const T& operator[](int k) const { return reinterpret_cast<const T*>(&raw)[k]; }
  __device__ __forceinline__ static Vec16 load(const T* p) {
    Vec16 v;
    v.raw = *reinterpret_cast<const uint4*>(p);  // plain load: the target may alias the output
    return v;
  }
  // Inline PTX: a plain uint4 assignment still lets ptxas split the store into four STG.E when the
  // packed words do not sit in an aligned register quad.
  __device__ __forceinline__ void store(T* p) const {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(raw.x), "r"(raw.y), "r"(raw.z),
                 "r"(raw.w)
                 : "memory");
  }
};

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0; }

}  // namespace cuda_detail
}  // namespace fastperc
