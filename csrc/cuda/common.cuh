// Shared CUDA helpers: accumulation type, block reductions, vector width.
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

template <typename T, int N>
struct alignas(16) Vec { T v[N]; };

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0; }

}  // namespace cuda_detail
}  // namespace fastperc
