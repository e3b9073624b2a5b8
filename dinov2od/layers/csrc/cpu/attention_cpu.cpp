// Softmax attention for the ViT blocks at CPU fp32 inference, with AVX-512 kernels.
//
//   q, k, v   (B, H, T, 64) float32, any strides with the last dim contiguous
//   -> out    (B, T, H, 64) float32 contiguous: the layout the output projection reads
//
// Per head, K is packed once into 16-key panels (K^T, zero-padded) and V into contiguous rows.
// Then each (head, block of query rows) task computes the scaled scores S = Q K^T for all keys
// (an 8-row x 32-key register tile), an exact row softmax over the whole row (no online
// rescaling: a row of ViT tokens fits in cache), and O = P V (8 rows x 32 columns, P packed
// [key][8 rows]), dividing by the row sums at the end. No gradient: inference only (the Python
// caller takes this path only without autograd). The AVX-512 code is compiled for that target
// only (GCC `target` pragma) and chosen at run time; `attention_available()` says whether this
// build and CPU have it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../ms_deform_attn.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DINOV2OD_HAVE_AVX512_ATTENTION 1
#include <immintrin.h>
#endif

namespace dinov2od {

namespace {
constexpr int64_t kHeadDim = 64;
constexpr int64_t kQueryBlock = 48;  // query rows per task (a multiple of the 8-row tile)
constexpr int64_t kPanel = 16;       // keys per packed K^T panel
}  // namespace

#ifdef DINOV2OD_HAVE_AVX512_ATTENTION
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")
namespace attn_avx512 {

struct Problem {
  int64_t T, TP, NP;  // tokens; keys padded to whole panel pairs; panels
  float scale;
};

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// T tokens: keys padded to whole pairs of 16-key panels; scale 1 / sqrt(64)
static inline Problem make_problem(int64_t T) {
  Problem pb;
  pb.T = T;
  pb.NP = (T + 2 * kPanel - 1) / (2 * kPanel) * 2;
  pb.TP = pb.NP * kPanel;
  pb.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(kHeadDim)));
  return pb;
}

// exp(x) for x <= 0: 2^n * 2^f with x log2(e) = n + f, |f| <= 1/2, a degree-6 polynomial for 2^f
static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// K^T panels ([NP][64][16], zero past T) and V rows ([T][64]) of one head
static void pack_head(const float* k, int64_t k_stride, const float* v, int64_t v_stride,
                      const Problem& pb, float* kp, float* vp) {
  for (int64_t j = 0; j < pb.NP; ++j) {
    float* panel = kp + j * kHeadDim * kPanel;
    for (int64_t i = 0; i < kPanel; ++i) {
      const int64_t t = j * kPanel + i;
      if (t < pb.T) {
        const float* row = k + t * k_stride;
        for (int64_t d = 0; d < kHeadDim; ++d) panel[d * kPanel + i] = row[d];
      } else {
        for (int64_t d = 0; d < kHeadDim; ++d) panel[d * kPanel + i] = 0.f;
      }
    }
  }
  for (int64_t t = 0; t < pb.T; ++t) std::memcpy(vp + t * kHeadDim, v + t * v_stride, kHeadDim * sizeof(float));
}

