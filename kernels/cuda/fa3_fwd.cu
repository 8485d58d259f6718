// One forward instantiation per compile: codegen/cuda_jit.py prepends a preamble of #defines
// (FA3_HDIM, FA3_DTYPE, ...) rendered from the AttentionSpec and tile config, then nvcc builds a
// shared library whose only export is a plain C launcher (no PyTorch headers: fast to compile).
#include <cstdint>
#include <cuda_runtime.h>

#include "fa3_fwd_kernel.cuh"

#ifndef FA3_HDIM
#define FA3_HDIM 128
#endif
#ifndef FA3_HDIM_V
#define FA3_HDIM_V FA3_HDIM  // V / O head dim: FA3_HDIM, or 128 with FA3_HDIM 192
#endif
#ifndef FA3_DTYPE_BF16
#define FA3_DTYPE_BF16 0  // 0: fp16, 1: bf16
#endif
#ifndef FA3_OUT_DTYPE
#define FA3_OUT_DTYPE 0   // 0: same as input, 1: fp32
#endif
#ifndef FA3_BLOCK_M
#define FA3_BLOCK_M 128
#endif
#ifndef FA3_BLOCK_N
#define FA3_BLOCK_N 128
#endif
#ifndef FA3_STAGES
#define FA3_STAGES 2
#endif
#ifndef FA3_HAS_WL
#define FA3_HAS_WL 0
#endif
#ifndef FA3_HAS_WR
#define FA3_HAS_WR 0
#endif
#ifndef FA3_PINGPONG
#define FA3_PINGPONG 1
#endif
#ifndef FA3_INTRA_WG
#define FA3_INTRA_WG 1
#endif
#ifndef FA3_WARP_SPEC
#define FA3_WARP_SPEC 1
#endif
#ifndef FA3_PERSISTENT
#define FA3_PERSISTENT 0
#endif
#ifndef FA3_FP8
#define FA3_FP8 0         // 1: e4m3 Q/K/V^T with block scales; FA3_DTYPE_BF16 then picks the output
#endif
#ifndef FA3_PACK_GQA
#define FA3_PACK_GQA 0    // 1: launched with pack_sq > 0 (GQA query heads packed into the rows)
#endif
#ifndef FA3_SOFTCAP
#define FA3_SOFTCAP 0
#endif
#ifndef FA3_EXP_POLY
#define FA3_EXP_POLY 0    // n > 0: every n-th exponential of a row on the FMA pipe (exp2_poly3)
#endif
#ifndef FA3_LAZY_RESCALE
#define FA3_LAZY_RESCALE 0  // 1: O is rescaled only when a row max of the warp grew by more than 2^8
#endif
#ifndef FA3_CLUSTER_M
#define FA3_CLUSTER_M 1     // 2: clusters of two CTAs on adjacent m blocks, K/V multicast to both
#endif

namespace {

using Element16 = std::conditional_t<FA3_DTYPE_BF16, cutlass::bfloat16_t, cutlass::half_t>;
using Element = std::conditional_t<FA3_FP8, cutlass::float_e4m3_t, Element16>;
using OutT = std::conditional_t<FA3_OUT_DTYPE == 1, float, Element16>;
using Cfg = fa3::Config<FA3_HDIM, FA3_BLOCK_M, FA3_BLOCK_N, FA3_STAGES, Element, OutT,
                        bool(FA3_HAS_WL), bool(FA3_HAS_WR), bool(FA3_PINGPONG), bool(FA3_INTRA_WG),
                        bool(FA3_WARP_SPEC), bool(FA3_PERSISTENT), bool(FA3_SOFTCAP), FA3_HDIM_V,
                        bool(FA3_PACK_GQA), FA3_EXP_POLY, bool(FA3_LAZY_RESCALE), FA3_CLUSTER_M>;

// Status codes besides cudaError_t values (which are < 1000).
constexpr int kErrBadArgs = 1001;

}  // namespace

