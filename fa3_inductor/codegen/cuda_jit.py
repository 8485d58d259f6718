"""Render, compile (nvcc, sm_90a) and load the CUDA forward templates in kernels/cuda.

One shared library per `KernelConfig`: a preamble of #defines selects the instantiation of
`fa3_fwd.cu`, whose only exports are plain C functions (no PyTorch headers, so a compile is
one nvcc call).  Libraries are cached on disk under `$FA3_INDUCTOR_CACHE/cuda` (default
`~/.cache/fa3_inductor/cuda`), keyed by a hash of the template sources, the rendered
preamble, the nvcc version, the flags and the CUTLASS headers' version; they are written to
a temporary name and renamed into place, so concurrent processes never see half a file.

Missing nvcc or CUTLASS headers raise `CudaToolchainUnavailable`; `ops/cuda_impl.py` turns
that into "not supported" so dispatch falls back to Triton.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time

from ..kernels_path import kernels_dir

log = logging.getLogger("fa3_inductor")

SUPPORTED_HEAD_DIMS = (64, 96, 128, 192, 256)
# (q/k head dim, v head dim) pairs besides equal ones: DeepSeek-style 192 / 128.
SPLIT_HEAD_DIMS = ((192, 128),)
# -DNDEBUG drops CUTLASS' debug traps (role checks in the pipeline) from the device code.
NVCC_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
              "-shared", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-lineinfo", "-DNDEBUG")
TEMPLATE = "cuda/fa3_fwd.cu"


class CudaToolchainUnavailable(RuntimeError):
    """nvcc or the CUTLASS/CuTe headers are missing: the CUDA templates cannot be built."""


class CudaCompileError(RuntimeError):
    """nvcc failed on a rendered template (a bug in the template, reported with nvcc's output)."""


# ---------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    head_dim: int
    dtype: str                 # "float16" | "bfloat16": q, k, v (16-bit) or the output (fp8)
    out_fp32: bool = False     # out dtype float32 instead of the input dtype
    block_m: int = 128
    block_n: int = 128
    stages: int = 2
    has_wl: bool = False       # window_left present (runtime value)
    has_wr: bool = False       # window_right present (causal = window_right 0)
    pingpong: bool = True      # named-barrier scheduling between the two consumer warpgroups
    intra_wg: bool = True      # issue S_{j+1} = Q K_{j+1}^T before the softmax of S_j
    warp_spec: bool = True     # producer warpgroup with TMA + setmaxnreg
    persistent: bool = False   # one CTA per SM looping over tiles (static round robin)
    fp8: bool = False          # e4m3 Q/K/V^T with block scales (fa3_inductor/fp8/cuda_attention.py)
    softcap: bool = False      # s = cap * tanh(s * scale / cap), cap a run-time value
    head_dim_v: int = 0        # V / O head dim when it differs from head_dim (SPLIT_HEAD_DIMS), else 0
    pack_gqa: bool = False     # query heads of a GQA group packed into the rows (cuda_impl.packed_gqa_rows)
    exp_poly: int = 0          # n > 0: every n-th exponential of a row on the FMA pipe (exp2_poly3)
    lazy_rescale: bool = False  # O rescaled only when a row max of the warp grew by > 2^8 (16-bit)
    cluster: bool = False      # clusters of two CTAs on adjacent m blocks, K/V TMA-multicast to both

    @property
    def dv(self) -> int:
        return self.head_dim_v or self.head_dim

    def defines(self) -> dict:
        split = {"FA3_HDIM_V": self.head_dim_v} if self.head_dim_v else {}
        if self.pack_gqa:
            split["FA3_PACK_GQA"] = 1
        if self.exp_poly:
            split["FA3_EXP_POLY"] = self.exp_poly
        if self.lazy_rescale:
            split["FA3_LAZY_RESCALE"] = 1
        if self.cluster:
            split["FA3_CLUSTER_M"] = 2
        return {
            "FA3_HDIM": self.head_dim, **split,
            "FA3_DTYPE_BF16": int(self.dtype == "bfloat16"),
            "FA3_OUT_DTYPE": int(self.out_fp32),
            "FA3_BLOCK_M": self.block_m,
            "FA3_BLOCK_N": self.block_n,
            "FA3_STAGES": self.stages,
            "FA3_HAS_WL": int(self.has_wl),
            "FA3_HAS_WR": int(self.has_wr),
            "FA3_PINGPONG": int(self.pingpong),
            "FA3_INTRA_WG": int(self.intra_wg),
            "FA3_WARP_SPEC": int(self.warp_spec),
            "FA3_PERSISTENT": int(self.persistent),
            "FA3_FP8": int(self.fp8),
            "FA3_SOFTCAP": int(self.softcap),
        }

    def name(self) -> str:
        abl = "".join(ch for ch, on in (("p", self.pingpong), ("o", self.intra_wg), ("w", self.warp_spec),
                                        ("P", self.persistent)) if on)
        mask = ("L" if self.has_wl else "") + ("R" if self.has_wr else "")
        return (f"fa3fwd_d{self.head_dim}{f'v{self.head_dim_v}' if self.head_dim_v else ''}_"
                f"{'e4m3_' if self.fp8 else ''}"
                f"{'bf16' if self.dtype == 'bfloat16' else 'fp16'}"
                f"{'_o32' if self.out_fp32 else ''}_{self.block_m}x{self.block_n}s{self.stages}"
                f"_{mask or 'N'}{'_sc' if self.softcap else ''}{'_gqa' if self.pack_gqa else ''}"
                f"{f'_x{self.exp_poly}' if self.exp_poly else ''}{'_lz' if self.lazy_rescale else ''}"
                f"{'_c2' if self.cluster else ''}"
                f"_{abl or 'none'}")


# Tile sizes per head dim (block_m, block_n): registers per consumer thread stay under 240 and
# K/V stages fit the 227 KiB of shared memory (hdim 256: 64 KiB Q + 2 x 2 x 40 KiB K/V).
# hdim 64: 192 query rows, three consumer warpgroups of 160 registers (as FA3 does there): the K/V
# tile is reused by 1.5x the rows, and the S, P and O of d64 fit 160 registers.
_TILES = {64: (192, 128), 96: (128, 128), 128: (128, 128), 192: (128, 96), 256: (128, 80),
          (192, 128): (128, 128)}  # 192 / 128: S and O take d128's registers, K/V stages 208 KiB
# FP8: operands take half the shared memory and P a quarter of S's registers; key tiles are whole
# k32 steps of the 8-bit PV GEMM.  These are also the quantisation blocks (one scale per tile).
# Keyed (head dim, causal); measured on the H100 at 8k (bf16 out, TFLOP/s of the attention kernel):
# d128 key tiles 128 / 160 / 192: 773 / 813 / 840 non-causal, 646 / 735 / 712 causal; d256 96 / 128:
# 1077 / 1081 non-causal, 955 / 1086 causal (128 keeps 12 bytes of spills, 96 none).  d128 x 256
# spills 168 bytes and serialises its WGMMAs; d128 x 224 (spill-free) against x 192, interleaved
# (session 8, device run 2): 0% at 2k, +5% at 4k, +6% at 8k, +5% at 16k non-causal.
FP8_HEAD_DIMS = (64, 128, 256)
_TILES_FP8 = {(64, False): (128, 128), (64, True): (128, 128), (128, False): (128, 224), (128, True): (128, 160),
              (256, False): (128, 128), (256, True): (128, 128)}


# The lazy O rescale (KernelConfig.lazy_rescale) by default at these V head dims, 16-bit.  At d256
# the rescale (128 multiplies per thread and key block) runs between the PV GEMM's wait and P's
# conversion; skipping it measured +3..+6% in all eight cells (2k-16k, causal or not; session 9,
# device run 1, two copies of each kernel interleaved, five rounds).  d128 (rescale under the S
# GEMM) and d64 read within -2..+3%, inside the noise: eager rescale stays there.
LAZY_RESCALE_HEAD_DIMS_V = (256,)


def config_for(head_dim: int, dtype: str, *, out_fp32: bool = False, has_wl: bool = False,
               has_wr: bool = False, pingpong: bool = True, intra_wg: bool = True,
               warp_spec: bool = True, persistent: bool = False, block_n: int | None = None,
               block_m: int | None = None,
               stages: int = 2, fp8: bool = False, softcap: bool = False,
               head_dim_v: int | None = None, pack_gqa: bool = False,
               exp_poly: int = 0, lazy_rescale: bool | None = None, cluster: bool = False) -> KernelConfig:
    """Tile config for a head dim; block_n / stages override the defaults for experiments
    (block_n a multiple of 16, e.g. 176 for hdim 128 non-causal as in the FA3 paper; of 32 for
    fp8; block_m 128 or 192: two or three consumer warpgroups).  With fp8, dtype is the output dtype (the operands are e4m3).  head_dim_v: V's head dim
    when it differs (one of SPLIT_HEAD_DIMS, 16-bit only).  pack_gqa: the instantiation for launches
    with packed GQA rows (16-bit only).  lazy_rescale: O rescaled only when a row max grew by more
    than 2^8 (16-bit only); None: the measured default (LAZY_RESCALE_HEAD_DIMS_V).  cluster: clusters
    of two CTAs on adjacent m blocks sharing each K/V tile by TMA multicast (no windows, no packed
    GQA, 128-row tiles; launched only over an even number of m blocks)."""
    split = head_dim_v is not None and head_dim_v != head_dim
    if split and ((head_dim, head_dim_v) not in SPLIT_HEAD_DIMS or fp8):
        raise ValueError(f"CUDA template: head dims q/k {head_dim}, v {head_dim_v}: equal, or one of "
                         f"{SPLIT_HEAD_DIMS} (16-bit)")
    allowed = FP8_HEAD_DIMS if fp8 else SUPPORTED_HEAD_DIMS
    if head_dim not in allowed:
        raise ValueError(f"CUDA template{' (fp8)' if fp8 else ''}: head dim {head_dim} not in {allowed}")
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"CUDA template: dtype {dtype} not float16/bfloat16")
    if lazy_rescale is None:
        lazy_rescale = not fp8 and (head_dim_v if split else head_dim) in LAZY_RESCALE_HEAD_DIMS_V
    if fp8 and (out_fp32 or softcap or pack_gqa or lazy_rescale):
        raise ValueError("CUDA template (fp8): fp16/bf16 output, no softcap, no packed GQA, no lazy_rescale")
    bm, bn = (_TILES_FP8[(head_dim, has_wr)] if fp8 else
              _TILES[(head_dim, head_dim_v)] if split else _TILES[head_dim])
    if block_n is not None:
        step = 32 if fp8 else 16
        if block_n % step or not step <= block_n <= 256:
            raise ValueError(f"CUDA template: block_n {block_n} must be a multiple of {step} in [{step}, 256]")
        bn = block_n
    if not isinstance(exp_poly, int) or not 0 <= exp_poly <= 16:
        raise ValueError(f"CUDA template: exp_poly {exp_poly!r}: 0 (every exponential on MUFU) or n in [1, 16] "
                         f"(every n-th on the FMA pipe)")
    if block_m is not None:
        if block_m not in (128, 192) or (block_m == 192 and head_dim > (128 if fp8 else 64)):
            raise ValueError(f"CUDA template: block_m {block_m}: 128, or 192 at head dim 64 (16-bit) "
                             f"or up to 128 (fp8)")
        bm = block_m
    if cluster and not _cluster_pairs_tiles(has_wl, has_wr, pack_gqa, bm):
        raise ValueError("CUDA template: cluster (K/V multicast) needs no windows or causal mask, no packed GQA "
                         f"and 128-row tiles (got has_wl={has_wl}, has_wr={has_wr}, pack_gqa={pack_gqa}, "
                         f"block_m={bm})")
    return KernelConfig(head_dim=head_dim, dtype=dtype, out_fp32=out_fp32, block_m=bm, block_n=bn, stages=stages,
                        has_wl=has_wl, has_wr=has_wr, pingpong=pingpong, intra_wg=intra_wg,
                        warp_spec=warp_spec, persistent=persistent, fp8=fp8, softcap=softcap,
                        head_dim_v=head_dim_v if split else 0, pack_gqa=pack_gqa, exp_poly=exp_poly,
                        lazy_rescale=bool(lazy_rescale), cluster=bool(cluster))


