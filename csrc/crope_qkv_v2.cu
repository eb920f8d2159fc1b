// Version 2 of the CUDA paths of crope::qkv_rotary, numbered beside version 1 (crope_qkv_cuda.cu), which stays
// the simplest correct kernel of each path. The op's `path` argument reaches them ("decode_v2", "tiled_v2");
// "auto" does not take them until a GPU has shown them correct and faster (csrc/NOTES.md). Each is checked
// against the same float64 reference as version 1: tests/test_kernel.py forces every path, and fused_op.py's
// self-check runs every path the op lists on the first use on each GPU.
//
//   decode_v2  qkv_decode_v2_kernel: one warp per complex output row, as version 1, with x staged once per
//              block in shared memory (version 1 re-reads it through L1 in every warp), 8 independent
//              16-byte weight loads in flight per lane that do not allocate in L1, and a grid that fills the
//              GPU once (each warp takes a few consecutive rows).
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
static_assert(BM == THREADS, "UNROTATE_X: one x row per thread");
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
// UNROTATE_X (the backward's dx = un-rotate(dy) Wc, Wc = conj(W)^T): each x tile is un-rotated in shared
// memory after it lands, x's first unrot.n_rotary_pairs pairs multiplied by e^(-i m theta_j) (unrot.sign = -1),
// one row per thread, then a second barrier before any warp reads it.
//
// Epilogue: each accumulator pair (c0, c1) / (c2, c3) is one complex output (re, im): rotated in fp32 by
// e^(i m theta_j) (the first rot.n_rotary_pairs), rounded once, staged per warp in shared memory, then
// written with 16-byte stores of whole 128-byte row segments (N % 8 == 0).
template <typename T, bool UNROTATE_X>
__global__ void __launch_bounds__(tiled2::THREADS)
    qkv_tiled_v2_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int M, int N, int K,
                        Rotary<float> rot, Rotary<float> unrot) {
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
  int unrot_position = 0;
  if constexpr (UNROTATE_X) unrot_position = unrot.position(min(m0 + tid, M - 1));  // row tid of every x tile

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (kt + STAGES - 1 < k_tiles) request((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();
    const T* xs = x_stages + kt % STAGES * X_TILE;
    const T* ws = w_stages + kt % STAGES * W_TILE;

    if constexpr (UNROTATE_X) {  // row tid of the x tile: complex features kt * BK/2 ..., 4 per 16-byte chunk
      T* row = x_stages + kt % STAGES * X_TILE + tid * LDS;
#pragma unroll
      for (int c = 0; c < BK; c += 8) rotate_chunk<T>(row + c, (kt * BK + c) / 2, unrot_position, unrot);
      __syncthreads();  // the un-rotated tile, before any warp reads it
    }

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

// ------------------------------------------------------------------ the backward's weight gradient
namespace wgrad2 {
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, THREADS = 128;  // BM: features n, BN: inputs k, BK: tokens
constexpr int WARP_M = 64, WARP_N = 64, WARPS_N = BN / WARP_N;  // warp tiles of 4 x 8 mma tiles
constexpr int LDS = BM + 8;        // a stage's row (one token) stride, 272 bytes: ldmatrix rows in distinct banks
static_assert(BM == BN, "one row stride for both tiles");
constexpr int TILE = BK * LDS;     // elements of one stage's tile of dy, and of x: BK tokens of 128 values
constexpr int SMEM_BYTES = STAGES * 2 * TILE * 2;  // 69,632
static_assert(THREADS == 32 * (BM / WARP_M) * WARPS_N, "one warp per warp tile");
static_assert(BK * BM / 8 == 4 * THREADS && BK * BM / 2 == 16 * THREADS, "4 copies and 4 un-rotated chunks per thread");
}  // namespace wgrad2

// dW (N/2, K/2, 2) of y = rotate(x Wr^T): with g = un-rotate(dy) (M, N), the real matrix's gradient is
// G = g^T x (N, K), and folding it onto (a, b), whose 2x2 blocks are [[a, -b], [b, a]]:
//   dW[o][i] = (G[2o][2i] + G[2o + 1][2i + 1], G[2o + 1][2i] - G[2o][2i + 1])   (= sum over tokens of g_o conj(z_i))
// A block computes a 128 (n) x 128 (k) tile of G over tokens split * tokens_per_split ...: blockIdx.y is the
// split of the tokens (so that ~2 blocks per SM run even when G has few tiles), and each split writes its
// folded fp32 sums to partial[split] (N/2, K/2, 2); the host adds the splits in fp32 and rounds once.
//
// Tiles hold BK tokens (rows) of dy (128 features) and of x (128 inputs), both contiguous along the features,
// so the mma operands are the transposes of what ldmatrix reads: A = G's rows n = dy tile's columns, B = x
// tile. ldmatrix.trans gives each lane two consecutive tokens of one column (crope_cuda.cuh), the fragment
// layout of both. The same 4-stage cp.async pipeline as qkv_tiled_v2_kernel; each dy tile is un-rotated in
// shared memory after it lands (4 chunks of 16 bytes per thread), then a second barrier.
//
// Epilogue: lane (gid, tid4) holds G rows n = gid and gid + 8 at columns (2 tid4, 2 tid4 + 1): one complex
// column i of rows 2o and 2o + 1 sits in lanes gid and gid ^ 1 (lane ^ 4). Even gid folds row gid's pair with
// its neighbour's, odd gid folds rows gid + 7 and gid + 8: one shuffle each, then one 8-byte fp32 store.
template <typename T>
__global__ void __launch_bounds__(wgrad2::THREADS)
    qkv_wgrad_v2_kernel(const T* __restrict__ dy, const T* __restrict__ x, float* __restrict__ partial, int M,
                        int N, int K, int tokens_per_split, Rotary<float> unrot) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the stub, as qkv_tiled_v2_kernel's
#else
  using namespace wgrad2;
  extern __shared__ __align__(16) unsigned char shared[];
  constexpr int TILES_M = WARP_M / 16, TILES_N = WARP_N / 8;
  T* const g_stages = reinterpret_cast<T*>(shared);  // [STAGES][BK][LDS]: dy, then un-rotated: g
  T* const x_stages = g_stages + STAGES * TILE;      // [STAGES][BK][LDS]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gid = lane / 4, tid4 = lane % 4;
  int tile_n, tile_k;
  grouped_tile(blockIdx.x, (N + BM - 1) / BM, (K + BN - 1) / BN, tile_n, tile_k);
  const int n0 = tile_n * BM, k0 = tile_k * BN;
  const int wn = warp / WARPS_N * WARP_M, wk = warp % WARPS_N * WARP_N;
  const int first_token = blockIdx.y * tokens_per_split;
  const int k_tiles = (min(first_token + tokens_per_split, M) - first_token + BK - 1) / BK;

  const auto request = [&](int stage, int kt) {  // BK tokens of dy (columns n0 ...) and of x (columns k0 ...)
    const int m0 = first_token + kt * BK;
#pragma unroll
    for (int i = 0; i < BK * BM / 8 / THREADS; ++i) {
      const int c = i * THREADS + tid, r = c / (BM / 8), col = c % (BM / 8) * 8;
      const bool token = m0 + r < M && r < first_token + tokens_per_split - m0;
      const bool g_ok = token && n0 + col < N, x_ok = token && k0 + col < K;
      cp_async_16(g_stages + stage * TILE + r * LDS + col, g_ok ? dy + (int64_t)(m0 + r) * N + n0 + col : dy, g_ok);
      cp_async_16(x_stages + stage * TILE + r * LDS + col, x_ok ? x + (int64_t)(m0 + r) * K + k0 + col : x, x_ok);
    }
  };

  float acc[TILES_M][TILES_N][4] = {};
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) request(s, s);
    cp_async_commit();
  }
  // ldmatrix.trans addresses (elements, within a stage), matrix q = lane / 8, its row r = lane % 8 (a token):
  //   A, row tile i: matrices (n 0-7, m 0-7), (n 8-15, m 0-7), (n 0-7, m 8-15), (n 8-15, m 8-15) = a0..a3
  //   B, column tiles j, j + 1: (j, m 0-7), (j, m 8-15), (j + 1, m 0-7), (j + 1, m 8-15)
  const int a_offset = (lane / 16 * 8 + lane % 8) * LDS + wn + lane / 8 % 2 * 8;
  const int b_offset = (lane / 8 % 2 * 8 + lane % 8) * LDS + wk + lane / 16 * 8;

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (kt + STAGES - 1 < k_tiles) request((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();
    T* const gs = g_stages + kt % STAGES * TILE;
    const T* xs = x_stages + kt % STAGES * TILE;
    {  // un-rotate: thread tid takes token tid / 4, features n0 + 32 (tid % 4) ..., 4 chunks of 4 pairs
      const int r = tid / 4, token = first_token + kt * BK + r;
      if (token < M) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int col = tid % 4 * 32 + c * 8;
          rotate_chunk<T>(gs + r * LDS + col, (n0 + col) / 2, unrot.position(token), unrot);
        }
      }
    }
    __syncthreads();  // the un-rotated tile, before any warp reads it
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[TILES_M][4], b[TILES_N][2];
#pragma unroll
      for (int i = 0; i < TILES_M; ++i) ldmatrix_x4_trans(a[i], gs + a_offset + kk * LDS + i * 16);
#pragma unroll
      for (int j = 0; j < TILES_N; j += 2) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, xs + b_offset + kk * LDS + j * 8);
        split_b(b[j], b[j + 1], r);
      }
      mma_tiles<T>(acc, a, b);
    }
  }

  // Epilogue: the fold, in fp32; one complex value per lane and accumulator tile.
  const bool odd = gid % 2 == 1;
  float2* const out = reinterpret_cast<float2*>(partial) + (int64_t)blockIdx.y * (N / 2) * (K / 2);
