// Multi-scale deformable attention, CUDA kernels (float16 / bfloat16 / float32 / float64, all
// accumulating in at::opmath_type: float32, or float64 for float64).
//
// Forward: one thread per output element (n, q, m, d), looping over levels and points.
// Backward: grad_value is scattered with atomics into an opmath buffer. The gradients of the
// sampling locations and attention weights are sums over the D channels of a head; three
// channel-reduction branches compute them:
//   * D <= 32            groups of next_pow2(D) lanes inside a warp, __shfl_xor_sync butterfly;
//   * 32 < D <= 1024     one block of round_up(D, 32) threads per (n, q, m): warp shuffles, then
//                        shared memory across warps; plain stores;
//   * D > 1024           several 1024-thread blocks per (n, q, m) along the channels, each
//                        reducing in shared memory, then global atomics into zeroed outputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <climits>
#include <string>
#include <vector>

#include "../ms_deform_attn.h"

#define DINOV2OD_STR_IMPL(...) #__VA_ARGS__
#define DINOV2OD_STR(...) DINOV2OD_STR_IMPL(__VA_ARGS__)

namespace dinov2od {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlock = 1024;

struct Dims {
  int64_t S, M, D, Lq, L, P;
};

#include "../bilinear_corners.h"

// out[(n, q, m), d] for i = ((n * Lq + q) * M + m) * D + d
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const T* __restrict__ loc,
                               const T* __restrict__ attn, scalar_t* __restrict__ out, Dims dm,
                               int64_t total) {
  const int64_t stride = dm.M * dm.D;  // between value rows of one head
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t d = i % dm.D, nqm = i / dm.D;
    const int64_t m = nqm % dm.M, n = nqm / (dm.M * dm.Lq);
    const scalar_t* head = value + (n * dm.S * dm.M + m) * dm.D + d;
    const T* li = loc + nqm * dm.L * dm.P * 2;
    const T* ai = attn + nqm * dm.L * dm.P;
    T acc = T(0);
    for (int64_t l = 0; l < dm.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const scalar_t* level = head + starts[l] * stride;
      for (int64_t p = 0; p < dm.P; ++p) {
        const int64_t lp = l * dm.P + p;
        Corners<T> c;
        if (!bilinear_corners(li[2 * lp], li[2 * lp + 1], H, W, c)) continue;
        T s = T(0);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c.row[k] >= 0) s += c.w[k] * static_cast<T>(level[c.row[k] * stride]);
        }
        acc += ai[lp] * s;
      }
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

// Per-channel backward of one sampling point. Scatters into grad_value (opmath buffer) and
// returns this channel's terms of the three channel sums:
//   r[0]: d out / d attention weight   r[1], r[2]: d sample / d fx, d fy (before * a * W, H)
template <typename scalar_t, typename T>
__device__ __forceinline__ void point_backward(const scalar_t* level, T* glevel, int64_t stride,
                                               const Corners<T>& c, T a, T gout, T r[3]) {
  T v[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[k] = T(0);
    if (c.row[k] >= 0) {
      v[k] = static_cast<T>(level[c.row[k] * stride]);
      gpuAtomicAdd(glevel + c.row[k] * stride, a * c.w[k] * gout);
    }
  }
  const T gx = T(1) - c.fx, gy = T(1) - c.fy;
  r[0] = gout * (c.w[0] * v[0] + c.w[1] * v[1] + c.w[2] * v[2] + c.w[3] * v[3]);
  r[1] = gout * (gy * (v[1] - v[0]) + c.fy * (v[3] - v[2]));
  r[2] = gout * (gx * (v[2] - v[0]) + c.fx * (v[3] - v[1]));
}

