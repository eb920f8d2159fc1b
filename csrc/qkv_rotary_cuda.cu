// CUDA forward of crope::qkv_rotary (the schema and the math are in qkv_rotary.cpp): which path computes an
// input, the cublas path, and the rotation as its own pass (which cublas and the backward use).
//
//   cublas  the real block matrix through cuBLAS, then rotate_kernel as a second pass (any dtype, shape).
// The other paths' kernels have a file each: decode.cu, tiled.cu, pipelined.cu (crope.h lists what each takes).
// The backward (qkv_rotary.cpp) un-rotates the gradient with rotate_kernel, then uses cuBLAS. Every path is
// checked against the PyTorch path of crope.py, the simple reference: by tests/test_kernel.py, and by the
// fused_op package's self-check on the first use on each GPU. Shared device helpers (value types, the rotation,
// PTX wrappers with their layouts): crope_cuda.cuh.

#include "crope.h"
#include "crope_cuda.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace crope {
namespace {

using namespace kernels;  // crope_cuda.cuh: value types, Rotary

// ------------------------------------------------------------------ rotation as its own pass
// dst = src with the first n_rotary_pairs complex numbers of every row rotated, the rest copied; in place
// (src == dst) only the rotated pairs are visited (pairs_per_row = n_rotary_pairs). One block row per
// output row, so the row's position is computed once per thread, in 32 bits.
template <typename T>
__global__ void rotate_kernel(const T* src, T* dst, int pairs_per_row, int row_pairs, Rotary<Acc<T>> rot) {
  using P = Pair<T>;
  const int row = blockIdx.x;  // rows on grid.x: up to 2^31 - 1
  const int m = rot.position(row);
  const auto* in = reinterpret_cast<const typename P::type*>(src) + (int64_t)row * row_pairs;
  auto* out = reinterpret_cast<typename P::type*>(dst) + (int64_t)row * row_pairs;
  for (int p = blockIdx.y * blockDim.x + threadIdx.x; p < pairs_per_row; p += gridDim.y * blockDim.x) {
    auto z = in[p];
    if (rot.rotates(p)) {
      Acc<T> re = P::re(z), im = P::im(z);
      rot.apply(m * rot.half + p % rot.half, re, im);
      z = P::make(re, im);
    }
    out[p] = z;
  }
}

// ------------------------------------------------------------------ host side

int sm_count(int device) {
  return cached_per_device(device, [device] {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  });
}

// The paths that can compute qkv_rotary(x, weight, ...) on this GPU and build
std::vector<Path> cuda_paths(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t K = x.size(2), N = 2 * weight.size(0);
  const auto dtype = x.scalar_type();
  std::vector<Path> paths;
  if (decode_takes(dtype, K)) paths.push_back(Path::decode);
  if (tiled_takes(dtype, K) && tiled_compiled(x.get_device())) paths.push_back(Path::tiled);
  if (pipelined_takes(dtype, K, N) && pipelined_compiled(x.get_device())) paths.push_back(Path::pipelined);
  paths.push_back(Path::cublas);
  return paths;
}

// 32-bit indexing inside the kernels
void check_sizes(int64_t M, int64_t N, int64_t K, const at::Tensor& cos) {
  constexpr int64_t limit = std::numeric_limits<int>::max();
  CROPE_CHECK(M < limit && K < limit && N < (int64_t)65535 * kTiledTile && 16 * N < limit && cos.numel() < limit,
              "crope::qkv_rotary: on CUDA, B*T, in_features and the rotary tables must stay below 2^31 elements and "
              "out_features below " + std::to_string(65535 * kTiledTile) + "; got B*T = " + std::to_string(M) + ", in = " +
                  std::to_string(K) + ", out = " + std::to_string(N));
}

}  // namespace

