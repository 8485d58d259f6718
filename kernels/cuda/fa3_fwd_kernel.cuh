// FlashAttention-3-style forward for sm_90a (H100), written with CuTe/CUTLASS.
//
// CTA layout (warp specialised, the default):
//   warpgroup 0: producer.  One thread issues TMA loads: Q once, then K_j / V_j into kStages-deep
//                circular buffers (PipelineTmaAsync: full barriers with tx counts, empty barriers
//                released by the consumers).  setmaxnreg gives its registers to the consumers.
//   warpgroups 1, 2 (and 3 for 192-row tiles): consumers.  Each owns 64 of the kBlockM query rows:
//                S = Q K^T (WGMMA, both operands in smem), online softmax in registers,
//                O += P V (WGMMA, P from registers, V from smem viewed MN-major).
// FP8 (Element = e4m3): Q and K carry one scale per tile of rows (folded into the block's
//   exp2 multiplier), V^T arrives transposed and key-permuted from the quantisation pass (8-bit
//   WGMMA needs K-major B; see acc_to_fp8_operand_a for the permutation), and V's per-block scale
//   is folded into the O rescale that the online softmax does anyway.
// Pingpong: named barriers hand a token round the consumer warpgroups so that one issues its
//   GEMMs while the others do their softmax (kPingpong).
// Intra-warpgroup overlap: S_{j+1} = Q K_{j+1}^T is issued before the softmax of S_j runs, and
//   P_j V_j runs under that softmax, and O takes its rescale while the next S GEMM runs (kIntraWG).
// Without warp specialisation (kWarpSpec == false) there is no producer warpgroup: thread 0 of the
//   first consumer issues the loads kStages-1 blocks ahead, in line with its own compute.
//
// Key blocks are visited from the last one down, so the blocks that need masking (the seqlen_k
// edge, the causal diagonal) come first and the rest run mask-free.
#pragma once

#include <cuda_runtime.h>
#include <climits>
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/arch/cluster_sm90.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "fa3_utils.cuh"
#include "fa3_softmax.cuh"

namespace fa3 {

using namespace cute;

// Largest GMMA shared-memory swizzle atom whose width divides the tile extent.
template <class T, int kContig, bool kKMajor>
CUTE_HOST_DEVICE constexpr auto smem_atom() {
  constexpr int kElems128 = 128 / sizeof(T), kElems64 = 64 / sizeof(T);
  if constexpr (kKMajor) {
    if constexpr (kContig % kElems128 == 0) return GMMA::Layout_K_SW128_Atom<T>{};
    else if constexpr (kContig % kElems64 == 0) return GMMA::Layout_K_SW64_Atom<T>{};
    else return GMMA::Layout_K_SW32_Atom<T>{};
  } else {
    if constexpr (kContig % kElems128 == 0) return GMMA::Layout_MN_SW128_Atom<T>{};
    else if constexpr (kContig % kElems64 == 0) return GMMA::Layout_MN_SW64_Atom<T>{};
    else return GMMA::Layout_MN_SW32_Atom<T>{};
  }
}

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_, class Element_, class OutT_,
          bool kHasWL_, bool kHasWR_, bool kPingpong_, bool kIntraWG_, bool kWarpSpec_,
          bool kPersistent_ = false, bool kSoftcap_ = false, int kHeadDimV_ = kHeadDim_,
          bool kPackGQA_ = false, int kExpPoly_ = 0, bool kLazyRescale_ = false, int kClusterM_ = 1>
struct Config {
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kStages = kStages_;
  // Head dim of V and O; differs from Q/K's only for the 192 / 128 split (DeepSeek-style MLA).
  static constexpr int kHeadDimV = kHeadDimV_;
  static_assert(kHeadDimV == kHeadDim || (kHeadDim == 192 && kHeadDimV == 128), "head dims: equal, or 192 / 128");
  static constexpr bool kHasWL = kHasWL_, kHasWR = kHasWR_;
  static constexpr bool kPingpong = kPingpong_, kIntraWG = kIntraWG_, kWarpSpec = kWarpSpec_;
  static constexpr bool kPersistent = kPersistent_;  // one CTA per SM looping over tiles
  static constexpr bool kSoftcap = kSoftcap_;        // s = cap * tanh(s * scale / cap)
  // Packed GQA rows (Params::pack_sq): a switch of its own so that the unpacked kernels keep their
  // registers (the row -> query modulo in the masks made d256 causal spill).
  static constexpr bool kPackGQA = kPackGQA_;
  // Every kExpPoly-th exponential of a row on the FMA pipe (exp2_poly3); 0: all on MUFU.
  static constexpr int kExpPoly = kExpPoly_;
  using Element = Element_;
  using OutT = OutT_;
  static constexpr bool kFp8 = sizeof(Element) == 1;  // e4m3 operands with block scales
  // Lazy rescale (FlashAttention-4's conditional correction): a warp keeps its stale row maxima,
  // and skips the O rescale, while no row max of the warp grew by more than 2^kLazyLog2.  P is then
  // at most 2^kLazyLog2 (16-bit P has the range; O and l carry the same factor, so O / l and the LSE
  // are unchanged).  Saves the dv/2 multiplies per thread and key block of rescale_o (64 at d128,
  // 128 at d256) once the maxima settle.  16-bit only: FP8 P uses e4m3's whole range, and O moves
  // to each V block's scale on every block anyway.
  static constexpr int kLazyLog2 = kLazyRescale_ ? 8 : 0;
  static_assert(!(kLazyRescale_ && kFp8), "lazy rescale: 16-bit operands only");
  // Intra-warpgroup overlap: O takes the softmax rescale while the next S GEMM runs (FA3's order)
  // rather than after the PV GEMM.  Only up to 128 columns of O and with two consumer warpgroups:
  // elsewhere the rescale between the two GEMM issues keeps both accumulators live at once and
  // ptxas spills more (d256 non-causal 40 bytes against 24; d64 on 192 rows, 160 registers a
  // thread, 84 against 60), while at d256 the longer GEMMs hide the softmax anyway.
  static constexpr bool kRescaleUnderS = kHeadDimV_ <= 128 && kBlockM_ == 128;
  // K/V multicast (FA3's cluster for unmasked 16-bit head dims >= 128): the two CTAs of a cluster
  // take adjacent m blocks of one head, and each TMA-loads half of every K and V tile into both
  // CTAs' shared memory, halving K/V traffic from L2 (80 KB per 128 x 160 step at d128).  Measured
  // no faster here (L2 runs at 24-30% of its peak without it; docs/perf-notes.md session 13), so
  // off by default (cuda_jit._CLUSTER_KV).  The CTAs must walk the same key blocks in the same
  // order, so no windows (the key range then depends on the m block) and no packed GQA rows; the
  // launcher needs an even number of m blocks.  The empty barriers count both CTAs' consumer warpgroups (a stage is
  // refilled in both CTAs at once), and the loader waits for its last stages' releases before it
  // exits (the peer's consumers arrive on this CTA's barriers).
  static constexpr int kClusterM = kClusterM_;
  static_assert(kClusterM == 1 || (kClusterM == 2 && !kHasWL_ && !kHasWR_ && !kPackGQA_ && kBlockM_ == 128),
                "K/V multicast: clusters of two CTAs, unmasked, unpacked, 128-row tiles");
  using ClusterShape = Shape<Int<kClusterM>, _1, _1>;
  using TmaLoadKV = std::conditional_t<(kClusterM > 1), SM90_TMA_LOAD_MULTICAST, SM90_TMA_LOAD>;
  static_assert(!kFp8 || kBlockN % 32 == 0, "FP8: key tiles of whole k32 WGMMA steps");

