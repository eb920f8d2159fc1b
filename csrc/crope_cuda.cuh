// Device helpers shared by the CUDA kernels of crope::qkv_rotary (qkv_rotary_cuda.cu, decode.cu, tiled.cu,
// pipelined.cu): value types, the rotation, and thin wrappers of the PTX instructions the tensor-core kernels use
// (ldmatrix, mma.sync, cp.async), each with the layout it assumes.
//
// PyTorch compiles extensions with -D__CUDA_NO_HALF_CONVERSIONS__ and -D__CUDA_NO_BFLOAT16_CONVERSIONS__,
// so there are no implicit conversions between float and __half / __nv_bfloat16: every conversion below
// is an explicit intrinsic (__low2float, __floats2bfloat162_rn, ...), as in PyTorch's own kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <mutex>
#include <type_traits>
#include <unordered_map>

namespace crope {
namespace kernels {

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };
template <> struct CudaType<at::Half> { using type = __half; };

// arithmetic type: double for double, float otherwise; 16-bit values are rounded once, at the store
template <typename T> using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Two adjacent values (re, im): one complex number, loaded and stored as one aligned value.
template <typename T> struct Pair;
template <> struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  __device__ static float re(type z) { return __low2float(z); }
  __device__ static float im(type z) { return __high2float(z); }
  __device__ static type make(float re, float im) { return __floats2bfloat162_rn(re, im); }
};
template <> struct Pair<__half> {
  using type = __half2;
  __device__ static float re(type z) { return __low2float(z); }
  __device__ static float im(type z) { return __high2float(z); }
  __device__ static type make(float re, float im) { return __floats2half2_rn(re, im); }
};
template <> struct Pair<float> {
  using type = float2;
  __device__ static float re(type z) { return z.x; }
  __device__ static float im(type z) { return z.y; }
  __device__ static type make(float re, float im) { return make_float2(re, im); }
};
template <> struct Pair<double> {
  using type = double2;
  __device__ static double re(type z) { return z.x; }
  __device__ static double im(type z) { return z.y; }
  __device__ static type make(double re, double im) { return make_double2(re, im); }
};

// A pair of 16-bit values in one 32-bit word (the low half at the lower address) as float (re, im).
template <typename T>
__device__ __forceinline__ float2 unpack(uint32_t word) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));  // bf16: a float's top half
  } else {
    return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16))));
  }
}

// Complex number q of a 16-byte chunk (4 pairs of 16-bit values, or 2 pairs of floats) as float (re, im).
template <typename T>
__device__ __forceinline__ float2 complex_at(const uint4& chunk, int q) {
  const uint32_t words[4] = {chunk.x, chunk.y, chunk.z, chunk.w};
  if constexpr (std::is_same_v<T, float>) {
    return make_float2(__uint_as_float(words[2 * q]), __uint_as_float(words[2 * q + 1]));
  } else {
    return unpack<T>(words[q]);
  }
}

// Positions and rotary tables of one output: row r of the (M, N) output is token t = r % T of its sequence,
// at position m = start_pos + t; complex output p < n_rotary_pairs rotates by theta_j, j = p % half.
// All in 32 bits: the host checks that every index fits.
template <typename A>
struct Rotary {
  const A* cos;
  const A* sin;
  int start_pos, T, half, n_rotary_pairs;
  A sign;

  __device__ __forceinline__ int position(int row) const { return start_pos + row % T; }
  __device__ __forceinline__ bool rotates(int p) const { return p < n_rotary_pairs; }
  // (re + i im) * e^(sign i m theta_j), table entry at = m * half + j
  __device__ __forceinline__ void apply(int at, A& re, A& im) const {
    const A c = cos[at], s = sign * sin[at];
    const A rotated_re = re * c - im * s;
    im = re * s + im * c;
    re = rotated_re;
  }
};