void rotate_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& cos, const at::Tensor& sin,
                 int64_t start_pos, int64_t n_rotary, int sign) {
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t rows = src.size(0) * src.size(1), N = src.size(2);
  const int64_t pairs_per_row = dst.is_same(src) ? n_rotary / 2 : N / 2;
  if (rows == 0 || pairs_per_row == 0) return;
  check_sizes(rows, N, 0, cos);
  const int threads = 256;
  const dim3 grid(rows, std::min<int64_t>((pairs_per_row + threads - 1) / threads, 65535));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "crope_rotate_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = Acc<T>;  // double tables for double, float otherwise
    const auto table_type = c10::CppTypeToScalarType<A>::value;
    const auto c = cos.to(table_type).contiguous(), s = sin.to(table_type).contiguous();
    rotate_kernel<T><<<grid, threads, 0, stream>>>(reinterpret_cast<const T*>(src.const_data_ptr<scalar_t>()),
                                                   reinterpret_cast<T*>(dst.data_ptr<scalar_t>()),
                                                   (int)pairs_per_row, (int)(N / 2),
                                                   make_rotary<A>(c, s, start_pos, src.size(1), n_rotary, sign));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor qkv_rotary_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& cos_in,
                           const at::Tensor& sin_in, int64_t start_pos, int64_t n_rotary, c10::string_view path_in) {
  check_inputs(x_in, weight_in, cos_in, sin_in, start_pos, n_rotary, path_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), T = x_in.size(1), K = x_in.size(2), N = 2 * weight_in.size(0), M = B * T;
  if (M == 0 || N == 0) return at::empty({B, T, N}, x_in.options());  // nothing to launch
  if (K == 0) return at::zeros({B, T, N}, x_in.options());            // a sum of nothing, rotated
  check_sizes(M, N, K, cos_in);
  const auto x = aligned_contiguous(x_in), weight = aligned_contiguous(weight_in);
  const auto dtype = x.scalar_type();

  Path path = parse_path(path_in);
  if (path == Path::standard) path = M <= kDecodeTokens && decode_takes(dtype, K) ? Path::decode : Path::cublas;
  if (path != Path::cublas) {
    const auto offered = cuda_paths(x, weight);
    if (std::find(offered.begin(), offered.end(), path) == offered.end()) {
      const bool shape_ok = path == Path::decode ? decode_takes(dtype, K)
                            : path == Path::tiled   ? tiled_takes(dtype, K)
                                                    : pipelined_takes(dtype, K, N);
      CROPE_CHECK(!shape_ok, std::string("crope::qkv_rotary: path '") + path_name(path) + "' needs a GPU of compute "
                                 "capability 8.0 or newer and a build for it (TORCH_CUDA_ARCH_LIST with 8.0 or newer)");
      CROPE_CHECK(false, std::string("crope::qkv_rotary: path '") + path_name(path) + "' takes " +
                             what_it_takes(path) + "; got " + text(dtype) + ", in_features " + std::to_string(K) +
                             ", out_features " + std::to_string(N));
    }
  }

  auto y = at::empty({B, T, N}, x.options());
  if (path == Path::decode) {
    decode_cuda(x, weight, y, cos_in, sin_in, start_pos, n_rotary, sm_count(x.get_device()));
  } else if (path == Path::pipelined) {
    pipelined_cuda(x, weight, y, cos_in, sin_in, start_pos, n_rotary);
  } else if (path == Path::cublas) {
    y = at::linear(x, real_weight(weight)).contiguous();
    rotate_cuda(y, y, cos_in, sin_in, start_pos, n_rotary, +1);
  } else {
    tiled_cuda(x, weight, y, cos_in, sin_in, start_pos, n_rotary);
  }
  return y;
}

std::vector<std::string> qkv_rotary_paths_cuda(const at::Tensor& x, const at::Tensor& weight, int64_t /*n_rotary*/) {
  CROPE_CHECK(x.dim() == 3 && weight.dim() == 3 && 2 * weight.size(1) == x.size(2),
              "crope::qkv_rotary_paths: x must be (B, T, in) and weight (out/2, in/2, 2)");
  CROPE_CHECK(x.is_cuda() && weight.device() == x.device(), "crope::qkv_rotary_paths: weight must be on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  return path_names(cuda_paths(x, weight));
}

TORCH_LIBRARY_IMPL(crope, CUDA, m) {
  m.impl("qkv_rotary", &qkv_rotary_cuda);
  m.impl("qkv_rotary_backward", &qkv_rotary_backward);
  m.impl("qkv_rotary_paths", &qkv_rotary_paths_cuda);
}

}  // namespace crope
