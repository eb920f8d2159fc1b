// CUDA forward of crope::qkv_rotary (the schema and the math are in crope_qkv.cpp): the tiled and cublas paths,
// the rotation as its own pass, and the host side that dispatches every path.
//
//   tiled   qkv_tiled_kernel (bf16/fp16, built for sm_80 or newer): a tensor-core GEMM (ldmatrix and
//           mma.sync m16n8k16) whose weight tile is expanded in shared memory from the complex weights
//           (half the bytes of RoPE's real matrix); its epilogue rotates the accumulator pairs in
//           registers and stores each pair with one packed store.
//   cublas  the real block matrix through cuBLAS, then rotate_kernel as a second pass (any dtype, shape).
// Their second versions, decode_v2 and tiled_v2, are in crope_qkv_v2.cu. The backward (crope_qkv.cpp)
// un-rotates the gradient with rotate_kernel, then uses cuBLAS. Every path is checked against the PyTorch
// path of crope.py, the simple reference: by tests/test_kernel.py, and by fused_op.py's self-check on the
// first use on each GPU. Shared device helpers (value types, the rotation, PTX wrappers with their layouts):
// crope_cuda.cuh.

#include "crope.h"
#include "crope_cuda.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace crope {
namespace {

using namespace kernels;  // crope_cuda.cuh: value types, Rotary, ldmatrix / mma.sync wrappers

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

// ------------------------------------------------------------------ many tokens: tensor-core tiles
// Y (M, N) = X (M, K) Wr^T with Wr the real (N, K) block matrix. A block computes a BM x BN tile of Y with
// 8 warps (2 x 4), each 64 x 32 as 4 x 4 mma.sync m16n8k16 tiles with fp32 accumulators. Per BK step it
// loads the X tile, and the complex weights of BN/2 output rows (BN/2 x BK values), which it expands into
// the BN x BK tile of Wr: rows 2o and 2o+1 become (a, -b, ...) and (b, a, ...). Fragments come from
// shared memory through ldmatrix. One stage: load, barrier, math, barrier (cp.async double buffering and
// a wgmma mainloop are the next steps, csrc/NOTES.md).
constexpr int BM = 128, BN = 128;  // the block tile; the rest of the tiling is inside the kernel

template <typename T>
__global__ void __launch_bounds__(256) qkv_tiled_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                        T* __restrict__ y, int M, int N, int K, Rotary<float> rot) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 needs sm_80; the host never launches this build (tiled_compiled)
#else
  constexpr int BK = kTiledBK, LDS = BK + 8;  // LDS: row stride, 80 bytes: ldmatrix's 8 rows of 16 bytes fall
                                              // in distinct banks
  constexpr int WARPS_N = 4, WARP_M = 64, WARP_N = 32, TILES_M = WARP_M / 16, TILES_N = WARP_N / 8;
  __shared__ __align__(16) T x_tile[BM][LDS];
  __shared__ __align__(16) T w_tile[BN][LDS];  // rows of Wr: w_tile[n][k] = Wr[n0 + n][k0 + k]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;  // M on grid.x: up to 2^31 - 1 tiles
  const int wm = (warp / WARPS_N) * WARP_M, wn = (warp % WARPS_N) * WARP_N;

  float acc[TILES_M][TILES_N][4];
#pragma unroll
  for (int i = 0; i < TILES_M; ++i)
