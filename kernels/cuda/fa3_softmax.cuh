// Online softmax over the rows a thread owns in the WGMMA accumulator, the window/causal mask
// and the softcap transform.  Scores are taken to the exp2 domain by one multiplier per key
// block (`sc`: scale * log2(e), times the FP8 block scales of Q and K when they vary per block),
// folded into the FMA of the exponent; the running max is kept in that domain so that blocks
// with different multipliers compare correctly.
#pragma once

#include <cute/tensor.hpp>
#include "fa3_utils.cuh"

namespace fa3 {

using namespace cute;

// kExpPoly > 0: every kExpPoly-th column of a thread's row takes exp2_poly3 (FMA pipe) instead of
// MUFU.EX2, so that both pipes work during the softmax.
// kLazyLog2 > 0: lazy rescale (Config::kLazyLog2).  A warp takes its new row maxima only when one
// of them grew by more than kLazyLog2 (exp2 domain); otherwise it keeps the stale maxima, so P is
// at most 2^kLazyLog2 (times 2^p_log2) and step() reports that O needs no rescale.
template <int kRows, int kExpPoly = 0, int kLazyLog2 = 0>
struct OnlineSoftmax {
  float row_max[kRows];  // exp2 domain (raw max * sc)
  float row_sum[kRows];  // per-thread partial sums; reduced across the quad only at the end
  // P is produced as 2^p_log2 * exp2(s - max): 0 for 16-bit P, log2(448) for FP8 P so that the
  // probabilities use e4m3's range (P in [0, 1] would flush below 2^-9).  l carries the same
  // factor, so O / l is unchanged; only the LSE subtracts it.
  float p_log2;

  CUTE_DEVICE explicit OnlineSoftmax(float p_log2_ = 0.f) : p_log2(p_log2_) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) { row_max[r] = -INFINITY; row_sum[r] = 0.f; }
  }

  // s: (rows, cols) view of raw scores (masked entries are -inf); overwritten with
  // unnormalised probabilities.  alpha[r] is the factor the O accumulator must be scaled by.
  // sc > 0: the block's multiplier into the exp2 domain.  Returns whether O needs alpha: false for
  // the first block (O is still zero) and, under kLazyLog2, while the warp keeps its maxima; the
  // value is the same in every lane of the warp.
  template <bool kFirst, class TensorS>
  CUTE_DEVICE bool step(TensorS& s, float (&alpha)[kRows], float sc) {
    static_assert(decltype(size<0>(s))::value == kRows);
    constexpr int kCols = decltype(size<1>(s))::value;
    // Row maxima first for all rows, then their quad reductions, then the exponentials: each phase
    // holds independent work for the one warp per SMSP that this warpgroup has.  Four partial
    // maxima per row: a single running max is a chain of kCols dependent FMNMX (32 at a 128-key
    // tile).  Exact in any order (fmaxf drops NaN the same way however the values are grouped).
    float mx[kRows];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float m4[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
      CUTE_UNROLL
      for (int c = 0; c < kCols; ++c) { m4[c % 4] = fmaxf(m4[c % 4], s(r, c)); }
      mx[r] = fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]));
    }
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    float m_new[kRows];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) m_new[r] = fmaxf(row_max[r], mx[r] * sc);  // -inf * sc stays -inf
    bool update = true;
    if constexpr (kLazyLog2 > 0 && !kFirst) {
      // -inf + kLazyLog2 is -inf: a row whose first kept key arrives in this block always updates.
      bool grew = false;
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) grew |= m_new[r] > row_max[r] + float(kLazyLog2);
      update = __any_sync(0xffffffffu, grew);
    }
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      if (!update) m_new[r] = row_max[r];
      // A row with every score masked so far keeps max -inf: subtract 0 so exp2 gives 0, not NaN.
      float const m_sub = (m_new[r] == -INFINITY) ? 0.f : m_new[r];
      alpha[r] = (kFirst || !update) ? 1.f : exp2_ftz(row_max[r] - m_sub);
      row_max[r] = m_new[r];
      float const bias = p_log2 - m_sub;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < kCols; ++c) {
        float const x = fmaf(s(r, c), sc, bias);
        float const p = (kExpPoly > 0 && c % kExpPoly == kExpPoly - 1) ? exp2_poly3(x) : exp2_ftz(x);
        s(r, c) = p;
        sum += p;
      }
      row_sum[r] = kFirst ? sum : update ? fmaf(row_sum[r], alpha[r], sum) : row_sum[r] + sum;
    }
    return !kFirst && update;
  }

  // Returns 1/l per row (0 for rows without any kept key) and the natural-log LSE.
  CUTE_DEVICE void finalize(float (&inv)[kRows], float (&lse)[kRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float const l = quad_sum(row_sum[r]);
      bool const dead = !(l > 0.f);  // also catches NaN
      inv[r] = dead ? 0.f : 1.f / l;
      lse[r] = dead ? -INFINITY : (row_max[r] + __log2f(l) - p_log2) * 0.69314718055994531f;
    }
  }
};

// softcap: s <- tanh(s * scale / cap), in place (the caller then uses sc = cap * log2(e)).
// pre2 = 2 * log2(e) * scale / cap.  tanh(x) = 1 - 2 / (exp2(2 x log2 e) + 1): one MUFU.EX2 and a
// fast reciprocal, saturating to +-1 without NaN (the Triton template computes it the same way).
// Runs before the mask, which then sets masked entries to -inf.
template <class TensorS>
CUTE_DEVICE void apply_softcap(TensorS& s, float pre2) {
  CUTE_UNROLL
  for (int i = 0; i < size(s); ++i) {
    float const e = exp2_ftz(s(i) * pre2);
    s(i) = 1.f - __fdividef(2.f, e + 1.f);
  }
}

// keep(i, j) = j < sk and (!HasWR or j <= i + off + wr) and (!HasWL or j >= i + off - wl)
// with i, j global indices; coords holds the (row, col) of every accumulator element.
// kPack (packed GQA): row r is query r % pack_sq.
template <bool kHasWL, bool kHasWR, bool kPack, class TensorS, class TensorC>
CUTE_DEVICE void apply_mask(TensorS& s, TensorC const& coords, int row0, int col0, int sk,
                            int off, int wl, int wr, int pack_sq) {
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    int row = row0 + get<0>(coords(r, 0));
    if constexpr (kPack) row %= pack_sq;
    int const i = row + off;
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
