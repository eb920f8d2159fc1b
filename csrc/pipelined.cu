// The pipelined path of crope::qkv_rotary (crope.h): tiled.cu's tensor-core GEMM with a cp.async pipeline.
//
//   qkv_pipelined_kernel: a 128 x 128 x 32 tensor-core GEMM with a 4-stage cp.async pipeline (loads of tile k + 3
//   in flight while tile k is multiplied), 4 warps of 64 x 64 (half the ldmatrix per mma.sync of tiled's 64 x 32),
//   the weight tile kept complex in shared memory (half of RoPE's bytes; the 2x2 blocks are formed in registers,
//   two bit operations per fragment register), the rotation applied to the fp32 accumulator pairs, and the output
//   tile staged in shared memory for 16-byte stores.

#include "crope.h"
#include "crope_cuda.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace crope {
namespace {

using namespace kernels;

namespace pipeline {
constexpr int BM = 128, BN = 128, BK = kTiledBK, STAGES = 4, THREADS = 128;
constexpr int WARP_M = 64, WARP_N = 64, WARPS_N = BN / WARP_N;  // warp tiles of 4 x 8 mma tiles
constexpr int LDS = BK + 8;           // a stage's row stride, 80 bytes: ldmatrix's 8 rows of 16 bytes hit distinct banks
constexpr int X_TILE = BM * LDS;      // elements of one stage's x tile: BM rows of BK values
constexpr int W_TILE = BN / 2 * LDS;  // and of its complex weight tile: BN/2 rows of BK values (BK/2 pairs)
constexpr int SMEM_BYTES = STAGES * (X_TILE + W_TILE) * 2;  // 61,440: more than the 48 KB of static shared memory
constexpr int OUT_LDS = WARP_N + 8;   // the epilogue's staging row, 144 bytes: the pair stores hit distinct banks
static_assert(THREADS == 32 * (BM / WARP_M) * WARPS_N, "one warp per warp tile");
static_assert(BM * BK / 8 % THREADS == 0 && BN / 2 * BK / 8 % THREADS == 0, "whole 16-byte copies per thread");
static_assert(THREADS / 32 * WARP_M * OUT_LDS * 2 <= SMEM_BYTES, "the output staging fits in the stages");
}  // namespace pipeline

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // where the kernels that use it are compiled
// Block `block` of a grid over tiles_m x tiles_n output tiles, in groups of GROUP_M block rows that sweep every
// block column: the blocks that run at the same time share x rows and weight columns in L2.
__device__ __forceinline__ void grouped_tile(int block, int tiles_m, int tiles_n, int& tile_m, int& tile_n) {
  constexpr int GROUP_M = 8;
  const int per_group = GROUP_M * tiles_n, first = block / per_group * GROUP_M;
  const int rows = min(tiles_m - first, GROUP_M), in_group = block % per_group;
  tile_m = first + in_group % rows;
  tile_n = in_group / rows;
}
#endif

// Y (M, N) = X (M, K) Wr^T, Wr the real (N, K) matrix of 2x2 blocks [[a, -b], [b, a]] of the complex weights
// (N/2, K/2, 2); then q and k rotated. A block computes a 128 x 128 tile of Y, warp w the 64 x 64 quarter at
// (wm, wn), as 4 x 8 mma.sync m16n8k16 tiles with fp32 accumulators.
//
// Pipeline: STAGES shared-memory stages, filled by cp.async (16 bytes per copy, zeros past M and N). Tile
// k + STAGES - 1 is requested, then tile k multiplied, with one barrier per K step:
//   wait until this thread's copies of tile k have landed; barrier (everyone's have, and everyone is done with
//   the stage that tile k + STAGES - 1 refills: the one tile k - 1 used); request tile k + STAGES - 1; multiply.
//
// The complex weights stay complex in shared memory: row o holds (a0, b0, a1, b1, ...), half of Wr's bytes.
// A B fragment (see crope_cuda.cuh) needs row n = gid of an n8 tile of Wr at k pair tid4: for n = 2o that
// is (a, -b), for n = 2o + 1 it is (b, a), both from the one word (a, b) of complex row o. So ldmatrix points
// matrix rows 2o and 2o + 1 at complex row o, and each lane fixes its word by the parity of its gid: flip b's
// sign bit (even), or swap the halves (odd). Exact in bf16 and fp16.
//
// K need only be a multiple of 8 (whole 16-byte copies): the last K step's missing columns are zeros.
//
// Epilogue: each accumulator pair (c0, c1) / (c2, c3) is one complex output (re, im): rotated in fp32 by
// e^(i m theta_j) (the first rot.n_rotary_pairs), rounded once, staged per warp in shared memory, then
// written with 16-byte stores of whole 128-byte row segments (N % 8 == 0).
template <typename T>
__global__ void __launch_bounds__(pipeline::THREADS)
    qkv_pipelined_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int M, int N, int K,
                        Rotary<float> rot) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async, ldmatrix and mma.sync m16n8k16 need sm_80; the host never launches this build
