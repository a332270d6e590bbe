// renoise on CUDA: fake = a*x_t + b*p, real = alpha'*x0 + sigma'*noise in one pass; grid (chunks, rows)
// so each block reads its four per-sample coefficients once. Each thread moves a fixed number of
// 16-byte vectors (unrolled at compile time) when the rows allow it, else scalars.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../kernels.h"
#include "common.cuh"

namespace fastperc {
namespace {
using namespace cuda_detail;

constexpr int kItems = 2;  // 16-byte vectors per thread per block: 8 KiB of each input per block

template <typename scalar_t>
constexpr int64_t chunk_elems() { return static_cast<int64_t>(kThreads) * kItems * vec_width<scalar_t>(); }

template <typename scalar_t, typename acc_t, bool VEC>
__global__ void __launch_bounds__(kThreads) renoise_kernel(
    const scalar_t* __restrict__ xt, const scalar_t* __restrict__ p, const scalar_t* __restrict__ x0,
    const scalar_t* __restrict__ e, const acc_t* __restrict__ coefs, scalar_t* __restrict__ fake,
    scalar_t* __restrict__ real, int64_t batch, int64_t n) {
  const int64_t row = blockIdx.y + static_cast<int64_t>(blockIdx.z) * gridDim.y;
  if (row >= batch) return;
  const acc_t ca = coefs[row], cb = coefs[batch + row], cap = coefs[2 * batch + row], csp = coefs[3 * batch + row];
  const int64_t begin = row * n + static_cast<int64_t>(blockIdx.x) * chunk_elems<scalar_t>();
  const int64_t end = min(begin + chunk_elems<scalar_t>(), (row + 1) * n);
  if constexpr (VEC) {
    using V = Vec16<scalar_t>;
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const int64_t i = begin + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * V::N;
      if (i < end) {  // rows are whole vectors here, so a vector is either all in or all out
        const V a = V::load(xt + i), b = V::load(p + i), c = V::load(x0 + i), d = V::load(e + i);
        V f, r;
#pragma unroll
        for (int k = 0; k < V::N; ++k) {
          f[k] = static_cast<scalar_t>(ca * static_cast<acc_t>(a[k]) + cb * static_cast<acc_t>(b[k]));
          r[k] = static_cast<scalar_t>(cap * static_cast<acc_t>(c[k]) + csp * static_cast<acc_t>(d[k]));
        }
        f.store(fake + i);
        r.store(real + i);
      }
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
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
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "renoise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t chunks = (n + chunk_elems<scalar_t>() - 1) / chunk_elems<scalar_t>();
    TORCH_CHECK(chunks <= 0x7fffffff, "model_output: ", n, " elements per sample exceed the grid");
    const unsigned rows_y = static_cast<unsigned>(std::min<int64_t>(batch, 65535));
    const dim3 grid(static_cast<unsigned>(chunks), rows_y, static_cast<unsigned>((batch + rows_y - 1) / rows_y));
    const bool vec = n % vec_width<scalar_t>() == 0 && aligned16(x_t.data_ptr()) && aligned16(p.data_ptr()) &&
                     aligned16(x0.data_ptr()) && aligned16(noise.data_ptr()) && aligned16(fake.data_ptr()) &&
                     aligned16(real.data_ptr());
    auto launch = [&](auto vec_tag) {
      renoise_kernel<scalar_t, acc_t, decltype(vec_tag)::value><<<grid, kThreads, 0, stream>>>(
          x_t.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), x0.data_ptr<scalar_t>(), noise.data_ptr<scalar_t>(),
          coefs.data_ptr<acc_t>(), fake.data_ptr<scalar_t>(), real.data_ptr<scalar_t>(), batch, n);
    };
    if (vec) launch(std::true_type{});
    else launch(std::false_type{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastperc
