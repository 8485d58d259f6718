"""FP8 attention accuracy experiment (FA3 paper, section 4.3): RMSE against an fp64 reference.

Q, K, V ~ N(0, 1) with 0.1% of the entries replaced by N(0, 10^2) outliers.  Variants:
  fp16          : fp16 inputs and fp16 P for the P @ V GEMM, fp32 accumulation (FA2/FA3 fp16)
  fp8 per-tensor: one scale per tensor for Q, K, V (the usual FP8 baseline)
  fp8 block     : one scale per kernel tile (BLOCK_M rows of Q, BLOCK_N rows of K/V)
  fp8 incoherent: per-tensor scales after the Hadamard rotation of Q and K
  fp8 block+inc : both (what fa3_inductor's FP8 forward does)
  fp8 cuda / fp8 triton: (CUDA + --kernel only) the FP8 kernels themselves (the CUDA template's
                  and the Triton one), each with its own tiles
The FP8 variants are the torch emulation of the kernel (fa3_inductor/fp8/emulate.py):
every e4m3 rounding is applied (also of P), the rest runs in fp32, so the CPU numbers
are the FP8 numerics without a GPU.

    python scripts/fp8_accuracy.py --seqlens 1024 2048 --hdims 128 256          # CPU
    python scripts/fp8_accuracy.py --device cuda --seqlens 2048 4096 8192 16384 --kernel
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fa3_inductor import reference  # noqa: E402
from fa3_inductor.fp8 import emulate  # noqa: E402
from fa3_inductor.fp8.attention import tiles_for  # noqa: E402
from fa3_inductor.spec import AttentionSpec  # noqa: E402

KERNELS = ("cuda", "triton")
VARIANTS = [("fp8 per-tensor", "tensor", False), ("fp8 block", "block", False),
            ("fp8 incoherent", "tensor", True), ("fp8 block+inc", "block", True)]


def outlier_normal(shape, gen, frac=1e-3, outlier_std=10.0):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    pick = torch.rand(shape, generator=gen, dtype=torch.float64) < frac
    return torch.where(pick, torch.randn(shape, generator=gen, dtype=torch.float64) * outlier_std, x)


def fp16_attention(q, k, v, scale):
    """FA-style fp16: S in fp32 from fp16 inputs, P = exp(S - max) rounded to fp16, fp32 P @ V."""
    q16, k16, v16 = (t.to(torch.float16).to(torch.float32) for t in (q, k, v))
    s = torch.matmul(q16, k16.transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    l = p.sum(-1, keepdim=True)
    o = torch.matmul(p.to(torch.float16).to(torch.float32), v16) / l
    return o.to(torch.float16)


def rmse(a, ref):
    return math.sqrt(((a.to(torch.float64) - ref) ** 2).mean().item())


def run_one(b, h, s, d, device, kernel, causal, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * s + d)
    q, k, v = (outlier_normal((b, h, s, d), gen).to(device) for _ in range(3))
    scale = 1.0 / math.sqrt(d)
    spec = AttentionSpec(window_right=0 if causal else None, out_dtype="float64")
    ref, _ = reference.forward(q, k, v, None, None, None, None, scale, spec)
    bm, bn, _, _ = tiles_for(d)
    row = {"seqlen": s, "hdim": d, "batch": b, "heads": h, "causal": causal, "device": str(device)}
    row["fp16"] = rmse(fp16_attention(q, k, v, scale), ref)
    for name, gran, inc in VARIANTS:
        out, _ = emulate.attention(q.float(), k.float(), v.float(), scale, spec, block_m=bm, block_n=bn,
                                   granularity=gran, incoherent=inc)
        row[name] = rmse(out, ref)
    if kernel:
        from fa3_inductor.fp8 import attention
        kspec = spec.replace(out_dtype="bfloat16")
        for name in KERNELS:
            out, _ = attention.forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None, None, None, scale,
                                       kspec, kernel=name)
            row[f"fp8 {name}"] = rmse(out, ref)
    row["per-tensor / block+inc"] = row["fp8 per-tensor"] / row["fp8 block+inc"]
    if kernel:
        row["per-tensor / cuda"] = row["fp8 per-tensor"] / row["fp8 cuda"]
    return row


def table(rows) -> str:
    kern = "fp8 cuda" in rows[0]
    cols = ["fp16"] + [v[0] for v in VARIANTS] + ([f"fp8 {k}" for k in KERNELS] if kern else [])
    ratios = ["per-tensor / block+inc"] + (["per-tensor / cuda"] if kern else [])
    lines = ["| seqlen | hdim | " + " | ".join(cols + ratios) + " |",
             "|---|---|" + "---|" * (len(cols) + len(ratios))]
    for r in rows:
        lines.append(f"| {r['seqlen']} | {r['hdim']} | " + " | ".join(f"{r[c]:.2e}" for c in cols)
                     + " | " + " | ".join(f"{r[c]:.2f}x" for c in ratios) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--hdims", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--kernel", action="store_true", help="also run the FP8 kernels (CUDA device)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    for d in args.hdims:
        for s in args.seqlens:
            t0 = time.time()
            rows.append(run_one(args.batch, args.heads, s, d, torch.device(args.device), args.kernel, args.causal))
            print(f"# seqlen={s} hdim={d}: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
