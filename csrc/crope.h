// Shared between the CPU (crope_qkv.cpp) and CUDA (crope_qkv_cuda.cu) halves of crope::qkv_rotary.
#pragma once
#include <ATen/ATen.h>

namespace crope {

// Argument checks of both operators: shapes, dtypes, devices, positions.
void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos, const at::Tensor& sin,
                  int64_t start_pos, int64_t n_rotary);

// Complex weights (out/2, in/2, 2) -> the dense real (out, in) matrix of 2x2 blocks [[a, -b], [b, a]].
at::Tensor real_weight(const at::Tensor& weight);

// Multiply pair p < n_rotary/2 of every row of y (B, T, N) by e^(sign * i m theta_j) in place,
// m = start_pos + t, j = p mod head_size/2. sign = -1 undoes the rotation (its adjoint).
void rotate_cpu_(at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin, int64_t start_pos,
                 int64_t n_rotary, int sign);
#ifdef WITH_CUDA
void rotate_cuda_(at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin, int64_t start_pos,
                  int64_t n_rotary, int sign);
#endif

std::tuple<at::Tensor, at::Tensor> qkv_rotary_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& weight, const at::Tensor& cos,
                                                       const at::Tensor& sin, int64_t start_pos, int64_t n_rotary);

}  // namespace crope
