// Multi-scale deformable attention: input checks, device dispatch and the Python module
// `dinov2od._C`. Autograd lives in Python (dinov2od/layers/_ext.py).
#include <torch/extension.h>

#include "ms_deform_attn.h"

namespace dinov2od {

MSDAInputs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, M, D), got ", value.sizes());
  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "value must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "level_start_index must be (L,) with L = ", L, ", got ", level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "attention_weights must be (N, Lq, M, L, P), got ",
              attention_weights.sizes());
  TORCH_CHECK(sampling_locations.device() == value.device() &&
                  attention_weights.device() == value.device(),
              "value, sampling_locations and attention_weights must be on one device, got ",
              value.device(), ", ", sampling_locations.device(), ", ",
              attention_weights.device());
  TORCH_CHECK(sampling_locations.is_floating_point() && attention_weights.is_floating_point(),
              "sampling_locations and attention_weights must be floating point");
  MSDAInputs in;
  in.N = value.size(0);
  in.S = value.size(1);
  in.M = value.size(2);
  in.D = value.size(3);
  in.Lq = sampling_locations.size(1);
  in.L = L;
  in.P = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == in.N && sampling_locations.size(2) == in.M &&
                  sampling_locations.size(3) == L,
              "sampling_locations ", sampling_locations.sizes(), " does not match value ",
              value.sizes(), " with ", L, " levels");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "attention_weights must be ", sampling_locations.sizes().slice(0, 5), ", got ",
              attention_weights.sizes());
  const auto opmath = dtype == at::kDouble ? at::kDouble : at::kFloat;
  // the CPU kernel reads value through its strides when its channels are contiguous
  in.value = (value.is_cpu() && value.stride(3) == 1) ? value : value.contiguous();
  in.spatial_shapes = spatial_shapes.to(value.device(), at::kLong).contiguous();
  in.level_start_index = level_start_index.to(value.device(), at::kLong).contiguous();
  in.loc = sampling_locations.to(opmath).contiguous();
  in.attn = attention_weights.to(opmath).contiguous();
  // the kernels index value with these: check them on the host (one small copy for CUDA)
  const auto shapes_cpu = spatial_shapes.to(at::kCPU, at::kLong);
  const auto starts_cpu = level_start_index.to(at::kCPU, at::kLong);
  const auto areas = shapes_cpu.select(1, 0) * shapes_cpu.select(1, 1);
  TORCH_CHECK(L == 0 || areas.min().item<int64_t>() > 0, "spatial_shapes must be positive, got ",
              shapes_cpu);
  TORCH_CHECK(areas.sum().item<int64_t>() == in.S, "value has S=", in.S,
              " tokens but spatial_shapes sum to ", areas.sum().item<int64_t>());
  TORCH_CHECK(at::equal(starts_cpu, areas.cumsum(0) - areas),
              "level_start_index must be the offsets of the levels in value, ",
              areas.cumsum(0) - areas, ", got ", starts_cpu);
  return in;
}

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  const auto in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_forward_cuda(in);
#else
    TORCH_CHECK(false, "dinov2od._C was built without CUDA; rebuild with FORCE_CUDA=1");
#endif
  }
  TORCH_CHECK(value.is_cpu(), "no multi-scale deformable attention kernel for ", value.device());
  return ms_deform_attn_forward_cpu(in);
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value,
                                                const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_locations,
                                                const at::Tensor& attention_weights,
                                                const at::Tensor& grad_output) {
  const auto in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights);
  TORCH_CHECK(grad_output.device() == value.device(), "grad_output must be on ", value.device());
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_backward_cuda(in, grad_output);
#else
    TORCH_CHECK(false, "dinov2od._C was built without CUDA; rebuild with FORCE_CUDA=1");
#endif
  }
  TORCH_CHECK(value.is_cpu(), "no multi-scale deformable attention kernel for ", value.device());
  return ms_deform_attn_backward_cpu(in, grad_output);
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string compiled_cuda_archs() {
#ifdef WITH_CUDA
  return cuda_arch_list();
#else
  return "";
#endif
}

}  // namespace dinov2od

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dinov2od compiled ops: multi-scale deformable attention (CPU, and CUDA if built), CPU ViT attention";
  m.def("ms_deform_attn_forward", &dinov2od::ms_deform_attn_forward,
        "forward(value, spatial_shapes, level_start_index, sampling_locations, "
        "attention_weights) -> (N, Lq, M*D)");
  m.def("ms_deform_attn_backward", &dinov2od::ms_deform_attn_backward,
        "backward(..., grad_output) -> [grad_value, grad_sampling_locations, "
        "grad_attention_weights]");
  m.def("with_cuda", &dinov2od::with_cuda, "whether the CUDA kernels were compiled");
  m.def("cuda_archs", &dinov2od::compiled_cuda_archs,
        "compute capabilities the CUDA kernels were compiled for, e.g. '800,900'");
  m.def("cpu_capability", &dinov2od::cpu_capability, "CPU inner loops in use: avx2 or default");
  m.def("set_cpu_capability", &dinov2od::set_cpu_capability,
        "select the CPU inner loops ('default' or 'avx2'); for tests and benchmarks");
  m.def("attention_available", &dinov2od::attention_available,
        "whether this build and CPU have the AVX-512 attention kernel");
  m.def("attention_forward", &dinov2od::attention_forward_cpu,
        "attention_forward(q, k, v) -> (B, T, H, 64): softmax(q k^T / 8) v of (B, H, T, 64) float32 "
        "CPU tensors, no gradient");
  m.def("attention_bf16_available", &dinov2od::attention_bf16_available,
        "whether this build and CPU have the bfloat16 attention kernel (AVX-512 + avx512_bf16)");
  m.def("attention_forward_bf16", &dinov2od::attention_forward_bf16_cpu,
        "attention_forward_bf16(q, k, v) -> (B, T, H, D) bfloat16: the same of bfloat16 CPU tensors, head dim D 64 or 32 "
        "(float32 accumulation and softmax), no gradient");
}
