// CUDA emulation for tests: bf16 storage (the upper 2 bytes of a float32) and its conversion to float.
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { unsigned short bits = 0; };
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