  static constexpr int kMmaWG = kBlockM / 64;  // one consumer warpgroup per 64 query rows
  static_assert(kBlockM % 64 == 0 && (kMmaWG == 2 || kMmaWG == 3),
                "two or three consumer warpgroups (the pingpong token goes round them)");
  static constexpr int kMmaThreads = kMmaWG * 128;
  // A pingpong barrier joins the warpgroup waiting for the token and the one passing it.
  static constexpr int kSchedThreads = 256;
  static constexpr int kThreads = kMmaThreads + (kWarpSpec ? 128 : 0);
  // Register split after setmaxnreg: 24 for the producer, 240 for each consumer thread with two
  // consumer warpgroups (24*128 + 240*256 = 64512 <= 65536), 160 with three (24*128 + 160*384).
  // The launch gives every thread 168 registers (65536 / 384, rounded down to a multiple of 8), so the
  // pool is 168 * 384 = 64512 and 24 * 128 + 240 * 256 uses all of it: a producer at 32 leaves the
  // consumers' setmaxnreg.inc waiting forever (it hung the first K/V multicast build).
  static constexpr int kProducerRegs = 24, kConsumerRegs = kMmaWG == 2 ? 240 : 160;
  static_assert(kProducerRegs * 128 + kConsumerRegs * kMmaWG * 128 <= (65536 / ((kMmaWG + 1) * 128)) / 8 * 8 * (kMmaWG + 1) * 128,
                "setmaxnreg: producer and consumer registers must fit the launch's allocation");

