// feature_mse on CPU: one OpenMP pass over every (layer, sample, chunk) computing the squared-error
// partial sum and writing the gradient 2w/N (p - t) in the same loop.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

#include "../kernels.h"

namespace fastperc {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per work item: large enough to amortise scheduling
constexpr int kLanes = 16;           // independent accumulators: vectorisable and accurate

template <typename scalar_t, typename acc_t>
acc_t chunk_sq_and_grad(const scalar_t* p, const scalar_t* t, scalar_t* g, int64_t n, acc_t scale) {
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    acc_t d[kLanes];
    // Load the whole block before storing: g may alias t.
    for (int k = 0; k < kLanes; ++k) d[k] = static_cast<acc_t>(p[i + k]) - static_cast<acc_t>(t[i + k]);
    for (int k = 0; k < kLanes; ++k) {
      acc[k] += d[k] * d[k];
      g[i + k] = static_cast<scalar_t>(scale * d[k]);
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    acc_t d = static_cast<acc_t>(p[i]) - static_cast<acc_t>(t[i]);
    acc[k] += d * d;
    g[i] = static_cast<scalar_t>(scale * d);
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
      partial[j] = static_cast<double>(chunk_sq_and_grad<scalar_t, acc_t>(
          static_cast<const scalar_t*>(L.pred) + off, static_cast<const scalar_t*>(L.target) + off,
          static_cast<scalar_t*>(L.grad) + off, it.end - it.begin, static_cast<acc_t>(L.scale_grad)));
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

}  // namespace

void feature_mse_cpu(const std::vector<Layer>& layers, int64_t batch, at::ScalarType dtype, at::Tensor per_sample) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "feature_mse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for half/bf16/float, double for double
    run<scalar_t, acc_t>(layers, batch, per_sample.data_ptr<acc_t>());
  });
}

}  // namespace fastperc
