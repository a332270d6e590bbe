// Kernel entry points shared by the binding file (fastperc.cpp) and the per-device sources.
// Callers (the binding) have already checked shapes, dtypes, devices and layouts.
#pragma once
// Light ATen headers only: the .cu files include this, and nvcc is slow on torch/extension.h.
#include <ATen/core/Tensor.h>
#include <vector>

namespace fastperc {

// One layer of feature_mse: pred/target/grad share shape and strides; sample b's N elements are
// the dense block [b*N, (b+1)*N) of each buffer (any memory format with batch outermost).
struct Layer {
  const void* pred;
  const void* target;
  void* grad;  // may alias target: every element of target is read before it is written
  int64_t n;   // elements per sample
  double scale_loss;  // w / N
  double scale_grad;  // 2 * w / N
};

// per_sample[b] = sum_l w_l/N_l * sum_i (p-t)^2 ; grad_l = 2 w_l/N_l (p - t). Deterministic.
void feature_mse_cpu(const std::vector<Layer>& layers, int64_t batch, at::ScalarType dtype, at::Tensor per_sample);
// outs[l][b, ...] = grads[l][b, ...] * scale[b] (the backward of feature_mse); outs may be grads.
void scale_rows_cpu(const std::vector<at::Tensor>& grads, const at::Tensor& scale, const std::vector<at::Tensor>& outs);
// fake = a[b]*x_t + b[b]*p ; real = ap[b]*x0 + sp[b]*noise over dense (B, N) buffers.
void renoise_cpu(const at::Tensor& x_t, const at::Tensor& p, const at::Tensor& x0, const at::Tensor& noise,
                 const at::Tensor& coefs, at::Tensor& fake, at::Tensor& real);

#ifdef FASTPERC_WITH_CUDA
void feature_mse_cuda(const std::vector<Layer>& layers, int64_t batch, at::ScalarType dtype, at::Tensor per_sample);
void scale_rows_cuda(const std::vector<at::Tensor>& grads, const at::Tensor& scale, const std::vector<at::Tensor>& outs);
void renoise_cuda(const at::Tensor& x_t, const at::Tensor& p, const at::Tensor& x0, const at::Tensor& noise,
                  const at::Tensor& coefs, at::Tensor& fake, at::Tensor& real);
#endif

}  // namespace fastperc
