// renoise on CUDA: fake = a*x_t + b*p, real = alpha'*x0 + sigma'*noise in one pass; grid (chunks, rows)
// so each block reads its four per-sample coefficients once. 16-byte vectors when rows allow it.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../kernels.h"
#include "common.cuh"

namespace fastperc {
namespace {
using namespace cuda_detail;

constexpr int kChunk = kThreads * 8;

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) renoise_kernel(
    const scalar_t* __restrict__ xt, const scalar_t* __restrict__ p, const scalar_t* __restrict__ x0,
    const scalar_t* __restrict__ e, const acc_t* __restrict__ coefs, scalar_t* __restrict__ fake,
    scalar_t* __restrict__ real, int64_t batch, int64_t n) {
  const int64_t row = blockIdx.y + static_cast<int64_t>(blockIdx.z) * gridDim.y;
  if (row >= batch) return;
  const acc_t ca = coefs[row], cb = coefs[batch + row], cap = coefs[2 * batch + row], csp = coefs[3 * batch + row];
  const int64_t begin = row * n + static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(begin + kChunk, (row + 1) * n);
  using V = Vec<scalar_t, VEC>;
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += blockDim.x * VEC) {
    if constexpr (VEC > 1) {
      const V a = *reinterpret_cast<const V*>(xt + i), b = *reinterpret_cast<const V*>(p + i);
      const V c = *reinterpret_cast<const V*>(x0 + i), d = *reinterpret_cast<const V*>(e + i);
      V f, r;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        f.v[k] = static_cast<scalar_t>(ca * static_cast<acc_t>(a.v[k]) + cb * static_cast<acc_t>(b.v[k]));
        r.v[k] = static_cast<scalar_t>(cap * static_cast<acc_t>(c.v[k]) + csp * static_cast<acc_t>(d.v[k]));
      }
      *reinterpret_cast<V*>(fake + i) = f;
      *reinterpret_cast<V*>(real + i) = r;
    } else {
      fake[i] = static_cast<scalar_t>(ca * static_cast<acc_t>(xt[i]) + cb * static_cast<acc_t>(p[i]));
      real[i] = static_cast<scalar_t>(cap * static_cast<acc_t>(x0[i]) + csp * static_cast<acc_t>(e[i]));
    }
  }
}

}  // namespace

void renoise_cuda(const at::Tensor& x_t, const at::Tensor& p, const at::Tensor& x0, const at::Tensor& noise,
                  const at::Tensor& coefs, at::Tensor& fake, at::Tensor& real) {
  const c10::cuda::CUDAGuard guard(p.device());
  const int64_t batch = p.size(0), n = p.numel() / batch;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const unsigned rows_y = static_cast<unsigned>(std::min<int64_t>(batch, 65535));
  const dim3 grid(static_cast<unsigned>(chunks), rows_y, static_cast<unsigned>((batch + rows_y - 1) / rows_y));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "renoise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = vec_width<scalar_t>();
    const bool vec = n % V == 0 && aligned16(x_t.data_ptr()) && aligned16(p.data_ptr()) && aligned16(x0.data_ptr()) &&
                     aligned16(noise.data_ptr()) && aligned16(fake.data_ptr()) && aligned16(real.data_ptr());
    auto launch = [&](auto vec_tag) {
      constexpr int W = decltype(vec_tag)::value;
      renoise_kernel<scalar_t, acc_t, W><<<grid, kThreads, 0, stream>>>(
          x_t.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), x0.data_ptr<scalar_t>(), noise.data_ptr<scalar_t>(),
          coefs.data_ptr<acc_t>(), fake.data_ptr<scalar_t>(), real.data_ptr<scalar_t>(), batch, n);
    };
    if (vec) launch(std::integral_constant<int, V>{});
    else launch(std::integral_constant<int, 1>{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastperc
