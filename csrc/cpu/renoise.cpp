// renoise on CPU: one pass reading x_t, p, x0, noise and writing both teacher inputs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../kernels.h"
#include "convert.h"

namespace fastperc {

void renoise_cpu(const at::Tensor& x_t, const at::Tensor& p, const at::Tensor& x0, const at::Tensor& noise,
                 const at::Tensor& coefs, at::Tensor& fake, at::Tensor& real) {
  const int64_t batch = x_t.size(0);
  const int64_t n = batch ? x_t.numel() / batch : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_t.scalar_type(), "renoise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using S = typename Storage<scalar_t>::type;
    const S *xt_p = storage_ptr<scalar_t>(x_t.const_data_ptr<scalar_t>()), *p_p = storage_ptr<scalar_t>(p.const_data_ptr<scalar_t>());
    const S *x0_p = storage_ptr<scalar_t>(x0.const_data_ptr<scalar_t>()), *e_p = storage_ptr<scalar_t>(noise.const_data_ptr<scalar_t>());
    S *f_p = storage_ptr<scalar_t>(fake.data_ptr<scalar_t>()), *r_p = storage_ptr<scalar_t>(real.data_ptr<scalar_t>());
    const acc_t* c = coefs.data_ptr<acc_t>();  // (4, B): a, b, alpha', sigma'
    at::parallel_for(0, batch * n, 1 << 14, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi;) {
        const int64_t bi = i / n, end = std::min(hi, (bi + 1) * n);
        const acc_t ca = c[bi], cb = c[batch + bi], cap = c[2 * batch + bi], csp = c[3 * batch + bi];
        for (; i < end; ++i) {
          f_p[i] = store_as<S>(ca * load_acc<acc_t>(xt_p[i]) + cb * load_acc<acc_t>(p_p[i]));
          r_p[i] = store_as<S>(cap * load_acc<acc_t>(x0_p[i]) + csp * load_acc<acc_t>(e_p[i]));
        }
      }
    });
  });
}

}  // namespace fastperc