extern "C" {

// Static facts about this instantiation, for logs and tests.
int fa3_fwd_info(int* threads, int* smem_bytes, int* block_m, int* block_n, int* head_dim) {
  *threads = Cfg::kThreads;
  *smem_bytes = Cfg::kSmemBytes;
  *block_m = Cfg::kBlockM;
  *block_n = Cfg::kBlockN;
  *head_dim = Cfg::kHeadDim;
  return 0;
}

// q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, DV] with arbitrary batch/head/seq strides
// (elements; last dim contiguous, strides multiples of 8 elements and 16-byte aligned bases: TMA).
// out [B, Hq, Sq, DV] (strides given; 16-byte multiples and a 16-byte aligned base, as for the
// inputs: 16-bit outputs leave through a TMA store), lse [B, Hq, Sq] fp32 contiguous.
// pack_sq > 0 (FA3_PACK_GQA instantiations, which need it): packed GQA.  The caller passes each kv group's query heads as one head of Sq rows
// (hq == hk, Sq = group * pack_sq, row r = query r % pack_sq of the group's head r / pack_sq; q,
// out and lse viewed so); masks then use the query position r % pack_sq, and align_off is
// computed from pack_sq.
// align_off: 0 for top-left, sk - sq for bottom-right.  wl / wr: window sizes, used when the
// instantiation has FA3_HAS_WL / FA3_HAS_WR.  gqa_div: 1 for kv head h / (Hq/Hk), 0 for h % Hk.
// reverse_m: 0, or the number of (batch, head) pairs per longest-first group (decode_tile); on
// the persistent grid the CTAs then take those tiles in pairs (tile_of).
// softcap: the cap (> 0) when the instantiation has FA3_SOFTCAP, else ignored.
// FP8 instantiations: q, k are e4m3 [B, H, S, D]; v is V^T [B, Hk, D, sk_v] e4m3 with keys
// contiguous and permuted within each 32 (acc_to_fp8_operand_a), sk_v >= sk rounded up to 32 and
// zero beyond the keys' images; v_ss is the stride between its d rows.  q_scale [B, Hq, cdiv(sq,
// BLOCK_M)], k_scale / v_scale [B, Hk, cdiv(sk, BLOCK_N)] fp32 with the given batch/head strides
// (v_scale shares k_scale's).  16-bit instantiations ignore the scales and sk_v.
int fa3_fwd_launch(const void* q, const void* k, const void* v, void* out, float* lse,
                   int b, int hq, int hk, int sq, int sk, int d, int dv,
                   int64_t q_sb, int64_t q_sh, int64_t q_ss,
                   int64_t k_sb, int64_t k_sh, int64_t k_ss,
                   int64_t v_sb, int64_t v_sh, int64_t v_ss,
                   int64_t o_sb, int64_t o_sh, int64_t o_ss,
                   float scale, int align_off, int wl, int wr, int gqa_div, int reverse_m,
                   float softcap, int sk_v, int pack_sq,
                   const float* q_scale, const float* k_scale, const float* v_scale,
                   int64_t qs_sb, int64_t qs_sh, int64_t ks_sb, int64_t ks_sh,
                   void* stream) {
  if (d != Cfg::kHeadDim || dv != Cfg::kHeadDimV || b <= 0 || hq <= 0 || hk <= 0 || hq % hk != 0 || sq <= 0 || sk <= 0 ||
      hq > 65535 || b > 65535) {
    return kErrBadArgs;
  }
  if (Cfg::kSoftcap && !(softcap > 0.f)) return kErrBadArgs;
  if (Cfg::kPackGQA != (pack_sq > 0) || (pack_sq > 0 && (hq != hk || sq % pack_sq != 0))) return kErrBadArgs;
  if (Cfg::kFp8 && (sk_v < sk || sk_v % 32 != 0 || !q_scale || !k_scale || !v_scale)) return kErrBadArgs;
  if (!Cfg::kFp8) sk_v = sk;
  using E = Element;
  fa3::Params<Cfg> p{
      fa3::make_tma_q<Cfg>(static_cast<E const*>(q), sq, hq, b, q_ss, q_sh, q_sb),
      fa3::make_tma_k<Cfg>(static_cast<E const*>(k), sk, hk, b, k_ss, k_sh, k_sb),
      fa3::make_tma_v<Cfg>(static_cast<E const*>(v), sk_v, hk, b, v_ss, v_sh, v_sb),
      fa3::make_tma_o<Cfg>(static_cast<OutT*>(out), sq, hq, b, o_ss, o_sh, o_sb),
  };
  p.out = static_cast<OutT*>(out);
  p.lse = lse;
  p.o_sb = o_sb; p.o_sh = o_sh; p.o_ss = o_ss;
  p.b = b; p.hq = hq; p.hk = hk; p.sq = sq; p.sk = sk;
  p.group = hq / hk;
  p.gqa_div = gqa_div;
  p.off = align_off;
  p.wl = wl; p.wr = wr;
  p.num_m_blocks = (sq + Cfg::kBlockM - 1) / Cfg::kBlockM;
  p.reverse_m = reverse_m;
  p.scale_log2 = scale * 1.4426950408889634f;
  if (Cfg::kSoftcap) {
    p.softcap_pre2 = 2.f * 1.4426950408889634f * scale / softcap;
    p.scale_log2 = softcap * 1.4426950408889634f;
  }
  p.sk_v = sk_v;
  p.pack_sq = pack_sq;
  p.q_scale = q_scale; p.k_scale = k_scale; p.v_scale = v_scale;
  p.qs_sb = qs_sb; p.qs_sh = qs_sh; p.ks_sb = ks_sb; p.ks_sh = ks_sh;

  auto kernel = fa3::fwd_kernel<Cfg>;
  // The attribute is per device; setting it every call is a cheap driver call, so no caching
  // (which would be wrong across devices).
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return int(err);
  // One CTA per tile, or (persistent) one per SM looping over tiles: shared memory allows
  // a single CTA per SM anyway.
  int64_t const num_tiles = int64_t(p.num_m_blocks) * hq * b;
  if (num_tiles > INT32_MAX) return kErrBadArgs;
  // K/V multicast: the two CTAs of a cluster take m blocks 2c and 2c + 1 of one head, which needs
  // an even number of m blocks (the caller picks this instantiation only then).
  if (Cfg::kClusterM > 1 && p.num_m_blocks % Cfg::kClusterM != 0) return kErrBadArgs;
  cudaStream_t const st = static_cast<cudaStream_t>(stream);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(num_tiles), 1, 1);
  config.blockDim = dim3(Cfg::kThreads, 1, 1);
  config.dynamicSmemBytes = Cfg::kSmemBytes;
  config.stream = st;
  cudaLaunchAttribute attr[1];
  if (Cfg::kClusterM > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = Cfg::kClusterM;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    config.attrs = attr;
    config.numAttrs = 1;
  }
  if (Cfg::kPersistent) {
    int dev = 0, slots = 0;
    err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return int(err);
    err = cudaDeviceGetAttribute(&slots, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return int(err);
    if (Cfg::kClusterM > 1) {
      // Resident CTAs in whole clusters (an SM left over in a GPC cannot take half a cluster).
      // Asked once per device (a property of the instantiation and the chip).
      static int resident[64] = {};
      int clusters = dev < 64 ? resident[dev] : 0;
      if (clusters == 0) {
        err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
        if (err != cudaSuccess) return int(err);
        if (dev < 64) resident[dev] = clusters;
      }
      if (clusters > 0) slots = clusters * Cfg::kClusterM;
      slots -= slots % Cfg::kClusterM;
    }
    // with longest-first groups the CTAs take tiles in pairs (tile_of); with K/V multicast the
    // grid is a whole number of clusters, so CTAs 2c and 2c + 1 take tiles t and t + 1 every round
    int64_t const units = fa3::schedule_units(p);
    config.gridDim.x = unsigned(units < slots ? units : slots);
  }
  if (Cfg::kClusterM > 1) {
    err = cudaLaunchKernelEx(&config, kernel, p);
    if (err != cudaSuccess) return int(err);
  } else {
    kernel<<<config.gridDim, config.blockDim, config.dynamicSmemBytes, st>>>(p);
  }
  return int(cudaGetLastError());
}

}  // extern "C"
