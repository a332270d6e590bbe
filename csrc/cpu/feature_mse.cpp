// feature_mse on CPU: one OpenMP pass over every (layer, sample, chunk) computing the squared-error
// partial sum and writing the gradient 2w/N (p - t) in the same loop.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

#include "../kernels.h"
#include "convert.h"

namespace fastperc {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per work item: large enough to amortise scheduling
constexpr int kLanes = 16;           // independent accumulators: vectorisable and accurate

template <typename S, typename acc_t>
FASTPERC_CLONES acc_t chunk_sq_and_grad(const S* p, const S* t, S* g, int64_t n, acc_t scale) {
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // Each lane reads p and t before writing g: safe when g aliases t (same index).
    for (int k = 0; k < kLanes; ++k) {
      const acc_t d = load_acc<acc_t>(p[i + k]) - load_acc<acc_t>(t[i + k]);
      acc[k] += d * d;
      g[i + k] = store_as<S>(scale * d);
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    acc_t d = load_acc<acc_t>(p[i]) - load_acc<acc_t>(t[i]);
    acc[k] += d * d;
    g[i] = store_as<S>(scale * d);
  }
  for (int w = kLanes / 2; w > 0; w /= 2)  // pairwise lane sum
    for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
  return acc[0];
}

template <typename scalar_t, typename acc_t>
void run(const std::vector<Layer>& layers, int64_t batch, acc_t* out) {
  struct Item { int layer; int64_t b, begin, end; };
  std::vector<Item> items;
  for (int l = 0; l < static_cast<int>(layers.size()); ++l)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t s = 0; s < layers[l].n; s += kChunk)
        items.push_back({l, b, s, std::min(s + kChunk, layers[l].n)});
  std::vector<double> partial(items.size());
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const Item& it = items[j];
      const Layer& L = layers[it.layer];
      const int64_t off = it.b * L.n + it.begin;
      partial[j] = static_cast<double>(chunk_sq_and_grad(
          storage_ptr<scalar_t>(static_cast<const scalar_t*>(L.pred)) + off,
          storage_ptr<scalar_t>(static_cast<const scalar_t*>(L.target)) + off,
          storage_ptr<scalar_t>(static_cast<scalar_t*>(L.grad)) + off, it.end - it.begin,
          static_cast<acc_t>(L.scale_grad)));
    }
  });
  // Fixed-order reduction per sample: results do not depend on the thread count.
  std::vector<double> total(batch, 0.0), layer_sum(batch);
  for (size_t l = 0, j = 0; l < layers.size(); ++l) {
    std::fill(layer_sum.begin(), layer_sum.end(), 0.0);
    for (; j < items.size() && items[j].layer == static_cast<int>(l); ++j) layer_sum[items[j].b] += partial[j];
    for (int64_t b = 0; b < batch; ++b) total[b] += layers[l].scale_loss * layer_sum[b];
  }
  for (int64_t b = 0; b < batch; ++b) out[b] = static_cast<acc_t>(total[b]);
}

template <typename S, typename acc_t>
FASTPERC_CLONES void scale_span(const S* src, S* dst, int64_t n, acc_t s) {
  for (int64_t i = 0; i < n; ++i) dst[i] = store_as<S>(load_acc<acc_t>(src[i]) * s);
}

}  // namespace

void scale_rows_cpu(const std::vector<at::Tensor>& grads, const at::Tensor& scale, const std::vector<at::Tensor>& outs) {
  const int64_t batch = scale.size(0);
  if (batch == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads[0].scalar_type(), "scale_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* s = scale.data_ptr<acc_t>();
    for (size_t l = 0; l < grads.size(); ++l) {
      const auto* src = storage_ptr<scalar_t>(grads[l].const_data_ptr<scalar_t>());
      auto* dst = storage_ptr<scalar_t>(outs[l].data_ptr<scalar_t>());  // may be src
      const int64_t n = grads[l].numel() / batch;
      at::parallel_for(0, batch * n, kChunk, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi;) {
          const int64_t b = i / n, end = std::min(hi, (b + 1) * n);
          const acc_t sb = s[b];
          scale_span(src + i, dst + i, end - i, sb);
          i = end;
        }
      });
    }
  });
}

void feature_mse_cpu(const std::vector<Layer>& layers, int64_t batch, at::ScalarType dtype, at::Tensor per_sample) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "feature_mse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for half/bf16/float, double for double
    run<scalar_t, acc_t>(layers, batch, per_sample.data_ptr<acc_t>());
  });
}

}  // namespace fastperc
