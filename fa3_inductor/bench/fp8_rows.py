"""FP8 forward throughput rows (H100): our kernels vs cuDNN FP8 SDPA, quantisation timed apart.

    python -m fa3_inductor.bench.fp8_rows [--hdims 128 256] [--seqlens 2048 ... 16384] [--causal]
                                          [--kernels cuda triton] [--sweep] [--json out.json]
    python -m fa3_inductor.bench.fp8_rows --quant-only [...]   (the quantisation pass alone,
                                          old kernel vs new: fa3_inductor/bench/fp8_quant.py)

Each row times one FP8 kernel ("cuda": the CUDA template, "triton": fp8_fwd.tmpl), and beside it
cuDNN's bf16 SDPA on the same bf16 inputs (the 16-bit speed the FP8 path has to beat).

Shapes follow the FA3 paper: batch * seqlen = 16k tokens, hidden 2048 (heads = 2048 / hdim).
TFLOP/s counts 4 * b * h * sq * sk * d (halved for causal) over the attention kernel time
alone ("attn"), and over quantisation + attention ("attn+quant").  cuDNN's FP8 SDPA is called
through F.scaled_dot_product_attention with float8_e4m3fn inputs under
SDPBackend.CUDNN_ATTENTION, or where this torch refuses that (2.11 does), through the cuDNN
frontend's graph API (optional package nvidia-cudnn-frontend; bench/cudnn_fp8.py).  Without
either the column says n/a and the reason is printed.
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
    """(ms, note, relative error) of cuDNN's FP8 SDPA, or (None, reason, None).  torch's SDPA
    first; where this torch refuses float8 inputs (2.11 does), the cuDNN frontend's graph API
    (bench/cudnn_fp8.py).  The relative error of its output against bf16 SDPA on the same
    e4m3-rounded inputs shows that the peer computes the same attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    from . import cudnn_fp8
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q8, k8, v8, is_causal=causal, scale=scale)
            torch.cuda.synchronize()
            return (_time_ms(lambda: F.scaled_dot_product_attention(q8, k8, v8, is_causal=causal, scale=scale)),
                    "cuDNN FP8 via torch SDPA", None)
    except Exception as exc:  # unsupported dtype/backend combination in this torch
        torch_reason = f"torch SDPA: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    ms, note = cudnn_fp8.sdpa_fp8_ms(q8, k8, v8, causal, scale, _time_ms)
    if ms is None:
        return None, f"{torch_reason}; {note}", None
    out = cudnn_fp8.sdpa_fp8_out(q8, k8, v8, causal, scale)
    ref = F.scaled_dot_product_attention(*(t.to(torch.bfloat16) for t in (q8, k8, v8)),
                                         is_causal=causal, scale=scale).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    return ms, note, rel


def _cudnn_bf16(q, k, v, causal, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale))
    except Exception:  # noqa: BLE001 - the column then says n/a
        return None


