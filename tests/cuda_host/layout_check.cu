// Host-only check (no GPU) of the register-layout helpers in fa3_utils.cuh against CuTe's own
// WGMMA partitions: the accumulator (row, col) view, and the accumulator-as-A-operand view used to
// feed P to the PV GEMM.  Build: nvcc -std=c++17 --expt-relaxed-constexpr -I<cutlass> -I kernels/cuda
// Prints "OK" and exits 0 when every thread's coordinates agree.
#include <cstdio>
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED 1  // 64x80 atoms for the hdim-256 tile, as cuda_jit renders it
#include "fa3_fwd_kernel.cuh"

using namespace cute;

// FP8: acc_to_fp8_operand_a puts accumulator element j (of P) into A slot i.  The slot's GEMM key
// k (CuTe's A partition) must be the permuted position of the accumulator's true key, and the row
// must agree: key_of_slot(k) = 32 (k / 32) + pi(k % 32) with pi as in fp8/quantize.py.
int pi32(int c) { return 16 * (c >> 4) + 8 * ((c & 3) >> 1) + 2 * ((c >> 2) & 3) + (c & 1); }

// 16-bit: the (row, col) view of the accumulator, and P as operand A of the PV GEMM: CuTe's A
// partition of a (128, BN) tile must hold, element for element, the same (row, key) coordinates
// as our reinterpretation of the S accumulator.
template <class TC, class TA>
void check_16bit(int t, TC const& tScS, TA const& tOcP, int& bad) {
  Tensor rc = make_tensor(tScS.data(), fa3::acc_rowcol(tScS.layout()));
  int w = t / 128, warp = (t % 128) / 32, lane = t % 32;
  for (int r = 0; r < size<0>(rc); ++r)
    for (int c = 0; c < size<1>(rc); ++c) {
      int row = w * 64 + warp * 16 + lane / 4 + 8 * r;
      int col = (lane % 4) * 2 + (c % 2) + 8 * (c / 2);
      if (get<0>(rc(r, c)) != row || get<1>(rc(r, c)) != col) {
        if (bad++ < 5) printf("rowcol mismatch t=%d r=%d c=%d got (%d,%d) want (%d,%d)\n", t, r, c,
                              int(get<0>(rc(r, c))), int(get<1>(rc(r, c))), row, col);
      }
    }
  Tensor asA = make_tensor(tScS.data(), fa3::acc_as_operand_a(tScS.layout()));
  for (int i = 0; i < size(tOcP); ++i) {
    if (tOcP(i) != asA(i)) {
      if (bad++ < 5) printf("operand-A mismatch t=%d i=%d got (%d,%d) want (%d,%d)\n", t, i,
                            int(get<0>(asA(i))), int(get<1>(asA(i))), int(get<0>(tOcP(i))), int(get<1>(tOcP(i))));
    }
  }
}

template <class TC, class TA>
void check_fp8(int t, TC const& tScS, TA const& tOcP, int& bad) {
  for (int kb = 0; kb < size(tScS) / 16; ++kb)
    for (int u2 = 0; u2 < 2; ++u2)
      for (int u1 = 0; u1 < 2; ++u1)
        for (int u0 = 0; u0 < 4; ++u0) {
          int const i = u0 + 4 * u1 + 8 * u2 + 16 * kb;
          int const j = (u0 & 1) + 2 * u1 + 4 * (4 * kb + 2 * u2 + (u0 >> 1));
          int const k = get<1>(tOcP(i));
          int const want_col = 32 * (k / 32) + pi32(k % 32);
          if (get<0>(tOcP(i)) != get<0>(tScS(j)) || get<1>(tScS(j)) != want_col) {
            if (bad++ < 5) printf("fp8 operand-A mismatch t=%d i=%d: slot (%d,%d), acc (%d,%d), want col %d\n", t, i,
                                  int(get<0>(tOcP(i))), k, int(get<0>(tScS(j))), int(get<1>(tScS(j))), want_col);
          }
        }
}

template <int D, int BN, class Element = cutlass::half_t>
int check() {
  using Cfg = fa3::Config<D, 128, BN, 2, Element, cutlass::half_t, false, true, true, true, true>;
  typename Cfg::TiledMmaQK mma_qk;
  typename Cfg::TiledMmaPV mma_pv;
  int bad = 0;
  for (int t = 0; t < 256; ++t) {
    auto thr_qk = mma_qk.get_thread_slice(t);
    auto thr_pv = mma_pv.get_thread_slice(t);
    Tensor cS = make_identity_tensor(Shape<Int<128>, Int<BN>>{});
    Tensor tScS = thr_qk.partition_C(cS);
    Tensor tOcP = thr_pv.partition_A(cS);
    if (size(tOcP) != size(tScS)) { printf("size mismatch %d vs %d\n", int(size(tOcP)), int(size(tScS))); return 1; }
    if constexpr (Cfg::kFp8) check_fp8(t, tScS, tOcP, bad);
    else check_16bit(t, tScS, tOcP, bad);
  }
  printf("%sD=%d BN=%d: %s\n", Cfg::kFp8 ? "fp8 " : "", D, BN, bad ? "MISMATCH" : "OK");
  return bad != 0;
}

int main() {
  int bad = 0;
  bad += check<128, 128, cutlass::float_e4m3_t>();
  bad += check<128, 192, cutlass::float_e4m3_t>();
  bad += check<128, 224, cutlass::float_e4m3_t>();  // the d128 non-causal FP8 tile
  bad += check<256, 128, cutlass::float_e4m3_t>();
  bad += check<128, 128>();
  bad += check<256, 80>();
  bad += check<64, 128>();
  bad += check<192, 96>();
  return bad;
}
