// CUDA emulation for tests: bf16 storage (the upper 2 bytes of a float32) and its conversions.
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { unsigned short bits = 0; };
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 v;
  v.bits = (u & 0x7FFFFFFF) > 0x7F800000 ? static_cast<unsigned short>((u >> 16) | 0x40)
                                         : static_cast<unsigned short>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  return v;
}
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