// ------------------------------------------------------------------ tensor-core instructions (sm_80+)
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 gid + tid4:
//   A (16 x 16, row major), 4 registers of two 16-bit values: a0 = A[gid][2 tid4, 2 tid4 + 1],
//     a1 = A[gid + 8][same columns], a2 = A[gid][2 tid4 + 8, + 9], a3 = A[gid + 8][2 tid4 + 8, + 9]
//   B (16 x 8, "col": element (k, n)), 2 registers: b0 = B[2 tid4, 2 tid4 + 1][gid], b1 = B[2 tid4 + 8, + 9][gid]
//   C (16 x 8, fp32), 4 registers: c0, c1 = C[gid][2 tid4, 2 tid4 + 1], c2, c3 = C[gid + 8][same columns]
// so every register of A, and every pair (c0, c1) / (c2, c3) of C, holds two adjacent columns of one row:
// with interleaved features, one complex number (re, im).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // where the kernels that use them are compiled
// ldmatrix.x4: lanes 8q..8q+7 give the addresses of the 8 rows (16 bytes each) of matrix q; register q of
// lane l receives the 32-bit word at row l / 4, word l % 4 of matrix q (the fragment layout above).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* shared) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
// c += a b for one 16 x 8 x 16 tile: a (16 x 16, row major), b (16 x 8, column major), c fp32
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// The warp's tile of accumulators += its A fragments (TM row tiles) times its B fragments (TN column tiles).
template <typename T, int TM, int TN>
__device__ __forceinline__ void mma_tiles(float (&acc)[TM][TN][4], const uint32_t (&a)[TM][4],
                                          const uint32_t (&b)[TN][2]) {
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
}

// One ldmatrix.x4 of matrices (tile j, k 0-7), (tile j, k 8-15), (tile j + 1, k 0-7), (tile j + 1, k 8-15) as the
// B fragments of the n8 tiles j and j + 1.
__device__ __forceinline__ void split_b(uint32_t (&bj)[2], uint32_t (&bj1)[2], const uint32_t (&r)[4]) {
  bj[0] = r[0];
  bj[1] = r[1];
  bj1[0] = r[2];
  bj1[1] = r[3];
}

// cp.async: a 16-byte copy from global to shared memory that bypasses registers (and L1: .cg), in flight
// until waited for. valid = false writes 16 zero bytes and reads nothing (the address must still be a
// valid one: callers pass the start of the tensor).
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool valid) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(valid ? 16 : 0)
               : "memory");
}
// close the group of copies issued since the last commit (an empty group is fine)
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// wait until at most `pending` of this thread's groups are still in flight (other threads: __syncthreads)
template <int pending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory"); }
#endif

// ------------------------------------------------------------------ host side

// Per-device facts, asked of the driver once (each call site keeps its own cache).
template <typename Query>
int cached_per_device(int device, Query query) {
  static std::mutex mutex;
  static std::unordered_map<int, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(device);
  return found != cache.end() ? found->second : cache.emplace(device, query()).first->second;
}

// Whether `kernel`, as loaded on the current device, was compiled from sm_80+ code: a build for an older
// architecture with PTX (e.g. TORCH_CUDA_ARCH_LIST="7.5+PTX") would otherwise JIT a __trap() stub on an
// A100. Asks the driver which PTX version the loaded kernel came from.
inline bool compiled_for_sm80(const void* kernel) {
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, kernel);
  if (status != cudaSuccess) (void)cudaGetLastError();  // no kernel image for this GPU: not an error here
  return status == cudaSuccess && attributes.ptxVersion >= 80;
}

template <typename A>
Rotary<A> make_rotary(const at::Tensor& cos, const at::Tensor& sin, int64_t start_pos, int64_t T, int64_t n_rotary,
                      int sign) {
  return Rotary<A>{cos.data_ptr<A>(), sin.data_ptr<A>(), (int)start_pos, (int)T, (int)cos.size(1),
                   (int)(n_rotary / 2), (A)sign};
}

// a contiguous tensor whose data starts on a 16-byte boundary (views with an offset are copied)
inline at::Tensor aligned_contiguous(const at::Tensor& t) {
  auto c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

}  // namespace kernels
}  // namespace crope
