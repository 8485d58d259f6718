"""Tile configurations of the Triton attention kernels: the tuned table (H100, sm_90) and the
candidate lists the autotuner (fa3_inductor/autotune.py) measures in max-autotune mode.

Keyed by (padded head dim, causal, dtype).  Rationale for the defaults (see docs/perf-notes.md):
- forward: BLOCK_M 128 so each CTA's Q tile amortises K/V traffic; BLOCK_N 64..128 so the fp32
  S tile (BLOCK_M x BLOCK_N / threads) plus the O accumulator (BLOCK_M x D / threads) fit in
  registers without spills (checked with scripts/compile_triton_sm90.py).
- backward: dK/dV program owns BLOCK_N keys and streams BLOCK_M query rows (small BLOCK_M: the
  dK, dV accumulators are BLOCK_N x D each); dQ program is the mirror image.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_spec: bool = False

    def key(self) -> str:
        return f"fwd_m{self.block_m}_n{self.block_n}_w{self.num_warps}_s{self.num_stages}_ws{int(self.warp_spec)}"


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    block_m1: int   # dK/dV kernel: query rows per step
    block_n1: int   # dK/dV kernel: keys per program
    block_m2: int   # dQ kernel: query rows per program
    block_n2: int   # dQ kernel: keys per step
    num_warps: int
    num_stages: int

    def key(self) -> str:
        return (f"bwd_m{self.block_m1}_n{self.block_n1}_m{self.block_m2}_n{self.block_n2}"
                f"_w{self.num_warps}_s{self.num_stages}")


def pad_head_dim(d: int) -> int:
    """Head dims are padded to the next power of two (>= 16) with masked loads."""
    return max(16, 1 << (max(1, d) - 1).bit_length())


# (d_pad, causal) -> config.  dtype (fp16/bf16) does not change the best tiles on H100.
_FWD_TABLE = {
    (16, False): FwdConfig(128, 64, 4, 3), (16, True): FwdConfig(128, 64, 4, 3),
    (32, False): FwdConfig(128, 64, 4, 3), (32, True): FwdConfig(128, 64, 4, 3),
    (64, False): FwdConfig(128, 128, 8, 3), (64, True): FwdConfig(128, 64, 4, 3),
    # d128: 255 regs, no spills, 224 KiB smem (3 stages of 128x128 K and V tiles).
    (128, False): FwdConfig(128, 128, 8, 3), (128, True): FwdConfig(128, 64, 8, 3),
    # d256: BLOCK_N 64 spills at 2+ stages; BLOCK_N 32 with 3 stages does not.
    (256, False): FwdConfig(128, 32, 8, 3), (256, True): FwdConfig(128, 32, 8, 3),
}
# Backward, keyed (d_pad, causal): the dK/dV kernel holds K, V, dK, dV of its key block in
# registers, so its BLOCK_M must shrink as d grows (and for causal: the masked diagonal run
# adds index/mask registers).  Chosen as the largest no-spill tiles under ptxas -v.
_BWD_TABLE = {
    (16, False): BwdConfig(32, 128, 128, 32, 8, 2), (16, True): BwdConfig(32, 128, 128, 32, 8, 2),
    (32, False): BwdConfig(32, 128, 128, 32, 8, 2), (32, True): BwdConfig(32, 128, 128, 32, 8, 2),
    (64, False): BwdConfig(32, 128, 128, 32, 8, 2), (64, True): BwdConfig(32, 128, 128, 32, 8, 2),
    (128, False): BwdConfig(32, 128, 128, 32, 8, 2), (128, True): BwdConfig(16, 128, 128, 16, 8, 2),
    (256, False): BwdConfig(16, 64, 64, 16, 8, 2), (256, True): BwdConfig(16, 64, 64, 16, 8, 1),
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
    dp = pad_head_dim(max(d, dv))
    cands = [default_fwd(d, dv, causal)]
    bns = (32, 64) if dp >= 256 else (64, 128)
    # 8 warps only where the tile is big enough to feed two warpgroups.
    for bm in (64, 128):
        for bn in bns:
            for w in (4, 8):
                for s in ((1, 2) if dp >= 256 else (2, 3, 4)):
                    if bm * bn < 128 * 128 and w == 8 and dp < 128:
                        continue
                    for ws in (False, True):
                        c = FwdConfig(bm, bn, w, s, ws)
                        if c not in cands:
                            cands.append(c)
    return cands


def bwd_candidates(d: int, dv: int, causal: bool) -> list[BwdConfig]:
    dp = pad_head_dim(max(d, dv))
    cands = [default_bwd(d, dv, causal)]
    if dp >= 256:
        tiles = [(16, 64, 64, 16), (32, 64, 64, 32), (16, 32, 64, 16)]
        stages = (1, 2)
    else:
        tiles = [(32, 128, 128, 32), (16, 128, 128, 16), (64, 128, 128, 64), (32, 64, 64, 32)]
        stages = (2, 3)
    for t in tiles:
        for w in (4, 8):
            for s in stages:
                c = BwdConfig(*t, w, s)
                if c not in cands:
                    cands.append(c)
    return cands
