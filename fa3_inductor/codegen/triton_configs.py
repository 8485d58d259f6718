"""Tile configurations of the Triton attention kernels: the tuned table (H100, sm_90) and the
candidate lists the autotuner (fa3_inductor/autotune.py) measures in max-autotune mode.

Keyed by (padded head dim, causal).  The defaults are the fastest candidates measured on the H100
by scripts/tune_triton.py (docs/perf-notes.md); the candidate shapes follow from:
- forward: BLOCK_M 128 so each CTA's Q tile amortises K/V traffic; BLOCK_N 64..128 so the fp32
  S tile (BLOCK_M x BLOCK_N / threads) plus the O accumulator (BLOCK_M x D / threads) stay in
  registers (scripts/compile_triton_sm90.py reports registers and spills).
- backward: dK/dV program owns BLOCK_N keys and streams BLOCK_M query rows (small BLOCK_M: the
  dK, dV accumulators are BLOCK_N x D each); dQ program is the mirror image.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

# Even-length specialisation (launch constexprs EVEN_M / EVEN_N of the Triton kernels): when Sq / Sk
# divide the launch's query / key tiles, the kernels drop their seqlen bound checks.  Same results
# either way; this switch exists only so scripts/tune_triton.py --noeven (or the env var
# FA3_NO_EVEN_SPECIALISATION=1) can time the masked code at even lengths in one process.
even_specialisation = os.environ.get("FA3_NO_EVEN_SPECIALISATION", "") in ("", "0")


@contextlib.contextmanager
def no_even_specialisation():
    """Launch every length as if it were odd (bound checks kept) inside the block."""
    global even_specialisation
    old = even_specialisation
    even_specialisation = False
    try:
        yield
    finally:
        even_specialisation = old


def even(size: int, *tiles: int) -> bool:
    """EVEN_M / EVEN_N of a launch: every tile of `tiles` divides `size` (and the switch is on)."""
    return even_specialisation and all(size % t == 0 for t in tiles)


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False         # Q/K/V through TMA tensor descriptors (pointers where strides forbid)
    lpt: bool = False         # causal/windowed: longest query blocks of each head first

    def key(self) -> str:
        return f"fwd_m{self.block_m}_n{self.block_n}_w{self.num_warps}_s{self.num_stages}_tma{int(self.tma)}_lpt{int(self.lpt)}"


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    block_m1: int   # dK/dV kernel: query rows per step
    block_n1: int   # dK/dV kernel: keys per program
    block_m2: int   # dQ kernel: query rows per program
    block_n2: int   # dQ kernel: keys per step
    num_warps: int
    num_stages: int
    # One launch for dK/dV and dQ (kernel attn_bwd_fused: dK/dV programs then dQ programs along
    # grid axis 0, as FlexAttention's backward): the dQ programs of a kv head run next to its
    # dK/dV programs, one tail instead of two.  Deterministic either way; ignored by the atomic-dQ
    # mode (no dQ kernel there).
    fused: bool = False
    # Q, K, V, dO through TMA tensor descriptors (pointers where strides forbid), as FwdConfig.tma;
    # LSE, Delta, bias, key padding and the dQ/dK/dV stores stay pointer-based.
    tma: bool = False

    def key(self) -> str:
        # "_tma" only when set: the pointer configs keep the keys the measurements name.
        return (f"bwd_m{self.block_m1}_n{self.block_n1}_m{self.block_m2}_n{self.block_n2}"
                f"_w{self.num_warps}_s{self.num_stages}" + ("_fused" if self.fused else "")
                + ("_tma" if self.tma else ""))


def pad_head_dim(d: int) -> int:
    """Head dims are padded to the next power of two (>= 16) with masked loads."""
    return max(16, 1 << (max(1, d) - 1).bit_length())


# (d_pad, causal) -> config, measured on the H100 with scripts/tune_triton.py (fp16, b*s = 16k,
# s = 4096; every candidate next to cuDNN in one run; docs/perf-notes.md, session 3).  dtype
# (fp16/bf16) does not change the best tiles.  The backward winners at d128/d256 spill 36-280
# bytes under ptxas -v and still beat the spill-free tiles by 1.2-2x: the measurement decides.
_FWD_TABLE = {
    (16, False): FwdConfig(128, 64, 4, 3), (16, True): FwdConfig(128, 64, 4, 3),
    (32, False): FwdConfig(128, 64, 4, 3), (32, True): FwdConfig(128, 64, 4, 3),
    # d64: 395 / 355 TFLOP/s (128x128: 354 / 298).
    (64, False): FwdConfig(128, 64, 8, 3), (64, True): FwdConfig(128, 64, 8, 3),
    # d128: 467 / 408 with TMA loads, causal longest-first (pointer loads 464 / 398).
    (128, False): FwdConfig(128, 128, 8, 3, tma=True), (128, True): FwdConfig(128, 128, 8, 3, tma=True, lpt=True),
    # d256: 499 / 440 with TMA loads (128x32 pointer loads: 429 / 354).
    (256, False): FwdConfig(128, 64, 8, 2, tma=True), (256, True): FwdConfig(128, 64, 8, 2, tma=True),
}
# Backward, keyed (d_pad, causal): the dK/dV kernel holds K, V, dK, dV of its key block in
# registers, so its BLOCK_M must shrink as d grows.  Measured winners (TFLOP/s, backward FLOPs
# 2.5x the forward's): d64 306 / 256 (was 227 / 195), d128 323 / 286 (was 263 / 205), d256
# 214 / 194 (was 86 / 82: 32 keys x 64 queries at 4 warps beats 64 x 16 at 8).
_BWD_TABLE = {
    (16, False): BwdConfig(32, 128, 128, 32, 4, 3), (16, True): BwdConfig(32, 128, 128, 32, 4, 3),
    (32, False): BwdConfig(32, 128, 128, 32, 4, 3), (32, True): BwdConfig(32, 128, 128, 32, 4, 3),
    (64, False): BwdConfig(32, 128, 128, 32, 4, 3), (64, True): BwdConfig(32, 128, 128, 32, 4, 3),
    # d128 non-causal: the one-launch backward with 64x64 tiles, 4 warps (session 4, H100, 16k
    # tokens: 338 / 344 / 376 / 375 TFLOP/s at 2k / 4k / 8k / 16k against 306 / 328 / 344 / 328
    # for the separate kernels).  Causal kept the separate kernels (fused 290-310 vs 325 at 8k).
    # Session 5 (device run 4, 4k): the same tiles as two launches with TMA loads 424 against 404
    # fused with pointers (TMA fused 413); TMA elsewhere no gain (d64 +2%, d128 causal +2%) or a
    # loss (d64 causal -15%, d256 -19% to -68%: its 32-key dK/dV tile spills 1-3 KB with TMA).
    (128, False): BwdConfig(64, 64, 64, 64, 4, 2, tma=True), (128, True): BwdConfig(64, 128, 128, 64, 8, 2),
    (256, False): BwdConfig(64, 32, 64, 32, 4, 2), (256, True): BwdConfig(64, 32, 64, 32, 4, 2),
}

_override: dict = {}


@contextlib.contextmanager
def override(fwd: Optional[FwdConfig] = None, bwd: Optional[BwdConfig] = None):
    """Force configs (tests use small tiles in the interpreter; the autotuner uses it too)."""
    old = dict(_override)
    if fwd is not None:
        _override["fwd"] = fwd
    if bwd is not None:
        _override["bwd"] = bwd
    try:
        yield
    finally:
        _override.clear()
        _override.update(old)


def default_fwd(d: int, dv: int, causal: bool) -> FwdConfig:
    return _override.get("fwd") or _FWD_TABLE[(pad_head_dim(max(d, dv)), bool(causal))]


def default_bwd(d: int, dv: int, causal: bool) -> BwdConfig:
    return _override.get("bwd") or _BWD_TABLE[(pad_head_dim(max(d, dv)), bool(causal))]


def for_spec(cfg, spec):
    """Specs with a [B,H,Sq,Sk] tensor operand (bias / bool mask) pipeline a score-sized tile of
    it next to K and V: narrower key tiles and fewer stages keep them in registers and smem."""
    if _override or spec.mask_kind is None:
        return cfg
    if isinstance(cfg, FwdConfig):
        return dataclasses.replace(cfg, block_n=min(cfg.block_n, 64), num_stages=min(cfg.num_stages, 2))
    return dataclasses.replace(cfg, block_m1=min(cfg.block_m1, 16), block_n2=min(cfg.block_n2, 16))


def fwd_candidates(d: int, dv: int, causal: bool) -> list[FwdConfig]:
    """What max-autotune (and scripts/tune_triton.py, which fills the tables) measures: pointer
    loads and TMA descriptor loads over a few tiles; causal ones also longest-first.  Triton 3.6's
    Hopper warp specialization is not among them: it compiles only single-loop kernels without
    pointer loads, and those kernels hung on the GPU (docs/perf-notes.md, session 3)."""
    dp = pad_head_dim(max(d, dv))
    if dp >= 256:
        base = [FwdConfig(128, 32, 8, 3), FwdConfig(128, 64, 8, 2), FwdConfig(64, 64, 4, 2),
                FwdConfig(128, 32, 8, 3, True), FwdConfig(128, 64, 8, 2, True), FwdConfig(128, 64, 8, 1, True),
                FwdConfig(64, 64, 4, 2, True), FwdConfig(128, 64, 4, 2, True)]
    else:
        base = [FwdConfig(128, 128, 8, 3), FwdConfig(128, 64, 8, 3), FwdConfig(128, 64, 4, 3),
                FwdConfig(128, 128, 8, 3, True), FwdConfig(128, 64, 8, 3, True), FwdConfig(128, 128, 8, 2, True),
                FwdConfig(128, 64, 8, 4, True), FwdConfig(64, 128, 4, 3, True)]
    cands = [default_fwd(d, dv, causal)]
    for c in base + ([dataclasses.replace(c, lpt=True) for c in base] if causal else []):
        if c not in cands:
            cands.append(c)
    return cands


def bwd_candidates(d: int, dv: int, causal: bool) -> list[BwdConfig]:
    dp = pad_head_dim(max(d, dv))
    cands = [default_bwd(d, dv, causal)]
    if dp >= 256:
        more = [BwdConfig(16, 64, 64, 16, 8, 2), BwdConfig(32, 64, 64, 32, 8, 1), BwdConfig(16, 32, 64, 16, 4, 2),
                BwdConfig(32, 32, 64, 32, 4, 3), BwdConfig(32, 32, 32, 32, 4, 2), BwdConfig(32, 32, 64, 32, 8, 2),
                BwdConfig(64, 32, 64, 32, 4, 2), BwdConfig(32, 32, 64, 16, 4, 2), BwdConfig(64, 64, 64, 64, 4, 2),
                BwdConfig(64, 32, 64, 32, 4, 3)]
    else:
        more = [BwdConfig(32, 128, 128, 32, 8, 2), BwdConfig(32, 128, 128, 32, 4, 3),
                BwdConfig(32, 128, 128, 32, 4, 4), BwdConfig(64, 128, 128, 64, 8, 2), BwdConfig(32, 64, 64, 32, 4, 3),
                BwdConfig(32, 64, 64, 32, 4, 4), BwdConfig(64, 64, 64, 64, 8, 2), BwdConfig(64, 64, 128, 64, 8, 2),
                BwdConfig(64, 128, 128, 32, 8, 2), BwdConfig(32, 64, 128, 32, 4, 3),
                BwdConfig(64, 128, 128, 64, 8, 3)]   # the last: the tile PyTorch's FlexAttention picks on sm_90
    for c in more + _fused_candidates(dp) + _tma_candidates(dp, cands[0]):
        if c not in cands:
            cands.append(c)
    return cands


def _fused_candidates(dp: int) -> list[BwdConfig]:
    """One-launch variants (BwdConfig.fused) of the measured winners and of FlexAttention's sm_90
    tiles; one kernel takes the larger of the two halves' registers and shared memory, so the dQ
    tile matters as much as the dK/dV tile here."""
    if dp >= 256:
        tiles = [BwdConfig(64, 32, 64, 32, 4, 2), BwdConfig(32, 32, 64, 32, 4, 2), BwdConfig(64, 64, 64, 64, 4, 2),
                 BwdConfig(32, 64, 64, 32, 8, 1)]
    elif dp >= 128:
        tiles = [BwdConfig(64, 128, 128, 64, 8, 2), BwdConfig(64, 128, 128, 64, 8, 3),
                 BwdConfig(32, 128, 128, 32, 8, 2), BwdConfig(64, 64, 64, 64, 4, 2)]
    else:
        tiles = [BwdConfig(32, 128, 128, 32, 4, 3), BwdConfig(64, 128, 128, 64, 8, 2),
                 BwdConfig(64, 128, 128, 64, 8, 3), BwdConfig(32, 64, 64, 32, 4, 3)]
    return [dataclasses.replace(c, fused=True) for c in tiles]


def _tma_candidates(dp: int, default: BwdConfig) -> list[BwdConfig]:
    """TMA-load variants (BwdConfig.tma), not yet measured: the table's tile, the same tiles
    launched the other way (fused / separate), and one more tile: FlexAttention's sm_90 tile at
    d <= 128; at d256 16x64 with 8 warps, spill-free under ptxas with TMA loads, causal or not
    (the table's 32-key dK/dV tile runs mma.sync, not wgmma, and spills 1-3 KB with TMA loads).
    scripts/tune_triton.py --only tma times exactly these next to the pointer-load default."""
    more = BwdConfig(16, 64, 64, 16, 8, 2) if dp >= 256 else BwdConfig(64, 128, 128, 64, 8, 3)
    tiles = [default, dataclasses.replace(default, fused=not default.fused), more]
    return [dataclasses.replace(c, tma=True) for c in tiles]
