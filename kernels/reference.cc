// Scalar reference path: plain loops that follow the math in tvk.h literally.
// Every other path is tested against this one.
#include "internal.h"

namespace tvk {
namespace {

template <Format F>
void MatmulScalarT(const MatmulProblem& p, int64_t n0, int64_t n1) {
  const int64_t G = p.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.w + n * p.row_bytes;
    const float* srow = p.scale + n * p.scale_cols;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xm = p.x + m * p.K;
      float total = 0.f;
      for (int64_t g = 0; g < p.scale_cols; ++g) {
        float acc = 0.f;  // integer-weighted sum of the group, scaled once
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          acc += xm[k] * static_cast<float>(CodeAt<F>(row, k));
        }
        total += srow[g] * acc;
      }
      p.y[m * p.N + n] = total;
    }
  }
}

template <Format F>
void UnpackScalarT(const UnpackProblem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.w + n * p.row_bytes;
    const float* srow = p.scale + n * p.scale_cols;
    float* out = p.out + n * p.K;
    for (int64_t k = 0; k < p.K; ++k) {
      out[k] = srow[k / p.group] * static_cast<float>(CodeAt<F>(row, k));
    }
  }
}

}  // namespace

void MatmulScalar(const MatmulProblem& p, int64_t n0, int64_t n1) {
  switch (p.fmt) {
    case Format::k2Bit:
      return MatmulScalarT<Format::k2Bit>(p, n0, n1);
    case Format::k1p6Bit:
      return MatmulScalarT<Format::k1p6Bit>(p, n0, n1);
    case Format::k1Bit:
      return MatmulScalarT<Format::k1Bit>(p, n0, n1);
  }
}

void UnpackScalar(const UnpackProblem& p, int64_t n0, int64_t n1) {
  switch (p.fmt) {
    case Format::k2Bit:
      return UnpackScalarT<Format::k2Bit>(p, n0, n1);
    case Format::k1p6Bit:
      return UnpackScalarT<Format::k1p6Bit>(p, n0, n1);
    case Format::k1Bit:
      return UnpackScalarT<Format::k1Bit>(p, n0, n1);
  }
}

}  // namespace tvk
