// Stand-in for CUDA's cuda_fp16.h (test tooling, tests/lightseq_loader): only what LightSeq's loaders and
// tools/util.cc.cu use on the host -- the __half type, __float2half_rn and __half2float.
// The conversions are IEEE binary16 with round-to-nearest-even, what CUDA's __float2half_rn does
// (done here by the compiler's _Float16 on x86-64, GCC >= 12; see stub/README.md).
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f);  // CUDA's __half converts from float with round-to-nearest-even
  operator float() const;
};
typedef __half half;

inline __half __float2half_rn(float f) {
  _Float16 h = static_cast<_Float16>(f);  // round to nearest even
  __half r;
  std::memcpy(&r.__x, &h, sizeof r.__x);
  return r;
}

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.__x, sizeof v);
  return static_cast<float>(v);
}

inline __half::__half(float f) : __x(__float2half_rn(f).__x) {}
inline __half::operator float() const { return __half2float(*this); }
