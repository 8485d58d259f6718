"""Forward-kernel rows for the CUDA template: the FA3 paper's grid (batch*seqlen = 16k, hidden
2048, head dims 64/128/256, causal or not) and the hdim-128 ablation table.

    python -m fa3_inductor.bench.cuda_rows            # grid + ablation, prints tables
    python -m fa3_inductor.bench.cuda_rows --quick    # seqlens 512, 2k, 8k only

TFLOP/s = 4 * b * h * sq * sk * d / t, halved for causal (the FLOPs actually needed).
"""
from __future__ import annotations

import argparse
import math

import torch

from .timing import time_ms

from ..spec import AttentionSpec

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)


def _time_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    return time_ms(fn, warmup=warmup, iters=iters)


def _inputs(b, h, s, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def _flops(b, h, s, d, causal):
    f = 4.0 * b * h * s * s * d
    return f / 2 if causal else f


def forward_fn(impl: str, q, k, v, spec: AttentionSpec, scale: float, **ablation):
    """A zero-argument callable running one forward with `impl` ("cuda", "triton", "sdpa")."""
    if impl == "cuda":
        from ..ops import cuda_impl
        why = cuda_impl.supports(q, k, v, None, spec)
        if why:
            raise RuntimeError(f"cuda: {why}")
        return lambda: cuda_impl.forward(q, k, v, None, None, None, None, scale, spec, **ablation)
    if impl == "triton":
        from ..ops import triton_impl
        return lambda: triton_impl.forward(q, k, v, None, None, None, None, scale, spec)
    if impl == "sdpa":
        import torch.nn.functional as F
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=spec.causal, scale=scale)
    raise ValueError(impl)


def cuda_forward_rows(hdims=(64, 128, 256), causals=(False, True), seqlens=SEQLENS, total_tokens=16384,
                      hidden=2048, dtype=torch.float16, impls=("cuda",), warmup=3, iters=10,
                      **ablation) -> list[dict]:
    """One row per (impl, hdim, causal, seqlen): ms and TFLOP/s.  Failures give a row with `error`."""
    rows = []
    for d in hdims:
        h = hidden // d
        for causal in causals:
            spec = AttentionSpec(window_right=0 if causal else None,
                                 out_dtype="bfloat16" if dtype == torch.bfloat16 else "float16")
            for s in seqlens:
                b = max(1, total_tokens // s)
                q, k, v = _inputs(b, h, s, d, dtype)
                for impl in impls:
                    row = dict(impl=impl, hdim=d, causal=causal, seqlen=s, batch=b, heads=h)
                    try:
                        ms = _time_ms(forward_fn(impl, q, k, v, spec, 1 / math.sqrt(d), **ablation), warmup, iters)
                        row.update(ms=ms, tflops=_flops(b, h, s, d, causal) / (ms * 1e-3) / 1e12)
                    except Exception as exc:  # keep the table going; report the reason in the row
                        row.update(ms=float("nan"), tflops=float("nan"), error=str(exc).splitlines()[0][:120])
                    rows.append(row)
                del q, k, v
    return rows


ABLATIONS = {
    "full": {},
    "no intra-WG overlap": dict(intra_wg=False),
    "no pingpong": dict(pingpong=False),
    "no warp specialization": dict(warp_spec=False),
    "full + persistent": dict(persistent=True),
    "full, 128x176 tile": dict(block_n=176),
}


def ablation_rows(hdim=128, seqlen=8192, total_tokens=16384, hidden=2048, dtype=torch.float16,
                  causal=False, warmup=3, iters=10) -> list[dict]:
    """The paper's ablation at hdim 128, seqlen 8k (non-causal): one row per variant."""
    rows = []
    for name, kw in ABLATIONS.items():
        r = cuda_forward_rows(hdims=(hdim,), causals=(causal,), seqlens=(seqlen,), total_tokens=total_tokens,
                              hidden=hidden, dtype=dtype, warmup=warmup, iters=iters, **kw)[0]
        r["variant"] = name
        rows.append(r)
    return rows


def format_rows(rows, key_cols=("impl", "hdim", "causal", "seqlen", "batch", "heads")) -> str:
    cols = [c for c in key_cols if any(c in r for r in rows)] + ["ms", "tflops"]
    lines = [" ".join(f"{c:>10}" for c in cols)]
    for r in rows:
        cells = []
        for c in cols:
            val = r.get(c, "")
            cells.append(f"{val:>10.3f}" if c == "ms" else f"{val:>10.1f}" if c == "tflops" else f"{str(val):>10}")
        line = " ".join(cells)
        if "error" in r:
            line += f"  ({r['error']})"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="CUDA template forward rows")
    ap.add_argument("--quick", action="store_true", help="seqlens 512, 2k, 8k")
    ap.add_argument("--impls", nargs="+", default=["cuda"], help="cuda triton sdpa")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--no-ablation", action="store_true")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    seqlens = (512, 2048, 8192) if args.quick else SEQLENS
    rows = cuda_forward_rows(seqlens=seqlens, impls=tuple(args.impls), dtype=dtype)
    print("forward, b*s = 16k, hidden 2048,", args.dtype)
    print(format_rows(rows))
    if not args.no_ablation:
        print("\nablation, hdim 128, seqlen 8k, non-causal (paper: 661 / 582 no intra-WG / 570 no WS)")
        print(format_rows(ablation_rows(dtype=dtype), key_cols=("variant", "hdim", "seqlen")))


if __name__ == "__main__":
    main()