template <typename T>
__device__ __forceinline__ T group_sum(T x, int width) {  // butterfly inside groups of `width` lanes
  for (int offset = width / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// D <= 32: lanes (n, q, m, lane) with `group` = next_pow2(D) lanes per (n, q, m); a group lives
// inside one warp. Loops are warp-uniform so every lane reaches each shuffle.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) backward_warp_kernel(const scalar_t* __restrict__ value,
                                     const int64_t* __restrict__ shapes,
                                     const int64_t* __restrict__ starts,
                                     const T* __restrict__ loc, const T* __restrict__ attn,
                                     const scalar_t* __restrict__ grad_out, T* grad_value,
                                     T* __restrict__ grad_loc, T* __restrict__ grad_attn, Dims dm,
                                     int64_t groups, int group) {
  const int64_t total = groups * group;
  const int64_t stride = dm.M * dm.D;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t warp0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + (threadIdx.x & ~31);
       warp0 < total; warp0 += step) {
    const int64_t i = warp0 + (threadIdx.x & 31);
    const int64_t nqm = i / group;
    const int lane = static_cast<int>(i % group);
    const bool in_range = i < total;  // uniform inside a group
    const bool active = in_range && lane < dm.D;
    const int64_t m = nqm % dm.M, n = nqm / (dm.M * dm.Lq);
    const int64_t off = (n * dm.S * dm.M + m) * dm.D + lane;
    const T gout = active ? static_cast<T>(grad_out[nqm * dm.D + lane]) : T(0);
    for (int64_t l = 0; l < dm.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      for (int64_t p = 0; p < dm.P; ++p) {
        const int64_t lp = (nqm * dm.L + l) * dm.P + p;
        T r[3] = {T(0), T(0), T(0)};
        T a = T(0);
        Corners<T> c;
        if (in_range && bilinear_corners(loc[2 * lp], loc[2 * lp + 1], H, W, c)) {
          a = attn[lp];
          if (active) {
            point_backward(value + off + starts[l] * stride, grad_value + off + starts[l] * stride,
                           stride, c, a, gout, r);
          }
        }
        const T s_attn = group_sum(r[0], group);
        const T s_x = group_sum(r[1], group);
        const T s_y = group_sum(r[2], group);
        if (in_range && lane == 0) {
          grad_attn[lp] = s_attn;
          grad_loc[2 * lp] = a * static_cast<T>(W) * s_x;
          grad_loc[2 * lp + 1] = a * static_cast<T>(H) * s_y;
        }
      }
    }
  }
}

// D > 32: block (x: one (n, q, m), y: one chunk of blockDim.x channels). With one chunk the block
// owns the (n, q, m) sums and stores them; with several, chunks add into zeroed outputs.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kMaxBlock) backward_block_kernel(const scalar_t* __restrict__ value,
                                      const int64_t* __restrict__ shapes,
                                      const int64_t* __restrict__ starts,
                                      const T* __restrict__ loc, const T* __restrict__ attn,
                                      const scalar_t* __restrict__ grad_out, T* grad_value,
                                      T* grad_loc, T* grad_attn, Dims dm, int64_t groups) {
  __shared__ T partial[3][kMaxBlock / 32];
  const int64_t stride = dm.M * dm.D;
  const int64_t d = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const bool active = d < dm.D;
  const bool atomic = gridDim.y > 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t nqm = blockIdx.x; nqm < groups; nqm += gridDim.x) {  // uniform per block
    const int64_t m = nqm % dm.M, n = nqm / (dm.M * dm.Lq);
    const int64_t off = (n * dm.S * dm.M + m) * dm.D + d;
    const T gout = active ? static_cast<T>(grad_out[nqm * dm.D + d]) : T(0);
    for (int64_t l = 0; l < dm.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      for (int64_t p = 0; p < dm.P; ++p) {
        const int64_t lp = (nqm * dm.L + l) * dm.P + p;
        T r[3] = {T(0), T(0), T(0)};
        Corners<T> c;
        const bool inside = bilinear_corners(loc[2 * lp], loc[2 * lp + 1], H, W, c);
        const T a = attn[lp];
        if (inside && active) {
          point_backward(value + off + starts[l] * stride, grad_value + off + starts[l] * stride,
                         stride, c, a, gout, r);
        }
#pragma unroll
        for (int k = 0; k < 3; ++k) {
          const T s = group_sum(r[k], 32);
          if (lane == 0) partial[k][warp] = s;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
          T s[3] = {T(0), T(0), T(0)};
          for (int w = 0; w < warps; ++w) {
#pragma unroll
            for (int k = 0; k < 3; ++k) s[k] += partial[k][w];
          }
          const T gx = a * static_cast<T>(W) * s[1], gy = a * static_cast<T>(H) * s[2];
          if (atomic) {
            gpuAtomicAdd(grad_attn + lp, s[0]);
            gpuAtomicAdd(grad_loc + 2 * lp, gx);
            gpuAtomicAdd(grad_loc + 2 * lp + 1, gy);
          } else {
            grad_attn[lp] = s[0];
            grad_loc[2 * lp] = gx;
            grad_loc[2 * lp + 1] = gy;
          }
        }
        __syncthreads();  // partial[] is reused by the next point
      }
    }
  }
}