// S[r][0:TP] = scale * q_r . K^T for 8 rows (rows past nr repeat the last valid one, not stored)
static void scores_tile(const float* const* qr, const float* kp, const Problem& pb, float* S, int nr) {
  const __m512 sc = _mm512_set1_ps(pb.scale);
  for (int64_t j = 0; j < pb.NP; j += 2) {
    const float* p0 = kp + j * kHeadDim * kPanel;
    const float* p1 = p0 + kHeadDim * kPanel;
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
           a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00, a60 = a00, a61 = a00, a70 = a00, a71 = a00;
    for (int64_t d = 0; d < kHeadDim; ++d) {
      const __m512 b0 = _mm512_loadu_ps(p0 + d * kPanel), b1 = _mm512_loadu_ps(p1 + d * kPanel);
      __m512 a;
      a = _mm512_set1_ps(qr[0][d]); a00 = _mm512_fmadd_ps(a, b0, a00); a01 = _mm512_fmadd_ps(a, b1, a01);
      a = _mm512_set1_ps(qr[1][d]); a10 = _mm512_fmadd_ps(a, b0, a10); a11 = _mm512_fmadd_ps(a, b1, a11);
      a = _mm512_set1_ps(qr[2][d]); a20 = _mm512_fmadd_ps(a, b0, a20); a21 = _mm512_fmadd_ps(a, b1, a21);
      a = _mm512_set1_ps(qr[3][d]); a30 = _mm512_fmadd_ps(a, b0, a30); a31 = _mm512_fmadd_ps(a, b1, a31);
      a = _mm512_set1_ps(qr[4][d]); a40 = _mm512_fmadd_ps(a, b0, a40); a41 = _mm512_fmadd_ps(a, b1, a41);
      a = _mm512_set1_ps(qr[5][d]); a50 = _mm512_fmadd_ps(a, b0, a50); a51 = _mm512_fmadd_ps(a, b1, a51);
      a = _mm512_set1_ps(qr[6][d]); a60 = _mm512_fmadd_ps(a, b0, a60); a61 = _mm512_fmadd_ps(a, b1, a61);
      a = _mm512_set1_ps(qr[7][d]); a70 = _mm512_fmadd_ps(a, b0, a70); a71 = _mm512_fmadd_ps(a, b1, a71);
    }
    const __m512 acc[8][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31},
                              {a40, a41}, {a50, a51}, {a60, a61}, {a70, a71}};
    for (int r = 0; r < nr; ++r) {
      float* s = S + r * pb.TP + j * kPanel;
      _mm512_storeu_ps(s, _mm512_mul_ps(acc[r][0], sc));
      _mm512_storeu_ps(s + kPanel, _mm512_mul_ps(acc[r][1], sc));
    }
  }
}

// one row in place: exp(s - max) over the T keys, padded keys set to 0; returns 1 / sum
static float softmax_row(float* s, const Problem& pb) {
  for (int64_t t = pb.T; t < pb.TP; ++t) s[t] = -std::numeric_limits<float>::infinity();
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < pb.TP; t += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + t));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < pb.TP; t += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), m));
    _mm512_storeu_ps(s + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// o[r][0:32] = inv[r] * sum_t A[t][r] V[t][0:32] for 8 packed rows (stores the first nr)
static void values_tile(const float* A, const float* vc, int64_t T, float* const* o, const float* inv, int nr) {
  __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
         a40 = a00, a41 = a00, a50 = a00, a51 = a00, a60 = a00, a61 = a00, a70 = a00, a71 = a00;
  for (int64_t t = 0; t < T; ++t) {
    const __m512 v0 = _mm512_loadu_ps(vc + t * kHeadDim), v1 = _mm512_loadu_ps(vc + t * kHeadDim + 16);
    const float* a = A + t * 8;
    __m512 b;
    b = _mm512_set1_ps(a[0]); a00 = _mm512_fmadd_ps(b, v0, a00); a01 = _mm512_fmadd_ps(b, v1, a01);
    b = _mm512_set1_ps(a[1]); a10 = _mm512_fmadd_ps(b, v0, a10); a11 = _mm512_fmadd_ps(b, v1, a11);
    b = _mm512_set1_ps(a[2]); a20 = _mm512_fmadd_ps(b, v0, a20); a21 = _mm512_fmadd_ps(b, v1, a21);
    b = _mm512_set1_ps(a[3]); a30 = _mm512_fmadd_ps(b, v0, a30); a31 = _mm512_fmadd_ps(b, v1, a31);
    b = _mm512_set1_ps(a[4]); a40 = _mm512_fmadd_ps(b, v0, a40); a41 = _mm512_fmadd_ps(b, v1, a41);
    b = _mm512_set1_ps(a[5]); a50 = _mm512_fmadd_ps(b, v0, a50); a51 = _mm512_fmadd_ps(b, v1, a51);
    b = _mm512_set1_ps(a[6]); a60 = _mm512_fmadd_ps(b, v0, a60); a61 = _mm512_fmadd_ps(b, v1, a61);
    b = _mm512_set1_ps(a[7]); a70 = _mm512_fmadd_ps(b, v0, a70); a71 = _mm512_fmadd_ps(b, v1, a71);
  }
  const __m512 acc[8][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31},
                            {a40, a41}, {a50, a51}, {a60, a61}, {a70, a71}};
  for (int r = 0; r < nr; ++r) {
    const __m512 s = _mm512_set1_ps(inv[r]);
    _mm512_storeu_ps(o[r], _mm512_mul_ps(acc[r][0], s));
    _mm512_storeu_ps(o[r] + 16, _mm512_mul_ps(acc[r][1], s));
  }
}

