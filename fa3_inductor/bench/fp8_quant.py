"""The FP8 quantisation pass alone (H100): Q and K rotated, V transposed, old kernel vs new.

    python -m fa3_inductor.bench.fp8_quant [--hdims 128 256] [--seqlens 2048 4096 8192 16384] [--causal]
                                           [--path cuda|triton] [--warps 8 16] [--separate] [--json out.json]
    python -m fa3_inductor.bench.fp8_rows --quant-only [same options]

Shapes as bench/fp8_rows.py: batch * seqlen = 16k tokens, hidden 2048 (heads = 2048 / hdim), bf16, so
each of Q, K, V is 64 MB.  Tiles are the attention kernel's (--path cuda: the CUDA template's, V^T in
its permuted key order, the H100 default; --path triton: fp8_fwd.tmpl's).  Variants:
  legacy       fp8_quant_kernel, one program per tile, three launches (FA3_FP8_QUANT=legacy)
  new wN       fp8_quant_qkv_kernel, persistent and pipelined, one launch, N warps per program
               (--warps, default 8)
  new w8 x3    the same kernel launched once per tensor: what fusing the launches saves (--separate)
The default run (legacy and new w8, hdim 128 and 256, four lengths) takes well under a minute on an
H100, most of it compiling; --warps 8 16 --separate adds a few more compilations.
Time: triton.testing.do_bench (L2 flushed before each call), median.  GB/s counts the bytes the pass
must move: 16-bit Q, K, V read once, fp8 Q, K, V^T (with its pad) and the fp32 scales written once;
"of peak" divides by 3.35 TB/s, the H100 SXM's HBM3.  Each head dim starts with a check of the new
kernel against quantize_ref on the GPU: V^T and its scales must match exactly, rotated Q/K within the
fp32 summation-order bound (scales within a few ulps, a few values in 10^4 one e4m3 step apart).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

PEAK_GBS = 3350.0


def _tiles(d: int, causal: bool, path: str):
    if path == "cuda":
        from ..fp8 import cuda_attention
        bm, bn = cuda_attention.tiles_for(d, causal)
        return bm, bn, True
    from ..fp8 import attention
    bm, bn = attention.tiles_for(d)[:2]
    return bm, bn, False


def _bytes(qq, q, k, v) -> int:
    read = sum(t.numel() * t.element_size() for t in (q, k, v))
    written = sum(t.numel() * t.element_size() for t in (qq.q8, qq.k8, qq.vt8, qq.q_scale, qq.k_scale, qq.v_scale))
    return read + written


def _check(q, k, v, bm, bn, signs, permute) -> str:
    """The new kernel against the torch reference on this GPU (one line)."""
    from ..fp8 import quantize
    got = quantize.quantize_qkv(q, k, v, bm, bn, signs, permute=permute, kernel="persistent")
    ref = quantize.quantize_qkv(q, k, v, bm, bn, signs, impl="ref", permute=permute)
    s = v.shape[2]
    vt, vr = got.vt8.float(), ref.vt8.float()  # values: a -0.0 of V comes out as +0.0
    v_exact = (torch.equal(vt, vr) if permute else torch.equal(vt[..., :s], vr)) and torch.equal(got.v_scale, ref.v_scale)
    parts = [f"V^T exact: {'yes' if v_exact else 'NO'}"]
    for name in ("q", "k"):
        y, yr = getattr(got, f"{name}8").float(), getattr(ref, f"{name}8").float()
        sc, scr = getattr(got, f"{name}_scale"), getattr(ref, f"{name}_scale")
        parts.append(f"{name.upper()} values differing {(y != yr).float().mean().item():.1e}, "
                     f"scales equal {(sc == scr).float().mean().item():.4f} (max rel {((sc - scr).abs() / scr).max().item():.1e})")
    return "; ".join(parts)


def rows(hdims, seqlens, causal=False, path="cuda", warps=(8,), separate=False, check=True, tokens=16384,
         hidden=2048, out=sys.stdout):
    from triton.testing import do_bench

    from ..fp8 import attention, quantize, quantize_launch
    from ..spec import AttentionSpec
    spec = AttentionSpec(window_right=0 if causal else None, out_dtype="bfloat16")
    result = []
    for d in hdims:
        bm, bn, permute = _tiles(d, causal, path)
        signs = attention.signs_for(spec, d, torch.device("cuda"))
        variants = {"legacy": lambda q, k, v: quantize.quantize_qkv(q, k, v, bm, bn, signs, permute=permute,
                                                                    kernel="legacy")}
        for w in warps:
            variants[f"new w{w}"] = (lambda w: lambda q, k, v: quantize.quantize_qkv(
                q, k, v, bm, bn, signs, permute=permute, kernel="persistent", num_warps=w))(w)
        if separate:
            def per_tensor(q, k, v):
                quantize_launch.quantize_triton(q, bm, signs, kernel="persistent")
                quantize_launch.quantize_triton(k, bn, signs, kernel="persistent")
                quantize_launch.quantize_triton(v, bn, None, transpose=True, permute=permute, kernel="persistent")
            variants["new w8 x3"] = per_tensor
        for i, s in enumerate(seqlens):
            b, h = max(1, tokens // s), max(1, hidden // d)
            q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            if check and i == 0:
                print(f"d{d} tiles {bm}x{bn} ({path}{', permuted V^T' if permute else ''}) check: "
                      f"{_check(q, k, v, bm, bn, signs, permute)}", file=out, flush=True)
            nbytes = _bytes(quantize.quantize_qkv(q, k, v, bm, bn, signs, permute=permute), q, k, v)
            for name, fn in variants.items():
                fn(q, k, v)  # compile outside the timing
                ms = do_bench(lambda: fn(q, k, v), warmup=10, rep=40, return_mode="median")
                gbs = nbytes / ms / 1e6
                row = dict(variant=name, hdim=d, seqlen=s, batch=b, heads=h, tiles=[bm, bn], path=path,
                           causal=causal, ms=ms, gbs=gbs, of_peak=gbs / PEAK_GBS, mbytes=nbytes / 1e6)
                result.append(row)
                print(f"| {name:10s} | {d} | {s} | {b}x{h} | {bm}x{bn} | {ms:.4f} | {gbs:.0f} | {gbs / PEAK_GBS:.2f} |",
                      file=out, flush=True)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hdims", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--causal", action="store_true", help="the causal instantiation's tiles")
    ap.add_argument("--path", default="cuda", choices=["cuda", "triton"])
    ap.add_argument("--warps", type=int, nargs="+", default=[8], help="warps per program of the new kernel")
    ap.add_argument("--separate", action="store_true", help="also the new kernel launched once per tensor")
    ap.add_argument("--no-check", action="store_true", help="skip the check against quantize_ref")
    ap.add_argument("--tokens", type=int, default=16384, help="batch * seqlen")
    ap.add_argument("--hidden", type=int, default=2048, help="heads * hdim")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8_quant bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"FP8 quantisation pass on {torch.cuda.get_device_name()}: Q, K rotated, V^T; "
          f"bytes = 16-bit reads + fp8 writes; peak {PEAK_GBS:.0f} GB/s")
    print("| variant | hdim | seqlen | batch x heads | tiles | ms | GB/s | of peak |")
    print("|---|---|---|---|---|---|---|---|")
    res = rows(args.hdims, args.seqlens, args.causal, args.path, tuple(args.warps), args.separate,
               not args.no_check, args.tokens, args.hidden)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
