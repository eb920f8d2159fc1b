// Shared between the CPU (crope_qkv.cpp) and CUDA (crope_qkv_cuda.cu, crope_qkv_v2.cu) halves of crope::qkv_rotary.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace crope {

// ------------------------------------------------------------------ refusals
// Every message of a refused argument is built as text, numbers through std::to_string, and handed to TORCH_CHECK
// as one std::string, which it passes on without a stream. A number formatted through a C++ stream in this library
// (TORCH_CHECK(cond, "got ", n) does that) crashed the process instead of raising on a machine whose extension was
// built by a GCC other than the one PyTorch's C++ runtime came with. tests/test_kernel.py checks that csrc/ calls
// TORCH_CHECK nowhere else.
#define CROPE_CHECK(cond, message) TORCH_CHECK(cond, std::string(message))

// "[4, 16]": a shape as text, for messages
inline std::string text(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}
inline std::string text(at::ScalarType dtype) { return c10::toString(dtype); }

// ------------------------------------------------------------------ the CUDA paths
// The `path` argument of crope::qkv_rotary, on CUDA tensors:
//   decode_v2  CUDA cores, one warp per complex output row, each complex weight streamed once per 8 tokens
//              (crope_qkv_v2.cu)
//   tiled      tensor cores (bf16/fp16, GPUs of compute capability 8.0 and newer), the complex weight tile expanded
//              in shared memory, the rotation in the epilogue (crope_qkv_cuda.cu)
//   tiled_v2   tiled with a 4-stage cp.async pipeline, 64 x 64 warp tiles, 16-byte stores (crope_qkv_v2.cu)
//   cublas     the real block matrix through cuBLAS, then the rotation as a second pass: takes every input
//   auto       cublas. fused_op.py times the paths that take an input and passes the fastest by name.
// On the CPU there is one implementation (a GEMM and one rotation loop): the name is checked, then ignored. The
// backward is the same for every path: one un-rotation pass, then two GEMMs. csrc/NOTES.md has the measurements
// that chose these paths, and what the versions that lost everywhere taught.
enum class Path { automatic, decode_v2, tiled, tiled_v2, cublas };
Path parse_path(c10::string_view name);  // refuses unknown names with a message that lists the known ones
const char* path_name(Path path);

constexpr int kTiledBK = 32;                     // tiled's K step: in_features must be a multiple
constexpr int64_t kDecodeV2SharedBytes = 32768;  // decode_v2 stages x of its tokens (1, 2, 4 or 8) in this much

// Which paths can compute an input at all (the GPU and the build may rule out the tensor-core paths too).
// fused_op.py's PATH_TAKES says the same in Python, so that a forced path is refused before the op is called.
inline bool decode_v2_takes(at::ScalarType dtype, int64_t in_features) {
  const bool ok = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  return ok && in_features % (16 / c10::elementSize(dtype)) == 0 &&  // 16-byte loads of whole pairs
         in_features * c10::elementSize(dtype) <= kDecodeV2SharedBytes;  // x of one token fits in shared memory
}
inline bool tiled_takes(at::ScalarType dtype, int64_t in_features) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && in_features % kTiledBK == 0;
}
// 16-byte copies and stores of whole rows of x, the weights and y
inline bool tiled_v2_takes(at::ScalarType dtype, int64_t in_features, int64_t out_features) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && in_features % 8 == 0 && out_features % 8 == 0;
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
void rotate_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& cos, const at::Tensor& sin,
                 int64_t start_pos, int64_t n_rotary, int sign);
// Version 2 (crope_qkv_v2.cu). tiled_v2_available: built for sm_80+ code on this GPU.
bool tiled_v2_available(int device);
void decode_v2_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos,
                    const at::Tensor& sin, int64_t start_pos, int64_t n_rotary, int64_t sm_count);
void tiled_v2_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos,
                   const at::Tensor& sin, int64_t start_pos, int64_t n_rotary);
#endif

// The backward of qkv_rotary: (dx, dW), each empty where output_mask says it is not needed. One un-rotation pass
// over the gradient, then two GEMMs; the path's name is checked and has no effect.
std::tuple<at::Tensor, at::Tensor> qkv_rotary_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& weight, const at::Tensor& cos,
                                                       const at::Tensor& sin, int64_t start_pos, int64_t n_rotary,
                                                       std::array<bool, 2> output_mask, c10::string_view path);

std::vector<std::string> path_names(const std::vector<Path>& paths);

}  // namespace crope
