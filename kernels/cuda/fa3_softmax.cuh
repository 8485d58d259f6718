// Online softmax over the rows a thread owns in the WGMMA accumulator, and the window/causal
// mask.  exp2 with log2(e)*scale folded into one FMA per score; running max kept unscaled.
#pragma once

#include <cute/tensor.hpp>
#include "fa3_utils.cuh"

namespace fa3 {

using namespace cute;

template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];
  float row_sum[kRows];  // per-thread partial sums; reduced across the quad only at the end
  float scale_log2;

  CUTE_DEVICE explicit OnlineSoftmax(float scale_log2_) : scale_log2(scale_log2_) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) { row_max[r] = -INFINITY; row_sum[r] = 0.f; }
  }

  // s: (rows, cols) view of raw scores (masked entries are -inf); overwritten with
  // unnormalised probabilities.  alpha[r] is the factor the O accumulator must be scaled by.
  template <bool kFirst, class TensorS>
  CUTE_DEVICE void step(TensorS& s, float (&alpha)[kRows]) {
    static_assert(decltype(size<0>(s))::value == kRows);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float mx = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) { mx = fmaxf(mx, s(r, c)); }
      mx = quad_max(mx);
      // A row with every score masked so far keeps max -inf: subtract 0 so exp2 gives 0, not NaN.
      float const m_scaled = (mx == -INFINITY) ? 0.f : mx * scale_log2;
      alpha[r] = kFirst ? 1.f : exp2f(row_max[r] * scale_log2 - m_scaled);
      row_max[r] = mx;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        float const p = exp2f(fmaf(s(r, c), scale_log2, -m_scaled));
        s(r, c) = p;
        sum += p;
      }
      row_sum[r] = kFirst ? sum : fmaf(row_sum[r], alpha[r], sum);
    }
  }

  // Returns 1/l per row (0 for rows without any kept key) and the natural-log LSE.
  CUTE_DEVICE void finalize(float (&inv)[kRows], float (&lse)[kRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float const l = quad_sum(row_sum[r]);
      bool const dead = !(l > 0.f);  // also catches NaN
      inv[r] = dead ? 0.f : 1.f / l;
      lse[r] = dead ? -INFINITY : (row_max[r] * scale_log2 + __log2f(l)) * 0.69314718055994531f;
    }
  }
};

// keep(i, j) = j < sk and (!HasWR or j <= i + off + wr) and (!HasWL or j >= i + off - wl)
// with i, j global indices; coords holds the (row, col) of every accumulator element.
template <bool kHasWL, bool kHasWR, class TensorS, class TensorC>
CUTE_DEVICE void apply_mask(TensorS& s, TensorC const& coords, int row0, int col0, int sk,
                            int off, int wl, int wr) {
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    int const i = row0 + get<0>(coords(r, 0)) + off;
    int const hi = kHasWR ? min(sk - 1, i + wr) : sk - 1;  // last kept column
    int const lo = kHasWL ? i - wl : 0;                     // first kept column
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); ++c) {
      int const j = col0 + get<1>(coords(r, c));
      if (j > hi || j < lo) { s(r, c) = -INFINITY; }
    }
  }
}

}  // namespace fa3
