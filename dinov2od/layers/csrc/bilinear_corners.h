// Bilinear corners of one sampling point: the op's sampling convention, shared by the CPU and
// CUDA kernels (and matching the PyTorch path): (x, y) in [0, 1] samples pixel
// (x * W - 0.5, y * H - 0.5) of an H x W map, with zero padding outside it.
//
// No include guard on purpose: it is included inside a namespace (the CPU kernels are compiled
// twice, for two instruction sets, each in a namespace of its own). <cmath> and <cstdint> must
// be included before it.

#ifdef __CUDACC__
#define DINOV2OD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DINOV2OD_HOST_DEVICE inline
#endif

template <typename T>
struct Corners {
  int64_t row[4];  // y * W + x of corners (y0,x0) (y0,x1) (y1,x0) (y1,x1); -1 when outside the map
  T w[4];          // bilinear weights of the four corners
  T fx, fy;        // fractional part of the pixel coordinates (for the location gradient)
  bool all_inside;
};

// Returns false when no corner can be inside the map (including NaN locations), i.e. the
// point contributes zero.
template <typename T>
DINOV2OD_HOST_DEVICE bool bilinear_corners(T loc_x, T loc_y, int64_t H, int64_t W, Corners<T>& c) {
  const T x = loc_x * static_cast<T>(W) - T(0.5);
  const T y = loc_y * static_cast<T>(H) - T(0.5);
  if (!(x >= T(-1) && y >= T(-1) && x < static_cast<T>(W) && y < static_cast<T>(H))) {
    return false;
  }
#ifdef __CUDA_ARCH__
  const T x0f = floor(x), y0f = floor(y);
#else
  const T x0f = std::floor(x), y0f = std::floor(y);
#endif
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  c.fx = x - x0f;
  c.fy = y - y0f;
  const T gx = T(1) - c.fx, gy = T(1) - c.fy;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < W, y0_in = y0 >= 0, y1_in = y0 + 1 < H;
  c.row[0] = (y0_in && x0_in) ? y0 * W + x0 : -1;
  c.row[1] = (y0_in && x1_in) ? y0 * W + x0 + 1 : -1;
  c.row[2] = (y1_in && x0_in) ? (y0 + 1) * W + x0 : -1;
  c.row[3] = (y1_in && x1_in) ? (y0 + 1) * W + x0 + 1 : -1;
  c.w[0] = gy * gx;
  c.w[1] = gy * c.fx;
  c.w[2] = c.fy * gx;
  c.w[3] = c.fy * c.fx;
  c.all_inside = x0_in && x1_in && y0_in && y1_in;
  return true;
}
