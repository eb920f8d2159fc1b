// CUDA forward of crope::qkv_rotary (the schema and the math are in crope_qkv.cpp).
//
// Two kernels, chosen by the number of tokens M = B * T:
//   qkv_decode_kernel  M <= 16 (decode): bound by reading the weights, so it streams every complex
//                      weight exactly once with 16-byte loads and keeps one accumulator pair per token.
//   qkv_tiled_kernel   M > 16 (training, prefill), bf16/fp16: a tensor-core GEMM whose weight tile is
//                      expanded in shared memory from the complex weights (half the bytes of RoPE's
//                      real matrix), and whose epilogue rotates the accumulator pairs before the store.
// float32 with many tokens takes cuBLAS and the rotation as a second pass, as does any shape the
// kernels do not cover. Each kernel is checked against the PyTorch path of crope.py
// (tests/test_kernel.py); that path is the simple reference.

#include "crope.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

namespace crope {
namespace {

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };
template <> struct CudaType<at::Half> { using type = __half; };

// arithmetic type: float, or double for double; 16-bit values round once, at the store
template <typename T> using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Position and rotary tables of one output: row r of the (M, N) output is token t = r % T of its
// sequence, at position start_pos + t; complex output p rotates by theta_j, j = p % half.
struct Rotary {
  const float* cos;
  const float* sin;
  int64_t start_pos;
  int T, half, n_rotary_pairs;
  float sign;

  // (re, im) of output pair p in row r, rotated when p belongs to q or k
  template <typename A>
  __device__ __forceinline__ void apply(int64_t r, int p, A& re, A& im) const {
    if (p >= n_rotary_pairs) return;
    const int64_t at = (start_pos + r % T) * half + p % half;
    const A c = cos[at], s = sign * sin[at];
    const A rotated_re = re * c - im * s;
    im = re * s + im * c;
    re = rotated_re;
  }
};

// ------------------------------------------------------------------ rotation as its own pass
template <typename T>
__global__ void rotate_kernel(T* y, int64_t rows, int N, Rotary rot) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;  // one thread per rotated pair
  if (idx >= rows * rot.n_rotary_pairs) return;
  const int64_t r = idx / rot.n_rotary_pairs;
  const int p = idx % rot.n_rotary_pairs;
  T* pair = y + r * N + 2 * p;
  Acc<T> re = static_cast<Acc<T>>(pair[0]), im = static_cast<Acc<T>>(pair[1]);
  rot.apply(r, p, re, im);
  pair[0] = static_cast<T>(re);
  pair[1] = static_cast<T>(im);
}

// ------------------------------------------------------------------ decode: stream the weights once
// One warp per complex output row o. Row o of the weight is in_features values (a0, b0, a1, b1, ...),
// laid out exactly like a row of x (re0, im0, re1, im1, ...), so lane l reads matching 16-byte chunks
// of both: y_o += (a + ib)(re + i im). x is a few KB and stays in L1/L2; the weights are read once.
template <typename T, int MAX_TOKENS>
__global__ void __launch_bounds__(256) qkv_decode_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                         T* __restrict__ y, int M, int K, int n_rows, Rotary rot) {
  constexpr int VEC = 16 / sizeof(T);  // values per 16-byte load: an even number, whole pairs
  const int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n_rows) return;
  float re[MAX_TOKENS], im[MAX_TOKENS];
#pragma unroll
  for (int t = 0; t < MAX_TOKENS; ++t) re[t] = im[t] = 0.f;

  const T* w_row = w + (int64_t)row * K;
#pragma unroll 4
  for (int k = lane * VEC; k < K; k += 32 * VEC) {
    union { uint4 vec; T v[VEC]; } wv, xv;
    wv.vec = __ldg(reinterpret_cast<const uint4*>(w_row + k));
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
      if (t < M) {
        xv.vec = *reinterpret_cast<const uint4*>(x + (int64_t)t * K + k);
#pragma unroll
        for (int v = 0; v < VEC; v += 2) {
          const float a = static_cast<float>(wv.v[v]), b = static_cast<float>(wv.v[v + 1]);
          const float xr = static_cast<float>(xv.v[v]), xi = static_cast<float>(xv.v[v + 1]);
          re[t] += a * xr - b * xi;
          im[t] += b * xr + a * xi;
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MAX_TOKENS; ++t) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      re[t] += __shfl_xor_sync(0xffffffff, re[t], offset);
      im[t] += __shfl_xor_sync(0xffffffff, im[t], offset);
    }
  }
  if (lane == 0) {
    const int N = 2 * n_rows;
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
      if (t < M) {
        float out_re = re[t], out_im = im[t];
        rot.apply(t, row, out_re, out_im);
        y[(int64_t)t * N + 2 * row] = static_cast<T>(out_re);
        y[(int64_t)t * N + 2 * row + 1] = static_cast<T>(out_im);
      }
    }
  }
}