#pragma unroll
  for (int i = 0; i < TILES_M; ++i) {
    const int n_even = n0 + wn + i * 16 + (odd ? gid + 7 : gid);  // row 2o of this lane's pair of rows
#pragma unroll
    for (int j = 0; j < TILES_N; ++j) {
      const float* c = acc[i][j];
      const float send_re = odd ? c[0] : c[2], send_im = odd ? c[1] : c[3];  // what the neighbour folds
      const float got_re = __shfl_xor_sync(0xffffffff, send_re, 4), got_im = __shfl_xor_sync(0xffffffff, send_im, 4);
      const float2 even = odd ? make_float2(got_re, got_im) : make_float2(c[0], c[1]);  // row 2o: (G[2o][2i], G[2o][2i+1])
      const float2 next = odd ? make_float2(c[2], c[3]) : make_float2(got_re, got_im);  // row 2o + 1
      const int o = n_even / 2, i_pair = (k0 + wk + j * 8) / 2 + tid4;
      if (2 * o < N && 2 * i_pair < K)
        out[(int64_t)o * (K / 2) + i_pair] = make_float2(even.x + next.y, next.x - even.y);
    }
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

template <typename T, bool UNROTATE_X>
void launch_tiled_v2(const T* x, const T* w, T* y, int64_t M, int64_t N, int64_t K, const Rotary<float>& rot,
                     const Rotary<float>& unrot, cudaStream_t stream) {
  using namespace tiled2;
  const auto kernel = qkv_tiled_v2_kernel<T, UNROTATE_X>;
  const int device = c10::cuda::current_device();
  cached_per_device(device, [&] {  // more than 48 KB of dynamic shared memory: asked for once per device
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES));
    return 1;
  });
  const int64_t tiles = ((M + BM - 1) / BM) * ((N + BN - 1) / BN);
  TORCH_CHECK(tiles < std::numeric_limits<int>::max() && M + BM < std::numeric_limits<int>::max(),
              "crope::qkv_rotary: path 'tiled_v2' takes fewer than 2^31 tiles of 128 x 128 outputs");
  kernel<<<(int)tiles, THREADS, SMEM_BYTES, stream>>>(x, w, y, (int)M, (int)N, (int)K, rot, unrot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Rotary<float> no_rotation() { return Rotary<float>{nullptr, nullptr, 0, 1, 1, 0, 1.f}; }

// dW of the backward: qkv_wgrad_v2_kernel over the tokens in `splits` parts, each part's fp32 sums in its own slice
// of a workspace, added in fp32 and rounded once to weight's dtype. dW has few tiles (18 x 6 at d = 768), so
// the tokens are split to fill the GPU: the number of parts (1-32) that minimises, in K steps of a full wave,
//   waves x (K steps per block + 2 for its epilogue) + parts x (the workspace's N K 4 bytes / 2 MB)
// with 2 blocks per SM (registers and shared memory allow 2), and a K step of a wave taking about as long as
// moving 2 MB (round figures for an H100, not measurements). At d = 768 with 16,384 tokens on 132 SMs:
// 7 parts of 74 K steps in 3 waves, where 3 parts would take 2 waves of 171; at d = 4096 (3,072 tiles): 1.
template <typename T>
at::Tensor weight_gradient_v2(const T* dy, const T* x, const at::Tensor& weight, int64_t M, int64_t N, int64_t K,
                              const Rotary<float>& unrot, cudaStream_t stream) {
  using namespace wgrad2;
  const int device = c10::cuda::current_device();
  cached_per_device(device, [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(qkv_wgrad_v2_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        SMEM_BYTES));
    return 1;
  });
  const int sms = cached_per_device(device, [device] {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  });
  const int64_t tiles = ((N + BM - 1) / BM) * ((K + BN - 1) / BN), token_tiles = (M + BK - 1) / BK;
  TORCH_CHECK(tiles < std::numeric_limits<int>::max(), "crope::qkv_rotary_backward: too many weight tiles");
  const int64_t slots = 2 * (int64_t)sms;
  int64_t wanted = 1, best = std::numeric_limits<int64_t>::max();
  for (int64_t parts = 1; parts <= std::min<int64_t>(token_tiles, 32); ++parts) {
    const int64_t cost = (tiles * parts + slots - 1) / slots * ((token_tiles + parts - 1) / parts + 2) +
                         parts * N * K * 4 / 2000000;
    if (cost < best) best = cost, wanted = parts;
  }
  const int64_t tokens_per_split = (token_tiles + wanted - 1) / wanted * BK;
  const int64_t splits = (M + tokens_per_split - 1) / tokens_per_split;
  auto partial = at::empty({splits, N / 2, K / 2, 2}, weight.options().dtype(at::kFloat));
  const dim3 grid((unsigned)tiles, (unsigned)splits);
  qkv_wgrad_v2_kernel<T><<<grid, THREADS, SMEM_BYTES, stream>>>(dy, x, partial.data_ptr<float>(), (int)M, (int)N,
                                                                (int)K, (int)tokens_per_split, unrot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(0).to(weight.scalar_type());  // fp32 sums of the splits, rounded once
}

}  // namespace

