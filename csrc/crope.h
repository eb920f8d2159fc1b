// Shared between the CPU (crope_qkv.cpp) and CUDA (crope_qkv_cuda.cu) halves of crope::qkv_rotary.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace crope {

// ------------------------------------------------------------------ the CUDA paths
// The `path` argument of crope::qkv_rotary: "auto" (the cheapest by the cost model below), or one of
//   decode     CUDA cores, each complex weight streamed once per kDecodeTokens tokens
//   tiled      tensor cores (bf16/fp16, GPUs of compute capability 8.0 and newer), rotation in the epilogue
//   cublas     the real block matrix through cuBLAS, then the rotation as a second pass
// and the second versions (crope_qkv_v2.cu), which "auto" never takes until a GPU has measured them:
//   decode_v2  decode with x staged in shared memory, 8 streaming 16-byte weight loads in flight per lane
//   tiled_v2   tiled with a 4-stage cp.async pipeline, 64 x 64 warp tiles and 16-byte stores (sm_80+);
//              as the backward's path: the un-rotation inside the gradient GEMMs' operand loads
// and a third (crope_qkv_v3.cu), the same rule:
//   tiled_v3   wgmma (Hopper, a build for sm_90a), bf16; the backward takes tiled_v2's
// On the CPU there is one implementation (a GEMM and one rotation loop): the name is checked, then ignored.
enum class Path { automatic, decode, tiled, cublas, decode_v2, tiled_v2, tiled_v3 };
Path parse_path(c10::string_view name);  // refuses unknown names with a message that lists the known ones
const char* path_name(Path path);

constexpr int kDecodeTokens = 8;  // tokens per launch of the decode kernel: its accumulators stay in registers
constexpr int kTiledBK = 32;      // the tiled kernels' K step: in_features must be a multiple
constexpr int64_t kDecodeV2SharedBytes = 32768;  // decode_v2 stages x of its tokens (1, 2, 4 or 8) in this much

// Which paths can compute a shape at all (the GPU may rule out tiled too: see crope_qkv_cuda.cu).
inline bool decode_takes(at::ScalarType dtype, int64_t in_features) {
  const bool ok = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  return ok && in_features % (16 / c10::elementSize(dtype)) == 0;  // 16-byte loads of whole pairs
}
inline bool tiled_takes(at::ScalarType dtype, int64_t in_features) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && in_features % kTiledBK == 0;
}
inline bool decode_v2_takes(at::ScalarType dtype, int64_t in_features) {  // x of one token fits in shared memory
  return decode_takes(dtype, in_features) && in_features * c10::elementSize(dtype) <= kDecodeV2SharedBytes;
}
// tiled_v2, forward and backward: 16-byte copies and stores of whole rows of x, the weights and y
inline bool tiled_v2_takes(at::ScalarType dtype, int64_t in_features, int64_t out_features) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && in_features % 8 == 0 && out_features % 8 == 0;
}
inline bool tiled_v3_takes(at::ScalarType dtype, int64_t in_features, int64_t out_features) {
  return dtype == at::kBFloat16 && tiled_v2_takes(dtype, in_features, out_features);
}

// The cost model behind "auto". Nothing here has been measured on a GPU: it is a prediction from a few
// ratios of recent data-center GPUs (A100, H100, H200), in one place so that measurements (bench.py
// times every path on one shape) can replace it. Costs are in bytes moved at DRAM bandwidth, i.e.
// time x bandwidth, so that only ratios to the bandwidth appear:
constexpr double kFp32FlopsPerByte = 15;     // CUDA-core fp32 rate / DRAM bandwidth (A100 ~10, H100 ~20, H200 ~14)
constexpr double kTensorFlopsPerByte = 200;  // bf16 tensor-core rate / DRAM bandwidth (A100 ~150, H100 ~300, H200 ~200)
constexpr double kCacheBytesPerByte = 10;    // L1/L2 bandwidth / DRAM bandwidth, for the decode kernel's x re-reads
constexpr double kTiledEfficiency = 0.5;     // the tiled kernel's share of cuBLAS's tensor-core rate (one stage)
constexpr double kTiledStepBytes = 3e6;      // one K step of a tiled block (a global-load round trip, two barriers)
constexpr double kTiledBlocksPerSM = 2;      // ~128 registers x 256 threads and 20 KB of shared memory per block
constexpr double kLaunchBytes = 8e6;         // one kernel launch, ~3 us

