// Multi-scale deformable attention: declarations shared by the CPU and CUDA kernels.
//
//   value               (N, S, M, D)        float16 / bfloat16 / float32 / float64
//   spatial_shapes      (L, 2) int64        (H_l, W_l)
//   level_start_index   (L,)   int64
//   sampling_locations  (N, Lq, M, L, P, 2) normalized (x, y); any floating dtype
//   attention_weights   (N, Lq, M, L, P)    any floating dtype
//   -> output           (N, Lq, M * D)      value's dtype
//
// Sampling locations and attention weights are computed with, and their gradients returned in,
// the opmath type of value (float32, or float64 for float64 value); value gradients come back
// in value's dtype. Accumulation is always in the opmath type.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace dinov2od {

struct MSDAInputs {
  at::Tensor value, spatial_shapes, level_start_index, loc, attn;
  int64_t N, S, M, D, Lq, L, P;
};

// Validates shapes and dtypes (TORCH_CHECK with the input's name) and returns contiguous
// tensors: value as is, shapes/starts int64 on value's device, loc/attn in opmath type.
MSDAInputs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights);

at::Tensor ms_deform_attn_forward_cpu(const MSDAInputs& in);
std::vector<at::Tensor> ms_deform_attn_backward_cpu(const MSDAInputs& in,
                                                    const at::Tensor& grad_output);
std::string cpu_capability();
void set_cpu_capability(const std::string& name);

// ViT softmax attention at CPU fp32 inference (cpu/attention_cpu.cpp): (B, H, T, 64) q, k, v ->
// (B, T, H, 64); AVX-512 only, no gradient
bool attention_available();
at::Tensor attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
bool attention_bf16_available();
at::Tensor attention_forward_bf16_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(const MSDAInputs& in);
std::vector<at::Tensor> ms_deform_attn_backward_cuda(const MSDAInputs& in,
                                                     const at::Tensor& grad_output);
std::string cuda_arch_list();
#endif

}  // namespace dinov2od
