// The decode path of crope::qkv_rotary (crope.h): decoding steps, a few tokens, on CUDA cores.
//
//   qkv_decode_kernel: one warp per complex output row, x staged once per block in shared memory, 8 independent
//   16-byte weight loads in flight per lane that do not allocate in L1, and a grid that fills the GPU once (each
//   warp takes a few consecutive rows). csrc/NOTES.md has the version it replaced, which re-read x through L1 in
//   every warp.

#include "crope.h"
#include "crope_cuda.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace crope {
namespace {

using namespace kernels;

namespace decoding {
constexpr int THREADS = 256, WARPS = THREADS / 32;
constexpr int BLOCKS_PER_SM = 2;  // __launch_bounds__ below: at most 128 registers
}  // namespace decoding

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
__global__ void __launch_bounds__(decoding::THREADS, decoding::BLOCKS_PER_SM)
    qkv_decode_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int token0, int M,
                         int K, int n_rows, int rows_per_warp, Rotary<float> rot) {
  constexpr int VEC = 16 / sizeof(T);                 // values per 16-byte chunk: whole pairs
  constexpr int LOADS = TOKENS >= 8 ? 4 : 8;          // weight chunks in flight per lane (registers: <= 64)
  static_assert(TOKENS <= 32, "lane t stores token t");
  extern __shared__ __align__(16) unsigned char shared[];
  T* xs = reinterpret_cast<T*>(shared);               // [TOKENS][K]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int t0 = token0 + blockIdx.y * TOKENS;

  const int row_chunks = K / VEC;
  for (int c = tid; c < TOKENS * row_chunks; c += decoding::THREADS) {
    const int t = c / row_chunks, k = c % row_chunks * VEC;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (t0 + t < M) v = __ldg(reinterpret_cast<const uint4*>(x + (int64_t)(t0 + t) * K + k));
    *reinterpret_cast<uint4*>(xs + t * K + k) = v;
  }
  __syncthreads();  // the only barrier: below, each warp works alone

  const int first = (blockIdx.x * decoding::WARPS + warp) * rows_per_warp;
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

template <int TOKENS, typename T>
void launch_decode(const T* x, const T* w, T* y, int token0, int chunks, int M, int K, int n_rows,
                      int sm_count, const Rotary<float>& rot, cudaStream_t stream) {
  // rows per warp: the fewest that fill every SM's BLOCKS_PER_SM blocks once
  const int64_t warps = (int64_t)sm_count * decoding::BLOCKS_PER_SM * decoding::WARPS;
  const int rows_per_warp = (int)std::max<int64_t>(1, (n_rows + warps - 1) / warps);
  const int rows_per_block = rows_per_warp * decoding::WARPS;
  const dim3 grid((n_rows + rows_per_block - 1) / rows_per_block, chunks);
  const size_t shared = (size_t)TOKENS * K * sizeof(T);
  qkv_decode_kernel<T, TOKENS><<<grid, decoding::THREADS, shared, stream>>>(x, w, y, token0, M, K, n_rows,
                                                                              rows_per_warp, rot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tokens per launch: 8, or as many (1, 2 or 4) as fit kDecodeSharedBytes; the last launch takes the
// smallest of 1, 2, 4, 8 that covers the rest (its missing tokens are zeros in shared memory, never stored).
template <typename scalar_t>
void decode_launches(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const Rotary<float>& rot,
                        int sm_count, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const auto* xp = reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>());
  const auto* wp = reinterpret_cast<const T*>(weight.const_data_ptr<scalar_t>());
  auto* yp = reinterpret_cast<T*>(y.data_ptr<scalar_t>());
  const int M = (int)(x.size(0) * x.size(1)), K = (int)x.size(2), n_rows = (int)weight.size(0);
  int per_launch = 8;
  while (per_launch > 1 && (int64_t)per_launch * K * (int64_t)sizeof(T) > kDecodeSharedBytes) per_launch /= 2;
  const auto launch = [&](int tokens, int token0, int chunks) {
    switch (tokens) {
      case 1: launch_decode<1>(xp, wp, yp, token0, chunks, M, K, n_rows, sm_count, rot, stream); break;
      case 2: launch_decode<2>(xp, wp, yp, token0, chunks, M, K, n_rows, sm_count, rot, stream); break;
      case 4: launch_decode<4>(xp, wp, yp, token0, chunks, M, K, n_rows, sm_count, rot, stream); break;
      default: launch_decode<8>(xp, wp, yp, token0, chunks, M, K, n_rows, sm_count, rot, stream);
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

}  // namespace

void decode_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos_in,
                    const at::Tensor& sin_in, int64_t start_pos, int64_t n_rotary, int64_t sm_count) {
  const auto cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const auto rot = make_rotary<float>(cos, sin, start_pos, x.size(1), n_rotary, +1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kBFloat16: decode_launches<at::BFloat16>(x, weight, y, rot, (int)sm_count, stream); break;
    case at::kHalf: decode_launches<at::Half>(x, weight, y, rot, (int)sm_count, stream); break;
    default: decode_launches<float>(x, weight, y, rot, (int)sm_count, stream);
  }
}

}  // namespace crope
