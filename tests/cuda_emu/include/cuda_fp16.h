// CUDA emulation for tests: fp16 storage (2 bytes) and its conversions, via the compiler's _Float16.
#pragma once
#include <cstring>
struct __half { unsigned short bits = 0; };
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // round to nearest even
  __half v;
  std::memcpy(&v.bits, &h, 2);
  return v;
}
inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}
