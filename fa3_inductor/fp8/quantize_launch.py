"""The Triton launchers of the FP8 quantisation pass (kernels/triton/fp8_quant.tmpl).

Two kernels with the same results as `quantize.quantize_ref`: fp8_quant_qkv_kernel (the
default: persistent and software-pipelined, Q, K and V in one launch, the rotation as GEMMs of
width min(d, 128)) and fp8_quant_kernel (one program per tile, one launch per tensor), kept for
A/B timing: FA3_FP8_QUANT=legacy or kernel="legacy" selects it.  `quantize.quantize_qkv` is the
entry point; this module holds how the work is cut into tiles, slots and programs.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch

from . import hadamard
from .quantize import FP8, PERMUTE_GROUP, VT_ALIGN

QUANT_KERNEL_ENV = "FA3_FP8_QUANT"
QUANT_KERNELS = ("persistent", "legacy")


def quant_kernel(kernel: Optional[str] = None) -> str:
    """Which Triton quantisation kernel runs: `kernel`, else $FA3_FP8_QUANT, else "persistent"."""
    k = kernel or os.environ.get(QUANT_KERNEL_ENV) or "persistent"
    if k not in QUANT_KERNELS:
        raise ValueError(f"fp8 quantisation kernel {k!r} not in {QUANT_KERNELS} (${QUANT_KERNEL_ENV})")
    return k


def _check_permute(block: int, transpose: bool, permute: bool) -> None:
    if permute and (not transpose or block % PERMUTE_GROUP):
        raise ValueError(f"quantize_triton: permute needs transpose=True and block % {PERMUTE_GROUP} == 0 "
                         f"(got transpose={transpose}, block={block})")


def quantize_triton(x: torch.Tensor, block: int, signs: Optional[torch.Tensor] = None,
                    transpose: bool = False, num_warps: Optional[int] = None, permute: bool = False,
                    kernel: Optional[str] = None):
    """Fused Triton kernel.  transpose=True writes [B, H, D, S_pad] (S contiguous, for V);
    permute=True (with transpose) writes the CUDA template's layout, permute_keys(V^T).
    kernel: "persistent" / "legacy" (default: quant_kernel()); num_warps overrides the kernel's."""
    _check_permute(block, transpose, permute)
    rotate = signs is not None
    # The persistent kernel rotates row-major tiles only (V, the transposed one, is not rotated).
    if quant_kernel(kernel) == "persistent" and not (rotate and transpose) \
            and _persistent_ok(x.shape[-1], [(block, rotate or transpose)]):
        (out,) = _launch_persistent([_Job(x, block, rotate, transpose, permute)], signs, num_warps)
        return out
    return _quantize_legacy(x, block, signs, transpose, num_warps, permute)


