// Version 2 of two CUDA paths of crope::qkv_rotary, numbered beside version 1 (crope_qkv_cuda.cu). The op's `path`
// argument reaches them ("decode_v2", "tiled_v2"); fused_op.py times them with the other paths and takes the fastest
// for each kind of input. Each is checked against the same float64 reference as version 1: tests/test_kernel.py forces
// every path, and fused_op.py's self-check runs every path the op lists on the first use on each GPU.
//
//   decode_v2  qkv_decode_v2_kernel: one warp per complex output row, x staged once per block in shared memory,
//              8 independent 16-byte weight loads in flight per lane that do not allocate in L1, and a grid that
//              fills the GPU once (each warp takes a few consecutive rows). Replaced a version 1 that re-read x
//              through L1 in every warp (csrc/NOTES.md).
//   tiled_v2   qkv_tiled_v2_kernel: a 128 x 128 x 32 tensor-core GEMM with a 4-stage cp.async pipeline (loads
//              of tile k + 3 in flight while tile k is multiplied), 4 warps of 64 x 64 (half the ldmatrix per
//              mma.sync of version 1's 64 x 32), the weight tile kept complex in shared memory (half of RoPE's
//              bytes; the 2x2 blocks are formed in registers, two bit operations per fragment register),
//              the rotation applied to the fp32 accumulator pairs, and the output tile staged in shared memory
//              for 16-byte stores.

#include "crope.h"
#include "crope_cuda.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace crope {
namespace {

using namespace kernels;

// ------------------------------------------------------------------ decode_v2
namespace decode2 {
constexpr int THREADS = 256, WARPS = THREADS / 32;
constexpr int BLOCKS_PER_SM = 2;  // __launch_bounds__ below: at most 128 registers
}  // namespace decode2

// A 16-byte load through the read-only path that does not allocate in L1: each weight byte is used once.
__device__ __forceinline__ uint4 load_streaming(const void* address) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(address));
  return v;
}

// y (M, N) for TOKENS tokens from token0 + TOKENS * blockIdx.y: the block copies their rows of x into shared
// memory (zeros past M), then warp w takes rows_per_warp consecutive complex output rows o. For each, lane l
// reads 16-byte chunks l, l + 32, ... of the weight row (a0, b0, a1, b1, ...), LOADS of them issued before
// any is used, and the matching chunk of x from shared memory (the same interleaved layout): 4 FMAs per
// complex multiply-add (a + ib)(re + i im) in fp32; a shuffle reduction; lane t rotates and stores token t.
template <typename T, int TOKENS>
__global__ void __launch_bounds__(decode2::THREADS, decode2::BLOCKS_PER_SM)
    qkv_decode_v2_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int token0, int M,
                         int K, int n_rows, int rows_per_warp, Rotary<float> rot) {
  constexpr int VEC = 16 / sizeof(T);                 // values per 16-byte chunk: whole pairs
  constexpr int LOADS = TOKENS >= 8 ? 4 : 8;          // weight chunks in flight per lane (registers: <= 64)
  static_assert(TOKENS <= 32, "lane t stores token t");
  extern __shared__ __align__(16) unsigned char shared[];
  T* xs = reinterpret_cast<T*>(shared);               // [TOKENS][K]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int t0 = token0 + blockIdx.y * TOKENS;

  const int row_chunks = K / VEC;
  for (int c = tid; c < TOKENS * row_chunks; c += decode2::THREADS) {
    const int t = c / row_chunks, k = c % row_chunks * VEC;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (t0 + t < M) v = __ldg(reinterpret_cast<const uint4*>(x + (int64_t)(t0 + t) * K + k));
    *reinterpret_cast<uint4*>(xs + t * K + k) = v;
  }
  __syncthreads();  // the only barrier: below, each warp works alone

  const int first = (blockIdx.x * decode2::WARPS + warp) * rows_per_warp;
  const int last = min(first + rows_per_warp, n_rows);
  for (int row = first; row < last; ++row) {  // the same for every lane: the shuffles see full warps
    const T* w_row = w + (int64_t)row * K;
    float re[TOKENS], im[TOKENS];
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) re[t] = im[t] = 0.f;
    for (int k0 = lane * VEC; k0 < K; k0 += 32 * VEC * LOADS) {
      uint4 wv[LOADS];
#pragma unroll
      for (int u = 0; u < LOADS; ++u) {  // all loads of the step first: LOADS x 16 bytes in flight
        const int k = k0 + u * 32 * VEC;
        wv[u] = k < K ? load_streaming(w_row + k) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < LOADS; ++u) {
        const int k = k0 + u * 32 * VEC;
        if (k >= K) break;
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) {
          const uint4 xv = *reinterpret_cast<const uint4*>(xs + t * K + k);
#pragma unroll
          for (int q = 0; q < VEC / 2; ++q) {
            const float2 ab = complex_at<T>(wv[u], q), z = complex_at<T>(xv, q);
            re[t] = fmaf(ab.x, z.x, fmaf(-ab.y, z.y, re[t]));  // (a + ib)(re + i im)
            im[t] = fmaf(ab.y, z.x, fmaf(ab.x, z.y, im[t]));
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {  // every lane ends with the sums
        re[t] += __shfl_xor_sync(0xffffffff, re[t], offset);
        im[t] += __shfl_xor_sync(0xffffffff, im[t], offset);
      }
    }
    const int N = 2 * n_rows;
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
      if (lane == t && t0 + t < M) {
        float out_re = re[t], out_im = im[t];
        if (rot.rotates(row)) rot.apply(rot.position(t0 + t) * rot.half + row % rot.half, out_re, out_im);
        *reinterpret_cast<typename Pair<T>::type*>(y + (int64_t)(t0 + t) * N + 2 * row) =
            Pair<T>::make(out_re, out_im);
      }
    }
  }
}