bool tiled_v2_available(int device) {
  return cached_per_device(device, [] {
           return static_cast<int>(compiled_for_sm80(
               reinterpret_cast<const void*>(qkv_tiled_v2_kernel<__nv_bfloat16, false>)));
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
    launch_tiled_v2<T, false>(reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()),
                              reinterpret_cast<const T*>(weight.const_data_ptr<scalar_t>()),
                              reinterpret_cast<T*>(y.data_ptr<scalar_t>()), M, N, K, rot, no_rotation(), stream);
  });
}

}  // namespace crope

namespace crope {

std::tuple<at::Tensor, at::Tensor> qkv_rotary_backward_v2_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                               const at::Tensor& weight, const at::Tensor& cos_in,
                                                               const at::Tensor& sin_in, int64_t start_pos,
                                                               int64_t n_rotary, std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto grad = aligned_contiguous(grad_in), x = aligned_contiguous(x_in);
  const auto cos = aligned_contiguous(cos_in.to(at::kFloat)), sin = aligned_contiguous(sin_in.to(at::kFloat));
  const auto unrot = make_rotary<float>(cos, sin, start_pos, x.size(1), n_rotary, -1);  // e^(-i m theta_j)
  const int64_t M = x.size(0) * x.size(1), N = grad.size(2), K = x.size(2);
  at::Tensor grad_x = x.new_empty({0}), grad_weight = weight.new_empty({0});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "crope_backward_v2", [&] {
    using T = typename CudaType<scalar_t>::type;
    const auto* dy = reinterpret_cast<const T*>(grad.const_data_ptr<scalar_t>());
    if (output_mask[0]) {
      // dx = g Wr with g = un-rotate(dy): Wr^T's 2x2 blocks [[a, b], [-b, a]] are those of conj(W), so dx is the
      // complex-linear map of g by conj(W)^T (K/2, N/2, 2), with g's un-rotation inside the kernel's loads
      auto conj_t = weight.transpose(0, 1).contiguous();
      conj_t.select(2, 1).neg_();
      grad_x = at::empty(x.sizes(), x.options());
      launch_tiled_v2<T, true>(dy, reinterpret_cast<const T*>(conj_t.const_data_ptr<scalar_t>()),
                               reinterpret_cast<T*>(grad_x.data_ptr<scalar_t>()), M, K, N, no_rotation(), unrot, stream);
    }
    if (output_mask[1])
      grad_weight = weight_gradient_v2<T>(dy, reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()), weight, M, N,
                                          K, unrot, stream);
  });
  return {grad_x, grad_weight};
}

}  // namespace crope
