// Multi-scale deformable attention, CPU inner loops.
//
// This header is included twice by ms_deform_attn_cpu.cpp, inside two namespaces: once with
// the compiler's default target and once under `#pragma GCC target("avx2,fma")`. It must not
// include anything itself but the guard-less ../bilinear_corners.h (<cmath>, <cstdint>,
// <cstring> are included before it), and it has no include guard on purpose.
//
// Forward layouts (contiguous unless noted; the backward's are listed at backward_task):
//   value        (N, S, M, D)        scalar_t, channels contiguous (strides in Problem)
//   loc          (N, Lq, M, L, P, 2) T  (T = opmath type: float, or double for double)
//   attn         (N, Lq, M, L, P)    T
//   out          (N, Lq, M, D)       scalar_t
// Every inner loop runs over the D contiguous channels of one value row.

struct Problem {
  int64_t N, S, M, D, Lq, L, P;
  int64_t vs_n, vs_s, vs_m;  // value strides (elements) of n, s, m; channels are contiguous
};

#include "../bilinear_corners.h"

// acc[d] += a * v[d]
template <typename scalar_t, typename T>
inline void axpy(T* __restrict__ acc, T a, const scalar_t* __restrict__ v, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    acc[d] += a * static_cast<T>(v[d]);
  }
}

// acc[d] += sum_c w[c] * v_c[d] over the four corners.
template <typename scalar_t, typename T>
inline void axpy4(T* __restrict__ acc, T w0, T w1, T w2, T w3, const scalar_t* __restrict__ v0,
                  const scalar_t* __restrict__ v1, const scalar_t* __restrict__ v2,
                  const scalar_t* __restrict__ v3, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    acc[d] += w0 * static_cast<T>(v0[d]) + w1 * static_cast<T>(v1[d]) +
              w2 * static_cast<T>(v2[d]) + w3 * static_cast<T>(v3[d]);
  }
}

// Prefetch the value rows of one point's corners (D channels each, one or more cache lines).
template <typename scalar_t, typename T>
inline void prefetch_corners(const Corners<T>& c, const scalar_t* level, int64_t stride, int64_t D) {
#if defined(__GNUC__)
  const int64_t bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  for (int k = 0; k < 4; ++k) {
    if (c.row[k] < 0) continue;
    const char* row = reinterpret_cast<const char*>(level + c.row[k] * stride);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
  }
#else
  (void)c; (void)level; (void)stride; (void)D;
#endif
}

// Points per item whose corners are found (and their rows prefetched) one item ahead.
constexpr int64_t kPrefetchPoints = 64;

// The corners of every point of item nqm (L * P <= kPrefetchPoints), their rows prefetched:
// live[lp] is false where the point reads nothing.
template <typename scalar_t, typename T>
inline void item_corners(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                         const Problem& pb, int64_t nqm, Corners<T>* cs, bool* live) {
  const int64_t M = pb.M, Lq = pb.Lq, L = pb.L, P = pb.P, stride = pb.vs_s;
  const int64_t m = nqm % M, n = nqm / (Lq * M);
  const scalar_t* head = value + n * pb.vs_n + m * pb.vs_m;
  const T* li = loc + nqm * L * P * 2;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const scalar_t* level = head + starts[l] * stride;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t lp = l * P + p;
      live[lp] = bilinear_corners(li[2 * lp], li[2 * lp + 1], H, W, cs[lp]);
      if (live[lp]) prefetch_corners(cs[lp], level, stride, pb.D);
    }
  }
}

// Forward for work items [begin, end), item nqm = (n * Lq + q) * M + m (the order of loc, attn
// and out, and heads of one query sample nearby value rows); acc is D scratch values.
// The value rows a point reads are scattered over a map that may have left the caches since it
// was written (a decoder projects every layer's values at once): where an item has at most
// kPrefetchPoints points, the corners of item i + 1 are found and their rows prefetched before
// item i is accumulated, so that the loads overlap instead of stalling one after another.
template <typename scalar_t, typename T>
void forward_items(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                   const T* loc, const T* attn, scalar_t* out, const Problem& pb, int64_t begin,
                   int64_t end, T* acc) {
  const int64_t M = pb.M, D = pb.D, Lq = pb.Lq, L = pb.L, P = pb.P;
  const int64_t stride = pb.vs_s;  // between value rows of one head
  const bool ahead = L * P <= kPrefetchPoints;
  Corners<T> buf[2][kPrefetchPoints];
  bool live[2][kPrefetchPoints];
  if (ahead && begin < end) item_corners(value, shapes, starts, loc, pb, begin, buf[0], live[0]);
  for (int64_t nqm = begin; nqm < end; ++nqm) {
    const int64_t m = nqm % M, n = nqm / (Lq * M);
    const scalar_t* head = value + n * pb.vs_n + m * pb.vs_m;
    const T* li = loc + nqm * L * P * 2;
    const T* ai = attn + nqm * L * P;
    const int cur = static_cast<int>((nqm - begin) & 1);
    if (ahead && nqm + 1 < end) item_corners(value, shapes, starts, loc, pb, nqm + 1, buf[cur ^ 1], live[cur ^ 1]);
    for (int64_t d = 0; d < D; ++d) acc[d] = T(0);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const scalar_t* level = head + starts[l] * stride;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t lp = l * P + p;
        Corners<T> own;
        const Corners<T>* cp = &own;
        if (ahead) {
          if (!live[cur][lp]) continue;
          cp = &buf[cur][lp];
        } else if (!bilinear_corners(li[2 * lp], li[2 * lp + 1], H, W, own)) {
          continue;
        }
        const Corners<T>& c = *cp;
        const T a = ai[lp];
        if (c.all_inside) {
          axpy4(acc, a * c.w[0], a * c.w[1], a * c.w[2], a * c.w[3], level + c.row[0] * stride,
                level + c.row[1] * stride, level + c.row[2] * stride, level + c.row[3] * stride, D);
        } else {
          for (int k = 0; k < 4; ++k) {
            if (c.row[k] >= 0) axpy(acc, a * c.w[k], level + c.row[k] * stride, D);
          }
        }
      }
    }
    scalar_t* o = out + nqm * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
  }
}