// ------------------------------------------------------------------ tiled_v2
namespace tiled2 {
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
}  // namespace tiled2

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
__global__ void __launch_bounds__(tiled2::THREADS)
    qkv_tiled_v2_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int M, int N, int K,
                        Rotary<float> rot) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async, ldmatrix and mma.sync m16n8k16 need sm_80; the host never launches this build
#else
  using namespace tiled2;
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

// ------------------------------------------------------------------ host side
template <int TOKENS, typename T>
void launch_decode_v2(const T* x, const T* w, T* y, int token0, int chunks, int M, int K, int n_rows,
                      int sm_count, const Rotary<float>& rot, cudaStream_t stream) {
  // rows per warp: the fewest that fill every SM's BLOCKS_PER_SM blocks once
  const int64_t warps = (int64_t)sm_count * decode2::BLOCKS_PER_SM * decode2::WARPS;
  const int rows_per_warp = (int)std::max<int64_t>(1, (n_rows + warps - 1) / warps);
  const int rows_per_block = rows_per_warp * decode2::WARPS;
  const dim3 grid((n_rows + rows_per_block - 1) / rows_per_block, chunks);
  const size_t shared = (size_t)TOKENS * K * sizeof(T);
  qkv_decode_v2_kernel<T, TOKENS><<<grid, decode2::THREADS, shared, stream>>>(x, w, y, token0, M, K, n_rows,
                                                                              rows_per_warp, rot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tokens per launch: 8, or as many (1, 2 or 4) as fit kDecodeV2SharedBytes; the last launch takes the
// smallest of 1, 2, 4, 8 that covers the rest (its missing tokens are zeros in shared memory, never stored).
template <typename scalar_t>
void decode_v2_launches(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const Rotary<float>& rot,
                        int sm_count, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const auto* xp = reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>());
  const auto* wp = reinterpret_cast<const T*>(weight.const_data_ptr<scalar_t>());
  auto* yp = reinterpret_cast<T*>(y.data_ptr<scalar_t>());
  const int M = (int)(x.size(0) * x.size(1)), K = (int)x.size(2), n_rows = (int)weight.size(0);
  int per_launch = 8;
  while (per_launch > 1 && (int64_t)per_launch * K * (int64_t)sizeof(T) > kDecodeV2SharedBytes) per_launch /= 2;
  const auto launch = [&](int tokens, int token0, int chunks) {
    switch (tokens) {
      case 1: launch_decode_v2<1>(xp, wp, yp, token0, chunks, M, K, n_rows, sm_count, rot, stream); break;
      case 2: launch_decode_v2<2>(xp, wp, yp, token0, chunks, M, K, n_rows, sm_count, rot, stream); break;
      case 4: launch_decode_v2<4>(xp, wp, yp, token0, chunks, M, K, n_rows, sm_count, rot, stream); break;
      default: launch_decode_v2<8>(xp, wp, yp, token0, chunks, M, K, n_rows, sm_count, rot, stream);
    }
  };
  const int full = M / per_launch, rest = M % per_launch;
  for (int first = 0; first < full; first += 65535)  // chunks on grid.y, up to 65535 per launch
    launch(per_launch, first * per_launch, std::min(full - first, 65535));
  if (rest > 0) {
    int tokens = 1;
    while (tokens < rest) tokens *= 2;
    launch(tokens, full * per_launch, 1);
  }
}

template <typename T>
void launch_tiled_v2(const T* x, const T* w, T* y, int64_t M, int64_t N, int64_t K, const Rotary<float>& rot,
                     cudaStream_t stream) {
  using namespace tiled2;
  const auto kernel = qkv_tiled_v2_kernel<T>;
  const int device = c10::cuda::current_device();
  cached_per_device(device, [&] {  // more than 48 KB of dynamic shared memory: asked for once per device
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES));
    return 1;
  });
  const int64_t tiles = ((M + BM - 1) / BM) * ((N + BN - 1) / BN);
  CROPE_CHECK(tiles < std::numeric_limits<int>::max() && M + BM < std::numeric_limits<int>::max(),
              "crope::qkv_rotary: path 'tiled_v2' takes fewer than 2^31 tiles of 128 x 128 outputs");
  kernel<<<(int)tiles, THREADS, SMEM_BYTES, stream>>>(x, w, y, (int)M, (int)N, (int)K, rot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool tiled_v2_available(int device) {
  return cached_per_device(device, [] {
           return static_cast<int>(compiled_for_sm80(
               reinterpret_cast<const void*>(qkv_tiled_v2_kernel<__nv_bfloat16>)));
         }) != 0;
}

void decode_v2_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos_in,
                    const at::Tensor& sin_in, int64_t start_pos, int64_t n_rotary, int64_t sm_count) {
  const auto cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const auto rot = make_rotary<float>(cos, sin, start_pos, x.size(1), n_rotary, +1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kBFloat16: decode_v2_launches<at::BFloat16>(x, weight, y, rot, (int)sm_count, stream); break;
    case at::kHalf: decode_v2_launches<at::Half>(x, weight, y, rot, (int)sm_count, stream); break;
    default: decode_v2_launches<float>(x, weight, y, rot, (int)sm_count, stream);
  }
}

void tiled_v2_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos_in,
                   const at::Tensor& sin_in, int64_t start_pos, int64_t n_rotary) {
  const auto cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const auto rot = make_rotary<float>(cos, sin, start_pos, x.size(1), n_rotary, +1);
  const int64_t M = x.size(0) * x.size(1), K = x.size(2), N = y.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "crope_tiled_v2", [&] {
    using T = typename CudaType<scalar_t>::type;
    launch_tiled_v2<T>(reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()),
                       reinterpret_cast<const T*>(weight.const_data_ptr<scalar_t>()),
                       reinterpret_cast<T*>(y.data_ptr<scalar_t>()), M, N, K, rot, stream);
  });
}

}  // namespace crope