# Launch policy of unpacked 16-bit calls (cuda_impl._launch_config asks only for those): per
# (mask kind, head dim), a wider key tile from some number of keys on, and the persistent grid
# below some number of keys.  Mask kinds (mask_kind): "none" (no window), "causal" (a right window
# and no left one: causal, bottom-right causal), "window" (sliding windows: the defaults, one CTA
# per tile at the head dim's tile).  Every entry comes from interleaved timings on the H100.
#
# Wider key tiles: (block_n, from this many keys).  d128 non-causal, 128 x 160 against 128 x 128,
# after the softmax's instruction count fell (session 6, device runs 4-5, fp16 and bf16): -5% at
# 1k, +2% at 2k, +3% at 4k, +4% at 8k, +7% at 16k; causal, the 128-key tile stays best everywhere.
_WIDE_KEY_TILES = {("none", 128): (160, 2048)}
# The persistent grid below this many keys: one CTA per SM looping over tiles, O staged apart from
# Q (kSeparateO), so the next tile's loads run under this tile's last PV GEMM and epilogue, which
# pays where tiles are short.  d128 non-causal against session 6's one CTA per tile (session 7,
# three runs): +2..+8% at 2k, +1..+7% at 4k (+9% at 1k against one CTA per tile); at 8k and 16k
# the two read within -4..+1%, and one CTA per tile stays.  d64 (mixed) and d256 (no room to
# stage O apart) gained nothing measurable then.
# Causal tiles on the persistent grid are taken in pairs of one head's longest and shortest m blocks
# (tile_of in fa3_fwd_kernel.cuh); d128 against one CTA per tile, interleaved (session 8, device
# runs 1-2, against this build's and session 7's one CTA per tile): +10..+12% at 1k, +2..+10% at
# 2k, +2..+7% at 4k, -1..+7% at 8k, -6..+1% at 16k.  d64 causal pairs lost to session 7's one CTA
# per tile from 8k (-3..-9%) and Triton runs d64 causal below that; d256 causal pairs -3..-6%.
# d64 unmasked (session 8, device run 1): +8% at 1k, +3% at 2k, +3% at 4k, -1..+1% from 8k.
_PERSISTENT_BELOW_KEYS = {("none", 128): 8192, ("causal", 128): 12288, ("none", 64): 4096}


