"""Incoherent processing: a random orthogonal M = diag(signs) @ H / sqrt(d).

Q and K are both multiplied by the same M before FP8 quantisation.  Because M is
orthogonal, (Q M)(K M)^T = Q M M^T K^T = Q K^T exactly (in exact arithmetic), while a
large entry in one coordinate is spread over all d coordinates, which shrinks the
amax that sets each block's FP8 scale and so the quantisation error of everything else.

H is the Sylvester Hadamard matrix (d a power of two): H_1 = [1], H_2n = [[H, H], [H, -H]],
equivalently H[i, j] = (-1)^popcount(i & j).  x @ (diag(s) H / sqrt(d)) is a fast
Walsh-Hadamard transform of x * s: O(d log d) butterflies instead of a d x d matmul.
The Triton quantisation kernels run the transform on the tensor cores instead (see
kernels/triton/fp8_quant.tmpl for why): the per-tile kernel with the whole d x d +-1 matrix,
the persistent one with GEMMs of width min(d, 128) (rotation_chunks; two at d = 256).
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


def rotation_chunks(signs: torch.Tensor, width: int, dtype=torch.float32, fold: float = 1.0) -> torch.Tensor:
    """[d, width]: rows c*width .. (c+1)*width - 1 hold diag(signs[c*width : (c+1)*width]) H_width * fold.

    Sylvester's ordering makes H_d = H_{d/width} (x) H_width (H[i, j] = (-1)^popcount(i & j), and
    the bits of i = i1*width + i0 split between the factors), so x @ diag(s) H_d is, per column
    chunk c of the output, sum_c' H_{d/width}[c', c] * (x_c' @ chunk_c'): the persistent
    quantisation kernel's GEMMs (d = 2 * width: u0 + u1 and u0 - u1).  Entries are +-fold; with
    fold a power of two they are exact in fp16/bf16."""
    d = signs.shape[0]
    check_dim(d)
    if width > d or d % width:
        raise ValueError(f"rotation_chunks: width {width} does not divide head dim {d}")
    h = hadamard_matrix(width, torch.float32, normalized=False, device=signs.device)
    s = signs.to(torch.float32).view(d // width, width, 1)
    return (s * h * fold).reshape(d, width).to(dtype)


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
           "rotation_matrix", "rotation_chunks", "fwht", "rotate"]