// Predicted cost of each path for y (M, N) = x (M, K) times the complex weights (N/2, K/2, 2), elements of
// `element_size` bytes, on a GPU with sm_count SMs.
//   decode: the weights W once per kDecodeTokens tokens, or its FMAs if they take longer; and every warp
//           re-reads x (one warp per complex output row) from cache
//   tiled:  the weights once per 128-row block row; tensor-core FLOPs at kTiledEfficiency, slowed by a
//           grid that does not fill the GPU; and no less than its un-hidden load latency per K step
//   cublas: expanding the real weights (read W, write 2W), the GEMM (bytes or FLOPs), the rotation pass
//           over the q and k outputs, three launches
inline double predicted_cost(Path path, int64_t M, int64_t N, int64_t K, int64_t n_rotary, int64_t element_size,
                             int64_t sm_count) {
  const double m = M, n = N, k = K, e = element_size, weights = n * k * e / 2, flops = 2 * m * n * k;
  const auto ceil_div = [](int64_t a, int64_t b) { return static_cast<double>((a + b - 1) / b); };
  switch (path) {
    case Path::decode:
      return std::max(ceil_div(M, kDecodeTokens) * weights, flops / kFp32FlopsPerByte) +
             (n / 2) * m * k * e / kCacheBytesPerByte + kLaunchBytes;
    case Path::tiled: {
      const double block_rows = ceil_div(M, 128), blocks = block_rows * ceil_div(N, 128);
      const double fill = std::min(1.0, blocks / static_cast<double>(std::max<int64_t>(sm_count, 1)));
      const double waves = std::ceil(blocks / (kTiledBlocksPerSM * std::max<int64_t>(sm_count, 1)));
      const double bytes = block_rows * weights + m * k * e + m * n * e;
      const double compute = 2 * block_rows * 128 * n * k / (kTensorFlopsPerByte * kTiledEfficiency * fill);
      return std::max({bytes, compute, waves * ceil_div(K, kTiledBK) * kTiledStepBytes}) + kLaunchBytes;
    }
    default:
      return 3 * weights + std::max(2 * weights + m * k * e + m * n * e, flops / kTensorFlopsPerByte) +
             2 * m * n_rotary * e + 3 * kLaunchBytes;
  }
}

// The paths that can take the shape, cheapest predicted first: "auto" takes the first.
inline std::vector<Path> rank_paths(int64_t M, int64_t N, int64_t K, int64_t n_rotary, int64_t element_size,
                                    int64_t sm_count, bool decode_ok, bool tiled_ok) {
  std::vector<Path> paths;
  if (decode_ok) paths.push_back(Path::decode);
  if (tiled_ok) paths.push_back(Path::tiled);
  paths.push_back(Path::cublas);
  std::stable_sort(paths.begin(), paths.end(), [&](Path a, Path b) {
    return predicted_cost(a, M, N, K, n_rotary, element_size, sm_count) <
           predicted_cost(b, M, N, K, n_rotary, element_size, sm_count);
  });
  return paths;
}

// What qkv_rotary_paths lists: auto's ranking, then the later versions that can take the shape (never first,
// so never auto's choice: cublas takes every shape).
inline std::vector<Path> listed_paths(std::vector<Path> ranked, bool decode_v2_ok, bool tiled_v2_ok,
                                      bool tiled_v3_ok) {
  if (decode_v2_ok) ranked.push_back(Path::decode_v2);
  if (tiled_v2_ok) ranked.push_back(Path::tiled_v2);
  if (tiled_v3_ok) ranked.push_back(Path::tiled_v3);
  return ranked;
}

// ------------------------------------------------------------------ shared by both halves
// Argument checks of every operator: shapes, dtypes, devices, positions, the path's name. Each message
// names the argument at fault.
void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos, const at::Tensor& sin,
                  int64_t start_pos, int64_t n_rotary, c10::string_view path);

// Complex weights (out/2, in/2, 2) -> the dense real (out, in) matrix of 2x2 blocks [[a, -b], [b, a]].
at::Tensor real_weight(const at::Tensor& weight);

// dst = src with pair p < n_rotary/2 of every row (B, T, N) multiplied by e^(sign * i m theta_j),
// m = start_pos + t, j = p mod head_size/2; the other pairs copied. dst may be src (in place).
// sign = -1 undoes the rotation (its adjoint). Both contiguous, of one dtype.
void rotate_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& cos, const at::Tensor& sin,
                int64_t start_pos, int64_t n_rotary, int sign);
#ifdef WITH_CUDA
// The second versions (crope_qkv_v2.cu). `available`: built for sm_80+ code on the current GPU (tiled_v2).
bool tiled_v2_available(int device);
// The third (crope_qkv_v3.cu): available on a Hopper GPU with a build for sm_90a.
bool tiled_v3_available(int device);
void tiled_v3_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos,
                   const at::Tensor& sin, int64_t start_pos, int64_t n_rotary);
void decode_v2_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos,
                    const at::Tensor& sin, int64_t start_pos, int64_t n_rotary, int64_t sm_count);
void tiled_v2_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos,
                   const at::Tensor& sin, int64_t start_pos, int64_t n_rotary);
// The backward's second version: dx and dW by tensor-core GEMMs that un-rotate dy's tiles as they load them
// (no un-rotated copy of dy), dW folded onto (a, b) in fp32 in the GEMM's epilogue.
std::tuple<at::Tensor, at::Tensor> qkv_rotary_backward_v2_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& weight, const at::Tensor& cos,
                                                               const at::Tensor& sin, int64_t start_pos,
                                                               int64_t n_rotary, std::array<bool, 2> output_mask);
void rotate_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& cos, const at::Tensor& sin,
                 int64_t start_pos, int64_t n_rotary, int sign);
#endif

// The backward of qkv_rotary: (dx, dW), each empty where output_mask says it is not needed. path "tiled_v2" or
// "tiled_v3" on CUDA runs its second version (qkv_rotary_backward_v2_cuda); any other path name the first: one
// un-rotation pass over the gradient, then two cuBLAS GEMMs.
std::tuple<at::Tensor, at::Tensor> qkv_rotary_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& weight, const at::Tensor& cos,
                                                       const at::Tensor& sin, int64_t start_pos, int64_t n_rotary,
                                                       std::array<bool, 2> output_mask, c10::string_view path);

std::vector<std::string> path_names(const std::vector<Path>& paths);

}  // namespace crope