# FP8 calls on the persistent grid below this many keys, per (mask kind, head dim).  d128 causal
# (pairs of tiles) against one CTA per tile, interleaved (session 8, device runs 2 and 4): +4 / +10%
# at 2k, +1 / +5% at 4k, -4 / +3% at 8k, -7 / -1% at 16k.  d128 unmasked and d256 read within
# -1..+4% at every length: one CTA per tile stays.
_FP8_PERSISTENT_BELOW_KEYS = {("causal", 128): 8192}


# K/V multicast (clusters of two CTAs, KernelConfig.cluster) by default for these (mask kind, head
# dim): FlashAttention-3 clusters unmasked 16-bit head dims >= 128.
_CLUSTER_KV: set = set()


_MASK_KINDS = ("none", "causal", "window")


def mask_kind(has_wl: bool, has_wr: bool) -> str:
    """The launch policy's mask kind of a call with / without left and right windows."""
    return "window" if has_wl else "causal" if has_wr else "none"


def _persistent_below(table: dict, head_dim: int, sk: int, mask: str, caller: str) -> bool:
    """Whether table ((mask kind, head dim) -> keys) puts a call over sk keys on the persistent grid."""
    if mask not in _MASK_KINDS:
        raise ValueError(f"{caller}: mask {mask!r} not one of {', '.join(map(repr, _MASK_KINDS))}")
    below = table.get((mask, head_dim))
    return below is not None and sk < below


