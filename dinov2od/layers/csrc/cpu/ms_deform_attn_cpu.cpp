// Multi-scale deformable attention on the CPU: at::parallel_for over independent work items,
// inner loops vectorized over the D contiguous channels. The inner loops are compiled twice,
// for the default target and (x86-64 with GCC) for AVX2+FMA, and chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../ms_deform_attn.h"

namespace dinov2od {
namespace cpu_default {
#include "ms_deform_attn_cpu_kernel.h"
}  // namespace cpu_default
}  // namespace dinov2od

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DINOV2OD_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace dinov2od {
namespace cpu_avx2 {
#include "ms_deform_attn_cpu_kernel.h"
}  // namespace cpu_avx2
}  // namespace dinov2od
#pragma GCC pop_options
#endif

namespace dinov2od {
namespace {

enum class Isa { kDefault, kAvx2 };

bool cpu_has_avx2() {
#ifdef DINOV2OD_HAVE_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

Isa& current_isa() {
  static Isa isa = cpu_has_avx2() ? Isa::kAvx2 : Isa::kDefault;
  return isa;
}

cpu_default::Problem problem_of(const MSDAInputs& in) {
  return {in.N, in.S, in.M, in.D, in.Lq, in.L, in.P,
          in.value.stride(0), in.value.stride(1), in.value.stride(2)};
}

template <typename scalar_t, typename T>
void forward_items(Isa isa, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                   const T* loc, const T* attn, scalar_t* out, const cpu_default::Problem& pb,
                   int64_t begin, int64_t end, T* acc) {
#ifdef DINOV2OD_HAVE_AVX2
  if (isa == Isa::kAvx2) {
    const cpu_avx2::Problem pb2{pb.N, pb.S, pb.M, pb.D, pb.Lq, pb.L, pb.P, pb.vs_n, pb.vs_s, pb.vs_m};
    cpu_avx2::forward_items(value, shapes, starts, loc, attn, out, pb2, begin, end, acc);
    return;
  }
#endif
  cpu_default::forward_items(value, shapes, starts, loc, attn, out, pb, begin, end, acc);
}

template <typename scalar_t, typename T>
void backward_task(Isa isa, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                   const T* loc, const T* attn, const scalar_t* grad_out, T* gv,
                   int64_t gv_stride, T* grad_loc, T* grad_attn, const cpu_default::Problem& pb,
                   int64_t t, T* gbuf) {
#ifdef DINOV2OD_HAVE_AVX2
  if (isa == Isa::kAvx2) {
    const cpu_avx2::Problem pb2{pb.N, pb.S, pb.M, pb.D, pb.Lq, pb.L, pb.P, pb.vs_n, pb.vs_s, pb.vs_m};
    cpu_avx2::backward_task(value, shapes, starts, loc, attn, grad_out, gv, gv_stride, grad_loc,
                            grad_attn, pb2, t, gbuf);
    return;
  }
#endif
  cpu_default::backward_task(value, shapes, starts, loc, attn, grad_out, gv, gv_stride, grad_loc,
                             grad_attn, pb, t, gbuf);
}

}  // namespace

std::string cpu_capability() { return current_isa() == Isa::kAvx2 ? "avx2" : "default"; }

void set_cpu_capability(const std::string& name) {
  if (name == "default") {
    current_isa() = Isa::kDefault;
  } else if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "cpu capability 'avx2' is not available on this CPU/build");
    current_isa() = Isa::kAvx2;
  } else {
    TORCH_CHECK(false, "unknown cpu capability '", name, "' (expected 'default' or 'avx2')");
  }
}

at::Tensor ms_deform_attn_forward_cpu(const MSDAInputs& in) {
  auto out = at::empty({in.N, in.Lq, in.M, in.D}, in.value.options());
  const auto pb = problem_of(in);
  const Isa isa = current_isa();
  const int64_t items = in.N * in.Lq * in.M;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        using T = at::opmath_type<scalar_t>;
        const scalar_t* value = in.value.data_ptr<scalar_t>();
        const int64_t* shapes = in.spatial_shapes.data_ptr<int64_t>();
        const int64_t* starts = in.level_start_index.data_ptr<int64_t>();
        const T* loc = in.loc.data_ptr<T>();
        const T* attn = in.attn.data_ptr<T>();
        scalar_t* o = out.data_ptr<scalar_t>();
        // grain: about 4k channel-point products per chunk
        const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, in.L * in.P * in.D));
        at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
          std::vector<T> acc(in.D);
          forward_items<scalar_t, T>(isa, value, shapes, starts, loc, attn, o, pb, begin, end,
                                     acc.data());
        });
      });
  return out.view({in.N, in.Lq, in.M * in.D});
}