// rows [q0, q0 + n) of one head: q rows at q + t * q_stride, output rows at o + t * o_stride.
// Scratch: S (kQueryBlock x TP), A (TP x 8), inv (kQueryBlock)
static void attend_rows(const float* q, int64_t q_stride, const float* kp, const float* vp, float* o,
                        int64_t o_stride, int64_t q0, int64_t n, const Problem& pb, float* S, float* A,
                        float* inv) {
  for (int64_t r0 = 0; r0 < n; r0 += 8) {
    const int nr = static_cast<int>(imin(8, n - r0));
    const float* qr[8];
    for (int r = 0; r < 8; ++r) qr[r] = q + (q0 + r0 + imin(r, nr - 1)) * q_stride;
    scores_tile(qr, kp, pb, S + r0 * pb.TP, nr);
  }
  for (int64_t r = 0; r < n; ++r) inv[r] = softmax_row(S + r * pb.TP, pb);
  for (int64_t r0 = 0; r0 < n; r0 += 8) {
    const int nr = static_cast<int>(imin(8, n - r0));
    for (int64_t t = 0; t < pb.T; ++t)
      for (int r = 0; r < 8; ++r) A[t * 8 + r] = S[(r0 + imin(r, nr - 1)) * pb.TP + t];
    for (int64_t c0 = 0; c0 < kHeadDim; c0 += 32) {
      float* orow[8];
      for (int r = 0; r < nr; ++r) orow[r] = o + (q0 + r0 + r) * o_stride + c0;
      values_tile(A, vp + c0, pb.T, orow, inv + r0, nr);
    }
  }
}

}  // namespace attn_avx512
#pragma GCC pop_options
#endif  // DINOV2OD_HAVE_AVX512_ATTENTION

namespace {
// the argument checks of both kernels: (B, H, T, 64) q, k, v of one shape (head dim 32 too where
// head_dim_32), CPU, `dtype`, last dim contiguous
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::ScalarType dtype, const char* what,
               bool head_dim_32 = false) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "q, k, v must be (B, H, T, head dim) of one shape, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(q.size(3) == kHeadDim || (head_dim_32 && q.size(3) == 32), "the ", what,
              " attention kernel is built for head dim 64", head_dim_32 ? " and 32" : "", ", got ", q.size(3));
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == dtype, "q, k, v must be ", what, " CPU tensors, got ",
                t->scalar_type(), " on ", t->device());
    TORCH_CHECK(t->stride(3) == 1, "q, k, v need a contiguous last dim, got strides ", t->strides());
  }
}
}  // namespace

bool attention_available() {
#ifdef DINOV2OD_HAVE_AVX512_ATTENTION
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

at::Tensor attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(attention_available(),
              "dinov2od attention kernel: needs an x86-64 CPU with AVX-512 (avx512f, avx512dq) and a "
              "GCC build; use torch.nn.functional.scaled_dot_product_attention instead");
  check_qkv(q, k, v, at::kFloat, "float32");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  auto out = at::empty({B, T, H, kHeadDim}, q.options());
  if (B * H * T == 0) return out;
#ifdef DINOV2OD_HAVE_AVX512_ATTENTION
  const attn_avx512::Problem pb = attn_avx512::make_problem(T);
  const int64_t BH = B * H;
  auto kp = at::empty({BH, pb.NP * kHeadDim * kPanel}, q.options());
  auto vp = at::empty({BH, T * kHeadDim}, q.options());
  const float *Q = q.data_ptr<float>(), *K = k.data_ptr<float>(), *V = v.data_ptr<float>();
  float *KP = kp.data_ptr<float>(), *VP = vp.data_ptr<float>(), *O = out.data_ptr<float>();
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      attn_avx512::pack_head(K + b * k.stride(0) + h * k.stride(1), k.stride(2), V + b * v.stride(0) + h * v.stride(1),
                             v.stride(2), pb, KP + bh * pb.NP * kHeadDim * kPanel, VP + bh * T * kHeadDim);
    }
  });
  const int64_t blocks = (T + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, BH * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(kQueryBlock * pb.TP), A(pb.TP * 8), inv(kQueryBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, q0 = (task % blocks) * kQueryBlock;
      const int64_t b = bh / H, h = bh % H;
      const int64_t n = std::min(kQueryBlock, T - q0);
      attn_avx512::attend_rows(Q + b * q.stride(0) + h * q.stride(1), q.stride(2),
                               KP + bh * pb.NP * kHeadDim * kPanel, VP + bh * T * kHeadDim,
                               O + (b * T * H + h) * kHeadDim, H * kHeadDim, q0, n, pb, S.data(), A.data(),
                               inv.data());
    }
  });