def fp8_persistent_grid(head_dim: int, sk: int, *, mask: str) -> bool:
    """Whether an FP8 call over sk keys runs on the persistent grid by default."""
    return _persistent_below(_FP8_PERSISTENT_BELOW_KEYS, head_dim, sk, mask, "fp8_persistent_grid")


def launch_policy(head_dim: int, sk: int, *, mask: str,
                  head_dim_v: int | None = None) -> tuple[int | None, bool, bool]:
    """(block_n, persistent, cluster) for an unpacked 16-bit call over sk keys: block_n None keeps
    the head dim's default tile; persistent says whether the persistent grid runs it; cluster whether
    K/V multicast does (where the call's m blocks pair up: cluster_fits).  Split head dims
    (head_dim_v != head_dim) keep the defaults."""
    persistent = _persistent_below(_PERSISTENT_BELOW_KEYS, head_dim, sk, mask, "launch_policy")
    if head_dim_v not in (None, head_dim):
        return None, False, False
    wide = _WIDE_KEY_TILES.get((mask, head_dim))
    cluster = (mask, head_dim) in _CLUSTER_KV
    return (wide[0] if wide and sk >= wide[1] else None), persistent, cluster


def _cluster_pairs_tiles(has_wl: bool, has_wr: bool, pack_gqa: bool, block_m: int) -> bool:
    """K/V multicast's static conditions (the kernel's Config asserts the same): both CTAs of a
    cluster walk the same key blocks, so no windows and no packed rows; 128-row tiles."""
    return not (has_wl or has_wr or pack_gqa) and block_m == 128


