// The tiled path of crope::qkv_rotary (crope.h): tensor cores for many tokens.
//
//   qkv_tiled_kernel (bf16/fp16, built for sm_80 or newer): a tensor-core GEMM (ldmatrix and mma.sync m16n8k16)
//   whose weight tile is expanded in shared memory from the complex weights (half the bytes of RoPE's real
//   matrix); its epilogue rotates the accumulator pairs in registers and stores each pair with one packed store.
//   pipelined.cu adds a cp.async pipeline to it.

#include "crope.h"
#include "crope_cuda.cuh"

#include <c10/cuda/CUDAStream.h>

namespace crope {
namespace {

using namespace kernels;  // crope_cuda.cuh: value types, Rotary, ldmatrix / mma.sync wrappers

// Y (M, N) = X (M, K) Wr^T with Wr the real (N, K) block matrix. A block computes a BM x BN tile of Y with
// 8 warps (2 x 4), each 64 x 32 as 4 x 4 mma.sync m16n8k16 tiles with fp32 accumulators. Per BK step it
// loads the X tile, and the complex weights of BN/2 output rows (BN/2 x BK values), which it expands into
// the BN x BK tile of Wr: rows 2o and 2o+1 become (a, -b, ...) and (b, a, ...). Fragments come from
// shared memory through ldmatrix. One stage: load, barrier, math, barrier (cp.async double buffering and
// a wgmma mainloop are the next steps, csrc/NOTES.md).
constexpr int BM = kTiledTile, BN = kTiledTile;  // the block tile; the rest of the tiling is inside the kernel

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

template <typename scalar_t>
void launch_tiled(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const Rotary<float>& rot,
                  cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const int M = (int)(x.size(0) * x.size(1)), K = (int)x.size(2), N = (int)y.size(2);
  const dim3 grid((M + BM - 1) / BM, (N + BN - 1) / BN);
  qkv_tiled_kernel<T><<<grid, 256, 0, stream>>>(reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()),
                                                reinterpret_cast<const T*>(weight.const_data_ptr<scalar_t>()),
                                                reinterpret_cast<T*>(y.data_ptr<scalar_t>()), M, N, K, rot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool tiled_compiled(int device) {
  return cached_per_device(device, [] { return static_cast<int>(compiled_for_sm80(
                                            reinterpret_cast<const void*>(qkv_tiled_kernel<__nv_bfloat16>))); }) != 0;
}

void tiled_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos_in,
                const at::Tensor& sin_in, int64_t start_pos, int64_t n_rotary) {
  const auto cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const auto rot = make_rotary<float>(cos, sin, start_pos, x.size(1), n_rotary, +1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kBFloat16) {
    launch_tiled<at::BFloat16>(x, weight, y, rot, stream);
  } else {
    launch_tiled<at::Half>(x, weight, y, rot, stream);
  }
}

}  // namespace crope