std::vector<at::Tensor> ms_deform_attn_backward_cpu(const MSDAInputs& in,
                                                    const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.numel() == in.N * in.Lq * in.M * in.D,
              "grad_output must have N * Lq * M * D elements");
  const int64_t N = in.N, M = in.M, D = in.D, L = in.L, Lq = in.Lq, P = in.P;
  // Task (n, m, l) reads these contiguously: (N, M, L, Lq, P, 2), (N, M, L, Lq, P), (N, M, Lq, D)
  const auto loc_t = in.loc.permute({0, 2, 3, 1, 4, 5}).contiguous();
  const auto attn_t = in.attn.permute({0, 2, 3, 1, 4}).contiguous();
  const auto go_t = grad_output.to(in.value.scalar_type())
                        .reshape({N, Lq, M, D})
                        .permute({0, 2, 1, 3})
                        .contiguous();
  auto grad_value = at::empty({N, in.S, M, D}, in.value.options());  // contiguous
  auto grad_loc_t = at::empty_like(loc_t);
  auto grad_attn_t = at::empty_like(attn_t);
  const auto pb = problem_of(in);
  const Isa isa = current_isa();
  const int64_t tasks = N * M * L;  // (n, m, l): disjoint slices of grad_value
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
        using T = at::opmath_type<scalar_t>;
        const scalar_t* value = in.value.data_ptr<scalar_t>();
        const int64_t* shapes = in.spatial_shapes.data_ptr<int64_t>();
        const int64_t* starts = in.level_start_index.data_ptr<int64_t>();
        const T* loc = loc_t.data_ptr<T>();
        const T* attn = attn_t.data_ptr<T>();
        const scalar_t* g = go_t.data_ptr<scalar_t>();
        scalar_t* gval = grad_value.data_ptr<scalar_t>();
        T* gloc = grad_loc_t.data_ptr<T>();
        T* gattn = grad_attn_t.data_ptr<T>();
        constexpr bool same = std::is_same<scalar_t, T>::value;
        at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
          std::vector<T> gbuf(D);
          std::vector<T> acc;  // float accumulator of one level slice (half / bfloat16 only)
          for (int64_t t = begin; t < end; ++t) {
            const int64_t l = t % L, nm = t / L;
            const int64_t rows = shapes[2 * l] * shapes[2 * l + 1];
            scalar_t* slice = gval + ((nm / M * in.S + starts[l]) * M + nm % M) * D;  // rows M*D apart
            T* gv;
            int64_t gv_stride;
            if (same) {
              gv = reinterpret_cast<T*>(slice);
              gv_stride = M * D;
            } else {
              acc.resize(rows * D);
              gv = acc.data();
              gv_stride = D;
            }
            backward_task<scalar_t, T>(isa, value, shapes, starts, loc + t * Lq * P * 2,
                                       attn + t * Lq * P, g + nm * Lq * D, gv, gv_stride,
                                       gloc + t * Lq * P * 2, gattn + t * Lq * P, pb, t,
                                       gbuf.data());
            if (!same) {
              for (int64_t r = 0; r < rows; ++r) {
                for (int64_t d = 0; d < D; ++d) {
                  slice[r * M * D + d] = static_cast<scalar_t>(acc[r * D + d]);
                }
              }
            }
          }
        });
      });
  // back to (N, Lq, M, L, P, 2) and (N, Lq, M, L, P)
  auto grad_loc = grad_loc_t.permute({0, 3, 1, 2, 4, 5}).contiguous();
  auto grad_attn = grad_attn_t.permute({0, 3, 1, 2, 4}).contiguous();
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace dinov2od