#pragma unroll
    for (int j = 0; j < TILES_N; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

  for (int k0 = 0; k0 < K; k0 += BK) {
    // X tile: BM x BK values, 8 per thread per 16-byte load, two passes of 256 threads
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
      const int idx = (pass * 256 + tid) * 8, r = idx / BK, c = idx % BK;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m0 + r < M) v = __ldg(reinterpret_cast<const uint4*>(x + (int64_t)(m0 + r) * K + k0 + c));
      *reinterpret_cast<uint4*>(&x_tile[r][c]) = v;
    }
    // complex weights: BN/2 rows x BK values (BK/2 pairs), 8 values (4 pairs) per thread. A pair (a, b) is
    // one 32-bit word, a in the low half. [[a, -b], [b, a]]: row 2o gets (a, -b), the word with b's sign
    // bit flipped (exact, for bf16 and fp16 alike); row 2o+1 gets (b, a), the word's halves swapped.
    {
      const int o = tid / (BK / 8), c = (tid % (BK / 8)) * 8;
      uint4 wv = make_uint4(0, 0, 0, 0);
      if (n0 + 2 * o < N) wv = __ldg(reinterpret_cast<const uint4*>(w + (int64_t)(n0 / 2 + o) * K + k0 + c));
      const auto neg_b = [](uint32_t ab) { return ab ^ 0x80000000u; };
      const auto swap = [](uint32_t ab) { return __byte_perm(ab, 0, 0x1032); };
      *reinterpret_cast<uint4*>(&w_tile[2 * o][c]) = make_uint4(neg_b(wv.x), neg_b(wv.y), neg_b(wv.z), neg_b(wv.w));
      *reinterpret_cast<uint4*>(&w_tile[2 * o + 1][c]) = make_uint4(swap(wv.x), swap(wv.y), swap(wv.z), swap(wv.w));
    }
    __syncthreads();

#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      // A fragments: lanes 0-15 address rows 0-15 at column kk, lanes 16-31 the same rows at kk + 8
      uint32_t a[TILES_M][4], b[TILES_N][2];
#pragma unroll
      for (int i = 0; i < TILES_M; ++i) ldmatrix_x4(a[i], &x_tile[wm + i * 16 + lane % 16][kk + (lane / 16) * 8]);
      // B fragments, two n8 tiles per ldmatrix: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
      // (n 8-15, k 8-15); lane l addresses row l % 8 of matrix l / 8
#pragma unroll
      for (int j = 0; j < TILES_N; j += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, &w_tile[wn + j * 8 + (lane / 16) * 8 + lane % 8][kk + ((lane / 8) % 2) * 8]);
        split_b(b[j], b[j + 1], r);
      }
      mma_tiles<T>(acc, a, b);
    }
    __syncthreads();
  }

  // Epilogue. In an m16n8 accumulator tile, lane holds columns 2(lane % 4) and 2(lane % 4) + 1 of rows
  // lane / 4 and lane / 4 + 8: each an output pair (re, im). Rotate in fp32, round once, store the pair.
  using P = Pair<T>;
  int pair[TILES_N], j_of[TILES_N];  // per column tile: the complex output index and its theta index j
#pragma unroll
  for (int j = 0; j < TILES_N; ++j) {
    pair[j] = (n0 + wn + j * 8) / 2 + lane % 4;
    j_of[j] = pair[j] % rot.half;
  }
#pragma unroll
  for (int i = 0; i < TILES_M; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int gm = m0 + wm + i * 16 + lane / 4 + 8 * h;
      if (gm >= M) continue;
      const int m = rot.position(gm);  // once per row
      T* y_row = y + (int64_t)gm * N;
#pragma unroll
      for (int j = 0; j < TILES_N; ++j) {
        if (2 * pair[j] >= N) continue;
        float re = acc[i][j][2 * h], im = acc[i][j][2 * h + 1];
        if (rot.rotates(pair[j])) rot.apply(m * rot.half + j_of[j], re, im);
        *reinterpret_cast<typename P::type*>(y_row + 2 * pair[j]) = P::make(re, im);
      }
    }
  }
#endif
}

// ------------------------------------------------------------------ host side

// Whether the tiled kernel that runs on `device` was compiled from sm_80+ code (a "7.5+PTX" build would
// otherwise JIT its __trap() stub on an A100)
bool tiled_compiled(int device) {
  return cached_per_device(device, [] { return static_cast<int>(compiled_for_sm80(
                                            reinterpret_cast<const void*>(qkv_tiled_kernel<__nv_bfloat16>))); }) != 0;
}

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
  if (decode_v2_takes(dtype, K)) paths.push_back(Path::decode_v2);
  if (tiled_takes(dtype, K) && tiled_compiled(x.get_device())) paths.push_back(Path::tiled);
  if (tiled_v2_takes(dtype, K, N) && tiled_v2_available(x.get_device())) paths.push_back(Path::tiled_v2);
  paths.push_back(Path::cublas);
  return paths;
}