Dims dims_of(const MSDAInputs& in) { return {in.S, in.M, in.D, in.Lq, in.L, in.P}; }

unsigned int grid_for(int64_t work, int64_t per_block) {
  return static_cast<unsigned int>(std::min<int64_t>((work + per_block - 1) / per_block, INT_MAX));
}

}  // namespace

std::string cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return DINOV2OD_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

at::Tensor ms_deform_attn_forward_cuda(const MSDAInputs& in) {
  const at::cuda::OptionalCUDAGuard guard(in.value.device());
  auto out = at::empty({in.N, in.Lq, in.M, in.D}, in.value.options());
  const int64_t total = out.numel();
  if (total == 0) return out.view({in.N, in.Lq, in.M * in.D});
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        forward_kernel<scalar_t, T><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
            in.value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(),
            in.level_start_index.data_ptr<int64_t>(), in.loc.data_ptr<T>(), in.attn.data_ptr<T>(),
            out.data_ptr<scalar_t>(), dims_of(in), total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out.view({in.N, in.Lq, in.M * in.D});
}

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const MSDAInputs& in,
                                                     const at::Tensor& grad_output) {
  const at::cuda::OptionalCUDAGuard guard(in.value.device());
  TORCH_CHECK(grad_output.numel() == in.N * in.Lq * in.M * in.D,
              "grad_output must have N * Lq * M * D elements");
  const auto go = grad_output.to(in.value.scalar_type()).contiguous();
  const auto opmath = in.loc.scalar_type();
  // opmath accumulator for grad_value: the result itself for float32 / float64
  auto grad_value_acc = at::zeros(in.value.sizes(), in.value.options().dtype(opmath));
  auto grad_loc = at::zeros_like(in.loc);
  auto grad_attn = at::zeros_like(in.attn);
  const int64_t groups = in.N * in.Lq * in.M;
  if (groups > 0 && in.D > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using T = at::opmath_type<scalar_t>;
          const auto* value = in.value.data_ptr<scalar_t>();
          const auto* shapes = in.spatial_shapes.data_ptr<int64_t>();
          const auto* starts = in.level_start_index.data_ptr<int64_t>();
          const auto* g = go.data_ptr<scalar_t>();
          if (in.D <= 32) {
            int group = 1;
            while (group < in.D) group *= 2;
            backward_warp_kernel<scalar_t, T>
                <<<grid_for(groups * group, kThreads), kThreads, 0, stream>>>(
                    value, shapes, starts, in.loc.data_ptr<T>(), in.attn.data_ptr<T>(), g,
                    grad_value_acc.data_ptr<T>(), grad_loc.data_ptr<T>(),
                    grad_attn.data_ptr<T>(), dims_of(in), groups, group);
          } else {
            const int64_t block = std::min<int64_t>((in.D + 31) / 32 * 32, kMaxBlock);
            const int64_t chunks = (in.D + block - 1) / block;
            TORCH_CHECK(chunks <= 65535, "too many channels per head: D=", in.D);
            const dim3 grid(static_cast<unsigned int>(std::min<int64_t>(groups, INT_MAX)),
                            static_cast<unsigned int>(chunks));
            backward_block_kernel<scalar_t, T><<<grid, static_cast<unsigned int>(block), 0, stream>>>(
                value, shapes, starts, in.loc.data_ptr<T>(), in.attn.data_ptr<T>(), g,
                grad_value_acc.data_ptr<T>(), grad_loc.data_ptr<T>(), grad_attn.data_ptr<T>(),
                dims_of(in), groups);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {grad_value_acc.to(in.value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace dinov2od
