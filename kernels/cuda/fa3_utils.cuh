// Small device helpers for the sm_90a forward kernel: accumulator-layout views, fp32 -> 16-bit
// conversion, a WGMMA issue helper, a flush-to-zero exp2 and the quad (4-lane) sum.  Own code; the ideas follow the
// FlashAttention-3 paper (register-resident P reused as the A operand of the second GEMM).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

namespace fa3 {

using namespace cute;

// WGMMA accumulator layout for an M=64 atom is ((2, 2, N/8), MMA_M, MMA_N):
//   mode 0.0: two adjacent columns, 0.1: rows r and r+8, 0.2: column blocks of 8.
// View it as (rows, cols) = ((2, MMA_M), (2, N/8, MMA_N)) for row-wise softmax and masking.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout const& acc) {
  static_assert(rank(Layout{}) == 3);
  auto l0 = get<0>(acc);
  return make_layout(make_layout(get<1>(l0), get<1>(acc)),
                     make_layout(get<0>(l0), get<2>(l0), get<2>(acc)));
}

// The same registers seen as the A operand (register-sourced) of a K=16 WGMMA:
// ((2, 2, 2), MMA_M, N/16): two consecutive column blocks of 8 form one k-slice of 16.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_operand_a(Layout const& acc) {
  auto l0 = logical_divide(get<0>(acc), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
  return make_layout(make_layout(get<0>(l0), get<1>(l0), get<0>(get<2>(l0))),
                     get<1>(acc),
                     coalesce(make_layout(get<1>(get<2>(l0)), get<2>(acc))));
}

// Convert a register tensor elementwise into another of the same size (vectorised through
// cutlass' array converters, which emit cvt.rn.f16x2 / bf16x2 pairs).
template <class TSrc, class TDst>
CUTE_DEVICE void convert_into(TSrc const& src, TDst& dst) {
  using From = typename TSrc::value_type;
  using To = typename TDst::value_type;
  constexpr int N = decltype(size(src))::value;
  static_assert(N == decltype(size(dst))::value);
  cutlass::NumericArrayConverter<To, From, N> conv;
  *reinterpret_cast<cutlass::Array<To, N>*>(raw_pointer_cast(dst.data())) =
      conv(*reinterpret_cast<cutlass::Array<From, N> const*>(raw_pointer_cast(src.data())));
}

// FP8: P (the fp32 S accumulator of one 64 x N atom, ((2, 2, N/8), 1, 1)) into the registers of
// the A operand of the k32 8-bit PV WGMMA, ((4, 2, 2), 1, N/32), converting to e4m3 on the way.
// An 8-bit A fragment holds 4 consecutive keys per register (lane q = lane % 4 owns keys 4q..4q+3
// and 16+4q..16+4q+3 of each 32), while the accumulator holds pairs (2q, 2q+1) of each 8.  Rather
// than exchanging values between lanes, each thread keeps its own values and the GEMM's key order
// is permuted: A slot (u0, u1, u2, kb) takes accumulator element (v0 = u0 & 1, v1 = u1,
// v2 = 4 kb + 2 u2 + (u0 >> 1)), so GEMM key 16 u2 + 4 q + u0 of block kb multiplies P's key
// 16 u2 + 8 (u0 >> 1) + 2 q + (u0 & 1).  V^T is written with its keys in that same order
// (fa3_inductor/fp8/quantize.py, permute_keys), so every product pairs the right P and V.
// tests/cuda_host/layout_check.cu checks the correspondence against CuTe's partitions.
template <class TAcc, class TA>
CUTE_DEVICE void acc_to_fp8_operand_a(TAcc const& acc, TA& a) {
  using To = typename TA::value_type;
  constexpr int N = decltype(size(acc))::value;
  static_assert(N == decltype(size(a))::value && N % 16 == 0);
  float const* src = raw_pointer_cast(acc.data());
  cutlass::Array<To, 4>* dst = reinterpret_cast<cutlass::Array<To, 4>*>(raw_pointer_cast(a.data()));
  cutlass::NumericArrayConverter<To, float, 4> conv;
  CUTE_UNROLL
  for (int kb = 0; kb < N / 16; ++kb) {
    CUTE_UNROLL
    for (int u2 = 0; u2 < 2; ++u2) {
      CUTE_UNROLL
      for (int u1 = 0; u1 < 2; ++u1) {
        cutlass::Array<float, 4> x;
        CUTE_UNROLL
        for (int u0 = 0; u0 < 4; ++u0) x[u0] = src[(u0 & 1) + 2 * u1 + 4 * (4 * kb + 2 * u2 + (u0 >> 1))];
        dst[4 * kb + 2 * u2 + u1] = conv(x);  // slots 16 kb + 8 u2 + 4 u1 + u0
      }
    }
  }
}

