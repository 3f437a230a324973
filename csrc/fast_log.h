// log for the C++ core's feature transforms (first_step.cpp's log1p of the transition counts).
#pragma once

#include <cstdint>
#include <cstring>

namespace genrec {

// log(x) for finite x > 0 (Cephes' logf polynomial, rel. error ~1e-7): plain arithmetic, so loops over it
// vectorise, where libm's scalar log1pf took ~20 ns a call (1.5 ms of a 256-user first step's 18).
inline float log_positive(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m 2^e with m in [0.5, 1)
  bits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &bits, sizeof m);
  if (m < 0.70710678118654752f) {  // m in [sqrt(1/2), sqrt 2) around 1
    e -= 1;
    m = m + m - 1.0f;
  } else {
    m = m - 1.0f;
  }
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float ef = static_cast<float>(e);
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return m + y + 0.693359375f * ef;
}

}  // namespace genrec
