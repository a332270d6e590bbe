// feature_mse on CUDA: one launch over every (layer, sample, chunk) of up to kMaxLayers layers writes
// the gradient 2w/N (p - t) and one squared-error partial per block; a second small launch sums the
// partials of each sample in a fixed order (deterministic, no atomics). Loads are 16-byte vectors when
// a layer's rows allow it. The gradient may be written over the target buffer (same index, read first).
// The backward, scale_rows, scales every layer's stored gradient by grad_output[b] in one launch of
// the same geometry (torch's broadcast multiply runs unvectorised, and for bf16 at a third of the
// copy bandwidth).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../kernels.h"
#include "common.cuh"

namespace fastperc {
namespace {
using namespace cuda_detail;

constexpr int kMaxLayers = 8;
constexpr int kChunk = kThreads * 16;  // elements per block

struct LayerArgs {
  const void* pred[kMaxLayers];
  const void* target[kMaxLayers];
  void* grad[kMaxLayers];
  int64_t n[kMaxLayers];
  int64_t chunks_per_row[kMaxLayers];
  int64_t first_block[kMaxLayers + 1];
  double scale_grad[kMaxLayers];
  double scale_loss[kMaxLayers];
  bool vec[kMaxLayers];
  int num_layers;
};

// One block's chunk [begin, end) of a row. VEC: the row is whole 16-byte vectors and every buffer is
// 16-byte aligned, so each thread moves kChunk / (kThreads * N) vectors, unrolled at compile time.
template <typename scalar_t, typename acc_t, bool VEC>
__device__ acc_t chunk(const scalar_t* __restrict__ p, const scalar_t* t, scalar_t* g, int64_t begin, int64_t end,
                       acc_t scale) {
  acc_t acc = 0;
  if constexpr (VEC) {
    using V = Vec16<scalar_t>;
    constexpr int kItems = kChunk / (kThreads * V::N);
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const int64_t i = begin + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * V::N;
      if (i < end) {
        const V pv = V::load(p + i), tv = V::load(t + i);  // t is read before g (which may be t) is written
        V gv;
#pragma unroll
        for (int k = 0; k < V::N; ++k) {
          const acc_t d = static_cast<acc_t>(pv[k]) - static_cast<acc_t>(tv[k]);
          acc += d * d;
          gv[k] = static_cast<scalar_t>(scale * d);
        }
        gv.store(g + i);
      }
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const acc_t d = static_cast<acc_t>(p[i]) - static_cast<acc_t>(t[i]);
      acc += d * d;
      g[i] = static_cast<scalar_t>(scale * d);
    }
  }
  return acc;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) partials_kernel(const LayerArgs args, acc_t* __restrict__ partial) {
  const int64_t blk = blockIdx.x;
  int l = 0;
  while (l + 1 < args.num_layers && blk >= args.first_block[l + 1]) ++l;  // <= 8 uniform steps
  const int64_t local = blk - args.first_block[l];
  const int64_t row = local / args.chunks_per_row[l];
  const int64_t n = args.n[l];
  const int64_t begin = row * n + (local % args.chunks_per_row[l]) * kChunk;
  const int64_t end = min(begin + kChunk, (row + 1) * n);
  const auto* p = static_cast<const scalar_t*>(args.pred[l]);
  const auto* t = static_cast<const scalar_t*>(args.target[l]);
  auto* g = static_cast<scalar_t*>(args.grad[l]);
  const acc_t scale = static_cast<acc_t>(args.scale_grad[l]);
  const acc_t acc = args.vec[l] ? chunk<scalar_t, acc_t, true>(p, t, g, begin, end, scale)
                                : chunk<scalar_t, acc_t, false>(p, t, g, begin, end, scale);
  const acc_t total = block_sum(acc);
  if (threadIdx.x == 0) partial[blk] = total;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const LayerArgs args, const acc_t* __restrict__ partial,
                                                            acc_t* __restrict__ out, bool accumulate) {
  const int64_t b = blockIdx.x;
  acc_t total = 0;
  for (int l = 0; l < args.num_layers; ++l) {
    const int64_t cpr = args.chunks_per_row[l];
    const acc_t* row = partial + args.first_block[l] + b * cpr;
    acc_t s = 0;
    for (int64_t c = threadIdx.x; c < cpr; c += blockDim.x) s += row[c];
    total += s * static_cast<acc_t>(args.scale_loss[l]);
  }
  total = block_sum(total);
  if (threadIdx.x == 0) out[b] = accumulate ? out[b] + total : total;
}

struct ScaleArgs {
  const void* src[kMaxLayers];
  void* dst[kMaxLayers];
  int64_t n[kMaxLayers];
  int64_t chunks_per_row[kMaxLayers];
  int64_t first_block[kMaxLayers + 1];
  bool vec[kMaxLayers];
  int num_layers;
};

template <typename scalar_t, typename acc_t, bool VEC>
__device__ void scale_chunk(const scalar_t* src, scalar_t* dst, int64_t begin, int64_t end, acc_t s) {
  if constexpr (VEC) {
    using V = Vec16<scalar_t>;
    constexpr int kItems = kChunk / (kThreads * V::N);
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const int64_t i = begin + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * V::N;
      if (i < end) {
        const V v = V::load(src + i);  // dst may be src: each element is read before it is written
        V o;
#pragma unroll
        for (int k = 0; k < V::N; ++k) o[k] = static_cast<scalar_t>(static_cast<acc_t>(v[k]) * s);
        o.store(dst + i);
      }
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
      dst[i] = static_cast<scalar_t>(static_cast<acc_t>(src[i]) * s);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) scale_rows_kernel(const ScaleArgs args, const acc_t* __restrict__ scale) {
  const int64_t blk = blockIdx.x;
  int l = 0;
  while (l + 1 < args.num_layers && blk >= args.first_block[l + 1]) ++l;
  const int64_t local = blk - args.first_block[l];
  const int64_t row = local / args.chunks_per_row[l];
  const int64_t n = args.n[l];
  const int64_t begin = row * n + (local % args.chunks_per_row[l]) * kChunk;
  const int64_t end = min(begin + kChunk, (row + 1) * n);
  const auto* src = static_cast<const scalar_t*>(args.src[l]);
  auto* dst = static_cast<scalar_t*>(args.dst[l]);
  const acc_t s = scale[row];
  if (args.vec[l]) scale_chunk<scalar_t, acc_t, true>(src, dst, begin, end, s);
  else scale_chunk<scalar_t, acc_t, false>(src, dst, begin, end, s);
}

}  // namespace

void scale_rows_cuda(const std::vector<at::Tensor>& grads, const at::Tensor& scale, const std::vector<at::Tensor>& outs) {
  const int64_t batch = scale.size(0);
  if (batch == 0 || grads.empty()) return;
  const c10::cuda::CUDAGuard guard(scale.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads[0].scalar_type(), "scale_rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = vec_width<scalar_t>();
    for (size_t g0 = 0; g0 < grads.size(); g0 += kMaxLayers) {
      ScaleArgs args{};
      args.num_layers = static_cast<int>(std::min(grads.size() - g0, static_cast<size_t>(kMaxLayers)));
      int64_t blocks = 0;
      for (int j = 0; j < args.num_layers; ++j) {
        const at::Tensor& g = grads[g0 + j];
        const at::Tensor& o = outs[g0 + j];
        args.src[j] = g.const_data_ptr();
        args.dst[j] = o.data_ptr();
        args.n[j] = g.numel() / batch;
        args.chunks_per_row[j] = (args.n[j] + kChunk - 1) / kChunk;
        args.first_block[j] = blocks;
        args.vec[j] = args.n[j] % V == 0 && aligned16(args.src[j]) && aligned16(args.dst[j]);
        blocks += args.chunks_per_row[j] * batch;
      }
      args.first_block[args.num_layers] = blocks;
      scale_rows_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(args, scale.const_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void feature_mse_cuda(const std::vector<Layer>& layers, int64_t batch, at::ScalarType dtype, at::Tensor per_sample) {
  const c10::cuda::CUDAGuard guard(per_sample.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "feature_mse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = vec_width<scalar_t>();
    for (size_t g0 = 0; g0 < layers.size(); g0 += kMaxLayers) {
      LayerArgs args{};
      args.num_layers = static_cast<int>(std::min(layers.size() - g0, static_cast<size_t>(kMaxLayers)));
      int64_t blocks = 0;
      for (int j = 0; j < args.num_layers; ++j) {
        const Layer& L = layers[g0 + j];
        args.pred[j] = L.pred;
        args.target[j] = L.target;
        args.grad[j] = L.grad;
        args.n[j] = L.n;
        args.chunks_per_row[j] = (L.n + kChunk - 1) / kChunk;
        args.first_block[j] = blocks;
        args.scale_grad[j] = L.scale_grad;
        args.scale_loss[j] = L.scale_loss;
        args.vec[j] = L.n % V == 0 && aligned16(L.pred) && aligned16(L.target) && aligned16(L.grad);
        blocks += args.chunks_per_row[j] * batch;
      }
      args.first_block[args.num_layers] = blocks;
      auto partial = at::empty({blocks}, per_sample.options());
      partials_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(args, partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finalize_kernel<acc_t><<<batch, kThreads, 0, stream>>>(args, partial.data_ptr<acc_t>(),
                                                             per_sample.data_ptr<acc_t>(), g0 > 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace fastperc
