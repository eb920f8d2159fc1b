// Version 3 of the tiled path of crope::qkv_rotary, for Hopper (sm_90a): "tiled_v3", forward only (its backward
// is tiled_v2's). Reached only by forcing it; "auto" does not take it until a GPU has shown it correct and faster.
// Checked against the same float64 reference as every path (tests/test_kernel.py, fused_op.py's self-check).
//
//   qkv_tiled_v3_kernel: Y (M, N) = X (M, K) Wr^T, then q and k rotated, with wgmma (the warpgroup-wide
//   asynchronous tensor-core instruction of sm_90a) instead of mma.sync. Wr, the real (N, K) matrix of 2x2
//   blocks [[a, -b], [b, a]], is expanded once per call (3.5 MB at d = 768): wgmma reads its operands straight
//   from shared memory, so the expansion cannot ride in the fragment loads as in tiled_v2. A block of 2
//   warpgroups computes a 128 x 128 tile of Y, each warpgroup 64 x 128, K in steps of 64, 3 stages of
//   cp.async copies into the 128-byte-swizzled layout wgmma reads (TMA and warp specialisation: the next
//   step, csrc/NOTES.md). The epilogue is tiled_v2's: rotate the fp32 accumulator pairs, round once, stage
//   in shared memory, 16-byte stores.
//
// It needs an sm_90a build (TORCH_CUDA_ARCH_LIST with "9.0a"): wgmma exists only there. Other builds compile
// a stub that traps, and the host never launches it (tiled_v3_available asks the loaded code).

#include "crope.h"
#include "crope_cuda.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CROPE_WGMMA 1  // this device pass is sm_90a: wgmma, and the kernel below, are compiled
#endif

namespace crope {
namespace {

using namespace kernels;

namespace tiled3 {
constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3, THREADS = 256;  // 2 warpgroups of 64 x 128
constexpr int TILE_BYTES = 128 * BK * 2;  // one operand's tile in one stage: 128 rows of 128 bytes, 16 KB
constexpr int SMEM_BYTES = STAGES * 2 * TILE_BYTES + 1024;  // 99,328: 1024 more to align the stages
}  // namespace tiled3

#if !defined(__CUDA_ARCH__) || defined(CROPE_WGMMA)  // the helpers, where the kernel that uses them is compiled
// The shared-memory layout wgmma reads (K-major, 128-byte swizzle; PTX ISA "Shared Memory Matrix Layout"):
// a tile of rows of 64 bf16 (128 bytes), row r at byte r * 128, its 16-byte chunk c stored at chunk c XOR
// (r % 8), so that the 8 rows of a core matrix spread over all banks. Tiles start on 1024-byte boundaries
// (the swizzle is applied to address bits 4-6 from bits 7-9).
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) { return row * 128 + ((chunk ^ (row % 8)) << 4); }

// The matrix descriptor of such a tile (PTX ISA "Matrix Descriptor Format"): start address / 16 in bits 0-13,
// leading byte offset / 16 in bits 16-29 (not used with this swizzle: 1), stride byte offset / 16 in bits
// 32-45 (from one 8-row core matrix to the next: 1024 bytes), swizzle mode in bits 62-63 (1: 128 bytes).
// The k-th 16-wide K step of the tile starts 32 k bytes further: the descriptor plus 2 k.
__device__ __forceinline__ uint64_t descriptor(const void* tile) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) | static_cast<uint64_t>(1) << 16 |
         static_cast<uint64_t>(1024 >> 4) << 32 | static_cast<uint64_t>(1) << 62;
}

// Fragment layout of the fp32 accumulator d of wgmma m64nNk16 (PTX ISA "Register Fragments"): warp w of the
// warpgroup holds rows 16 w + gid (d[4j], d[4j + 1]) and 16 w + gid + 8 (d[4j + 2], d[4j + 3]), at columns
// 8 j + 2 tid4 and 8 j + 2 tid4 + 1: as in mma.sync, each pair is one complex output (re, im).
// d (64 x 128 fp32, the layout above) += a (64 x 16, K-major) b (16 x 128, K-major), bf16, both read from
// shared memory through their descriptors; asynchronous until wgmma_wait
__device__ __forceinline__ void wgmma_64x128x16(float (&d)[64], uint64_t a, uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"  // p (%66 = 1): accumulate into d
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
               "%64, %65, p, 1, 1, 0, 0;\n}\n"  // scale a and b by 1, neither transposed (both K-major)
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
               : "l"(a), "l"(b), "r"(1));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// make this thread's writes to shared memory (cp.async's included) visible to wgmma's reads (the async proxy)
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#endif

