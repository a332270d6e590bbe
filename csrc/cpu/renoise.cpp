// renoise on CPU: one pass reading x_t, p, x0, noise and writing both teacher inputs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../kernels.h"
#include "convert.h"

namespace fastperc {
namespace {

template <typename S, typename acc_t>
FASTPERC_CLONES void renoise_span(const S* xt, const S* p, const S* x0, const S* e, S* fake, S* real, int64_t n,
                                  acc_t a, acc_t b, acc_t ap, acc_t sp) {
  for (int64_t i = 0; i < n; ++i) {
    fake[i] = store_as<S>(a * load_acc<acc_t>(xt[i]) + b * load_acc<acc_t>(p[i]));
    real[i] = store_as<S>(ap * load_acc<acc_t>(x0[i]) + sp * load_acc<acc_t>(e[i]));
  }
}

}  // namespace

void renoise_cpu(const at::Tensor& x_t, const at::Tensor& p, const at::Tensor& x0, const at::Tensor& noise,
                 const at::Tensor& coefs, at::Tensor& fake, at::Tensor& real) {
  const int64_t batch = x_t.size(0);
  const int64_t n = batch ? x_t.numel() / batch : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_t.scalar_type(), "renoise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using S = typename Storage<scalar_t>::type;
    auto in = [](const at::Tensor& x) { return storage_ptr<scalar_t>(x.const_data_ptr<scalar_t>()); };
    auto out = [](at::Tensor& x) { return storage_ptr<scalar_t>(x.data_ptr<scalar_t>()); };
    const S *xt_p = in(x_t), *p_p = in(p), *x0_p = in(x0), *e_p = in(noise);
    S *f_p = out(fake), *r_p = out(real);
    const acc_t* c = coefs.data_ptr<acc_t>();  // (4, B): a, b, alpha', sigma'
    at::parallel_for(0, batch * n, 1 << 14, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi;) {
        const int64_t bi = i / n, end = std::min(hi, (bi + 1) * n);
        const acc_t ca = c[bi], cb = c[batch + bi], cap = c[2 * batch + bi], csp = c[3 * batch + bi];
        renoise_span(xt_p + i, p_p + i, x0_p + i, e_p + i, f_p + i, r_p + i, end - i, ca, cb, cap, csp);
        i = end;
      }
    });
  });
}

}  // namespace fastperc