#endif
  return out;
}

// ---------------------------------------------------------------- bfloat16 (avx512_bf16)
//
//   q, k, v   (B, H, T, D) bfloat16, D = 64 (the ViTs) or 32 (the decoder's 256-wide, 8-head
//             self-attention), last dim contiguous  -> out (B, T, H, D) bfloat16
//
// The same algorithm with VDPBF16PS, which multiplies pairs of bfloat16 and accumulates in float32:
// scores S = Q K^T / sqrt(D) from K packed into 16-key panels of d-pairs ([NP][D/2][16][2]), an exact
// float32 softmax per row written back as bfloat16 probabilities P (row-major: a pair of keys is one
// 32-bit broadcast), and O = P V from V packed into t-pairs ([T/2][D][2]), 32 output channels per
// tile; accumulation, the softmax and the final 1/sum are float32, as torch's bfloat16 attention
// rounds P to bfloat16 for P V.
#ifdef DINOV2OD_HAVE_AVX512_ATTENTION
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma")
namespace attn_bf16 {

using attn_avx512::Problem;

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

static inline int32_t pair_at(const uint16_t* p) {
  int32_t x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

static inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// K^T panels of d-pairs ([NP][D/2][16][2], zero past T) and V in t-pairs ([TU][D][2], zero past T)
template <int64_t D>
static void pack_head(const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride,
                      const Problem& pb, int64_t TU, uint16_t* kp, uint16_t* vp) {
  for (int64_t j = 0; j < pb.NP; ++j) {
    uint16_t* panel = kp + j * D * kPanel;
    for (int64_t i = 0; i < kPanel; ++i) {
      const int64_t t = j * kPanel + i;
      const uint16_t* row = t < pb.T ? k + t * k_stride : nullptr;
      for (int64_t p = 0; p < D / 2; ++p) {
        panel[(p * kPanel + i) * 2] = row ? row[2 * p] : 0;
        panel[(p * kPanel + i) * 2 + 1] = row ? row[2 * p + 1] : 0;
      }
    }
  }
  for (int64_t u = 0; u < TU; ++u) {
    const uint16_t* r0 = v + (2 * u) * v_stride;
    const uint16_t* r1 = 2 * u + 1 < pb.T ? v + (2 * u + 1) * v_stride : nullptr;
    uint16_t* dst = vp + u * D * 2;
    for (int64_t c = 0; c < D; ++c) {
      dst[2 * c] = r0[c];
      dst[2 * c + 1] = r1 ? r1[c] : 0;
    }
  }
}

// S[r][0:TP] = scale * q_r . K^T for 8 rows (rows past nr repeat the last valid one, not stored)
template <int64_t D>
static void scores_tile(const uint16_t* const* qr, const uint16_t* kp, const Problem& pb, float* S, int nr) {
  const __m512 sc = _mm512_set1_ps(pb.scale);
  for (int64_t j = 0; j < pb.NP; j += 2) {
    const uint16_t* p0 = kp + j * D * kPanel;
    const uint16_t* p1 = p0 + D * kPanel;
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
           a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00, a60 = a00, a61 = a00, a70 = a00, a71 = a00;
    for (int64_t p = 0; p < D / 2; ++p) {
      const __m512i b0 = _mm512_loadu_si512(p0 + p * kPanel * 2), b1 = _mm512_loadu_si512(p1 + p * kPanel * 2);
      __m512i a;
      a = _mm512_set1_epi32(pair_at(qr[0] + 2 * p)); a00 = dp(a00, a, b0); a01 = dp(a01, a, b1);
      a = _mm512_set1_epi32(pair_at(qr[1] + 2 * p)); a10 = dp(a10, a, b0); a11 = dp(a11, a, b1);
      a = _mm512_set1_epi32(pair_at(qr[2] + 2 * p)); a20 = dp(a20, a, b0); a21 = dp(a21, a, b1);
      a = _mm512_set1_epi32(pair_at(qr[3] + 2 * p)); a30 = dp(a30, a, b0); a31 = dp(a31, a, b1);
      a = _mm512_set1_epi32(pair_at(qr[4] + 2 * p)); a40 = dp(a40, a, b0); a41 = dp(a41, a, b1);
      a = _mm512_set1_epi32(pair_at(qr[5] + 2 * p)); a50 = dp(a50, a, b0); a51 = dp(a51, a, b1);
      a = _mm512_set1_epi32(pair_at(qr[6] + 2 * p)); a60 = dp(a60, a, b0); a61 = dp(a61, a, b1);
      a = _mm512_set1_epi32(pair_at(qr[7] + 2 * p)); a70 = dp(a70, a, b0); a71 = dp(a71, a, b1);
    }
    const __m512 acc[8][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31},
                              {a40, a41}, {a50, a51}, {a60, a61}, {a70, a71}};
    for (int r = 0; r < nr; ++r) {
      float* s = S + r * pb.TP + j * kPanel;
      _mm512_storeu_ps(s, _mm512_mul_ps(acc[r][0], sc));
      _mm512_storeu_ps(s + kPanel, _mm512_mul_ps(acc[r][1], sc));
    }
  }
}

// one row: exp(s - max) over the T keys as bfloat16 into P (zero past T); returns 1 / (float32 sum)
static float softmax_row(const float* s_in, float* s, uint16_t* P, const Problem& pb) {
  (void)s_in;
  for (int64_t t = pb.T; t < pb.TP; ++t) s[t] = -std::numeric_limits<float>::infinity();
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < pb.TP; t += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + t));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < pb.TP; t += 16) {
    const __m512 e = attn_avx512::exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), m));
    const __m256bh h = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(P + t), (__m256i)h);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// o[r][0:32] = inv[r] * sum_t P[r][t] V[t][c0:c0+32] for 8 rows of P (rows past nr repeat, not stored)
