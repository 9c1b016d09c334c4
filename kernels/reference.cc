// Scalar reference path: plain loops that follow the math in tvk.h literally.
// Every other path is tested against this one.
#include <type_traits>

#include "internal.h"

namespace tvk {
namespace {

template <Format F>
void MatmulScalarT(const MatmulProblem& p, int64_t n0, int64_t n1) {
  const int64_t G = p.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = RowPtr(F, p.w, p.row_bytes, n);
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
    const uint8_t* row = RowPtr(F, p.w, p.row_bytes, n);
    const float* srow = p.scale + n * p.scale_cols;
    float* out = p.out + n * p.K;
    for (int64_t k = 0; k < p.K; ++k) {
      out[k] = srow[k / p.group] * static_cast<float>(CodeAt<F>(row, k));
    }
  }
}

// The int8-activation product on xq, in the order tvk.h/internal.h define.
template <Format F>
void MatmulI8ScalarT(const MatmulProblem& p, int64_t n0, int64_t n1) {
  const ActQuant& a = *p.act;
  const int64_t G = p.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = RowPtr(F, p.w, p.row_bytes, n);
    const float* srow = p.scale + n * p.scale_cols;
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* xm = a.xq + m * p.K;
      float total = 0.f;
      for (int64_t g = 0; g < p.scale_cols; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) dot += xm[k] * CodeAt<F>(row, k);
        total += srow[g] * static_cast<float>(dot);
      }
      p.y[m * p.N + n] = total * a.d[m];
    }
  }
}

template <Format F>
void GatherScalarT(const uint8_t* w, int64_t row_bytes, int64_t K, const float* scale,
                   int64_t scale_cols, const int32_t* ids, int64_t n_ids, float* out) {
  const int64_t G = K / scale_cols;
  for (int64_t i = 0; i < n_ids; ++i) {
    const uint8_t* row = RowPtr(F, w, row_bytes, ids[i]);
    const float* srow = scale + ids[i] * scale_cols;
    for (int64_t k = 0; k < K; ++k) {
      out[i * K + k] = srow[k / G] * static_cast<float>(CodeAt<F>(row, k));
    }
  }
}

template <Format F>
using FormatTag = std::integral_constant<Format, F>;

// Calls body(FormatTag<F>{}) for the run-time format.
template <typename Body>
void ForFormat(Format fmt, Body&& body) {
  switch (fmt) {
    case Format::k2Bit:
      return body(FormatTag<Format::k2Bit>{});
    case Format::k1p6Bit:
      return body(FormatTag<Format::k1p6Bit>{});
    case Format::k1Bit:
      return body(FormatTag<Format::k1Bit>{});
    case Format::kInt8:
      return body(FormatTag<Format::kInt8>{});
    case Format::kInt4:
      return body(FormatTag<Format::kInt4>{});
    case Format::k2BitLut:
      return body(FormatTag<Format::k2BitLut>{});
  }
}

}  // namespace

void MatmulI8Scalar(const MatmulProblem& p, int64_t n0, int64_t n1) {
  ForFormat(p.fmt, [&](auto f) { MatmulI8ScalarT<decltype(f)::value>(p, n0, n1); });
}

void GatherScalar(Format fmt, const uint8_t* w, int64_t row_bytes, int64_t K,
                  const float* scale, int64_t scale_cols, const int32_t* ids, int64_t n_ids,
                  float* out) {
  ForFormat(fmt, [&](auto f) {
    GatherScalarT<decltype(f)::value>(w, row_bytes, K, scale, scale_cols, ids, n_ids, out);
  });
}

void MatmulScalar(const MatmulProblem& p, int64_t n0, int64_t n1) {
  ForFormat(p.fmt, [&](auto f) { MatmulScalarT<decltype(f)::value>(p, n0, n1); });
}

void UnpackScalar(const UnpackProblem& p, int64_t n0, int64_t n1) {
  ForFormat(p.fmt, [&](auto f) { UnpackScalarT<decltype(f)::value>(p, n0, n1); });
}

}  // namespace tvk
