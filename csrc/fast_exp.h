// exp for the softmax-style sums of the C++ core (topk.cpp, packed_attention.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace genrec {

// exp(x) for x <= 0 (Cephes' expf polynomial, rel. error ~1e-7). Below -87.3 it returns
// exp(-87.3) ~ 1e-38 instead of a smaller number: each call is added to a sum >= 1 (the max
// term), so the difference never shows. Plain arithmetic, so the loops calling it vectorise.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.3f);
  const float t = x * 1.44269504088896341f;
  const int32_t n = -static_cast<int32_t>(0.5f - t);  // round(t) for t <= 0
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;  // 2^n, n >= -126
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

}  // namespace genrec