// ------------------------------------------------------------------ many tokens: tensor-core tiles
// Y (M, N) = X (M, K) Wr^T with Wr the real (N, K) block matrix. A block computes a BM x BN tile of Y
// with 8 warps (2 x 4), each 64 x 32 as 4 x 2 WMMA fragments of 16 x 16. Per BK slice it loads the
// X tile, and the complex weights of BN/2 output rows (BN/2 x BK values), which it expands into the
// BN x BK tile of Wr: rows 2o and 2o+1 become (a, -b, ...) and (b, a, ...). The epilogue goes one
// fragment at a time through a per-warp scratch, rotates each pair (adjacent columns) and stores it.
constexpr int BM = 128, BN = 128, BK = 32, PAD = 8;  // PAD: 16 bytes against shared-memory bank conflicts
constexpr int WARPS_N = 4, WARP_M = 64, WARP_N = 32, FRAGS_M = WARP_M / 16, FRAGS_N = WARP_N / 16;

template <typename T>
__global__ void __launch_bounds__(256) qkv_tiled_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                        T* __restrict__ y, int M, int N, int K, Rotary rot) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the host side never launches this on older GPUs
#else
  using namespace nvcuda;
  __shared__ __align__(32) T x_tile[BM][BK + PAD];
  __shared__ __align__(32) T w_tile[BN][BK + PAD];  // rows of Wr: w_tile[n][k] = Wr[n0 + n][k0 + k]
  __shared__ __align__(32) float scratch[8][16][16];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;  // M on x: up to 2^31 - 1 tiles
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FRAGS_M][FRAGS_N];
#pragma unroll
  for (int i = 0; i < FRAGS_M; ++i)
#pragma unroll
    for (int j = 0; j < FRAGS_N; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int k0 = 0; k0 < K; k0 += BK) {
    // X tile: BM x BK values, 8 per thread per 16-byte load, two passes of 256 threads
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
      const int idx = (pass * 256 + tid) * 8, r = idx / BK, c = idx % BK;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m0 + r < M) v = *reinterpret_cast<const uint4*>(x + (int64_t)(m0 + r) * K + k0 + c);
      *reinterpret_cast<uint4*>(&x_tile[r][c]) = v;
    }
    // complex weights: BN/2 rows x BK values (BK/2 pairs), 8 values (4 pairs) per thread
    {
      const int o = tid / (BK / 8), c = (tid % (BK / 8)) * 8;
      union { uint4 vec; T v[8]; } wv, even_row, odd_row;
      wv.vec = make_uint4(0, 0, 0, 0);
      if (n0 + 2 * o < N) wv.vec = __ldg(reinterpret_cast<const uint4*>(w + (int64_t)(n0 / 2 + o) * K + k0 + c));
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const T a = wv.v[2 * q], b = wv.v[2 * q + 1];
        even_row.v[2 * q] = a;                                   // [[a, -b],
        even_row.v[2 * q + 1] = static_cast<T>(-static_cast<float>(b));
        odd_row.v[2 * q] = b;                                    //  [b,  a]]
        odd_row.v[2 * q + 1] = a;
      }
      *reinterpret_cast<uint4*>(&w_tile[2 * o][c]) = even_row.vec;
      *reinterpret_cast<uint4*>(&w_tile[2 * o + 1][c]) = odd_row.vec;
    }
    __syncthreads();

#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag[FRAGS_M];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag[FRAGS_N];  // Wr^T
#pragma unroll
      for (int i = 0; i < FRAGS_M; ++i)
        wmma::load_matrix_sync(a_frag[i], &x_tile[warp_m * WARP_M + i * 16][kk], BK + PAD);
#pragma unroll
      for (int j = 0; j < FRAGS_N; ++j)
        wmma::load_matrix_sync(b_frag[j], &w_tile[warp_n * WARP_N + j * 16][kk], BK + PAD);
#pragma unroll
      for (int i = 0; i < FRAGS_M; ++i)
#pragma unroll
        for (int j = 0; j < FRAGS_N; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
    }
    __syncthreads();
  }

  // epilogue: 16 x 16 fragment = 128 pairs, 4 per lane; rotate in fp32, round once, store the pair
#pragma unroll
  for (int i = 0; i < FRAGS_M; ++i) {
#pragma unroll
    for (int j = 0; j < FRAGS_N; ++j) {
      wmma::store_matrix_sync(&scratch[warp][0][0], acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int q = lane; q < 128; q += 32) {
        const int r = q / 8, c = 2 * (q % 8);
        const int gm = m0 + warp_m * WARP_M + i * 16 + r, gn = n0 + warp_n * WARP_N + j * 16 + c;
        if (gm < M && gn < N) {
          float re = scratch[warp][r][c], im = scratch[warp][r][c + 1];
          rot.apply(gm, gn / 2, re, im);
          T* out = y + (int64_t)gm * N + gn;
          out[0] = static_cast<T>(re);
          out[1] = static_cast<T>(im);
        }
      }
      __syncwarp();
    }
  }