#else
  using namespace pipeline;
  constexpr int TILES_M = WARP_M / 16, TILES_N = WARP_N / 8;
  extern __shared__ __align__(16) unsigned char shared[];
  T* const x_stages = reinterpret_cast<T*>(shared);  // [STAGES][BM][LDS]
  T* const w_stages = x_stages + STAGES * X_TILE;    // [STAGES][BN/2][LDS]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gid = lane / 4, tid4 = lane % 4;
  int tile_m, tile_n;
  grouped_tile(blockIdx.x, (M + BM - 1) / BM, (N + BN - 1) / BN, tile_m, tile_n);
  const int m0 = tile_m * BM, n0 = tile_n * BN;
  const int wm = warp / WARPS_N * WARP_M, wn = warp % WARPS_N * WARP_N;
  const int k_tiles = (K + BK - 1) / BK;

  const auto request = [&](int stage, int kt) {  // cp.async of tile kt into `stage`
    const int k0 = kt * BK;
    T* xs = x_stages + stage * X_TILE;
    T* ws = w_stages + stage * W_TILE;
#pragma unroll
    for (int i = 0; i < BM * BK / 8 / THREADS; ++i) {  // x: BM rows x BK/8 chunks
      const int c = i * THREADS + tid, r = c / (BK / 8), col = c % (BK / 8) * 8;
      const bool ok = m0 + r < M && k0 + col < K;
      cp_async_16(xs + r * LDS + col, ok ? x + (int64_t)(m0 + r) * K + k0 + col : x, ok);
    }
#pragma unroll
    for (int i = 0; i < BN / 2 * BK / 8 / THREADS; ++i) {  // complex weights: BN/2 rows x BK/8 chunks
      const int c = i * THREADS + tid, o = c / (BK / 8), col = c % (BK / 8) * 8;
      const bool ok = n0 / 2 + o < N / 2 && k0 + col < K;
      cp_async_16(ws + o * LDS + col, ok ? w + (int64_t)(n0 / 2 + o) * K + k0 + col : w, ok);
    }
  };

  float acc[TILES_M][TILES_N][4] = {};  // fp32 accumulators

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {  // the prologue: tiles 0 .. STAGES - 2 requested
    if (s < k_tiles) request(s, s);
    cp_async_commit();  // one group per tile, empty past the last: the wait below counts groups
  }

  // Per-lane constants. B: the word of complex row o becomes row 2o (a, -b) or 2o + 1 (b, a) of Wr.
  const uint32_t flip = gid % 2 == 0 ? 0x80000000u : 0u, order = gid % 2 == 0 ? 0x3210u : 0x1032u;
  // ldmatrix addresses (elements, within a stage). A, tile i: lanes 0-15 rows 0-15 at k, 16-31 the same at k + 8.
  const int a_offset = (wm + lane % 16) * LDS + lane / 16 * 8;
  // B, n8 tiles j and j + 1: matrix q = lane / 8 is (tile j + q / 2, k + 8 (q % 2)); its row r = lane % 8 is
  // Wr row wn + 8 (j + q / 2) + r, complex row wn / 2 + 4 (j + q / 2) + r / 2.
  const int b_offset = (wn / 2 + lane / 16 * 4 + lane % 8 / 2) * LDS + lane / 8 % 2 * 8;

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (kt + STAGES - 1 < k_tiles) request((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();
    const T* xs = x_stages + kt % STAGES * X_TILE;
    const T* ws = w_stages + kt % STAGES * W_TILE;

#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[TILES_M][4], b[TILES_N][2];
#pragma unroll
      for (int i = 0; i < TILES_M; ++i) ldmatrix_x4(a[i], xs + a_offset + i * 16 * LDS + kk);
#pragma unroll
      for (int j = 0; j < TILES_N; j += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, ws + b_offset + j * 4 * LDS + kk);
#pragma unroll
        for (int q = 0; q < 4; ++q) r[q] = __byte_perm(r[q] ^ flip, 0, order);
        split_b(b[j], b[j + 1], r);
      }
      mma_tiles<T>(acc, a, b);
    }
  }

  // Epilogue: rotate each pair in fp32, round once, stage the warp's 64 x 64 tile, store 16 bytes at a time.
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages: they become the staging area
  using P = Pair<T>;
  T* const out = reinterpret_cast<T*>(shared) + warp * WARP_M * OUT_LDS;
  int pair[TILES_N], theta[TILES_N];  // per column tile: this lane's complex output and its theta index j