def _inputs(d, s, causal):
    """One row's shape (b * s = 16k tokens, hidden 2048) and bf16 inputs: (b, h, spec, q, k, v,
    scale, signs)."""
    from ..fp8 import attention
    from ..spec import AttentionSpec
    b, h = max(1, 16384 // s), 2048 // d
    spec = AttentionSpec(window_right=0 if causal else None, out_dtype="bfloat16")
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = 1 / math.sqrt(d)
    return b, h, spec, q, k, v, scale, attention.signs_for(spec, d, q.device)


def _row(kernel, d, s, b, h, causal, tiles, t_quant, t_attn, earlier, q, k, v, scale) -> dict:
    """A table row: our timings (ms) as TFLOP/s next to cuDNN's FP8 and bf16 SDPA on q, k, v."""
    flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    cudnn, cudnn_note, cudnn_rel = _cudnn_fp8(q, k, v, causal, scale)
    bf16 = _cudnn_bf16(q, k, v, causal, scale)
    return {"kernel": kernel, "hdim": d, "seqlen": s, "batch": b, "heads": h, "causal": causal, "tiles": tiles,
            "cudnn_bf16_tflops": flops / bf16 / 1e9 if bf16 else "n/a",
            "quant_ms": t_quant, "attn_ms": t_attn,
            "tflops_attn": flops / t_attn / 1e9, "tflops_attn_quant": flops / (t_attn + t_quant) / 1e9,
            "tflops_attn_earlier": flops / earlier / 1e9 if earlier else None,
            "cudnn_fp8_tflops": flops / cudnn / 1e9 if cudnn else "n/a",
            "vs_cudnn_fp8": cudnn / t_attn if cudnn else "n/a",
            "cudnn_fp8_relerr": cudnn_rel, "cudnn_note": cudnn_note}


def variant_rows(d, s, causal, variants: dict) -> list[dict]:
    """The CUDA FP8 kernel at its default tile and each of `variants` (name -> config_for
    switches: exp_poly, persistent, block_n), timed interleaved (three rounds, medians) on the
    same inputs, quantised once per tile, each as a row next to cuDNN's FP8 SDPA."""
    from ..fp8 import cuda_attention, quantize
    from .other_build import interleaved
    b, h, spec, q, k, v, scale, signs = _inputs(d, s, causal)
    fns = {"default": {}, **variants}
    tiles = {name: cuda_attention.tiles_for(d, causal, **kw) for name, kw in fns.items()}
    quantized = {t: quantize.quantize_qkv(q, k, v, *t, signs, permute=True) for t in set(tiles.values())}
    t_quant = _time_ms(lambda: quantize.quantize_qkv(q, k, v, *tiles["default"], signs, permute=True))
    med = interleaved({name: (lambda kw=kw, qq=quantized[tiles[name]]:
                              cuda_attention.forward(q, k, v, scale, spec, signs, quantized=qq, **kw))
                       for name, kw in fns.items()}, None, 3, _time_ms)
    return [_row(f"cuda {name}", d, s, b, h, causal, list(tiles[name]), t_quant, med[name], None, q, k, v, scale)
            for name in fns]


def row(d, s, causal, tiles=None, kernel="triton", block_n=None, against=None, **variant):
    from ..fp8 import attention, cuda_attention, quantize
    b, h, spec, q, k, v, scale, signs = _inputs(d, s, causal)
    if kernel == "cuda":
        bm, bn = cuda_attention.tiles_for(d, causal, block_n, **variant)
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
    earlier = None
    if against and kernel == "cuda":  # this build and the earlier one, interleaved (bench/other_build.py)
        from .other_build import interleaved
        med = interleaved({"cuda": lambda: attn(qq)}, against, 3, _time_ms)
        t_attn, earlier = med["cuda"], med["cuda (earlier)"]
    else:
        t_attn = _time_ms(lambda: attn(qq))
    return _row(kernel, d, s, b, h, causal, shown, t_quant, t_attn, earlier, q, k, v, scale)


def table(rows) -> str:
    lines = ["| kernel | hdim | seqlen | causal | tiles | quant ms | attn ms | TFLOP/s attn | TFLOP/s attn+quant "
             "| cuDNN FP8 TFLOP/s | attn / cuDNN FP8 | cuDNN bf16 TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cud, ratio, b16 = (f"{x:.0f}" if isinstance(x, float) and x > 10 else f"{x:.2f}" if isinstance(x, float) else x
                           for x in (r["cudnn_fp8_tflops"], r["vs_cudnn_fp8"], r["cudnn_bf16_tflops"]))
        lines.append(f"| {r['kernel']} | {r['hdim']} | {r['seqlen']} | {r['causal']} | {r['tiles']} | {r['quant_ms']:.3f} | "
                     f"{r['attn_ms']:.3f} | {r['tflops_attn']:.0f} | {r['tflops_attn_quant']:.0f} | {cud} | {ratio} | {b16} |")
    notes = sorted({r["cudnn_note"] for r in rows if r["cudnn_note"]})
    earlier = [f"d{r['hdim']} {'causal' if r['causal'] else 'non-causal'} {r['seqlen']}: "
               f"{r['tflops_attn']:.0f} vs {r['tflops_attn_earlier']:.0f}" for r in rows if r.get("tflops_attn_earlier")]
    if earlier:
        lines.append("this build vs the earlier build (TFLOP/s attn, interleaved medians): " + "; ".join(earlier))
    errs = [r["cudnn_fp8_relerr"] for r in rows if r.get("cudnn_fp8_relerr") is not None]
    if errs:
        notes.append(f"cuDNN FP8 output vs bf16 SDPA on the same e4m3 inputs: relative error "
                     f"{min(errs):.2e}-{max(errs):.2e}")
    return "\n".join(lines + [f"cuDNN: {n}" for n in notes])


SWEEP = {64: [(128, 64, 8, 3), (128, 64, 4, 3)], 128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3)],
         256: [(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2)]}
# Tile candidates of the CUDA template's FP8 instantiations (key tiles in multiples of 32; d128
# x 256 spills).  d128 with 192 query rows: three consumer warpgroups of 160 registers, which
# hold two S tiles and O only up to 64 keys (intra-warpgroup overlap) or one S tile up to 128.
CUDA_SWEEP = {64: [dict(block_n=128), dict(block_n=192)],
              128: [dict(block_n=128), dict(block_n=160), dict(block_n=192), dict(block_m=192, block_n=64),
                    dict(block_m=192, block_n=128, intra_wg=False), dict(block_m=192, block_n=96, intra_wg=False)],
              256: [dict(block_n=96), dict(block_n=128)]}
# Schedule and softmax variants timed at the default tile with --variants: every n-th exponential
# on the FMA pipe (exp_poly), the persistent grid (causal: tiles in pairs, tile_of), key tiles.
VARIANTS = {"x4": dict(exp_poly=4), "x3": dict(exp_poly=3), "persistent": dict(persistent=True),
            "per-tile": dict(persistent=False), "n224": dict(block_n=224), "n192": dict(block_n=192)}
CUDA_VARIANTS = list(VARIANTS.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hdims", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--both", action="store_true", help="causal and non-causal rows")
    ap.add_argument("--kernels", nargs="+", default=["cuda", "triton"], choices=["cuda", "triton"])
    ap.add_argument("--sweep", action="store_true", help="time the candidate tile configs (at --seqlens)")
    ap.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), metavar="NAME",
                    help="CUDA kernel: default vs these VARIANTS (all when none named: "
                         f"{', '.join(VARIANTS)}), interleaved, at --seqlens")
    ap.add_argument("--json")
    ap.add_argument("--against", metavar="CACHE",
                    help="CUDA rows: also time the earlier build in kernel cache CACHE, interleaved")
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
                if args.variants is not None and kernel == "cuda":
                    chosen = {n: VARIANTS[n] for n in (args.variants or VARIANTS)}
                    rows += [r for s in args.seqlens for r in variant_rows(d, s, causal, chosen)]
                elif args.sweep:
                    if kernel == "cuda":
                        rows += [row(d, s, causal, kernel="cuda", **c) for c in CUDA_SWEEP.get(d, [])
                                 for s in args.seqlens]
                    else:
                        rows += [row(d, 8192, causal, tiles=t) for t in SWEEP.get(d, [])]
                else:
                    rows += [row(d, s, causal, kernel=kernel, against=args.against) for s in args.seqlens]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
