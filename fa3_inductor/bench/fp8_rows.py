"""FP8 forward throughput rows (H100): our kernel vs cuDNN FP8 SDPA, quantisation timed apart.

    python -m fa3_inductor.bench.fp8_rows [--hdims 128 256] [--seqlens 2048 ... 16384] [--causal]
                                          [--sweep] [--json out.json]

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


def row(d, s, causal, tiles=None):
    from ..fp8 import attention, quantize
    from ..spec import AttentionSpec
    b, h = max(1, 16384 // s), 2048 // d
    spec = AttentionSpec(window_right=0 if causal else None, out_dtype="bfloat16")
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = 1 / math.sqrt(d)
    bm, bn, _, _ = attention.tiles_for(d, tiles)
    signs = attention.signs_for(spec, d, q.device)
    quant = lambda: quantize.quantize_qkv(q, k, v, bm, bn, signs)  # noqa: E731
    qq = quant()
    t_quant = _time_ms(quant)
    t_attn = _time_ms(lambda: attention.forward(q, k, v, None, None, None, None, scale, spec,
                                                quantized=qq, tiles=tiles))
    flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    cudnn = _cudnn_fp8(q, k, v, causal, scale)
    return {"hdim": d, "seqlen": s, "batch": b, "heads": h, "causal": causal, "tiles": list(attention.tiles_for(d, tiles)),
            "quant_ms": t_quant, "attn_ms": t_attn,
            "tflops_attn": flops / t_attn / 1e9, "tflops_attn_quant": flops / (t_attn + t_quant) / 1e9,
            "cudnn_fp8_tflops": flops / cudnn / 1e9 if isinstance(cudnn, float) else "n/a",
            "cudnn_note": "" if isinstance(cudnn, float) else cudnn}


def table(rows) -> str:
    lines = ["| hdim | seqlen | causal | tiles | quant ms | attn ms | TFLOP/s attn | TFLOP/s attn+quant | cuDNN FP8 TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cud = r["cudnn_fp8_tflops"]
        cud = f"{cud:.0f}" if isinstance(cud, float) else cud
        lines.append(f"| {r['hdim']} | {r['seqlen']} | {r['causal']} | {r['tiles']} | {r['quant_ms']:.3f} | "
                     f"{r['attn_ms']:.3f} | {r['tflops_attn']:.0f} | {r['tflops_attn_quant']:.0f} | {cud} |")
    notes = sorted({r["cudnn_note"] for r in rows if r["cudnn_note"]})
    return "\n".join(lines + [f"cuDNN n/a: {n}" for n in notes])


SWEEP = {64: [(128, 64, 8, 3), (128, 64, 4, 3)], 128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3)],
         256: [(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2)]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hdims", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time the candidate tile configs (seqlen 8k)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    if args.sweep:
        for d in args.hdims:
            for t in SWEEP.get(d, []):
                rows.append(row(d, 8192, args.causal, tiles=t))
    else:
        for d in args.hdims:
            for s in args.seqlens:
                rows.append(row(d, s, args.causal))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
