// The one binding file of fastperc._C: argument checks, then dispatch to the CPU or CUDA kernels.
// Outputs are allocated by the Python side (fastperc/ops), so the gradient buffer can be the target.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "kernels.h"

#define CHECK_SAME(x, ref, what) \
  TORCH_CHECK((x).what() == (ref).what(), #x ": expected " #what " ", (ref).what(), " (as " #ref "), got ", (x).what())
// Same element order: equal strides on every dimension of size > 1 (size-1 strides are arbitrary).
#define CHECK_SAME_ORDER(x, ref)                                                                    \
  TORCH_CHECK(fastperc::same_order((x), (ref)), #x ": expected the memory layout of " #ref " (strides ", \
              (ref).strides(), "), got strides ", (x).strides(), " for sizes ", (x).sizes())
#define CHECK_DENSE_BATCH_MAJOR(x)                                                                  \
  TORCH_CHECK((x).is_non_overlapping_and_dense() && ((x).dim() == 0 || (x).size(0) <= 1 ||          \
                                                      (x).stride(0) * (x).size(0) == (x).numel()),  \
              #x ": expected a dense tensor with the batch dimension outermost (contiguous or "    \
              "channels_last), got sizes ", (x).sizes(), " strides ", (x).strides())

#ifdef FASTPERC_WITH_CUDA
#ifndef FASTPERC_SASS_ARCHS  // built without setup.py's defines: unknown, and `auto` will not guess
#define FASTPERC_SASS_ARCHS
#define FASTPERC_PTX_ARCH 0
#endif
#define FASTPERC_STR_(...) #__VA_ARGS__
#define FASTPERC_STR(x) FASTPERC_STR_(x)
#endif

namespace fastperc {

bool same_order(const at::Tensor& x, const at::Tensor& ref) {
  if (x.dim() != ref.dim()) return false;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) > 1 && x.stride(d) != ref.stride(d)) return false;
  return true;
}

namespace {

bool is_cuda(const at::Tensor& t) { return t.device().is_cuda(); }

void check_per_sample(const at::Tensor& per_sample, int64_t batch, at::ScalarType dtype, const at::Device& dev) {
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(per_sample.dim() == 1 && per_sample.size(0) == batch && per_sample.is_contiguous(),
              "per_sample: expected a contiguous (", batch, ",) tensor, got sizes ", per_sample.sizes());
  TORCH_CHECK(per_sample.scalar_type() == acc, "per_sample: expected dtype ", acc, ", got ", per_sample.scalar_type());
  TORCH_CHECK(per_sample.device() == dev, "per_sample: expected device ", dev, ", got ", per_sample.device());
}

// preds[l], targets[l], grads[l]: one layer each; grads[l] may be targets[l] (overwritten in place).
void feature_mse(const std::vector<at::Tensor>& preds, const std::vector<at::Tensor>& targets,
                 const std::vector<at::Tensor>& grads, const std::vector<double>& weights, at::Tensor per_sample) {
  const size_t L = preds.size();
  TORCH_CHECK(L >= 1, "preds: expected at least one layer, got none");
  TORCH_CHECK(targets.size() == L && grads.size() == L && weights.size() == L,
              "targets/grads/weights: expected ", L, " entries each, got ", targets.size(), "/", grads.size(), "/",
              weights.size());
  const at::Tensor& p0 = preds[0];
  TORCH_CHECK(p0.dim() >= 1, "preds[0]: expected shape (B, ...), got a 0-d tensor");
  const int64_t batch = p0.size(0);
  const auto dtype = p0.scalar_type();
  std::vector<Layer> layers;
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor &p = preds[l], &t = targets[l], &g = grads[l];
    TORCH_CHECK(p.dim() >= 1 && p.size(0) == batch, "preds[", l, "]: expected batch size ", batch, ", got sizes ",
                p.sizes());
    CHECK_SAME(p, p0, scalar_type);
    CHECK_SAME(p, p0, device);
    CHECK_SAME(t, p, sizes);
    CHECK_SAME_ORDER(t, p);
    CHECK_SAME(t, p, scalar_type);
    CHECK_SAME(t, p, device);
    CHECK_SAME(g, p, sizes);
    CHECK_SAME_ORDER(g, p);
    CHECK_SAME(g, p, scalar_type);
    CHECK_SAME(g, p, device);
    const int64_t n = batch ? p.numel() / batch : 0;
    TORCH_CHECK(n > 0 || batch == 0, "preds[", l, "]: expected at least one element per sample, got sizes ", p.sizes());
    CHECK_DENSE_BATCH_MAJOR(p);
    const double w = weights[l];
    layers.push_back({p.data_ptr(), t.data_ptr(), g.data_ptr(), n, n ? w / n : 0.0, n ? 2.0 * w / n : 0.0});
  }
  check_per_sample(per_sample, batch, dtype, p0.device());
  if (batch == 0) return;
  if (is_cuda(p0)) {
#ifdef FASTPERC_WITH_CUDA
    feature_mse_cuda(layers, batch, dtype, per_sample);
#else
    TORCH_CHECK(false, "preds: CUDA tensors, but fastperc._C was built without CUDA kernels");
#endif
  } else {
    TORCH_CHECK(p0.device().is_cpu(), "preds: expected CPU or CUDA tensors, got ", p0.device());
    feature_mse_cpu(layers, batch, dtype, per_sample);
  }
}