  using TileQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;
  using TilePV = Shape<Int<kBlockM>, Int<kHeadDimV>, Int<kBlockN>>;
  using AtomLayout = Layout<Shape<Int<kMmaWG>, _1, _1>>;
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, TileQK>(), AtomLayout{}));
  // 16-bit: V is stored (key, d) with d contiguous, an MN-major B operand, which 16-bit WGMMA
  // supports.  FP8: V^T (d, key) with keys contiguous, K-major as 8-bit WGMMA requires.
  static constexpr GMMA::Major kMajorV = kFp8 ? GMMA::Major::K : GMMA::Major::MN;
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TilePV, GMMA::Major::K, kMajorV>(),
      AtomLayout{}));

  using SmemLayoutQ = decltype(tile_to_shape(smem_atom<Element, kHeadDim, true>(),
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(smem_atom<Element, kHeadDim, true>(),
                                             Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutVt = std::conditional_t<kFp8,
      decltype(tile_to_shape(smem_atom<Element, kBlockN, true>(),
                             Shape<Int<kHeadDimV>, Int<kBlockN>, Int<kStages>>{})),
      decltype(tile_to_shape(smem_atom<Element, kHeadDimV, false>(),
                             Shape<Int<kHeadDimV>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{}))>;

  using PipelineK = cutlass::PipelineTmaAsync<kStages>;
  using PipelineV = cutlass::PipelineTmaAsync<kStages>;

  // O leaves through shared memory and one TMA store per tile when it has the operands' 16-bit
  // type.  fp32 output and FP8 operands (O twice sQ's bytes or more) store from registers.
  static constexpr bool kTmaStoreO = !kFp8 && std::is_same_v<OutT, Element>;
  using SmemLayoutO = decltype(tile_to_shape(smem_atom<OutT, kHeadDimV, true>(),
                                             Shape<Int<kBlockM>, Int<kHeadDimV>>{}));
  static constexpr int kBytesOperands = int(cosize_v<SmemLayoutQ> + cosize_v<SmemLayoutK> + cosize_v<SmemLayoutVt>)
                                        * int(sizeof(Element));
  // Persistent grid: O is staged in a buffer of its own where shared memory allows it (up to d128
  // with two stages).  Then Q is free right after the tile's last QK GEMM, the producer loads the
  // next tile's Q (and K/V into the stages that free up) under this tile's last PV GEMM and its
  // epilogue, and the store of O runs under the next tile (+2-6% at d128 against staging O in
  // sQ, session 7).  Elsewhere O is staged in sQ, free once the tile's last QK GEMM has run: with
  // one tile per CTA there is no next tile to overlap, and the extra buffer cost the d64 192-row
  // tile registers (spills 60 -> 80 bytes).
  static constexpr bool kSeparateO = kTmaStoreO && kPersistent
      && kBytesOperands + int(cosize_v<SmemLayoutO> * sizeof(OutT)) + 1024 <= 227 * 1024;

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutVt>, 1024> v;
    cute::array_aligned<OutT, kSeparateO ? cosize_v<SmemLayoutO> : 8, kSeparateO ? 1024 : 16> o;  // kSeparateO only
    alignas(16) cutlass::arch::ClusterTransactionBarrier barrier_q;        // Q landed (TMA tx count)
    alignas(16) cutlass::arch::ClusterBarrier barrier_q_empty;             // consumers done with Q
    alignas(16) typename PipelineK::SharedStorage pipe_k;
    alignas(16) typename PipelineV::SharedStorage pipe_v;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(!kTmaStoreO || kSeparateO
                || cosize_v<SmemLayoutO> * sizeof(OutT) <= cosize_v<SmemLayoutQ> * sizeof(Element),
                "O is staged in sQ");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget of sm_90 exceeded");

  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesV = kBlockN * kHeadDimV * sizeof(Element);

  // Global tensors seen by TMA: (seq, d, head, batch) for Q/K and (d, seq, head, batch) for V
  // (16-bit: d contiguous; FP8: V^T, seq contiguous).
  using ShapeT = Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideSD = Stride<int64_t, _1, int64_t, int64_t>;
  using StrideDS = Stride<_1, int64_t, int64_t, int64_t>;
};

template <class Cfg>
auto make_tma_q(typename Cfg::Element const* p, int s, int h, int b, int64_t ss, int64_t sh, int64_t sb) {
  auto g = make_tensor(make_gmem_ptr(p), make_shape(s, int32_t(Cfg::kHeadDim), h, b),
                       make_stride(ss, _1{}, sh, sb));
  return make_tma_copy(SM90_TMA_LOAD{}, g, typename Cfg::SmemLayoutQ{},
                       Shape<Int<Cfg::kBlockM>, Int<Cfg::kHeadDim>>{}, _1{});
}
template <class Cfg>
auto make_tma_k(typename Cfg::Element const* p, int s, int h, int b, int64_t ss, int64_t sh, int64_t sb) {
  auto g = make_tensor(make_gmem_ptr(p), make_shape(s, int32_t(Cfg::kHeadDim), h, b),
                       make_stride(ss, _1{}, sh, sb));
  return make_tma_copy(typename Cfg::TmaLoadKV{}, g, take<0, 2>(typename Cfg::SmemLayoutK{}),
                       Shape<Int<Cfg::kBlockN>, Int<Cfg::kHeadDim>>{}, Int<Cfg::kClusterM>{});
}
// ss: stride between keys (16-bit) or between rows of V^T (FP8, the keys being contiguous).
template <class Cfg>
auto make_tma_v(typename Cfg::Element const* p, int s, int h, int b, int64_t ss, int64_t sh, int64_t sb) {
  auto stride = [&] {
    if constexpr (Cfg::kFp8) return make_stride(ss, _1{}, sh, sb);
    else return make_stride(_1{}, ss, sh, sb);
  }();
  auto g = make_tensor(make_gmem_ptr(p), make_shape(int32_t(Cfg::kHeadDimV), s, h, b), stride);
  return make_tma_copy(typename Cfg::TmaLoadKV{}, g, take<0, 2>(typename Cfg::SmemLayoutVt{}),
                       Shape<Int<Cfg::kHeadDimV>, Int<Cfg::kBlockN>>{}, Int<Cfg::kClusterM>{});
}

// O [seq, dv, head, batch] for the TMA-store epilogue (kTmaStoreO).
template <class Cfg>
auto make_tma_o(typename Cfg::OutT* p, int s, int h, int b, int64_t ss, int64_t sh, int64_t sb) {
  auto g = make_tensor(make_gmem_ptr(p), make_shape(s, int32_t(Cfg::kHeadDimV), h, b),
                       make_stride(ss, _1{}, sh, sb));
  return make_tma_copy(SM90_TMA_STORE{}, g, typename Cfg::SmemLayoutO{},
                       Shape<Int<Cfg::kBlockM>, Int<Cfg::kHeadDimV>>{}, _1{});
}

template <class Cfg>
struct Params {
  using TmaQ = decltype(make_tma_q<Cfg>(nullptr, 1, 1, 1, 0, 0, 0));
  using TmaK = decltype(make_tma_k<Cfg>(nullptr, 1, 1, 1, 0, 0, 0));
  using TmaV = decltype(make_tma_v<Cfg>(nullptr, 1, 1, 1, 0, 0, 0));
  using TmaO = decltype(make_tma_o<Cfg>(nullptr, 1, 1, 1, 0, 0, 0));
  TmaQ tma_q;
  TmaK tma_k;
  TmaV tma_v;
  TmaO tma_o;  // used by kTmaStoreO instantiations only
  // Default initialisers: the launcher brace-initialises the TMA members only.
  typename Cfg::OutT* out = nullptr;
  float* lse = nullptr;
  int64_t o_sb = 0, o_sh = 0, o_ss = 0;  // out strides (elements); lse is [B, Hq, Sq] contiguous
  int b = 0, hq = 0, hk = 0, sq = 0, sk = 0;
  int group = 1;         // hq / hk
  int gqa_div = 1;       // 1: kv head = h / group, 0: h % hk
  int off = 0;           // 0 (top-left) or sk - sq (bottom-right)
  int wl = 0, wr = 0;    // window sizes when kHasWL / kHasWR
  int num_m_blocks = 0;
  int reverse_m = 0;     // > 0: m blocks last-first (longest first under causal masks), in groups
                         // of reverse_m (batch, head) pairs whose K/V fit in L2 together
  float scale_log2 = 0;  // scale * log2(e) (with softcap: cap * log2(e), the tanh's multiplier)
  float softcap_pre2 = 0;  // kSoftcap: 2 * log2(e) * scale / cap (apply_softcap)
  int sk_v = 0;            // keys in V's global extent (FP8: sk padded to the permutation's 32)
  // Packed GQA (kPackGQA, small seqlen_q): the launcher views the query heads of each kv group as
  // one head of group * sq rows (row r = query r % pack_sq of the group's head r / pack_sq), so a
  // tile fills with several heads' queries and reads their shared K/V once.  Then hq == hk here,
  // and the masks take the query position as row % pack_sq.
  int pack_sq = 0;
  // FP8 block scales: q_scale [B, Hq, cdiv(sq, kBlockM)], k/v_scale [B, Hk, cdiv(sk, kBlockN)].
  float const* q_scale = nullptr;
  float const* k_scale = nullptr;
  float const* v_scale = nullptr;
  int64_t qs_sb = 0, qs_sh = 0, ks_sb = 0, ks_sh = 0;  // their batch/head strides (elements)
};

// Query positions [lo, hi] held by the rows of m block m_block.  Packed GQA: a block whose rows
// wrap from one head to the next holds every position.
template <class Cfg>
CUTE_DEVICE void query_range(Params<Cfg> const& p, int m_block, int& lo, int& hi) {
  lo = m_block * Cfg::kBlockM;
  hi = min(p.sq, lo + Cfg::kBlockM) - 1;
  if constexpr (Cfg::kPackGQA) {
    if (lo / p.pack_sq != hi / p.pack_sq) { lo = 0; hi = p.pack_sq - 1; }
    else { lo %= p.pack_sq; hi %= p.pack_sq; }
  }
}

// Key-block range [n_min, n_max) that holds any kept key for the block's query rows.
template <class Cfg>
CUTE_DEVICE void block_range(Params<Cfg> const& p, int m_block, int& n_min, int& n_max) {
  constexpr int BN = Cfg::kBlockN;
  int row_lo, row_hi;
  query_range<Cfg>(p, m_block, row_lo, row_hi);
  n_min = 0;
  n_max = (p.sk + BN - 1) / BN;
  if constexpr (Cfg::kHasWR) {
    int const x = row_hi + p.off + p.wr + 1;  // one past the last kept column of the last row
    n_max = x <= 0 ? 0 : min(n_max, (x + BN - 1) / BN);
  }
  if constexpr (Cfg::kHasWL) {
    int const y = row_lo + p.off - p.wl;      // first kept column of the first row
    n_min = y <= 0 ? 0 : y / BN;
  }
}

// Does key block n hold any masked entry for the tile's rows?  Blocks strictly inside run mask-free.
template <class Cfg>
CUTE_DEVICE bool block_needs_mask(Params<Cfg> const& p, int m_block, int n) {
  constexpr int BN = Cfg::kBlockN;
  int row_lo, row_hi;
  query_range<Cfg>(p, m_block, row_lo, row_hi);
  bool need = (n + 1) * BN > p.sk;
  if constexpr (Cfg::kHasWR) need |= (n + 1) * BN - 1 > row_lo + p.off + p.wr;
  if constexpr (Cfg::kHasWL) need |= n * BN < row_hi + p.off - p.wl;
  return need;
}

// Named barriers (ids above CUTLASS' reserved ones): kBarSchedWG0 + wg for the pingpong token,
// kBarEpilogue for the consumer warpgroups around the TMA-store epilogue.
enum : uint32_t { kBarSchedWG0 = 1, kBarEpilogue = 4 };

// log2(448): FP8 P is produced as 448 * exp2(s - max), 448 being e4m3's largest finite value.
constexpr float kLog2Fp8Max = 8.807354922057604f;

struct TileCoord {
  int m_block, head, batch;
};

// Tile t of the (m block, head, batch) grid.  reverse_m = G > 0 (causal): (batch, head) pairs are
// taken in groups of G (the host picks a divisor of B*Hq); inside a group the m index is the
// slower one and runs from the last block down, so the longest tiles start first and the short
// ones fill the tail, while the CTAs running at once touch the K/V of only G heads, which the
// host sizes to fit in L2 (one group spanning every head made short causal sequences re-read K/V
// from HBM for every m block).
// reverse_m = 0: m is the fastest index, so consecutive tiles share one head's K/V in L2.
// (P: Params, or any struct with its num_m_blocks, hq, b and reverse_m: tests/cuda_host checks
// the schedule on the host.)
template <class P>
CUTE_HOST_DEVICE TileCoord decode_tile(P const& p, int t) {
  if (p.reverse_m > 0) {
    int const per_group = p.reverse_m * p.num_m_blocks;
    int const g = t / per_group;
    int const r = t - g * per_group;
    int const hb = g * p.reverse_m + r % p.reverse_m;
    return {p.num_m_blocks - 1 - r / p.reverse_m, hb % p.hq, hb / p.hq};
  }
  int const r = t / p.num_m_blocks;
  return {t % p.num_m_blocks, r % p.hq, r / p.hq};
}

// What tile_of returns besides a tile: any value >= num_tiles means past this CTA's last tile;
// kSkipTile, the missing half of a pair.
enum : int { kSkipTile = -1, kNoTile = INT_MAX };

// Units of work on the persistent grid: tiles, or with longest-first groups (causal) pairs of one
// head's tiles (an odd middle block is a pair alone).  The launcher starts min(units, SMs) CTAs.
template <class P>
CUTE_HOST_DEVICE int64_t schedule_units(P const& p) {
  int64_t const heads = int64_t(p.hq) * p.b;
  return (p.reverse_m > 0 ? int64_t((p.num_m_blocks + 1) / 2) : int64_t(p.num_m_blocks)) * heads;
}

// The k-th tile (k = 0, 1, ...) that CTA cta of ncta runs on the persistent grid, as an index for
// decode_tile.  Without longest-first groups: cta, +ncta, ... (unmasked tiles all have one
// length, so the CTAs stay in step).  With longest-first groups (causal): the CTAs take pairs of
// tiles of one head, the j-th longest and the j-th shortest of its m blocks, so every pair costs
// about the same number of key blocks.  The CTAs then stay in step round after round, and the
// pairs in flight are a window of the longest-first order, whose groups of heads share K/V in L2.
// (A static round robin over single causal tiles let the CTAs drift apart by whole rounds: L2 hit
// rate 58% against 93% with one CTA per tile.)  Pair u of a group of G heads is head u % G at
// j = u / G; with an odd number of m blocks the middle one is a pair alone (its second half skipped).
template <class P>
CUTE_HOST_DEVICE int tile_of(P const& p, int k, int cta, int ncta) {
  if (p.reverse_m == 0) return cta + k * ncta;
  int const n = p.num_m_blocks, G = p.reverse_m, pairs = (n + 1) / 2;
  int const u = cta + (k >> 1) * ncta;
  if (u >= schedule_units(p)) return kNoTile;  // (the loop stops at t >= num_tiles)
  int const g = u / (G * pairs);
  int const r = u - g * (G * pairs);
  int const j = r / G;
  int const rank = (k & 1) ? n - 1 - j : j;  // 0 = longest
  if ((k & 1) && rank == j) return kSkipTile;
  return (g * n + rank) * G + (r - j * G);
}

// The tile loop: `for (k = 0, t = first_tile; t < num_tiles; t = next_tile(t, ++k))`.  One CTA per
// tile keeps the loop of the kernels before the persistent pairs (t = blockIdx.x; t += num_tiles):
// a loop the compiler could prove runs once compiled differently and measured 8-12% slower at d64
// causal 8k-16k (session 8, device runs 1-2).
template <class Cfg>
CUTE_DEVICE int first_tile(Params<Cfg> const& p) {
  if constexpr (Cfg::kPersistent) return tile_of(p, 0, blockIdx.x, gridDim.x);
  else return blockIdx.x;
}
template <class Cfg>
CUTE_DEVICE int next_tile(Params<Cfg> const& p, int t, int k, int num_tiles) {
  if constexpr (Cfg::kPersistent) return tile_of(p, k, blockIdx.x, gridDim.x);
  else return t + num_tiles;
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
fwd_kernel(CUTE_GRID_CONSTANT Params<Cfg> const p) {
  using Element = typename Cfg::Element;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, D = Cfg::kHeadDim, DV = Cfg::kHeadDimV;
  using SS = typename Cfg::SharedStorage;
  using PipelineK = typename Cfg::PipelineK;
  using PipelineV = typename Cfg::PipelineV;
  using PipeState = cutlass::PipelineState<Cfg::kStages>;

  extern __shared__ __align__(1024) char smem_raw[];
  SS& ss = *reinterpret_cast<SS*>(smem_raw);

  // Persistent: a CTA loops over the tiles tile_of names; otherwise one tile per CTA.
  int const num_tiles = p.num_m_blocks * p.hq * p.b;

  int const warp_group = threadIdx.x / 128;
  bool const is_producer_wg = Cfg::kWarpSpec && warp_group == 0;
  int const mma_tid = threadIdx.x - (Cfg::kWarpSpec ? 128 : 0);  // 0..255 on consumers
  // Thread that issues TMA: the producer warpgroup's first thread, or consumer thread 0.
  bool const is_loader = threadIdx.x == 0;

  if (threadIdx.x == 0) {
    prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
    prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    if constexpr (Cfg::kTmaStoreO) prefetch_tma_descriptor(p.tma_o.get_tma_descriptor());
    ss.barrier_q.init(1);
    ss.barrier_q_empty.init(Cfg::kMmaThreads);
  }

  typename PipelineK::Params pk;
  pk.transaction_bytes = Cfg::kBytesK;
  pk.role = Cfg::kWarpSpec ? (is_producer_wg ? PipelineK::ThreadCategory::Producer
                                              : PipelineK::ThreadCategory::Consumer)
                           : PipelineK::ThreadCategory::ProducerConsumer;
  pk.is_leader = is_loader;
  pk.num_consumers = Cfg::kMmaThreads;
  pk.initializing_warp = 0;
  // (K/V multicast: each CTA's full barrier expects the whole tile, half of it from the peer.)
  PipelineK pipe_k(ss.pipe_k, pk, typename Cfg::ClusterShape{});
  typename PipelineV::Params pv = pk;
  pv.transaction_bytes = Cfg::kBytesV;
  PipelineV pipe_v(ss.pipe_v, pv, typename Cfg::ClusterShape{});
  // Barrier initialisation must be visible to every thread (and the async proxy) before use; with
  // K/V multicast also to the peer CTA, whose loads and releases land on this CTA's barriers.
  cutlass::arch::fence_barrier_init();
  if constexpr (Cfg::kClusterM > 1) cute::cluster_sync();
  else __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Cfg::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Cfg::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Cfg::SmemLayoutVt{});
  Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.sq, int32_t(D), p.hq, p.b));
  Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.sk, int32_t(D), p.hk, p.b));
  Tensor mVt = p.tma_v.get_tma_tensor(make_shape(int32_t(DV), p.sk_v, p.hk, p.b));

  // Producer-side state, persistent across tiles.
  PipeState wk = cutlass::make_producer_start_state<PipelineK>();
  PipeState wv = cutlass::make_producer_start_state<PipelineV>();
  int q_empty_phase = 0;
  bool q_loaded = false;  // a previous tile's Q is (or was) in smem: wait until consumers free it

  // Loads for one tile, as closures over its global tiles.
  auto load_q = [&](TileCoord const& tc) {
    if (q_loaded) { ss.barrier_q_empty.wait(q_empty_phase); q_empty_phase ^= 1; }
    q_loaded = true;
    Tensor gQ = local_tile(mQ(_, _, tc.head, tc.batch), Shape<Int<BM>, Int<D>>{}, make_coord(tc.m_block, _0{}));
    auto tq = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    ss.barrier_q.arrive_and_expect_tx(Cfg::kBytesQ);
    copy(p.tma_q.with(reinterpret_cast<uint64_t&>(ss.barrier_q), 0), get<0>(tq), get<1>(tq));
  };
  // K/V multicast: this CTA's slice of each tile (by its rank in the cluster) goes to both CTAs.
  auto kv_partition = [&](auto const& tma, auto const& s, auto const& g) {
    if constexpr (Cfg::kClusterM > 1) {
      return tma_partition(tma, cute::block_rank_in_cluster(), Layout<Int<Cfg::kClusterM>>{},
                           group_modes<0, 2>(s), group_modes<0, 2>(g));
    } else {
      return tma_partition(tma, _0{}, Layout<_1>{}, group_modes<0, 2>(s), group_modes<0, 2>(g));
    }
  };
  constexpr uint16_t kMcastMask = uint16_t((1u << Cfg::kClusterM) - 1);
  auto load_k = [&](TileCoord const& tc, int kv_head, int n) {
    Tensor gK = local_tile(mK(_, _, kv_head, tc.batch), Shape<Int<BN>, Int<D>>{}, make_coord(_, _0{}));
    auto tk = kv_partition(p.tma_k, sK, gK);
    pipe_k.producer_acquire(wk);
    copy(p.tma_k.with(*pipe_k.producer_get_barrier(wk), kMcastMask), get<0>(tk)(_, n), get<1>(tk)(_, wk.index()));
    ++wk;
  };
  auto load_v = [&](TileCoord const& tc, int kv_head, int n) {
    Tensor gVt = local_tile(mVt(_, _, kv_head, tc.batch), Shape<Int<DV>, Int<BN>>{}, make_coord(_0{}, _));
    auto tv = kv_partition(p.tma_v, sVt, gVt);
    pipe_v.producer_acquire(wv);
    copy(p.tma_v.with(*pipe_v.producer_get_barrier(wv), kMcastMask), get<0>(tv)(_, n), get<1>(tv)(_, wv.index()));
    ++wv;
  };
  auto kv_head_of = [&](int head) { return p.gqa_div ? head / p.group : head % p.hk; };

  if (is_producer_wg) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    if (is_loader) {
      for (int k = 0, t = first_tile<Cfg>(p); t < num_tiles; t = next_tile<Cfg>(p, t, ++k, num_tiles)) {
        if constexpr (Cfg::kPersistent) {
          if (t == kSkipTile) continue;
        }
        TileCoord const tc = decode_tile(p, t);
        int n_min, n_max;
        block_range<Cfg>(p, tc.m_block, n_min, n_max);
        if (n_max <= n_min) continue;
        int const kvh = kv_head_of(tc.head);
        load_q(tc);
        // Order matches consumption: with intra-WG overlap K_{j+1} is needed before V_j.
        load_k(tc, kvh, n_max - 1);
        for (int n = n_max - 1; n > n_min; --n) {
          if constexpr (Cfg::kIntraWG) { load_k(tc, kvh, n - 1); load_v(tc, kvh, n); }
          else { load_v(tc, kvh, n); load_k(tc, kvh, n - 1); }
        }
        load_v(tc, kvh, n_min);
      }
      // K/V multicast: the peer's consumers release their stages on this CTA's empty barriers too;
      // stay until every stage is released, so that no arrival lands after this CTA exited.
      if constexpr (Cfg::kClusterM > 1) {
        pipe_k.producer_tail(wk);
        pipe_v.producer_tail(wv);
      }
    }
    return;
  }

  // ---------------------------------------------------------------- consumers
  if constexpr (Cfg::kWarpSpec) { cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>(); }
  int const wg = mma_tid / 128;  // consumer warpgroup 0 or 1

  typename Cfg::TiledMmaQK mma_qk;
  typename Cfg::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(mma_tid);
  auto thr_pv = mma_pv.get_thread_slice(mma_tid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
  Tensor tSrK = thr_qk.partition_fragment_B(sK);
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);
  Tensor cS = make_identity_tensor(Shape<Int<BM>, Int<BN>>{});
  Tensor tScS = thr_qk.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  Tensor cO = make_identity_tensor(Shape<Int<BM>, Int<DV>>{});
  Tensor tOcO = thr_pv.partition_C(cO);
  Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));

  PipeState rk, rv;  // consumer read states (index 0, phase 0), persistent across tiles
  int q_phase = 0;

  // A consumed K/V stage goes back to the producer(s).  K/V multicast: each consumer warpgroup
  // arrives once on the stage's empty barrier in every CTA of the cluster (the count the pipeline
  // set up), from lane 0 of its warps 0 and 1 (one warp's wgmma wait covers the warpgroup's GEMM).
  // CUTLASS' consumer_release does the same from per-thread target and predicate registers, which
  // stayed live across the whole loop and spilled (80 bytes at d128).
  auto release_stage = [&](auto& pipe, auto& storage, PipeState const& st) {
    if constexpr (Cfg::kClusterM > 1) {
      int const t = mma_tid % 128;
      storage.empty_barrier_[st.index()].arrive(uint32_t(t / 32), t % 32 == 0 && t < 32 * Cfg::kClusterM);
    } else {
      pipe.consumer_release(st);
    }
  };
  auto release_k = [&](PipeState const& st) { release_stage(pipe_k, ss.pipe_k, st); };
  auto release_v = [&](PipeState const& st) { release_stage(pipe_v, ss.pipe_v, st); };

  auto sched_sync = [&]() {
    if constexpr (Cfg::kPingpong) cutlass::arch::NamedBarrier::sync(Cfg::kSchedThreads, kBarSchedWG0 + wg);
  };
  auto sched_arrive = [&]() {
    if constexpr (Cfg::kPingpong) {
      cutlass::arch::NamedBarrier::arrive(Cfg::kSchedThreads, kBarSchedWG0 + (wg + 1) % Cfg::kMmaWG);
    }
  };

  for (int k = 0, t = first_tile<Cfg>(p); t < num_tiles; t = next_tile<Cfg>(p, t, ++k, num_tiles)) {
    if constexpr (Cfg::kPersistent) {
      if (t == kSkipTile) continue;
    }
    TileCoord const tc = decode_tile(p, t);
    int const m_block = tc.m_block;
    int n_min, n_max;
    block_range<Cfg>(p, m_block, n_min, n_max);
    bool const empty_tile = n_max <= n_min;
    int const kvh = kv_head_of(tc.head);

    // Without a producer warpgroup, thread 0 keeps loads kStages-1 blocks ahead of compute.  K and
    // V run ahead separately: refilling a V stage must only wait for a V block this thread's own
    // warpgroup has already released, else it would deadlock on itself.
    int next_k = n_max - 1, next_v = n_max - 1;  // next key blocks to load (descending)
    auto inline_load_k = [&](int upto) {
      if constexpr (!Cfg::kWarpSpec) {
        if (is_loader) for (; next_k >= max(upto, n_min); --next_k) load_k(tc, kvh, next_k);
      }
    };
    auto inline_load_v = [&](int upto) {
      if constexpr (!Cfg::kWarpSpec) {
        if (is_loader) for (; next_v >= max(upto, n_min); --next_v) load_v(tc, kvh, next_v);
      }
    };
    if constexpr (!Cfg::kWarpSpec) {
      if (!empty_tile) {
        if (is_loader) load_q(tc);
        inline_load_k(n_max - Cfg::kStages);
        inline_load_v(n_max - Cfg::kStages);
      }
    }

    Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<BM>, Int<DV>>{});
    Tensor tOrO_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    constexpr int kRows = decltype(size<0>(tOrO_rc))::value;
    OnlineSoftmax<kRows, Cfg::kExpPoly, Cfg::kLazyLog2> softmax(Cfg::kFp8 ? kLog2Fp8Max : 0.f);
    clear(tOrO);

    // Multiplier of block n's raw scores into the exp2 domain; FP8 adds the Q tile's and the K
    // block's scales.  The scale tensors are tiny and stay in L1/L2.
    float const* ks_bh = nullptr;
    float const* vs_bh = nullptr;
    float q_sc = p.scale_log2;
    if constexpr (Cfg::kFp8) {
      if (!empty_tile) {
        q_sc *= __ldg(p.q_scale + tc.batch * p.qs_sb + tc.head * p.qs_sh + m_block);
        ks_bh = p.k_scale + tc.batch * p.ks_sb + kvh * p.ks_sh;
        vs_bh = p.v_scale + tc.batch * p.ks_sb + kvh * p.ks_sh;
      }
    }
    auto block_sc = [&](int n) {
      if constexpr (Cfg::kFp8) return q_sc * __ldg(ks_bh + n);
      else return q_sc;
    };
    // FP8: O accumulates P V8 in units of V's block scale; when the next block has another scale
    // the accumulator moves to it inside the softmax rescale (one multiply per row, no extra pass).
    float v_unit = 1.f;
    auto v_units_to = [&](int n) {
      if constexpr (Cfg::kFp8) {
        float const vs = __ldg(vs_bh + n);
        float const f = v_unit / vs;
        v_unit = vs;
        return f;
      } else {
        return 1.f;
      }
    };

    // Raw scores of block n -> softcapped, masked scores.
    auto prep = [&](auto& tSrS, int n) {
      if constexpr (Cfg::kSoftcap) apply_softcap(tSrS, p.softcap_pre2);
      if (block_needs_mask<Cfg>(p, m_block, n)) {
        Tensor s_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
        apply_mask<Cfg::kHasWL, Cfg::kHasWR, Cfg::kPackGQA>(s_rc, tScS_rc, m_block * BM, n * BN, p.sk, p.off,
                                                            p.wl, p.wr, p.pack_sq);
      }
    };
    // need: the softmax step moved a row max of this warp (always true unless kLazyLog2; warp-uniform,
    // so the skip never diverges).  FP8 moves O to the next V block's scale on every call.
    auto rescale_o = [&](float const (&alpha)[kRows], float f, bool need) {
      if (Cfg::kLazyLog2 && !need) return;
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float const a = alpha[r] * f;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(tOrO_rc); ++c) tOrO_rc(r, c) *= a;
      }
    };
    // P as the A operand of the PV GEMM.  16-bit: the accumulator's registers reinterpreted
    // (acc_as_operand_a); FP8: the k32 8-bit operand layout, filled by acc_to_fp8_operand_a.
    auto make_operand_p = [&](auto const& tSrS) {
      if constexpr (Cfg::kFp8) return make_tensor<Element>(shape(thr_pv.partition_A(cS)));
      else return make_tensor<Element>(acc_as_operand_a(tSrS.layout()));
    };
    auto to_operand_p = [&](auto const& tSrS, auto& tOrP) {
      if constexpr (Cfg::kFp8) acc_to_fp8_operand_a(tSrS, tOrP);
      else convert_into(tSrS, tOrP);  // same linear register order as tSrS
    };

    if (!empty_tile) {
      // The first consumer warpgroup holds the token first.
      if constexpr (Cfg::kPingpong) {
        if (wg == 0) cutlass::arch::NamedBarrier::arrive(Cfg::kSchedThreads, kBarSchedWG0 + 0);
      }
      ss.barrier_q.wait(q_phase);
      q_phase ^= 1;

      if constexpr (Cfg::kIntraWG) {
        // Prologue: S for the first (highest) key block.
        Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<BM>, Int<BN>>{});
        pipe_k.consumer_wait(rk);
        sched_sync();
        wg_gemm<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, rk.index()), tSrS);
        sched_arrive();
        warpgroup_wait<0>();
        release_k(rk);
        ++rk;
        prep(tSrS, n_max - 1);
        float alpha[kRows];
        bool moved;  // this block's softmax moved a row max of the warp: O needs alpha
        {
          Tensor s_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
          moved = softmax.template step<true>(s_rc, alpha, block_sc(n_max - 1));
        }
        if constexpr (!Cfg::kRescaleUnderS) v_units_to(n_max - 1);  // O is still zero
        // P lives in registers and feeds the PV GEMM as its A operand.
        Tensor tOrP = make_operand_p(tSrS);
        to_operand_p(tSrS, tOrP);
        for (int n = n_max - 2; n >= n_min; --n) {
          inline_load_k(n - Cfg::kStages + 1);
          inline_load_v(n - Cfg::kStages + 2);
          Tensor tSrS2 = partition_fragment_C(mma_qk, Shape<Int<BM>, Int<BN>>{});
          pipe_k.consumer_wait(rk);
          sched_sync();
          wg_gemm<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, rk.index()), tSrS2);
          // O takes block n+1's softmax rescale while S_n runs on the tensor cores (FA3's order):
          // the multiplies leave the stretch between two GEMM issues that the pingpong has to
          // hide.  The PV GEMM of block n+2 finished last iteration (warpgroup_wait<0>).
          if constexpr (Cfg::kRescaleUnderS) rescale_o(alpha, v_units_to(n + 1), moved);
          pipe_v.consumer_wait(rv);
          wg_gemm<false, -1>(mma_pv, tOrP, tOrV(_, _, _, rv.index()), tOrO);
          sched_arrive();
          warpgroup_wait<1>();  // S_{j+1} done; P_j V_j may still run under the softmax below
          release_k(rk);
          ++rk;
          prep(tSrS2, n);
          {
            Tensor s_rc = make_tensor(tSrS2.data(), acc_rowcol(tSrS2.layout()));
            moved = softmax.template step<false>(s_rc, alpha, block_sc(n));
          }
          warpgroup_wait<0>();
          release_v(rv);
          ++rv;
          if constexpr (!Cfg::kRescaleUnderS) rescale_o(alpha, v_units_to(n), moved);
          to_operand_p(tSrS2, tOrP);  // safe: the PV GEMM reading tOrP has completed
        }
        if constexpr (Cfg::kRescaleUnderS) rescale_o(alpha, v_units_to(n_min), moved);
        pipe_v.consumer_wait(rv);
        wg_gemm<false, 0>(mma_pv, tOrP, tOrV(_, _, _, rv.index()), tOrO);
        release_v(rv);
        ++rv;
      } else {
        for (int n = n_max - 1; n >= n_min; --n) {
          inline_load_k(n - Cfg::kStages + 1);
          inline_load_v(n - Cfg::kStages + 1);
          Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<BM>, Int<BN>>{});
          pipe_k.consumer_wait(rk);
          sched_sync();
          wg_gemm<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, rk.index()), tSrS);
          sched_arrive();
          warpgroup_wait<0>();
          release_k(rk);
          ++rk;
          prep(tSrS, n);
          float alpha[kRows];
          Tensor s_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
          bool const moved = n == n_max - 1 ? softmax.template step<true>(s_rc, alpha, block_sc(n))
                                            : softmax.template step<false>(s_rc, alpha, block_sc(n));
          rescale_o(alpha, v_units_to(n), moved);
          Tensor tOrP = make_operand_p(tSrS);
          to_operand_p(tSrS, tOrP);
          pipe_v.consumer_wait(rv);
          wg_gemm<false, 0>(mma_pv, tOrP, tOrV(_, _, _, rv.index()), tOrO);
          release_v(rv);
          ++rv;
        }
      }
      // Every GEMM reading sQ has completed: the producer may load the next tile's Q (where O is
      // staged in sQ, once O has left it).
      if constexpr (!Cfg::kTmaStoreO || Cfg::kSeparateO) ss.barrier_q_empty.arrive();
      // Take back the token the other warpgroup passed after its last GEMMs, leaving both named
      // barriers balanced at the end of every tile.
      if constexpr (Cfg::kPingpong) {
        if (wg == 0) cutlass::arch::NamedBarrier::sync(Cfg::kSchedThreads, kBarSchedWG0 + 0);
      }
    }

    // ---------------------------------------------------------------- epilogue
    // O /= l.  Each thread owns pairs of adjacent columns of kRows rows.  kTmaStoreO: staged in sQ
    // and written by one TMA store per tile (full lines, rows past sq clipped by the TMA unit);
    // otherwise, and for empty tiles (whose Q was never loaded: in a persistent CTA the producer
    // may be filling sQ for the next tile), stored straight from registers.  LSE by the first
    // lane of each quad.  Empty tiles write O = 0, LSE = -inf.
    float inv[kRows], lse[kRows];
    softmax.finalize(inv, lse);
    if constexpr (Cfg::kFp8) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) inv[r] *= v_unit;  // O's units back to values
    }
    using OutT = typename Cfg::OutT;
    auto o_pair = [&](int r, int c) {
      cutlass::Array<OutT, 2> v2;
      v2[0] = OutT(tOrO_rc(r, c) * inv[r]);
      v2[1] = OutT(tOrO_rc(r, c + 1) * inv[r]);
      return v2;
    };
    float* lse_bh = p.lse + (int64_t(tc.batch) * p.hq + tc.head) * p.sq;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      int const row = m_block * BM + get<0>(tOcO_rc(r, 0));
      if (row < p.sq && mma_tid % 4 == 0) lse_bh[row] = lse[r];
    }
    bool stored = false;
    if constexpr (Cfg::kTmaStoreO) {
      if (!empty_tile) {
        if constexpr (Cfg::kSeparateO) {
          // The previous tile's store must have read sO out before it is overwritten.
          if (mma_tid == 0) tma_store_wait<0>();
          cutlass::arch::NamedBarrier::sync(Cfg::kMmaThreads, kBarEpilogue);
        } else if constexpr (Cfg::kHeadDimV != Cfg::kHeadDim) {
          // O's smem layout differs from Q's: wait until neither warpgroup's GEMMs read sQ.
          cutlass::arch::NamedBarrier::sync(Cfg::kMmaThreads, kBarEpilogue);
        }  // (same layout: each warpgroup overwrites only the Q rows its own GEMMs read)
        OutT* o_base = Cfg::kSeparateO ? ss.o.data() : reinterpret_cast<OutT*>(ss.q.data());
        Tensor sO = make_tensor(make_smem_ptr(o_base), typename Cfg::SmemLayoutO{});
        Tensor tOsO = thr_pv.partition_C(sO);
        Tensor tOsO_rc = make_tensor(tOsO.data(), acc_rowcol(tOsO.layout()));
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
          CUTE_UNROLL
          for (int c = 0; c < size<1>(tOsO_rc); c += 2) {
            // a column pair stays inside one 16-byte chunk of the swizzled row
            *reinterpret_cast<cutlass::Array<OutT, 2>*>(&tOsO_rc(r, c)) = o_pair(r, c);
          }
        }
        cutlass::arch::fence_view_async_shared();  // generic-proxy writes -> the TMA unit
        cutlass::arch::NamedBarrier::sync(Cfg::kMmaThreads, kBarEpilogue);
        if (mma_tid == 0) {
          Tensor mO = p.tma_o.get_tma_tensor(make_shape(p.sq, int32_t(DV), p.hq, p.b));
          Tensor gO = local_tile(mO(_, _, tc.head, tc.batch), Shape<Int<BM>, Int<DV>>{}, make_coord(m_block, _0{}));
          auto to = tma_partition(p.tma_o, _0{}, Layout<_1>{}, group_modes<0, 2>(sO), group_modes<0, 2>(gO));
          copy(p.tma_o, get<1>(to), get<0>(to));  // tma_partition gives (gmem, smem): smem -> gmem
          tma_store_arrive();
          // Staged in sQ: sO read out before the next tile's Q may land there.  A buffer of its
          // own is waited for before the next tile writes it, and before the CTA exits.
          if constexpr (!Cfg::kSeparateO) tma_store_wait<0>();
        }
        if constexpr (!Cfg::kSeparateO) ss.barrier_q_empty.arrive();
        stored = true;
      }
    }
    // Only window / causal tiles can be empty: without masks the direct path is not compiled
    // next to the TMA store.
    constexpr bool kDirectO = !Cfg::kTmaStoreO || Cfg::kHasWL || Cfg::kHasWR;
    if (kDirectO && !stored) {
      OutT* out_bh = p.out + tc.batch * p.o_sb + tc.head * p.o_sh;
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        int const row = m_block * BM + get<0>(tOcO_rc(r, 0));
        if (row < p.sq) {
          OutT* orow = out_bh + row * p.o_ss;
          CUTE_UNROLL
          for (int c = 0; c < size<1>(tOcO_rc); c += 2) {
            *reinterpret_cast<cutlass::Array<OutT, 2>*>(orow + get<1>(tOcO_rc(r, c))) = o_pair(r, c);
          }
        }
      }
    }
  }
  // The last TMA store of O reads shared memory, which must outlive it.
  if constexpr (Cfg::kSeparateO) { if (mma_tid == 0) tma_store_wait<0>(); }
}

}  // namespace fa3