// 32-bit indexing inside the kernels
void check_sizes(int64_t M, int64_t N, int64_t K, const at::Tensor& cos) {
  constexpr int64_t limit = std::numeric_limits<int>::max();
  CROPE_CHECK(M < limit && K < limit && N < (int64_t)65535 * BN && 16 * N < limit && cos.numel() < limit,
              "crope::qkv_rotary: on CUDA, B*T, in_features and the rotary tables must stay below 2^31 elements and "
              "out_features below " + std::to_string(65535 * BN) + "; got B*T = " + std::to_string(M) + ", in = " +
                  std::to_string(K) + ", out = " + std::to_string(N));
}

template <typename scalar_t>
void tiled(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const Rotary<float>& rot,
           cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const int M = (int)(x.size(0) * x.size(1)), K = (int)x.size(2), N = (int)y.size(2);
  const dim3 grid((M + BM - 1) / BM, (N + BN - 1) / BN);
  qkv_tiled_kernel<T><<<grid, 256, 0, stream>>>(reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()),
                                                reinterpret_cast<const T*>(weight.const_data_ptr<scalar_t>()),
                                                reinterpret_cast<T*>(y.data_ptr<scalar_t>()), M, N, K, rot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// What a forced path takes, for its refusal (fused_op.py refuses the same in Python, before the op is called)
std::string what_it_takes(Path path) {
  switch (path) {
    case Path::decode_v2:
      return "float32, bfloat16 or float16 with in_features a multiple of 8 (4 in float32) and at most " +
             std::to_string(kDecodeV2SharedBytes / 2) + " (" + std::to_string(kDecodeV2SharedBytes / 4) +
             " in float32)";
    case Path::tiled: return "bfloat16 or float16 with in_features a multiple of " + std::to_string(kTiledBK);
    default: return "bfloat16 or float16 with in_features and out_features multiples of 8";
  }
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
  if (path == Path::automatic) path = Path::cublas;
  if (path != Path::cublas) {
    const auto offered = cuda_paths(x, weight);
    if (std::find(offered.begin(), offered.end(), path) == offered.end()) {
      const bool shape_ok = path == Path::decode_v2 ? decode_v2_takes(dtype, K)
                            : path == Path::tiled   ? tiled_takes(dtype, K)
                                                    : tiled_v2_takes(dtype, K, N);
      CROPE_CHECK(!shape_ok, std::string("crope::qkv_rotary: path '") + path_name(path) + "' needs a GPU of compute "
                                 "capability 8.0 or newer and a build for it (TORCH_CUDA_ARCH_LIST with 8.0 or newer)");
      CROPE_CHECK(false, std::string("crope::qkv_rotary: path '") + path_name(path) + "' takes " +
                             what_it_takes(path) + "; got " + text(dtype) + ", in_features " + std::to_string(K) +
                             ", out_features " + std::to_string(N));
    }
  }

  auto y = at::empty({B, T, N}, x.options());
  if (path == Path::decode_v2) {
    decode_v2_cuda(x, weight, y, cos_in, sin_in, start_pos, n_rotary, sm_count(x.get_device()));
  } else if (path == Path::tiled_v2) {
    tiled_v2_cuda(x, weight, y, cos_in, sin_in, start_pos, n_rotary);
  } else if (path == Path::cublas) {
    y = at::linear(x, real_weight(weight)).contiguous();
    rotate_cuda(y, y, cos_in, sin_in, start_pos, n_rotary, +1);
  } else {
    const auto cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
    const auto rot = make_rotary<float>(cos, sin, start_pos, T, n_rotary, +1);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (dtype == at::kBFloat16) {
      tiled<at::BFloat16>(x, weight, y, rot, stream);
    } else {
      tiled<at::Half>(x, weight, y, rot, stream);
    }
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