def _quantize_legacy(x, block, signs, transpose, num_warps, permute):
    """fp8_quant_kernel: one program per tile, one launch per tensor."""
    from . import templates
    mod = templates.load("fp8_quant")
    import triton

    B, H, S, D = x.shape
    hadamard.check_dim(D)  # tl.arange needs a power of two even without the rotation
    nblk = triton.cdiv(S, block)
    align = PERMUTE_GROUP if permute else VT_ALIGN
    s_pad = -(-S // align) * align
    s_store = s_pad if permute else S  # the permuted layout's pad is written (zeros), the plain one not
    if transpose:
        y = torch.empty(B, H, D, s_pad, dtype=FP8, device=x.device)
        ys = (y.stride(0), y.stride(1), y.stride(3), y.stride(2))
    else:
        y = torch.empty(B, H, S, D, dtype=FP8, device=x.device)
        ys = (y.stride(0), y.stride(1), y.stride(2), y.stride(3))
    scales = torch.empty(B, H, nblk, dtype=torch.float32, device=x.device)
    signs_arg = signs.to(device=x.device, dtype=torch.float32).contiguous() if signs is not None else scales
    if num_warps is None:
        # The tile lives in registers (fp32 BLOCK x D, plus the rotation's accumulator).
        num_warps = 8 if block * D >= 128 * 128 else 4
    mod.fp8_quant_kernel[(nblk, B * H)](
        x, y, scales, signs_arg, S, s_store, H,
        *x.stride(), *ys, scales.stride(0), scales.stride(1),
        BLOCK=block, BLOCK_P2=triton.next_power_of_2(block), D=D, LOG2_D=D.bit_length() - 1,
        HADAMARD=signs is not None, PERMUTE=permute,
        INTERPRET=templates.interpreting(),
        num_warps=num_warps,
    )
    return y, scales


# Rotations the persistent kernel builds from GEMMs of at most this width (H_D = H_{D/W} (x) H_W).
_ROT_WIDTH = 128


def _persistent_ok(d: int, tiles) -> bool:
    """The persistent kernel handles this head dim and these (block, GEMM: rotated or transposed)
    tiles: tl.dot needs 16 rows and columns, and there are at most two GEMM column chunks; else
    the legacy kernel runs."""
    if not hadamard.is_pow2(d):
        return False
    for block, gemm in tiles:
        if block % 16 or (gemm and not 16 <= d <= 2 * _ROT_WIDTH):
            return False
    return True


@dataclasses.dataclass
class _Job:
    """One tensor of a persistent launch: x [B, H, S, D] -> fp8 tiles of `block` rows."""
    x: torch.Tensor
    block: int
    rotate: bool
    transpose: bool = False
    permute: bool = False


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def slot_constexprs(block: int, rotate: bool, transpose: bool, permute: bool) -> dict:
    """A slot's constexprs.  A tile of 96/160/192/224 rows is a power-of-two part a (BA rows) and
    the rest, part b (held in BB rows, a power of two of at least 16, masked past its end)."""
    ba = 1 << (block.bit_length() - 1)
    bb = max(16, _next_pow2(block - ba)) if block > ba else 0
    return dict(BLOCK=block, BA=ba, BB=bb, ROT=rotate, TRANS=transpose, PERMUTE=permute)


# Shared memory the kernel may use (227 KB per block on the H100), and what it needs besides the
# pipeline buffers (layout conversions, reductions; measured 16-20 KB).
_SMEM_LIMIT = 227 * 1024
_SMEM_SCRATCH = 24 * 1024


def persistent_config(d: int, tiles) -> dict:
    """Launch-wide constexprs for head dim d and tiles [(block, rotated)]: the rotation's GEMM
    width K, the 1/sqrt(d) handling, and the pipeline depth (3 stages where the shared memory
    holds them, else 2)."""
    k = min(d, _ROT_WIDTH)
    pow4 = (d.bit_length() - 1) % 2 == 0
    # 1/sqrt(d) is folded into the rotation when it is a power of two; else it is applied the way
    # torch applies `y / math.sqrt(d)`: a division by fp32 sqrt(d) on the CPU, a product with
    # fp32(1 / sqrt(d)) on CUDA.
    root = float(torch.tensor(math.sqrt(d), dtype=torch.float32))
    inv_root = float(torch.tensor(1.0 / math.sqrt(d), dtype=torch.float32))
    rows = max(c["BA"] + c["BB"] for c in (slot_constexprs(b, r, False, False) for b, r in tiles))
    stage = rows * d * 2                                    # one 16-bit tile in flight
    rot = d * k * 2                                         # the rotation matrices (or the identity)
    stages = 3 if 3 * stage + rot + _SMEM_SCRATCH <= _SMEM_LIMIT else 2
    return dict(D=d, K=k, POST=1.0 if pow4 else root, INV_POST=1.0 if pow4 else inv_root, STAGES=stages)


def rotation_fold(d: int) -> float:
    """The factor of 1/sqrt(d) folded into the rotation GEMMs: all of it when it is a power of two."""
    return 1.0 / math.sqrt(d) if (d.bit_length() - 1) % 2 == 0 else 1.0


_ROT_OPERANDS: dict = {}


def _rotation_operand(signs: torch.Tensor, d: int, dtype, device) -> torch.Tensor:
    """hadamard.rotation_chunks for the kernel, cached per sign tensor (the signs of a site are
    one cached tensor, hadamard.random_signs), so a forward pays a dictionary look-up."""
    key = (signs.data_ptr(), signs._version, str(signs.device), dtype, str(device), d)
    hit = _ROT_OPERANDS.get(key)
    if hit is not None and hit[0] is signs:
        return hit[1]
    if len(_ROT_OPERANDS) > 64:
        _ROT_OPERANDS.clear()
    m = hadamard.rotation_chunks(signs.to(device=device, dtype=torch.float32), min(d, _ROT_WIDTH), dtype,
                                 rotation_fold(d)).contiguous()
    _ROT_OPERANDS[key] = (signs, m)  # holding `signs` keeps its address from being reused
    return m


def _slot(job: _Job):
    """(outputs, runtime args, constexprs) of one slot of fp8_quant_qkv_kernel."""
    x, block = job.x, job.block
    B, H, S, D = x.shape
    nblk = -(-S // block)
    s_pad = -(-S // (PERMUTE_GROUP if job.permute else VT_ALIGN)) * (PERMUTE_GROUP if job.permute else VT_ALIGN)
    if job.transpose:
        # The pad keys (S .. s_pad) are written too, as zeros: whole 16-byte rows, and a defined pad.
        y = torch.empty(B, H, D, s_pad, dtype=FP8, device=x.device)
        ys, s_store = (y.stride(0), y.stride(1), y.stride(3), y.stride(2)), s_pad
    else:
        y = torch.empty(B, H, S, D, dtype=FP8, device=x.device)
        ys, s_store = y.stride(), S
    scales = torch.empty(B, H, nblk, dtype=torch.float32, device=x.device)
    args = [x, y, scales, None, S, s_store, H, B * H * nblk, *x.stride(), *ys, scales.stride(0), scales.stride(1)]
    return (y, scales), args, slot_constexprs(block, job.rotate, job.transpose, job.permute)


_RM, _N_TILES = 3, 7  # positions in a slot's arguments


def _dummy_slot(like: list) -> tuple:
    """Arguments of an unused slot: the first slot's tensors, no tiles."""
    args = list(like)
    args[_N_TILES] = 0
    return args, slot_constexprs(16, False, False, False)


def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; 0 off the GPU (the interpreter: a few programs instead)."""
    if device.type != "cuda":
        return 0
    from ..ops.triton_impl import sm_count_of
    return sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


_OCCUPANCY: dict = {}
QUANT_WARPS = 8


def _programs_per_sm(kernel, args, const, warps, key) -> int:
    """Programs one SM holds at once (registers, shared memory), from the compiled kernel; 1..2."""
    occ = _OCCUPANCY.get(key)
    if occ is None:
        occ = 1
        try:
            ck = kernel.warmup(*args, grid=(1,), **const, num_warps=warps, num_stages=const["STAGES"])
            ck._init_handles()
            threads = 32 * warps
            by_regs = 65536 // max(1, ck.n_regs * threads)
            by_smem = (228 * 1024) // (ck.metadata.shared + 1024)
            occ = max(1, min(2, by_regs, by_smem))
        except Exception:  # noqa: BLE001 - occupancy is an optimisation; one program per SM works
            occ = 1
        _OCCUPANCY[key] = occ
    return occ


def _launch_persistent(jobs, signs: Optional[torch.Tensor], num_warps: Optional[int] = None,
                       programs: Optional[int] = None):
    """Quantise up to three tensors (same head dim and device) in one fp8_quant_qkv_kernel launch.
    Returns [(y8, scales)] per job.  programs: the grid (default: as many as the SMs hold)."""
    warps = num_warps or QUANT_WARPS
    from . import templates
    mod = templates.load("fp8_quant")
    D = jobs[0].x.shape[-1]
    dev = jobs[0].x.device
    outs, slot_args, slot_const = [], [], []
    for job in jobs:
        out, args, const = _slot(job)
        outs.append(out)
        slot_args.append(args)
        slot_const.append(const)
    while len(slot_args) < 3:
        args, const = _dummy_slot(slot_args[0])
        slot_args.append(args)
        slot_const.append(const)
    rot_dtypes = {j.x.dtype for j in jobs if j.rotate}
    if len(rot_dtypes) > 1:
        raise ValueError(f"fp8 quantisation: rotated tensors of one launch need one dtype (got {rot_dtypes})")
    rot_m = _rotation_operand(signs, D, rot_dtypes.pop(), dev) if rot_dtypes else outs[0][1]
    for a in slot_args:
        a[_RM] = rot_m
    const = dict(persistent_config(D, [(j.block, j.rotate) for j in jobs]), N_SLOTS=len(jobs),
                 INTERPRET=templates.interpreting())
    for i, c in enumerate(slot_const):
        const.update({f"{n}{i}": v for n, v in c.items()})
    args = [a for sa in slot_args for a in sa]
    n_tiles = sum(a[_N_TILES] for a in slot_args)
    if programs is None:
        sms = _sm_count(dev)
        if sms == 0:  # the interpreter: a few programs, each walking several tiles
            programs = 3
        else:
            key = (dev.index, warps, tuple((a[0].dtype, tuple(sorted(c.items()))) for a, c in zip(slot_args, slot_const)),
                   tuple(sorted(const.items())))
            programs = sms * _programs_per_sm(mod.fp8_quant_qkv_kernel, args, const, warps, key)
    programs = max(1, min(programs, n_tiles))
    if n_tiles:
        mod.fp8_quant_qkv_kernel[(programs,)](*args, **const, num_warps=warps, num_stages=const["STAGES"])
    return outs


def quantize_qkv_triton(q, k, v, block_m: int, block_n: int, signs: Optional[torch.Tensor],
                        permute: bool = False, kernel: Optional[str] = None, num_warps: Optional[int] = None):
    """(q8, q_scale, k8, k_scale, vt8, v_scale) for quantize.quantize_qkv: one launch of the
    persistent kernel for the three where it applies, else one quantize_triton per tensor."""
    rot = signs is not None
    if quant_kernel(kernel) == "persistent" and q.shape[-1] == k.shape[-1] == v.shape[-1] \
            and q.device == k.device == v.device and (not rot or q.dtype == k.dtype) \
            and _persistent_ok(q.shape[-1], [(block_m, rot), (block_n, rot), (block_n, True)]):
        _check_permute(block_n, True, permute)
        (q8, qs), (k8, ks), (vt8, vs) = _launch_persistent(
            [_Job(q, block_m, rot), _Job(k, block_n, rot), _Job(v, block_n, False, True, permute)], signs, num_warps)
    else:
        q8, qs = quantize_triton(q, block_m, signs, kernel=kernel, num_warps=num_warps)
        k8, ks = quantize_triton(k, block_n, signs, kernel=kernel, num_warps=num_warps)
        vt8, vs = quantize_triton(v, block_n, None, transpose=True, permute=permute, kernel=kernel, num_warps=num_warps)
    return q8, qs, k8, ks, vt8, vs