// coefs: (4, B) rows a, b, alpha', sigma' in the accumulation dtype (float32, or float64 for float64 data).
void renoise(const at::Tensor& x_t, const at::Tensor& p, const at::Tensor& x0, const at::Tensor& noise,
             const at::Tensor& coefs, at::Tensor fake, at::Tensor real) {
  TORCH_CHECK(p.dim() >= 1, "model_output: expected shape (B, ...), got a 0-d tensor");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x_t, &x0, &noise, &fake, &real}) {
    CHECK_SAME(*t, p, sizes);
    CHECK_SAME_ORDER(*t, p);
    CHECK_SAME(*t, p, scalar_type);
    CHECK_SAME(*t, p, device);
  }
  const auto acc = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == 4 && coefs.size(1) == p.size(0) && coefs.is_contiguous(),
              "coefs: expected a contiguous (4, ", p.size(0), ") tensor, got sizes ", coefs.sizes());
  TORCH_CHECK(coefs.scalar_type() == acc, "coefs: expected dtype ", acc, ", got ", coefs.scalar_type());
  CHECK_SAME(coefs, p, device);
  if (p.numel() == 0) return;  // nothing to write; an empty tensor has no meaningful layout
  CHECK_DENSE_BATCH_MAJOR(p);
  if (is_cuda(p)) {
#ifdef FASTPERC_WITH_CUDA
    renoise_cuda(x_t, p, x0, noise, coefs, fake, real);
#else
    TORCH_CHECK(false, "model_output: CUDA tensors, but fastperc._C was built without CUDA kernels");
#endif
  } else {
    TORCH_CHECK(p.device().is_cpu(), "model_output: expected CPU or CUDA tensors, got ", p.device());
    renoise_cpu(x_t, p, x0, noise, coefs, fake, real);
  }
}

// outs[l][b] = grads[l][b] * scale[b] (outs may be grads): the backward of feature_mse.
void scale_rows(const std::vector<at::Tensor>& grads, const at::Tensor& scale, const std::vector<at::Tensor>& outs) {
  TORCH_CHECK(scale.dim() == 1 && scale.is_contiguous(), "scale: expected a contiguous 1-D tensor, got sizes ",
              scale.sizes(), " strides ", scale.strides());
  TORCH_CHECK(outs.size() == grads.size(), "outs: expected ", grads.size(), " tensors, got ", outs.size());
  if (grads.empty()) return;
  const auto acc = grads[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.scalar_type() == acc, "scale: expected dtype ", acc, ", got ", scale.scalar_type());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& g = grads[l];
    TORCH_CHECK(g.device() == scale.device(), "grads[", l, "]: expected device ", scale.device(), " (as scale), got ",
                g.device());
    CHECK_SAME(g, grads[0], scalar_type);
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == scale.size(0), "grads[", l, "]: expected batch size ", scale.size(0),
                ", got sizes ", g.sizes());
    CHECK_DENSE_BATCH_MAJOR(g);
    const at::Tensor& o = outs[l];
    CHECK_SAME(o, g, sizes);
    CHECK_SAME_ORDER(o, g);
    CHECK_SAME(o, g, scalar_type);
    CHECK_SAME(o, g, device);
  }
  if (is_cuda(scale)) {
#ifdef FASTPERC_WITH_CUDA
    scale_rows_cuda(grads, scale, outs);
#else
    TORCH_CHECK(false, "scale: CUDA tensors, but fastperc._C was built without CUDA kernels");
#endif
  } else {
    TORCH_CHECK(scale.device().is_cpu(), "scale: expected CPU or CUDA tensors, got ", scale.device());
    scale_rows_cpu(grads, scale, outs);
  }
}

std::string build_info() {
#ifdef _OPENMP  // the OpenMP version the CPU kernels were compiled against (absent: built without it)
  std::string s = "cpu(openmp " + std::to_string(_OPENMP) + ", threads=" + std::to_string(at::get_num_threads()) + ")";
#else
  std::string s = "cpu(no openmp, threads=" + std::to_string(at::get_num_threads()) + ")";
#endif
#ifdef FASTPERC_WITH_CUDA
  s += " cuda(sm " FASTPERC_STR(FASTPERC_SASS_ARCHS) ", ptx " FASTPERC_STR(FASTPERC_PTX_ARCH) ")";
#endif
  return s;
}

#ifdef FASTPERC_WITH_CUDA
// The architectures the CUDA kernels were built for: SASS per listed compute capability, PTX for the
// newest (set by setup.py). fastperc.ops._backend checks the GPU against these before `auto` picks cuda.
pybind11::dict cuda_archs() {
  pybind11::dict d;
  d["sass"] = std::vector<int>{FASTPERC_SASS_ARCHS};
  d["ptx"] = FASTPERC_PTX_ARCH;
  return d;
}
#endif

}  // namespace
}  // namespace fastperc

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastperc fused kernels (CPU/OpenMP, and CUDA when built with it)";
  m.def("feature_mse_cpu", &fastperc::feature_mse, "multi-layer feature MSE + gradient (CPU tensors)");
  m.def("renoise_cpu", &fastperc::renoise, "both teacher inputs in one pass (CPU tensors)");
  m.def("scale_rows_cpu", &fastperc::scale_rows, "outs[l][b] = grads[l][b] * scale[b] (CPU tensors)");
#ifdef FASTPERC_WITH_CUDA
  m.def("feature_mse_cuda", &fastperc::feature_mse, "multi-layer feature MSE + gradient (CUDA tensors)");
  m.def("renoise_cuda", &fastperc::renoise, "both teacher inputs in one pass (CUDA tensors)");
  m.def("scale_rows_cuda", &fastperc::scale_rows, "outs[l][b] = grads[l][b] * scale[b] (CUDA tensors)");
  m.def("cuda_archs", &fastperc::cuda_archs, "{'sass': [compute capabilities x10], 'ptx': newest}");
#endif
  m.def("build_info", &fastperc::build_info, "what this build holds");
}
