// Shared between the CPU half of crope::qkv_rotary (qkv_rotary.cpp) and its CUDA half (qkv_rotary_cuda.cu, and a
// file per CUDA kernel: decode.cu, tiled.cu, pipelined.cu).
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
//   decode     CUDA cores, one warp per complex output row, each complex weight streamed once per 8 tokens
//              (decode.cu)
//   tiled      tensor cores (bf16/fp16, GPUs of compute capability 8.0 and newer), the complex weight tile expanded
//              in shared memory, the rotation in the epilogue (tiled.cu)
//   pipelined  tiled with a 4-stage cp.async pipeline, 64 x 64 warp tiles, 16-byte stores (pipelined.cu)
//   cublas     the real block matrix through cuBLAS, then the rotation as a second pass: takes every input
//              (qkv_rotary_cuda.cu)
//   default    decode for a decoding step (up to kDecodeTokens tokens) that it takes, cublas otherwise
// On the CPU there is one implementation (a GEMM and one rotation loop): the name is checked, then ignored. The
// backward is the same for every path: one un-rotation pass, then two GEMMs. csrc/NOTES.md has the measurements
// that chose these paths, and what the versions that lost everywhere taught.
enum class Path { standard, decode, tiled, pipelined, cublas };  // standard: "default"
Path parse_path(c10::string_view name);  // refuses unknown names with a message that lists the known ones
const char* path_name(Path path);

constexpr int kTiledBK = 32;                    // tiled's K step: in_features must be a multiple
constexpr int kTiledTile = 128;                 // tiled's block tile: 128 x 128 outputs
constexpr int64_t kDecodeSharedBytes = 32768;   // decode stages x of its tokens (1, 2, 4 or 8) in this much
constexpr int64_t kDecodeTokens = 8;            // "default" takes decode up to this many tokens (B * T)

// What each path takes (the GPU and the build may rule out the tensor-core paths too): the one statement of it.
// A forced path that does not take its input is refused with what_it_takes.
inline bool decode_takes(at::ScalarType dtype, int64_t in_features) {
  const bool ok = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  return ok && in_features % (16 / c10::elementSize(dtype)) == 0 &&  // 16-byte loads of whole pairs
         in_features * c10::elementSize(dtype) <= kDecodeSharedBytes;  // x of one token fits in shared memory
}
inline bool tiled_takes(at::ScalarType dtype, int64_t in_features) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && in_features % kTiledBK == 0;
}
// 16-byte copies and stores of whole rows of x, the weights and y
inline bool pipelined_takes(at::ScalarType dtype, int64_t in_features, int64_t out_features) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && in_features % 8 == 0 && out_features % 8 == 0;
}
inline std::string what_it_takes(Path path) {
  switch (path) {
    case Path::decode:
      return "float32, bfloat16 or float16 with in_features a multiple of 8 (4 in float32) and at most " +
             std::to_string(kDecodeSharedBytes / 2) + " (" + std::to_string(kDecodeSharedBytes / 4) +
             " in float32)";
    case Path::tiled: return "bfloat16 or float16 with in_features a multiple of " + std::to_string(kTiledBK);
    case Path::pipelined: return "bfloat16 or float16 with in_features and out_features multiples of 8";
    default: return "every input";
  }
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
// The kernels of the paths, one file each. *_compiled: built from sm_80+ code for this GPU (a "7.5+PTX" build
// would otherwise JIT their __trap() stubs on an A100).
void decode_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos,
                 const at::Tensor& sin, int64_t start_pos, int64_t n_rotary, int64_t sm_count);
bool tiled_compiled(int device);
void tiled_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos,
                const at::Tensor& sin, int64_t start_pos, int64_t n_rotary);
bool pipelined_compiled(int device);
void pipelined_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos,
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
