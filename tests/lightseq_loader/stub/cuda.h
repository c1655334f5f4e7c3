// Stand-in for CUDA's cuda.h / cuda_runtime.h (test tooling, tests/lightseq_loader): the runtime names that
// LightSeq's tools/util.h and util.cc.cu mention, so that they compile and link as they are. Memory is the
// host's: the loaders keep their weights in a thrust::device_vector, which thrust's CPP backend keeps on the
// host; the other functions (print_vec, getGPUName, to_gpu) are compiled but never called by the driver.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "cuda_fp16.h"

typedef enum cudaError { cudaSuccess = 0, cudaErrorUnknown = 999 } cudaError_t;
typedef struct CUstream_st *cudaStream_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
typedef enum cudaDataType_t { CUDA_R_16F = 2, CUDA_R_32F = 0, CUDA_R_8I = 3, CUDA_R_32I = 10 } cudaDataType;

struct cudaDeviceProp {
  char name[256];
};

inline const char *cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorUnknown"; }
inline const char *cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "unknown error"; }
inline cudaError_t cudaMalloc(void *p, size_t n) {
  *static_cast<void **>(p) = std::malloc(n);
  return *static_cast<void **>(p) ? cudaSuccess : cudaErrorUnknown;
}
inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind) {
  std::memcpy(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k, cudaStream_t = 0) {
  return cudaMemcpy(dst, src, n, k);
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int *d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
  std::strcpy(p->name, "host (stand-in CUDA headers)");
  return cudaSuccess;
}
