"""Counter-based dropout RNG shared by the reference and the kernels.

The keep decision of score (b*H + h, i, j) is a pure function of (seed, offset, bh, i, j),
so the backward regenerates exactly the forward's mask, and the reference reproduces the
kernels' mask bit for bit.  The Triton templates implement the same arithmetic
(`kernels/triton/*`: `_dropout_keep`); keep the two in step.

    c0 = (i * Sk + j) mod 2^32,  c1 = bh
    h  = fmix32((c0 ^ seed_lo) * 0x9E3779B1 + fmix32((c1 ^ seed_hi) + 0x85EBCA6B))   (mod 2^32)
    u  = (h >> 8) * 2^-24;  keep iff u >= p;  kept values are scaled by 1 / (1 - p)

fmix32 is MurmurHash3's finaliser.  seed is an int64 tensor [seed, offset]; seed_lo and
seed_hi are their low 32 bits.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    h = h ^ (h >> 16)
    return h


def uniform(seed: torch.Tensor, bh: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    s = seed.to(torch.int64).cpu().tolist() if seed.device.type != "meta" else [0, 0]
    seed_lo, seed_hi = s[0] & M32, s[1] & M32
    inner = _fmix32(((bh ^ seed_hi) + 0x85EBCA6B) & M32)
    h = _fmix32((((c0 ^ seed_lo) * 0x9E3779B1) + inner) & M32)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def make_seed(device) -> torch.Tensor:
    """A fresh (seed, offset) pair drawn from torch's generator (so torch.manual_seed controls it)."""
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, device=device)


def dropout_scale(seed, p: float, B: int, H: int, rows: torch.Tensor, sk: int, device) -> torch.Tensor:
    """[B, H, len(rows), Sk] fp32: 0 where dropped, 1/(1-p) where kept."""
    bh = torch.arange(B * H, device=device, dtype=torch.int64).view(B, H, 1, 1)
    c0 = ((rows.to(torch.int64).view(1, 1, -1, 1) * sk + torch.arange(sk, device=device).view(1, 1, 1, -1))
          & M32)
    u = uniform(seed, bh, c0)
    return (u >= p).to(torch.float32) / (1.0 - p)