#endif
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool has_tensor_cores_for_bf16(int device) {  // WMMA on bf16 (and our tiled kernel) needs sm_80+
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

Rotary make_rotary(const at::Tensor& cos, const at::Tensor& sin, int64_t start_pos, int64_t T,
                   int64_t n_rotary, int sign) {
  return Rotary{cos.data_ptr<float>(), sin.data_ptr<float>(), start_pos, (int)T, (int)cos.size(1),
                (int)(n_rotary / 2), (float)sign};
}

template <int MAX_TOKENS, typename T>
void launch_decode(const T* x, const T* w, T* y, int M, int K, int n_rows, const Rotary& rot, cudaStream_t stream) {
  const int threads = 256, blocks = (n_rows * 32 + threads - 1) / threads;
  qkv_decode_kernel<T, MAX_TOKENS><<<blocks, threads, 0, stream>>>(x, w, y, M, K, n_rows, rot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// the smallest instantiation that holds M tokens: its accumulators stay in registers
template <typename scalar_t>
void decode(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const Rotary& rot, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr<scalar_t>());
  const auto* wp = reinterpret_cast<const T*>(weight.data_ptr<scalar_t>());
  auto* yp = reinterpret_cast<T*>(y.data_ptr<scalar_t>());
  const int M = (int)(x.size(0) * x.size(1)), K = (int)x.size(2), n_rows = (int)weight.size(0);
  if (M == 1) launch_decode<1>(xp, wp, yp, M, K, n_rows, rot, stream);
  else if (M <= 4) launch_decode<4>(xp, wp, yp, M, K, n_rows, rot, stream);
  else launch_decode<16>(xp, wp, yp, M, K, n_rows, rot, stream);
}

template <typename scalar_t>
void tiled(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const Rotary& rot, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const int M = (int)(x.size(0) * x.size(1)), K = (int)x.size(2), N = (int)y.size(2);
  const dim3 grid((M + BM - 1) / BM, (N + BN - 1) / BN);
  qkv_tiled_kernel<T><<<grid, 256, 0, stream>>>(reinterpret_cast<const T*>(x.data_ptr<scalar_t>()),
                                                reinterpret_cast<const T*>(weight.data_ptr<scalar_t>()),
                                                reinterpret_cast<T*>(y.data_ptr<scalar_t>()), M, N, K, rot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void rotate_cuda_(at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin, int64_t start_pos,
                  int64_t n_rotary, int sign) {
  const c10::cuda::CUDAGuard guard(y.device());
  const auto c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  const int64_t rows = y.size(0) * y.size(1), pairs = rows * (n_rotary / 2);
  if (pairs == 0) return;
  const Rotary rot = make_rotary(c, s, start_pos, y.size(1), n_rotary, sign);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "crope_rotate_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    const int threads = 256;
    rotate_kernel<T><<<(pairs + threads - 1) / threads, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<T*>(y.data_ptr<scalar_t>()), rows, (int)y.size(2), rot);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor qkv_rotary_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& cos_in,
                           const at::Tensor& sin_in, int64_t start_pos, int64_t n_rotary) {
  check_inputs(x_in, weight_in, cos_in, sin_in, start_pos, n_rotary);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), weight = weight_in.contiguous();
  const auto cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), T = x.size(1), K = x.size(2), N = 2 * weight.size(0), M = B * T;
  const Rotary rot = make_rotary(cos, sin, start_pos, T, n_rotary, +1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int vec = 16 / (int)x.element_size();
  const bool vector_ok = K % vec == 0 && aligned16(x.data_ptr()) && aligned16(weight.data_ptr());
  const bool half_precision = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;

  if (M > 0 && M <= 16 && vector_ok && x.scalar_type() != at::kDouble) {
    auto y = at::empty({B, T, N}, x.options());
    switch (x.scalar_type()) {
      case at::kBFloat16: decode<at::BFloat16>(x, weight, y, rot, stream); break;
      case at::kHalf: decode<at::Half>(x, weight, y, rot, stream); break;
      default: decode<float>(x, weight, y, rot, stream);
    }
    return y;
  }
  if (half_precision && M > 16 && K % BK == 0 && vector_ok && has_tensor_cores_for_bf16(x.get_device())) {
    auto y = at::empty({B, T, N}, x.options());
    if (x.scalar_type() == at::kBFloat16) tiled<at::BFloat16>(x, weight, y, rot, stream);
    else tiled<at::Half>(x, weight, y, rot, stream);
    return y;
  }
  auto y = at::linear(x, real_weight(weight)).contiguous();  // float32/64 with many tokens, or shapes the kernels do not cover
  rotate_cuda_(y, cos, sin, start_pos, n_rotary, +1);
  return y;
}

TORCH_LIBRARY_IMPL(crope, CUDA, m) {
  m.impl("qkv_rotary", &qkv_rotary_cuda);
  m.impl("qkv_rotary_backward", &qkv_rotary_backward);
}

}  // namespace crope
