// crope::qkv_rotary: CRoPE's Q/K/V projection with the rotation fused into it.
//
// Interleaved pairs: z_i = x[2i] + i x[2i+1]. With complex weights W = A + iB, stored as
// weight[o, i] = (a, b), the projection is y_o = sum_i W_oi z_i: as a real matrix, 2x2 blocks
// [[a, -b], [b, a]]. Output pair p < n_rotary/2 (the q and k features) is then multiplied by
// e^(i m theta_j), m = start_pos + t (t: the token's index in its sequence), j = p mod head_size/2;
// the rest (v) is left as it is.
//
// Backward: the rotation is unitary, so its adjoint is the rotation by -theta. Un-rotate the
// gradient, and what is left is the backward of a linear map: two GEMMs, the real weight's
// gradient folded back onto (a, b).
//
// This file: the schema, the argument checks, the CPU implementation (float64, float32, bfloat16 and
// float16; gradcheck runs here in float64) and the backward shared by CPU and CUDA. The CUDA forward is in
// qkv_rotary_cuda.cu, its kernels in decode.cu, tiled.cu and pipelined.cu.

#include "crope.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/version.h>

namespace crope {

Path parse_path(c10::string_view name) {
  if (name == "default") return Path::standard;
  if (name == "decode") return Path::decode;
  if (name == "tiled") return Path::tiled;
  if (name == "pipelined") return Path::pipelined;
  if (name == "cublas") return Path::cublas;
  CROPE_CHECK(false, "crope::qkv_rotary: path must be default, decode, tiled, pipelined or cublas, got '" +
                         std::string(name) + "'");
}

const char* path_name(Path path) {
  switch (path) {
    case Path::decode: return "decode";
    case Path::tiled: return "tiled";
    case Path::pipelined: return "pipelined";
    case Path::cublas: return "cublas";
    default: return "default";
  }
}

std::vector<std::string> path_names(const std::vector<Path>& paths) {
  std::vector<std::string> names;
  for (const Path p : paths) names.emplace_back(path_name(p));
  return names;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos, const at::Tensor& sin,
                  int64_t start_pos, int64_t n_rotary, c10::string_view path) {
  parse_path(path);
  CROPE_CHECK(x.dim() == 3, "crope::qkv_rotary: x must be (B, T, in_features), got " + text(x.sizes()));
  const auto dtype = x.scalar_type();
  CROPE_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "crope::qkv_rotary: x must be float64, float32, bfloat16 or float16, got " + text(dtype));
  CROPE_CHECK(weight.dim() == 3 && weight.size(2) == 2 && 2 * weight.size(1) == x.size(2),
              "crope::qkv_rotary: weight must be (out/2, in/2, 2) with in = x.size(-1) = " + std::to_string(x.size(2)) +
                  ", got " + text(weight.sizes()));
  CROPE_CHECK(weight.scalar_type() == dtype, "crope::qkv_rotary: weight must have x's dtype (" + text(dtype) +
                                                 "), got " + text(weight.scalar_type()));
  CROPE_CHECK(cos.dim() == 2 && cos.size(1) > 0,
              "crope::qkv_rotary: cos must be (positions, head_size/2), got " + text(cos.sizes()));
  CROPE_CHECK(sin.sizes() == cos.sizes(),
              "crope::qkv_rotary: sin must have cos's shape " + text(cos.sizes()) + ", got " + text(sin.sizes()));
  for (const auto& [name, table] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}})
    CROPE_CHECK(at::isFloatingType(table.scalar_type()), std::string("crope::qkv_rotary: ") + name +
                                                             " must be a floating-point table, got " +
                                                             text(table.scalar_type()));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"weight", weight}, {"cos", cos},
                                {"sin", sin}})
    CROPE_CHECK(t.device() == x.device(), std::string("crope::qkv_rotary: ") + name + " must be on x's device (" +
                                              x.device().str() + "), got " + t.device().str());
  const int64_t head_size = 2 * cos.size(1);
  CROPE_CHECK(n_rotary >= 0 && n_rotary % head_size == 0 && n_rotary <= 2 * weight.size(0),
              "crope::qkv_rotary: n_rotary (" + std::to_string(n_rotary) + ") must be a multiple of head_size (" +
                  std::to_string(head_size) + ") and at most out_features (" + std::to_string(2 * weight.size(0)) +
                  ")");
  CROPE_CHECK(start_pos >= 0 && start_pos + x.size(1) <= cos.size(0),
              "crope::qkv_rotary: positions " + std::to_string(start_pos) + ".." + std::to_string(start_pos + x.size(1)) +
                  " exceed the rotary tables (" + std::to_string(cos.size(0)) + ")");
  // Non-contiguous x and weight are accepted: the implementations take contiguous copies.
}

