// Host-device portability: the per-element math is written once and compiled by the host C++
// compiler (CPU backend, C++ tests) and by nvcc (CUDA backend).
#pragma once

#ifdef __CUDACC__
#define FASTDIFF_HD __host__ __device__ __forceinline__
#define FASTDIFF_UNROLL _Pragma("unroll")
#else
#define FASTDIFF_HD inline
#define FASTDIFF_UNROLL
#endif