template <int64_t D>
static void values_tile(const uint16_t* const* pr, const uint16_t* vc, int64_t TU, uint16_t* const* o,
                        const float* inv, int nr) {
  __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
         a40 = a00, a41 = a00, a50 = a00, a51 = a00, a60 = a00, a61 = a00, a70 = a00, a71 = a00;
  for (int64_t u = 0; u < TU; ++u) {
    const __m512i v0 = _mm512_loadu_si512(vc + u * D * 2), v1 = _mm512_loadu_si512(vc + u * D * 2 + 32);
    __m512i b;
    b = _mm512_set1_epi32(pair_at(pr[0] + 2 * u)); a00 = dp(a00, b, v0); a01 = dp(a01, b, v1);
    b = _mm512_set1_epi32(pair_at(pr[1] + 2 * u)); a10 = dp(a10, b, v0); a11 = dp(a11, b, v1);
    b = _mm512_set1_epi32(pair_at(pr[2] + 2 * u)); a20 = dp(a20, b, v0); a21 = dp(a21, b, v1);
    b = _mm512_set1_epi32(pair_at(pr[3] + 2 * u)); a30 = dp(a30, b, v0); a31 = dp(a31, b, v1);
    b = _mm512_set1_epi32(pair_at(pr[4] + 2 * u)); a40 = dp(a40, b, v0); a41 = dp(a41, b, v1);
    b = _mm512_set1_epi32(pair_at(pr[5] + 2 * u)); a50 = dp(a50, b, v0); a51 = dp(a51, b, v1);
    b = _mm512_set1_epi32(pair_at(pr[6] + 2 * u)); a60 = dp(a60, b, v0); a61 = dp(a61, b, v1);
    b = _mm512_set1_epi32(pair_at(pr[7] + 2 * u)); a70 = dp(a70, b, v0); a71 = dp(a71, b, v1);
  }
  const __m512 acc[8][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31},
                            {a40, a41}, {a50, a51}, {a60, a61}, {a70, a71}};
  for (int r = 0; r < nr; ++r) {
    const __m512 s = _mm512_set1_ps(inv[r]);
    const __m256bh h0 = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][0], s));
    const __m256bh h1 = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][1], s));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o[r]), (__m256i)h0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o[r] + 16), (__m256i)h1);
  }
}