at::Tensor real_weight(const at::Tensor& weight) {
  const auto a = weight.select(2, 0), b = weight.select(2, 1);       // (out/2, in/2)
  const auto even_rows = at::stack({a, -b}, 2);                      // row 2o:   a, -b, ...
  const auto odd_rows = at::stack({b, a}, 2);                        // row 2o+1: b,  a, ...
  return at::stack({even_rows, odd_rows}, 1).reshape({2 * weight.size(0), 2 * weight.size(1)});
}

void rotate_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& cos, const at::Tensor& sin,
                int64_t start_pos, int64_t n_rotary, int sign) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "crope_rotate_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;  // float for 16-bit types: round once, at the store
    const auto table_type = c10::CppTypeToScalarType<math_t>::value;
    const auto c = cos.to(table_type).contiguous(), s = sin.to(table_type).contiguous();
    const int64_t half = c.size(1), T = src.size(1), N = src.size(2), rows = src.size(0) * T;
    const int64_t heads = n_rotary / (2 * half);
    const bool in_place = dst.is_same(src);
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    const math_t* cos_table = c.const_data_ptr<math_t>();
    const math_t* sin_table = s.const_data_ptr<math_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const math_t* cos_m = cos_table + (start_pos + r % T) * half;
        const math_t* sin_m = sin_table + (start_pos + r % T) * half;
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* z = in + r * N + h * 2 * half;
          scalar_t* w = out + r * N + h * 2 * half;
          for (int64_t j = 0; j < half; ++j) {
            const math_t re = z[2 * j], im = z[2 * j + 1], cs = cos_m[j], sn = sign * sin_m[j];
            w[2 * j] = re * cs - im * sn;                 // (re + i im)(cos + i sin)
            w[2 * j + 1] = re * sn + im * cs;
          }
        }
        if (!in_place) std::copy(in + r * N + n_rotary, in + (r + 1) * N, out + r * N + n_rotary);  // v
      }
    });
  });
}

at::Tensor qkv_rotary_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos,
                          const at::Tensor& sin, int64_t start_pos, int64_t n_rotary, c10::string_view path) {
  check_inputs(x, weight, cos, sin, start_pos, n_rotary, path);
  auto y = at::linear(x, real_weight(weight)).contiguous();         // (B, T, out)
  rotate_cpu(y, y, cos, sin, start_pos, n_rotary, +1);
  return y;
}