// Issue one warpgroup GEMM C (+)= A * B over the whole K extent and commit it as one batch.
// kWait >= 0 waits until at most kWait batches are in flight; -1 returns immediately so
// the caller can overlap the GEMM with other work (intra-warpgroup overlap).
template <bool kZeroInit, int kWait, class TiledMma, class TA, class TB, class TC>
CUTE_DEVICE void wg_gemm(TiledMma& tiled_mma, TA const& tA, TB const& tB, TC& tC) {
  // A from registers (RS GEMM) unless it is a tensor of shared-memory descriptors (SS GEMM).
  constexpr bool kARegs = !is_same_v<typename TA::iterator, GMMA::DescriptorIterator>;
  if constexpr (kARegs) { warpgroup_fence_operand(const_cast<TA&>(tA)); }
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  if constexpr (kZeroInit) { tiled_mma.accumulate_ = GMMA::ScaleOut::Zero; }
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    cute::gemm(tiled_mma, tA(_, _, kb), tB(_, _, kb), tC);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) { warpgroup_wait<kWait>(); }
  warpgroup_fence_operand(tC);
  if constexpr (kARegs) { warpgroup_fence_operand(const_cast<TA&>(tA)); }
}

// 2^x as one MUFU.EX2 (ex2.approx.ftz).  exp2f() without --use_fast_math keeps denormal results
// and costs three more instructions per call (a range test and two predicated FMULs around the
// MUFU): at d128 that was ~40% more ALU issue in the softmax, which the pingpong must hide under
// the other warpgroup's GEMMs.  Flushing results below 2^-126 to zero changes nothing a softmax
// can see: such a P is below fp16/bf16's smallest value and 1e-38 of the row's largest term.
CUTE_DEVICE float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// exp2 on the FMA and integer pipes, for a share of the softmax's exponentials (OnlineSoftmax's
// kExpPoly).  Hopper's MUFU does 16 exponentials a clock per SM, 8 cycles per warp instruction:
// in the softmax of one warpgroup (one warp per SMSP, the other warpgroup in its GEMMs) the
// MUFU pipe is the longest chain while the FMA pipe idles (ncu source counters, session 7: the
// MUFU.EX2 instructions took 12% of all stall samples, as fixed-latency waits on the busy pipe).
// Computing some of them here moves that work to the idle pipes (the FlashAttention-4 idea).
// 2^x = 2^floor(x) * 2^f, f in [0, 1): floor through the round-down add of 1.5 * 2^23 (whose low
// mantissa bits then hold floor(x)), 2^f by a degree-3 polynomial fitted for relative error with
// p(0) = 1 (max relative error 8.6e-5, below fp16's half-ulp of 2.4e-4 for P), and floor(x) added
// to the result's exponent field.  x is clamped to -126 first (masked scores are -inf; 2^-126 is
// as good as 0 against the row's largest term, 1), which keeps the exponent field normal.
CUTE_DEVICE float exp2_poly3(float x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23
  x = fmaxf(x, -126.f);
  float const j = __fadd_rd(x, kRound);
  float const f = x - (j - kRound);
  float const p = fmaf(fmaf(fmaf(0.07706265151500702f, f, 0.22764979302883148f), f, 0.6951157450675964f), f, 1.f);
  // bits(j) = bits(1.5 * 2^23) + floor(x), and bits(1.5 * 2^23) << 23 wraps to 0.
  return __int_as_float(__float_as_int(p) + (__float_as_int(j) << 23));
}

// Threads holding one accumulator row are the 4 lanes of a quad (lane / 4 equal).
CUTE_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

}  // namespace fa3