#pragma unroll
  for (int j = 0; j < TILES_N; ++j) {
    pair[j] = (n0 + wn + j * 8) / 2 + tid4;
    theta[j] = pair[j] % rot.half;
  }
#pragma unroll
  for (int i = 0; i < TILES_M; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = i * 16 + gid + 8 * h, m = rot.position(m0 + wm + r);  // rows past M: never stored
#pragma unroll
      for (int j = 0; j < TILES_N; ++j) {
        float re = acc[i][j][2 * h], im = acc[i][j][2 * h + 1];
        if (rot.rotates(pair[j])) rot.apply(m * rot.half + theta[j], re, im);
        *reinterpret_cast<typename P::type*>(out + r * OUT_LDS + j * 8 + 2 * tid4) = P::make(re, im);
      }
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < WARP_M * WARP_N / 8 / 32; ++i) {  // 8 chunks of 16 bytes per row; a row per 8 lanes
    const int c = i * 32 + lane, r = c / (WARP_N / 8), col = c % (WARP_N / 8) * 8;
    const int gm = m0 + wm + r, gn = n0 + wn + col;
    if (gm < M && gn < N)
      *reinterpret_cast<uint4*>(y + (int64_t)gm * N + gn) = *reinterpret_cast<const uint4*>(out + r * OUT_LDS + col);
  }
#endif
}

template <typename T>
void launch_pipelined(const T* x, const T* w, T* y, int64_t M, int64_t N, int64_t K, const Rotary<float>& rot,
                     cudaStream_t stream) {
  using namespace pipeline;
  const auto kernel = qkv_pipelined_kernel<T>;
  const int device = c10::cuda::current_device();
  cached_per_device(device, [&] {  // more than 48 KB of dynamic shared memory: asked for once per device
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES));
    return 1;
  });
  const int64_t tiles = ((M + BM - 1) / BM) * ((N + BN - 1) / BN);
  CROPE_CHECK(tiles < std::numeric_limits<int>::max() && M + BM < std::numeric_limits<int>::max(),
              "crope::qkv_rotary: path 'pipelined' takes fewer than 2^31 tiles of 128 x 128 outputs");
  kernel<<<(int)tiles, THREADS, SMEM_BYTES, stream>>>(x, w, y, (int)M, (int)N, (int)K, rot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool pipelined_compiled(int device) {
  return cached_per_device(device, [] {
           return static_cast<int>(compiled_for_sm80(
               reinterpret_cast<const void*>(qkv_pipelined_kernel<__nv_bfloat16>)));
         }) != 0;
}

void pipelined_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos_in,
                   const at::Tensor& sin_in, int64_t start_pos, int64_t n_rotary) {
  const auto cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const auto rot = make_rotary<float>(cos, sin, start_pos, x.size(1), n_rotary, +1);
  const int64_t M = x.size(0) * x.size(1), K = x.size(2), N = y.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "crope_pipelined", [&] {
    using T = typename CudaType<scalar_t>::type;
    launch_pipelined<T>(reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()),
                       reinterpret_cast<const T*>(weight.const_data_ptr<scalar_t>()),
                       reinterpret_cast<T*>(y.data_ptr<scalar_t>()), M, N, K, rot, stream);
  });
}

}  // namespace crope