namespace {

// a @ b, accumulated in float32 and returned in float32 for 16-bit inputs (in the inputs' dtype otherwise),
// so that the fold of the real weight's gradient onto (a, b) adds float32 values and rounds once
at::Tensor mm_opmath(const at::Tensor& a, const at::Tensor& b) {
  if (!at::isReducedFloatingType(a.scalar_type())) return at::mm(a, b);
#if defined(WITH_CUDA) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8))
  if (a.is_cuda()) return at::mm(a, b, at::kFloat);  // cuBLAS writes its float32 accumulators
#endif
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

bool aligned_to(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> qkv_rotary_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& weight, const at::Tensor& cos,
                                                       const at::Tensor& sin, int64_t start_pos, int64_t n_rotary,
                                                       std::array<bool, 2> output_mask, c10::string_view path) {
  check_inputs(x, weight, cos, sin, start_pos, n_rotary, path);
  const int64_t N = 2 * weight.size(0), K = x.size(2);
  CROPE_CHECK(grad.dim() == 3 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1) && grad.size(2) == N,
              "crope::qkv_rotary_backward: grad must be (B, T, out) = " + text({x.size(0), x.size(1), N}) + ", got " +
                  text(grad.sizes()));
  CROPE_CHECK(grad.scalar_type() == x.scalar_type(), "crope::qkv_rotary_backward: grad must have x's dtype (" +
                                                         text(x.scalar_type()) + "), got " + text(grad.scalar_type()));
  CROPE_CHECK(grad.device() == x.device(), "crope::qkv_rotary_backward: grad must be on x's device (" +
                                               x.device().str() + "), got " + grad.device().str());
  // outputs autograd does not need (ctx.needs_input_grad) are returned empty, and not computed
  at::Tensor grad_x = x.new_empty({0}), grad_weight = weight.new_empty({0});
  if (!output_mask[0] && !output_mask[1]) return {grad_x, grad_weight};

  // the un-rotated gradient g, in one pass: read grad, write g (the v features copied)
  auto src = grad.contiguous();
  if (!aligned_to(src, 2 * src.element_size())) src = src.clone();  // pairs are loaded as one value
  auto g = at::empty_like(src, at::MemoryFormat::Contiguous);
#ifdef WITH_CUDA
  if (g.is_cuda()) {
    rotate_cuda(src, g, cos, sin, start_pos, n_rotary, -1);
  } else
#endif
  {
    rotate_cpu(src, g, cos, sin, start_pos, n_rotary, -1);
  }
  const int64_t M = x.size(0) * x.size(1);
  const auto g2 = g.view({M, N});                                    // (B*T, out)
  if (output_mask[0]) grad_x = at::mm(g2, real_weight(weight)).view(x.sizes());
  if (output_mask[1]) {
    const auto x2 = x.contiguous().view({M, K});                     // (B*T, in)
    // gradient of the real matrix, (out/2, 2, in/2, 2), in float32 for 16-bit types; a sits at blocks
    // [0][0] and [1][1], b at [1][0] and, negated, at [0][1]; the sums are rounded once, at the end
    const auto G = mm_opmath(g2.t(), x2).view({weight.size(0), 2, weight.size(1), 2});
    const auto block = [&](int64_t r, int64_t c) { return G.select(1, r).select(2, c); };
    grad_weight = at::stack({block(0, 0) + block(1, 1), block(1, 0) - block(0, 1)}, 2).to(weight.scalar_type());
  }
  return {grad_x, grad_weight};
}

// The CUDA paths that can compute qkv_rotary(x, weight, ..., n_rotary) on x's GPU: none on the CPU, which has one
// implementation.
std::vector<std::string> qkv_rotary_paths_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t /*n_rotary*/) {
  CROPE_CHECK(x.dim() == 3 && weight.dim() == 3 && 2 * weight.size(1) == x.size(2),
              "crope::qkv_rotary_paths: x must be (B, T, in) and weight (out/2, in/2, 2)");
  CROPE_CHECK(weight.device() == x.device(), "crope::qkv_rotary_paths: weight must be on x's device");
  return {};
}

TORCH_LIBRARY(crope, m) {
  m.def("qkv_rotary(Tensor x, Tensor weight, Tensor cos, Tensor sin, int start_pos, int n_rotary, "
        "str path=\"default\") -> Tensor");
  m.def("qkv_rotary_backward(Tensor grad, Tensor x, Tensor weight, Tensor cos, Tensor sin, int start_pos, "
        "int n_rotary, bool[2] output_mask, str path=\"default\") -> (Tensor, Tensor)");
  m.def("qkv_rotary_paths(Tensor x, Tensor weight, int n_rotary) -> str[]");
}

TORCH_LIBRARY_IMPL(crope, CPU, m) {
  m.impl("qkv_rotary", &qkv_rotary_cpu);
  m.impl("qkv_rotary_backward", &qkv_rotary_backward);
  m.impl("qkv_rotary_paths", &qkv_rotary_paths_cpu);
}

}  // namespace crope