// One corner of the backward: returns sum_d g[d] * v[d] and does gv[d] += a * g[d].
template <typename scalar_t, typename T>
inline T dot_and_scatter(const T* __restrict__ g, const scalar_t* __restrict__ v,
                         T* __restrict__ gv, T a, int64_t D) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) {
    s += g[d] * static_cast<T>(v[d]);
    gv[d] += a * g[d];
  }
  return s;
}

// The same for four distinct corners at once (the point lies inside the map).
template <typename scalar_t, typename T>
inline void dot_and_scatter4(const T* __restrict__ g, const scalar_t* __restrict__ v0,
                             const scalar_t* __restrict__ v1, const scalar_t* __restrict__ v2,
                             const scalar_t* __restrict__ v3, T* __restrict__ gv0,
                             T* __restrict__ gv1, T* __restrict__ gv2, T* __restrict__ gv3,
                             T a0, T a1, T a2, T a3, int64_t D, T* dots) {
  T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t d = 0; d < D; ++d) {
    const T gd = g[d];
    s0 += gd * static_cast<T>(v0[d]);
    s1 += gd * static_cast<T>(v1[d]);
    s2 += gd * static_cast<T>(v2[d]);
    s3 += gd * static_cast<T>(v3[d]);
    gv0[d] += a0 * gd;
    gv1[d] += a1 * gd;
    gv2[d] += a2 * gd;
    gv3[d] += a3 * gd;
  }
  dots[0] = s0;
  dots[1] = s1;
  dots[2] = s2;
  dots[3] = s3;
}

// Backward for one task t = (n * M + m) * L + l. The task owns the value rows of level l and
// head m of batch n, so no two tasks write the same gradient entry. Per-task inputs are laid out
// contiguously by the caller:
//   loc (Lq, P, 2), attn (Lq, P)           T, this task's (n, m, l) slice
//   grad_out (Lq, D)                        scalar_t, rows of (n, m)
//   grad_loc (Lq, P, 2), grad_attn (Lq, P)  T, outputs
//   gv       first accumulator row of this task's level (H * W rows, gv_stride apart)
//   gbuf     D scratch values (grad_out row in T when scalar_t is not T)
template <typename scalar_t, typename T>
void backward_task(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                   const T* loc, const T* attn, const scalar_t* grad_out, T* gv,
                   int64_t gv_stride, T* grad_loc, T* grad_attn, const Problem& pb, int64_t t,
                   T* gbuf) {
  const int64_t M = pb.M, D = pb.D, Lq = pb.Lq, L = pb.L, P = pb.P;
  const int64_t l = t % L, m = (t / L) % M, n = t / (L * M);
  const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
  const int64_t stride = pb.vs_s;
  const scalar_t* level = value + n * pb.vs_n + starts[l] * stride + m * pb.vs_m;
  for (int64_t r = 0; r < H * W; ++r) {
    T* row = gv + r * gv_stride;
    for (int64_t d = 0; d < D; ++d) row[d] = T(0);
  }
  for (int64_t q = 0; q < Lq; ++q) {
    const scalar_t* go = grad_out + q * D;
    const T* g;
    if (sizeof(scalar_t) == sizeof(T)) {
      g = reinterpret_cast<const T*>(go);  // scalar_t is T
    } else {
      for (int64_t d = 0; d < D; ++d) gbuf[d] = static_cast<T>(go[d]);
      g = gbuf;
    }
    for (int64_t p = 0; p < P; ++p) {
      const int64_t lp = q * P + p;
      Corners<T> c;
      if (!bilinear_corners(loc[2 * lp], loc[2 * lp + 1], H, W, c)) {
        grad_loc[2 * lp] = T(0);
        grad_loc[2 * lp + 1] = T(0);
        grad_attn[lp] = T(0);
        continue;
      }
      const T a = attn[lp];
      T dots[4] = {T(0), T(0), T(0), T(0)};
      if (c.all_inside) {
        dot_and_scatter4(g, level + c.row[0] * stride, level + c.row[1] * stride,
                         level + c.row[2] * stride, level + c.row[3] * stride,
                         gv + c.row[0] * gv_stride, gv + c.row[1] * gv_stride,
                         gv + c.row[2] * gv_stride, gv + c.row[3] * gv_stride, a * c.w[0],
                         a * c.w[1], a * c.w[2], a * c.w[3], D, dots);
      } else {
        for (int k = 0; k < 4; ++k) {
          if (c.row[k] >= 0) {
            dots[k] = dot_and_scatter(g, level + c.row[k] * stride, gv + c.row[k] * gv_stride,
                                      a * c.w[k], D);
          }
        }
      }
      const T gx = T(1) - c.fx, gy = T(1) - c.fy;
      // d(sample)/d(fx) and d(sample)/d(fy), contracted with grad_out
      const T dfx = gy * (dots[1] - dots[0]) + c.fy * (dots[3] - dots[2]);
      const T dfy = gx * (dots[2] - dots[0]) + c.fx * (dots[3] - dots[1]);
      grad_attn[lp] = c.w[0] * dots[0] + c.w[1] * dots[1] + c.w[2] * dots[2] + c.w[3] * dots[3];
      grad_loc[2 * lp] = a * static_cast<T>(W) * dfx;
      grad_loc[2 * lp + 1] = a * static_cast<T>(H) * dfy;
    }
  }
}
