"""FP8 forward throughput rows (H100): our kernels vs cuDNN FP8 SDPA, quantisation timed apart.

    python -m fa3_inductor.bench.fp8_rows [--hdims 128 256] [--seqlens 2048 ... 16384] [--causal]
                                          [--kernels cuda triton] [--sweep] [--json out.json]
    python -m fa3_inductor.bench.fp8_rows --quant-only [...]   (the quantisation pass alone,
                                          old kernel vs new: fa3_inductor/bench/fp8_quant.py)

Each row times one FP8 kernel ("cuda": the CUDA template, "triton": fp8_fwd.tmpl), and beside it
cuDNN's bf16 SDPA on the same bf16 inputs (the 16-bit speed the FP8 path has to beat).

Shapes follow the FA3 paper: batch * seqlen = 16k tokens, hidden 2048 (heads = 2048 / hdim).
TFLOP/s counts 4 * b * h * sq * sk * d (halved for causal) over the attention kernel time
alone ("attn"), and over quantisation + attention ("attn+quant").  cuDNN is called through
F.scaled_dot_product_attention with float8_e4m3fn inputs under SDPBackend.CUDNN_ATTENTION;
where the installed torch refuses that, the column says n/a (the reason is printed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from .timing import time_ms


def _time_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    return time_ms(fn, warmup=warmup, iters=iters)


def _cudnn_fp8(q, k, v, causal, scale):
    """ms of cuDNN SDPA on fp8 inputs, or the reason it cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q8, k8, v8, is_causal=causal, scale=scale)
            torch.cuda.synchronize()
            return _time_ms(lambda: F.scaled_dot_product_attention(q8, k8, v8, is_causal=causal, scale=scale))
    except Exception as exc:  # unsupported dtype/backend combination in this torch
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def _cudnn_bf16(q, k, v, causal, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale))
    except Exception:  # noqa: BLE001 - the column then says n/a
        return None


def row(d, s, causal, tiles=None, kernel="triton", block_n=None, **variant):
    from ..fp8 import attention, cuda_attention, quantize
    from ..spec import AttentionSpec
    b, h = max(1, 16384 // s), 2048 // d
    spec = AttentionSpec(window_right=0 if causal else None, out_dtype="bfloat16")
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = 1 / math.sqrt(d)
    signs = attention.signs_for(spec, d, q.device)
    if kernel == "cuda":
        bm, bn = cuda_attention.tiles_for(d, causal, block_n)
        shown = [bm, bn] + [f"{k}={v}" for k, v in variant.items()]
        quant = lambda: quantize.quantize_qkv(q, k, v, bm, bn, signs, permute=True)  # noqa: E731
        attn = lambda qq: cuda_attention.forward(q, k, v, scale, spec, signs, quantized=qq,  # noqa: E731
                                                 block_n=block_n, **variant)
    else:
        bm, bn, _, _ = attention.tiles_for(d, tiles)
        shown = list(attention.tiles_for(d, tiles))
        quant = lambda: quantize.quantize_qkv(q, k, v, bm, bn, signs)  # noqa: E731
        attn = lambda qq: attention.forward(q, k, v, None, None, None, None, scale, spec,  # noqa: E731
                                            quantized=qq, tiles=tiles, kernel="triton")
    qq = quant()
    t_quant = _time_ms(quant)
    t_attn = _time_ms(lambda: attn(qq))
    flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    cudnn = _cudnn_fp8(q, k, v, causal, scale)
    bf16 = _cudnn_bf16(q, k, v, causal, scale)
    return {"kernel": kernel, "hdim": d, "seqlen": s, "batch": b, "heads": h, "causal": causal, "tiles": shown,
            "cudnn_bf16_tflops": flops / bf16 / 1e9 if bf16 else "n/a",
            "quant_ms": t_quant, "attn_ms": t_attn,
            "tflops_attn": flops / t_attn / 1e9, "tflops_attn_quant": flops / (t_attn + t_quant) / 1e9,
            "cudnn_fp8_tflops": flops / cudnn / 1e9 if isinstance(cudnn, float) else "n/a",
            "cudnn_note": "" if isinstance(cudnn, float) else cudnn}


def table(rows) -> str:
    lines = ["| kernel | hdim | seqlen | causal | tiles | quant ms | attn ms | TFLOP/s attn | TFLOP/s attn+quant "
             "| cuDNN FP8 TFLOP/s | cuDNN bf16 TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cud, b16 = (f"{x:.0f}" if isinstance(x, float) else x for x in (r["cudnn_fp8_tflops"], r["cudnn_bf16_tflops"]))
        lines.append(f"| {r['kernel']} | {r['hdim']} | {r['seqlen']} | {r['causal']} | {r['tiles']} | {r['quant_ms']:.3f} | "
                     f"{r['attn_ms']:.3f} | {r['tflops_attn']:.0f} | {r['tflops_attn_quant']:.0f} | {cud} | {b16} |")
    notes = sorted({r["cudnn_note"] for r in rows if r["cudnn_note"]})
    return "\n".join(lines + [f"cuDNN n/a: {n}" for n in notes])


SWEEP = {64: [(128, 64, 8, 3), (128, 64, 4, 3)], 128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3)],
         256: [(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2)]}
# Key tiles of the CUDA template's FP8 instantiations (multiples of 32); d128 x 256 spills.
CUDA_SWEEP = {64: [128, 192], 128: [128, 160, 192], 256: [96, 128]}
# Schedule variants timed at the default tile with --variants (seqlen 8k and 16k).
CUDA_VARIANTS = [dict(persistent=True), dict(stages=3), dict(persistent=True, stages=3)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hdims", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--both", action="store_true", help="causal and non-causal rows")
    ap.add_argument("--kernels", nargs="+", default=["cuda", "triton"], choices=["cuda", "triton"])
    ap.add_argument("--sweep", action="store_true", help="time the candidate tile configs (seqlen 8k)")
    ap.add_argument("--variants", action="store_true",
                    help="CUDA kernel: default vs persistent / 3-stage at seqlen 8k and 16k")
    ap.add_argument("--json")
    ap.add_argument("--quant-only", action="store_true",
                    help="time the quantisation pass alone, old kernel vs new (bench/fp8_quant.py)")
    args, rest = ap.parse_known_args(argv)
    if args.quant_only:
        from . import fp8_quant
        fwd = ["--hdims", *map(str, args.hdims), "--seqlens", *map(str, args.seqlens)] + rest
        fwd += ["--causal"] * args.causal + (["--json", args.json] if args.json else [])
        return fp8_quant.main(fwd)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    rows = []
    causals = [False, True] if args.both else [args.causal]
    for causal in causals:
        for d in args.hdims:
            for kernel in args.kernels:
                if args.variants and kernel == "cuda":
                    rows += [row(d, s, causal, kernel="cuda", **v) for s in (8192, 16384)
                             for v in [{}] + CUDA_VARIANTS]
                elif args.sweep:
                    if kernel == "cuda":
                        rows += [row(d, 8192, causal, kernel="cuda", block_n=bn) for bn in CUDA_SWEEP.get(d, [])]
                    else:
                        rows += [row(d, 8192, causal, tiles=t) for t in SWEEP.get(d, [])]
                else:
                    rows += [row(d, s, causal, kernel=kernel) for s in args.seqlens]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
