// CUDA emulation for tests: fp16 storage (2 bytes) and its conversion to float, via the compiler's _Float16.
#pragma once
#include <cstring>
struct __half { unsigned short bits = 0; };
inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}
