"""Incoherent processing: a random orthogonal M = diag(signs) @ H / sqrt(d).

Q and K are both multiplied by the same M before FP8 quantisation.  Because M is
orthogonal, (Q M)(K M)^T = Q M M^T K^T = Q K^T exactly (in exact arithmetic), while a
large entry in one coordinate is spread over all d coordinates, which shrinks the
amax that sets each block's FP8 scale and so the quantisation error of everything else.

H is the Sylvester Hadamard matrix (d a power of two): H_1 = [1], H_2n = [[H, H], [H, -H]],
equivalently H[i, j] = (-1)^popcount(i & j).  x @ (diag(s) H / sqrt(d)) is a fast
Walsh-Hadamard transform of x * s: O(d log d) butterflies instead of a d x d matmul.
The Triton quantisation kernel builds the +-1 matrix in registers and runs the transform
on the tensor cores instead (see kernels/triton/fp8_quant.tmpl for why).
"""
from __future__ import annotations

import math
import zlib

import torch

# Base seed of the sign vectors.  Any fixed value works: the signs only have to be
# independent of the data, and deterministic so that every run of a compiled model
# (and every rank) uses the same rotation.
DEFAULT_SEED = 0x3A8F_5EED

_SIGNS_CACHE: dict = {}


def is_pow2(d: int) -> bool:
    return d >= 1 and (d & (d - 1)) == 0


def check_dim(d: int) -> None:
    if not is_pow2(d):
        raise ValueError(f"fp8 incoherent processing needs a power-of-two head dim (Sylvester Hadamard); got {d}")


def site_seed(site_key: str = "", seed: int = DEFAULT_SEED) -> int:
    """Deterministic 31-bit seed for one attention site (site_key: e.g. spec.to_json() or a node name)."""
    return (zlib.crc32(site_key.encode()) ^ (seed & 0xFFFFFFFF)) & 0x7FFFFFFF


def random_signs(d: int, seed: int = DEFAULT_SEED, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """[d] vector of +-1, a pure function of (d, seed) on every device (drawn on the CPU)."""
    check_dim(d)
    key = (d, seed, str(torch.device(device)), dtype)
    cached = _SIGNS_CACHE.get(key)
    if cached is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        bits = torch.randint(0, 2, (d,), generator=gen)
        cached = (1 - 2 * bits).to(dtype).to(device)
        _SIGNS_CACHE[key] = cached
    return cached


def hadamard_matrix(d: int, dtype=torch.float64, normalized: bool = True, device="cpu") -> torch.Tensor:
    """Sylvester Hadamard H_d (symmetric); divided by sqrt(d) when normalized (then orthogonal)."""
    check_dim(d)
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d) if normalized else h


def rotation_matrix(signs: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """M = diag(signs) @ H / sqrt(d): the explicit matrix, for tests only (O(d^2))."""
    d = signs.shape[0]
    return signs.to(dtype).view(d, 1) * hadamard_matrix(d, dtype, device=signs.device)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalised fast Walsh-Hadamard transform along the last dim: x @ H / sqrt(d), O(d log d).

    Butterfly stage with half-width h pairs coordinates (i, i + h) inside blocks of 2h;
    doing h = 1, 2, 4, ... yields exactly the Sylvester ordering of hadamard_matrix().
    """
    d = x.shape[-1]
    check_dim(d)
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) / math.sqrt(d)).to(x.dtype)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x @ M with M = diag(signs) H / sqrt(d), computed in fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return fwht(x.to(acc) * signs.to(device=x.device, dtype=acc))


__all__ = ["DEFAULT_SEED", "is_pow2", "check_dim", "site_seed", "random_signs", "hadamard_matrix",
           "rotation_matrix", "fwht", "rotate"]