// rows [q0, q0 + n) of one head. Scratch: S (kQueryBlock x TP float), P (kQueryBlock x TP bf16), inv
template <int64_t D>
static void attend_rows(const uint16_t* q, int64_t q_stride, const uint16_t* kp, const uint16_t* vp, uint16_t* o,
                        int64_t o_stride, int64_t q0, int64_t n, const Problem& pb, int64_t TU, float* S,
                        uint16_t* P, float* inv) {
  for (int64_t r0 = 0; r0 < n; r0 += 8) {
    const int nr = static_cast<int>(imin(8, n - r0));
    const uint16_t* qr[8];
    for (int r = 0; r < 8; ++r) qr[r] = q + (q0 + r0 + imin(r, nr - 1)) * q_stride;
    scores_tile<D>(qr, kp, pb, S + r0 * pb.TP, nr);
  }
  for (int64_t r = 0; r < n; ++r) inv[r] = softmax_row(nullptr, S + r * pb.TP, P + r * pb.TP, pb);
  for (int64_t r0 = 0; r0 < n; r0 += 8) {
    const int nr = static_cast<int>(imin(8, n - r0));
    const uint16_t* pr[8];
    for (int r = 0; r < 8; ++r) pr[r] = P + (r0 + imin(r, nr - 1)) * pb.TP;
    for (int64_t c0 = 0; c0 < D; c0 += 32) {
      uint16_t* orow[8];
      for (int r = 0; r < nr; ++r) orow[r] = o + (q0 + r0 + r) * o_stride + c0;
      values_tile<D>(pr, vp + c0 * 2, TU, orow, inv + r0, nr);
    }
  }
}

}  // namespace attn_bf16
#pragma GCC pop_options
#endif  // DINOV2OD_HAVE_AVX512_ATTENTION

bool attention_bf16_available() {
#ifdef DINOV2OD_HAVE_AVX512_ATTENTION
  static const bool ok = attention_available() && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

#ifdef DINOV2OD_HAVE_AVX512_ATTENTION
namespace {
template <int64_t D>
void attention_bf16_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  attn_avx512::Problem pb = attn_avx512::make_problem(T);
  pb.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const int64_t TU = (T + 1) / 2;
  const int64_t BH = B * H;
  auto kp = at::empty({BH, pb.NP * D * kPanel}, q.options());
  auto vp = at::empty({BH, TU * D * 2}, q.options());
  auto u16 = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
  auto w16 = [](at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
  const uint16_t *Q = u16(q), *K = u16(k), *V = u16(v);
  uint16_t *KP = w16(kp), *VP = w16(vp), *O = w16(out);
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      attn_bf16::pack_head<D>(K + b * k.stride(0) + h * k.stride(1), k.stride(2), V + b * v.stride(0) + h * v.stride(1),
                              v.stride(2), pb, TU, KP + bh * pb.NP * D * kPanel, VP + bh * TU * D * 2);
    }
  });
  const int64_t blocks = (T + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, BH * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(kQueryBlock * pb.TP), inv(kQueryBlock);
    std::vector<uint16_t> P(kQueryBlock * pb.TP);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, q0 = (task % blocks) * kQueryBlock;
      const int64_t b = bh / H, h = bh % H;
      const int64_t n = std::min(kQueryBlock, T - q0);
      attn_bf16::attend_rows<D>(Q + b * q.stride(0) + h * q.stride(1), q.stride(2), KP + bh * pb.NP * D * kPanel,
                                VP + bh * TU * D * 2, O + (b * T * H + h) * D, H * D, q0, n, pb, TU, S.data(),
                                P.data(), inv.data());
    }
  });
}
}  // namespace
#endif

at::Tensor attention_forward_bf16_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(attention_bf16_available(),
              "dinov2od bfloat16 attention kernel: needs an x86-64 CPU with AVX-512 and avx512_bf16 and a "
              "GCC build; use the float32 kernel or torch.nn.functional.scaled_dot_product_attention instead");
  check_qkv(q, k, v, at::kBFloat16, "bfloat16", /*head_dim_32=*/true);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  auto out = at::empty({B, T, H, D}, q.options());
  if (B * H * T == 0) return out;
#ifdef DINOV2OD_HAVE_AVX512_ATTENTION
  if (D == 64) {
    attention_bf16_heads<64>(q, k, v, out);
  } else {
    attention_bf16_heads<32>(q, k, v, out);
  }
#endif
  return out;
}

}  // namespace dinov2od