def cluster_fits(cfg: KernelConfig, sq: int) -> bool:
    """Whether cfg may run with K/V multicast over sq query rows (config_for's conditions, and an
    even number of m blocks so that every cluster's two CTAs share one head)."""
    return (_cluster_pairs_tiles(cfg.has_wl, cfg.has_wr, cfg.pack_gqa, cfg.block_m)
            and ((sq + cfg.block_m - 1) // cfg.block_m) % 2 == 0)


def block_m_for(head_dim: int, head_dim_v: int | None = None) -> int:
    """Query rows per tile of the 16-bit instantiation for these head dims."""
    split = head_dim_v is not None and head_dim_v != head_dim
    return (_TILES[(head_dim, head_dim_v)] if split else _TILES.get(head_dim, (128, 0)))[0]


def standard_configs(hdims=(64, 128, 256), extras: bool = False) -> list[KernelConfig]:
    """What scripts/compile_cuda_sm90.py prebuilds: every (hdim, dtype, causal or not), 16-bit and
    (hdim 128/256) fp8; with extras also the configurations the GPU tests and the ablation table
    use (hdim 128)."""
    out = [config_for(hd, dt, has_wr=causal) for hd in hdims for dt in ("float16", "bfloat16")
           for causal in (False, True)]
    out += [config_for(hd, dt, has_wr=causal, fp8=True) for hd in hdims if hd in (128, 256)
            for dt in ("float16", "bfloat16") for causal in (False, True)]
    out += [config_for(hd, dt, has_wr=mask == "causal", fp8=True, persistent=True)
            for mask, hd in _FP8_PERSISTENT_BELOW_KEYS if hd in hdims for dt in ("float16", "bfloat16")]
    # what launch_policy picks besides the defaults: wide key tiles, and the persistent grid at both
    # key tiles where the two ranges meet
    for (mask, hd), (bn, _) in _WIDE_KEY_TILES.items():
        out += [config_for(hd, dt, block_n=bn, has_wr=mask == "causal") for dt in ("float16", "bfloat16")
                if hd in hdims]
    for mask, hd in _PERSISTENT_BELOW_KEYS:
        wide = _WIDE_KEY_TILES.get((mask, hd))
        out += [config_for(hd, dt, persistent=True, block_n=bn, has_wr=mask == "causal")
                for dt in ("float16", "bfloat16") for bn in (None, *([wide[0]] if wide else [])) if hd in hdims]
    # K/V multicast where the policy takes it: every (key tile, grid) launch_policy pairs it with
    for mask, hd in sorted(_CLUSTER_KV):
        wide = _WIDE_KEY_TILES.get((mask, hd))
        grids = (False, True) if (mask, hd) in _PERSISTENT_BELOW_KEYS else (False,)
        out += [config_for(hd, dt, block_n=bn, persistent=pg, cluster=True) for dt in ("float16", "bfloat16")
                for bn in (None, *([wide[0]] if wide else [])) for pg in grids if hd in hdims]
    if extras:
        # K/V multicast candidates (cuda_rows --schedules 128 / 256 and the GPU tests)
        out += [config_for(hd, "float16", block_n=bn, persistent=pg, cluster=True)
                for hd, bn in ((128, 160), (128, None), (256, None)) for pg in (False, True)]
        for causal in (False, True):
            for kw in (dict(intra_wg=False), dict(pingpong=False), dict(warp_spec=False),
                       dict(intra_wg=False, pingpong=False, warp_spec=False), dict(persistent=True),
                       dict(persistent=True, warp_spec=False)):
                out.append(config_for(128, "float16", has_wr=causal, **kw))
        out.append(config_for(128, "bfloat16", has_wl=True))
        out.append(config_for(128, "bfloat16", has_wl=True, has_wr=True))
        out.append(config_for(64, "float16", has_wr=True, out_fp32=True))
        out.append(config_for(128, "float16", block_n=176))  # the paper's hdim-128 non-causal tile
        out.append(config_for(128, "bfloat16", has_wr=True, softcap=True))
        out += [config_for(64, dt, has_wr=causal, fp8=True) for dt in ("float16", "bfloat16")
                for causal in (False, True)]  # the FP8 GPU tests' d64 cases
        out += [config_for(192, dt, has_wr=causal, head_dim_v=128) for dt in ("float16", "bfloat16")
                for causal in (False, True)]
        # tile candidates (cuda_rows --tiles 64 / 128)
        out += [config_for(64, "float16", has_wr=causal, **kw) for causal in (False, True)
                for kw in (dict(block_m=128),)]  # (192 x 96 / 112 measured slower and spill: perf-notes)
        out += [config_for(128, "float16", has_wr=causal, **kw) for causal in (False, True)
                for kw in (dict(stages=3), dict(block_n=160), dict(block_n=176))]
        # packed GQA: decoding at d64/d128 (benchmark rows) and the GPU tests' cases
        out += [config_for(hd, dt, has_wr=causal, pack_gqa=True) for hd in (64, 128)
                for dt in ("float16", "bfloat16") for causal in (False, True)]
        out += [config_for(128, "float16", has_wl=True, has_wr=True, pack_gqa=True),
                config_for(128, "float16", has_wl=True, pack_gqa=True),
                config_for(128, "float16", has_wr=True, pack_gqa=True),
                config_for(192, "bfloat16", has_wr=True, head_dim_v=128, pack_gqa=True),
                config_for(192, "bfloat16", head_dim_v=128, pack_gqa=True)]
    return list(dict.fromkeys(out))


# WGMMA N sizes CuTe's ss/rs_op_selector picks without CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED.
_BASE_GMMA_N = (8, 16, 32, 64, 96, 128, 192, 256)


def render(cfg: KernelConfig) -> str:
    """The translation unit nvcc compiles: the preamble, then the template."""
    lines = [f"// generated by fa3_inductor.codegen.cuda_jit for {cfg.name()}"]
    lines += [f"#define {k} {v}" for k, v in cfg.defines().items()]
    if cfg.block_n not in _BASE_GMMA_N:
        # e.g. 64x80x16 for hdim 256: without it CuTe's selector silently falls back to 64x16
        # atoms (5x the instructions).  Only when needed: the extended header is slow to parse.
        lines.append("#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED 1")
    lines.append('#include "fa3_fwd.cu"')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- toolchain discovery
@functools.lru_cache(maxsize=None)
def find_nvcc() -> str:
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(pathlib.Path(os.environ[env]) / "bin" / "nvcc")
    which = shutil.which("nvcc")
    if which:
        cands.append(pathlib.Path(which))
    try:  # pip package nvidia-cuda-nvcc(-cu12/-cu13): nvidia/cuda_nvcc/bin/nvcc
        import nvidia.cuda_nvcc as _pkg  # type: ignore
        for base in list(getattr(_pkg, "__path__", [])):
            cands.append(pathlib.Path(base) / "bin" / "nvcc")
    except Exception:
        pass
    cands.append(pathlib.Path("/usr/local/cuda/bin/nvcc"))
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise CudaToolchainUnavailable("nvcc not found (set CUDA_HOME, put nvcc on PATH, or pip install nvidia-cuda-nvcc)")


@functools.lru_cache(maxsize=None)
def cutlass_include() -> pathlib.Path:
    cands = []
    if os.environ.get("FA3_CUTLASS_INCLUDE"):
        cands.append(pathlib.Path(os.environ["FA3_CUTLASS_INCLUDE"]))
    try:
        import cutlass_library  # type: ignore  (pip package nvidia-cutlass)
        cands.append(pathlib.Path(cutlass_library.__file__).parent / "source" / "include")
    except Exception:
        pass
    for c in cands:
        if (c / "cute" / "tensor.hpp").is_file() and (c / "cutlass" / "pipeline" / "sm90_pipeline.hpp").is_file():
            return c
    raise CudaToolchainUnavailable(
        "CUTLASS/CuTe headers not found (pip install nvidia-cutlass, or set FA3_CUTLASS_INCLUDE to a "
        f"CUTLASS include/ directory); looked in {[str(c) for c in cands] or 'nothing'}")


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    out = subprocess.run([find_nvcc(), "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else "unknown"


@functools.lru_cache(maxsize=None)
def toolchain_problem() -> str | None:
    """None when nvcc and the headers are present, else the reason (cached: the lookups raise
    when something is missing, and lru_cache does not remember exceptions)."""
    try:
        find_nvcc()
        cutlass_include()
        return None
    except CudaToolchainUnavailable as exc:
        return str(exc)


def cache_dir() -> pathlib.Path:
    root = os.environ.get("FA3_INDUCTOR_CACHE")
    base = pathlib.Path(root) / "cuda" if root else pathlib.Path.home() / ".cache" / "fa3_inductor" / "cuda"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _sources_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((kernels_dir() / "cuda").glob("*")):
        if p.suffix in (".cu", ".cuh", ".h", ".hpp"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _cutlass_version(inc: pathlib.Path) -> str:
    v = inc / "cutlass" / "version.h"
    return hashlib.sha256(v.read_bytes()).hexdigest()[:16] if v.is_file() else str(inc)


def cache_key(cfg: KernelConfig) -> str:
    h = hashlib.sha256()
    for part in (_sources_digest(), render(cfg), nvcc_version(), " ".join(NVCC_FLAGS),
                 _cutlass_version(cutlass_include())):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


# ---------------------------------------------------------------- compile
def find_cuobjdump() -> str | None:
    """cuobjdump next to nvcc, on PATH, or the copy bundled with Triton (for SASS checks)."""
    cands = []
    try:
        cands.append(pathlib.Path(find_nvcc()).parent / "cuobjdump")
    except CudaToolchainUnavailable:
        pass
    if shutil.which("cuobjdump"):
        cands.append(pathlib.Path(shutil.which("cuobjdump")))
    try:
        import triton  # type: ignore
        cands.append(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except Exception:
        pass
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def nvcc_command(src: pathlib.Path, out: pathlib.Path) -> list[str]:
    return [find_nvcc(), *NVCC_FLAGS, f"-I{kernels_dir() / 'cuda'}", f"-I{cutlass_include()}",
            str(src), "-o", str(out)]


def compile_config(cfg: KernelConfig, *, force: bool = False) -> pathlib.Path:
    """Path of the cached .so for cfg, compiling it first when absent."""
    key = cache_key(cfg)
    d = cache_dir()
    so = d / f"{cfg.name()}_{key}.so"
    if so.is_file() and not force:
        return so
    with tempfile.TemporaryDirectory(dir=d, prefix=".build_") as tmp:
        tmpd = pathlib.Path(tmp)
        src = tmpd / f"{cfg.name()}.cu"
        src.write_text(render(cfg))
        tmp_so = tmpd / "out.so"
        t0 = time.perf_counter()
        proc = subprocess.run(nvcc_command(src, tmp_so), capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise CudaCompileError(f"nvcc failed for {cfg.name()} ({dt:.1f}s):\n{proc.stderr[-8000:]}")
        (tmpd / "out.log").write_text(f"# {' '.join(nvcc_command(src, so))}\n# {dt:.1f}s\n{proc.stdout}{proc.stderr}")
        os.replace(tmpd / "out.log", so.with_suffix(".log"))
        os.replace(tmp_so, so)  # atomic: other processes see either nothing or the whole library
    log.info("fa3: compiled CUDA kernel %s in %.1fs", cfg.name(), dt)
    return so


def ptxas_report(cfg: KernelConfig) -> dict:
    """Registers / spills / stack of the kernel from the cached build log (compiling if needed)."""
    import re
    text = compile_config(cfg).with_suffix(".log").read_text()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.findall(r"(\d+) bytes stack frame", text)
    return {
        "registers": int(regs[-1]) if regs else None,
        "spill_stores": int(spills[-1][0]) if spills else None,
        "spill_loads": int(spills[-1][1]) if spills else None,
        "stack": int(stack[-1]) if stack else None,
        "wgmma_serialized": "wgmma" in text.lower() and "serializ" in text.lower(),
        "log": text,
    }


# ---------------------------------------------------------------- load
_c_i64 = ctypes.c_int64
_LAUNCH_ARGTYPES = ([ctypes.c_void_p] * 5 + [ctypes.c_int] * 7 + [_c_i64] * 12   # .. b .. d, dv, strides
                    + [ctypes.c_float] + [ctypes.c_int] * 5        # scale .. reverse_m
                    + [ctypes.c_float, ctypes.c_int, ctypes.c_int]  # softcap, sk_v, pack_sq
                    + [ctypes.c_void_p] * 3 + [_c_i64] * 4         # fp8 scales and their strides
                    + [ctypes.c_void_p])


class CompiledKernel:
    def __init__(self, cfg: KernelConfig, path: pathlib.Path):
        self.cfg = cfg
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.fa3_fwd_launch.argtypes = _LAUNCH_ARGTYPES
        self.lib.fa3_fwd_launch.restype = ctypes.c_int
        self.lib.fa3_fwd_info.argtypes = [ctypes.POINTER(ctypes.c_int)] * 5
        self.lib.fa3_fwd_info.restype = ctypes.c_int
        vals = [ctypes.c_int() for _ in range(5)]
        self.lib.fa3_fwd_info(*[ctypes.byref(v) for v in vals])
        self.threads, self.smem_bytes, self.block_m, self.block_n, self.head_dim = (v.value for v in vals)

    def launch(self, *args) -> int:
        return self.lib.fa3_fwd_launch(*args)


_loaded: dict = {}
_lock = threading.Lock()


def get_kernel(cfg: KernelConfig) -> CompiledKernel:
    k = _loaded.get(cfg)
    if k is None:
        with _lock:
            k = _loaded.get(cfg)
            if k is None:
                k = CompiledKernel(cfg, compile_config(cfg))
                _loaded[cfg] = k
    return k
