// crope::qkv_rotary: CRoPE's Q/K/V projection with the rotation fused into it.
//
// Interleaved pairs: z_i = x[2i] + i x[2i+1]. With complex weights W = A + iB, stored as
// weight[o, i] = (a, b), the projection is y_o = sum_i W_oi z_i: as a real matrix, 2x2 blocks
// [[a, -b], [b, a]]. Output pair p < n_rotary/2 (the q and k features) is then multiplied by
// e^(i m theta_j), m = start_pos + t (t: the token's index in its sequence), j = p mod head_size/2;
// the rest (v) is left as it is.
//
// Backward: the rotation is unitary, so its adjoint is the rotation by -theta. Un-rotate the
// gradient, and what is left is the backward of a linear map: two GEMMs, the weight's folded
// back onto (a, b).
//
// This file: the schema, the CPU implementation (float32, float64: gradcheck runs here) and the
// backward shared by CPU and CUDA. The CUDA forward kernels are in crope_qkv_cuda.cu.

#include "crope.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace crope {

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos, const at::Tensor& sin,
                  int64_t start_pos, int64_t n_rotary) {
  TORCH_CHECK(x.dim() == 3, "crope::qkv_rotary: x must be (B, T, in_features), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) == 2 && 2 * weight.size(1) == x.size(2),
              "crope::qkv_rotary: weight must be (out/2, in/2, 2) with in = x.size(-1) = ", x.size(2),
              ", got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.device() == weight.device(),
              "crope::qkv_rotary: x and weight must share dtype and device");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) > 0 && cos.sizes() == sin.sizes() && cos.device() == x.device(),
              "crope::qkv_rotary: cos and sin must be (positions, head_size/2) on x's device");
  const int64_t head_size = 2 * cos.size(1);
  TORCH_CHECK(n_rotary >= 0 && n_rotary % head_size == 0 && n_rotary <= 2 * weight.size(0),
              "crope::qkv_rotary: n_rotary (", n_rotary, ") must be a multiple of head_size (", head_size,
              ") and at most out_features (", 2 * weight.size(0), ")");
  TORCH_CHECK(start_pos >= 0 && start_pos + x.size(1) <= cos.size(0), "crope::qkv_rotary: positions ",
              start_pos, "..", start_pos + x.size(1), " exceed the rotary tables (", cos.size(0), ")");
}

at::Tensor real_weight(const at::Tensor& weight) {
  const auto a = weight.select(2, 0), b = weight.select(2, 1);       // (out/2, in/2)
  const auto even_rows = at::stack({a, -b}, 2);                      // row 2o:   a, -b, ...
  const auto odd_rows = at::stack({b, a}, 2);                        // row 2o+1: b,  a, ...
  return at::stack({even_rows, odd_rows}, 1).reshape({2 * weight.size(0), 2 * weight.size(1)});
}

void rotate_cpu_(at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin, int64_t start_pos,
                 int64_t n_rotary, int sign) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "crope_rotate_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;  // float for 16-bit types: round once, at the store
    const auto table_type = c10::CppTypeToScalarType<math_t>::value;
    const auto c = cos.to(table_type).contiguous(), s = sin.to(table_type).contiguous();
    const int64_t half = c.size(1), T = y.size(1), N = y.size(2), rows = y.size(0) * T;
    const int64_t heads = n_rotary / (2 * half);
    scalar_t* out = y.data_ptr<scalar_t>();
    const math_t* cos_table = c.data_ptr<math_t>();
    const math_t* sin_table = s.data_ptr<math_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const math_t* cos_m = cos_table + (start_pos + r % T) * half;
        const math_t* sin_m = sin_table + (start_pos + r % T) * half;
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* pair = out + r * N + h * 2 * half;
          for (int64_t j = 0; j < half; ++j) {
            const math_t re = pair[2 * j], im = pair[2 * j + 1], cs = cos_m[j], sn = sign * sin_m[j];
            pair[2 * j] = re * cs - im * sn;                 // (re + i im)(cos + i sin)
            pair[2 * j + 1] = re * sn + im * cs;
          }
        }
      }
    });
  });
}

at::Tensor qkv_rotary_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos,
                          const at::Tensor& sin, int64_t start_pos, int64_t n_rotary) {
  check_inputs(x, weight, cos, sin, start_pos, n_rotary);
  auto y = at::linear(x, real_weight(weight)).contiguous();         // (B, T, out)
  rotate_cpu_(y, cos, sin, start_pos, n_rotary, +1);
  return y;
}

std::tuple<at::Tensor, at::Tensor> qkv_rotary_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& weight, const at::Tensor& cos,
                                                       const at::Tensor& sin, int64_t start_pos, int64_t n_rotary) {
  check_inputs(x, weight, cos, sin, start_pos, n_rotary);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1) &&
              grad.size(2) == 2 * weight.size(0), "crope::qkv_rotary_backward: grad must be (B, T, out), got ",
              grad.sizes());
  auto g = grad.contiguous().clone();
#ifdef WITH_CUDA
  if (g.is_cuda()) {
    rotate_cuda_(g, cos, sin, start_pos, n_rotary, -1);
  } else
#endif
  {
    rotate_cpu_(g, cos, sin, start_pos, n_rotary, -1);
  }
  const auto g2 = g.view({-1, g.size(2)});                          // (B*T, out)
  const auto x2 = x.contiguous().view({-1, x.size(2)});              // (B*T, in)
  const auto grad_x = at::mm(g2, real_weight(weight)).view(x.sizes());
  // gradient of the real matrix, (out/2, 2, in/2, 2); a sits at blocks [0][0] and [1][1],
  // b at [1][0] and, negated, at [0][1]
  const auto G = at::mm(g2.t(), x2).view({weight.size(0), 2, weight.size(1), 2});
  const auto block = [&](int64_t r, int64_t c) { return G.select(1, r).select(2, c); };
  const auto grad_weight = at::stack({block(0, 0) + block(1, 1), block(1, 0) - block(0, 1)}, 2);
  return {grad_x, grad_weight};
}

TORCH_LIBRARY(crope, m) {
  m.def("qkv_rotary(Tensor x, Tensor weight, Tensor cos, Tensor sin, int start_pos, int n_rotary) -> Tensor");
  m.def("qkv_rotary_backward(Tensor grad, Tensor x, Tensor weight, Tensor cos, Tensor sin, int start_pos, "
        "int n_rotary) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(crope, CPU, m) {
  m.impl("qkv_rotary", &qkv_rotary_cpu);
  m.impl("qkv_rotary_backward", &qkv_rotary_backward);
}

}  // namespace crope