// Pipeline, per K step kt (one barrier): wait for this thread's copies of tile kt, make them visible to
// wgmma, barrier (everyone's are, and every warpgroup is done with tile kt - 1's stage, which is refilled
// next), request tile kt + 2, then 4 wgmma of K 16 on tile kt and wait for them (so that the stage they
// read is free at the next barrier).
__global__ void __launch_bounds__(tiled3::THREADS) qkv_tiled_v3_kernel(const __nv_bfloat16* __restrict__ x,
                                                                    const __nv_bfloat16* __restrict__ wr,
                                                                    __nv_bfloat16* __restrict__ y, int M, int N,
                                                                    int K, Rotary<float> rot) {
#ifndef CROPE_WGMMA
  __trap();  // not an sm_90a build: no wgmma; the host never launches this stub
#else
  using namespace tiled3;
  constexpr int OUT_LDS = BN + 8;  // the epilogue's staging row, 272 bytes: pair stores in distinct banks
  extern __shared__ __align__(16) unsigned char shared_raw[];
  unsigned char* const shared =  // the stages on a 1024-byte boundary (the swizzle's period)
      shared_raw + ((1024 - static_cast<uint32_t>(__cvta_generic_to_shared(shared_raw)) % 1024) % 1024);
  const auto a_stage = [&](int s) { return shared + s * 2 * TILE_BYTES; };  // x: 128 rows of BK
  const auto b_stage = [&](int s) { return shared + s * 2 * TILE_BYTES + TILE_BYTES; };  // Wr: 128 rows of BK

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gid = lane / 4, tid4 = lane % 4;
  const int group = warp / 4;  // warpgroup: rows 64 group ... of the block tile
  const int tiles_n = (N + BN - 1) / BN;
  const int m0 = blockIdx.x / tiles_n * BM, n0 = blockIdx.x % tiles_n * BN;  // row-major tile order
  const int k_tiles = (K + BK - 1) / BK;

  const auto request = [&](int stage, int kt) {  // 128 rows x 8 chunks of each operand, 4 + 4 copies per thread
    const int k0 = kt * BK;
#pragma unroll
    for (int i = 0; i < 128 * 8 / THREADS; ++i) {
      const int c = i * THREADS + tid, r = c / 8, chunk = c % 8, k = k0 + chunk * 8;
      const bool a_ok = m0 + r < M && k < K, b_ok = n0 + r < N && k < K;
      cp_async_16(a_stage(stage) + swizzled(r, chunk), a_ok ? x + (int64_t)(m0 + r) * K + k : x, a_ok);
      cp_async_16(b_stage(stage) + swizzled(r, chunk), b_ok ? wr + (int64_t)(n0 + r) * K + k : wr, b_ok);
    }
  };

  float d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0.f;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) request(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    fence_proxy_async();
    __syncthreads();
    if (kt + STAGES - 1 < k_tiles) request((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();
    const uint64_t a = descriptor(a_stage(kt % STAGES) + group * 64 * 128), b = descriptor(b_stage(kt % STAGES));
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < BK / 16; ++k) wgmma_64x128x16(d, a + 2 * k, b + 2 * k);
    wgmma_commit();
    wgmma_wait_all();
  }

  // Epilogue, as tiled_v2's: rotate, round once, stage the warp's 16 x 128 rows, 16-byte stores.
  cp_async_wait<0>();
  __syncthreads();
  auto* const out = reinterpret_cast<__nv_bfloat16*>(shared) + warp * 16 * OUT_LDS;
  const int row0 = m0 + group * 64 + warp % 4 * 16;  // the warp's first row
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = gid + 8 * h, m = rot.position(row0 + r);  // rows past M: never stored
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int pair = (n0 + 8 * j) / 2 + tid4;
      float re = d[4 * j + 2 * h], im = d[4 * j + 2 * h + 1];
      if (rot.rotates(pair)) rot.apply(m * rot.half + pair % rot.half, re, im);
      *reinterpret_cast<__nv_bfloat162*>(out + r * OUT_LDS + 8 * j + 2 * tid4) = __floats2bfloat162_rn(re, im);
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * BN / 8 / 32; ++i) {  // 16 rows of 16 chunks; 2 rows per pass of the warp
    const int c = i * 32 + lane, r = c / (BN / 8), col = c % (BN / 8) * 8;
    const int gm = row0 + r, gn = n0 + col;
    if (gm < M && gn < N)
      *reinterpret_cast<uint4*>(y + (int64_t)gm * N + gn) = *reinterpret_cast<const uint4*>(out + r * OUT_LDS + col);
  }
#endif
}

// Writes 1 where this build's code for the device has wgmma (sm_90a), else 0.
__global__ void wgmma_probe_kernel(int* has_wgmma) {
#ifdef CROPE_WGMMA
  *has_wgmma = 1;
#else
  *has_wgmma = 0;
#endif
}

}  // namespace

bool tiled_v3_available(int device) {
  return cached_per_device(device, [device] {
    cudaDeviceProp properties;
    if (cudaGetDeviceProperties(&properties, device) != cudaSuccess || properties.major != 9) {
      (void)cudaGetLastError();
      return 0;
    }
    auto flag = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
    wgmma_probe_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream(device)>>>(flag.data_ptr<int>());
    if (cudaGetLastError() != cudaSuccess) return 0;  // no kernel image for this GPU
    return flag.item<int>();  // one synchronisation, once per device (before any CUDA graph capture)
  }) != 0;
}

void tiled_v3_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const at::Tensor& cos_in,
                   const at::Tensor& sin_in, int64_t start_pos, int64_t n_rotary) {
  using namespace tiled3;
  const auto cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const auto rot = make_rotary<float>(cos, sin, start_pos, x.size(1), n_rotary, +1);
  const auto wr = real_weight(weight).contiguous();  // (N, K): wgmma reads Wr from shared memory as it is
  const int64_t M = x.size(0) * x.size(1), K = x.size(2), N = y.size(2);
  const int device = c10::cuda::current_device();
  cached_per_device(device, [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(qkv_tiled_v3_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES));
    return 1;
  });
  const int64_t tiles = ((M + BM - 1) / BM) * ((N + BN - 1) / BN);
  TORCH_CHECK(tiles < std::numeric_limits<int>::max() && M + BM < std::numeric_limits<int>::max(),
              "crope::qkv_rotary: path 'tiled_v3' takes fewer than 2^31 tiles of 128 x 128 outputs");
  qkv_tiled_v3_kernel<<<(int)tiles, THREADS, SMEM_BYTES, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const __nv_bfloat16*>(x.const_data_ptr<at::BFloat16>()),
      reinterpret_cast<const __nv_bfloat16*>(wr.const_data_ptr<at::BFloat16>()),
      reinterpret_cast<__nv_bfloat16*>(y.data_ptr<at::BFloat16>()), (int)M, (int)N, (int)K, rot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace crope
