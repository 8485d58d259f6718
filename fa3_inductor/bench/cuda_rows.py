"""Forward-kernel rows for the CUDA template: the FA3 paper's grid (batch*seqlen = 16k, hidden
2048, head dims 64/128/256, causal or not) and the hdim-128 ablation table.

    python -m fa3_inductor.bench.cuda_rows            # grid + ablation, prints tables
    python -m fa3_inductor.bench.cuda_rows --quick    # seqlens 512, 2k, 8k only
    python -m fa3_inductor.bench.cuda_rows --against OLD_CACHE   # this build vs an earlier one

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


def _spec(causal: bool, dtype) -> AttentionSpec:
    """The benchmark's spec: causal (top-left) or not, output in the input dtype."""
    return AttentionSpec(window_right=0 if causal else None,
                         out_dtype="bfloat16" if dtype == torch.bfloat16 else "float16")


def _cells(d, causals, seqlens, total_tokens, hidden, dtype):
    """(causal, spec, seqlen, batch, heads, q, k, v) per cell of the grid at b*s = total_tokens."""
    h = hidden // d
    for causal in causals:
        spec = _spec(causal, dtype)
        for s in seqlens:
            b = max(1, total_tokens // s)
            yield (causal, spec, s, b, h, *_inputs(b, h, s, d, dtype))


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
        return _sdpa_fn(q, k, v, scale, "default", causal=spec.causal)
    raise ValueError(impl)


def cuda_forward_rows(hdims=(64, 128, 256), causals=(False, True), seqlens=SEQLENS, total_tokens=16384,
                      hidden=2048, dtype=torch.float16, impls=("cuda",), warmup=3, iters=10,
                      **ablation) -> list[dict]:
    """One row per (impl, hdim, causal, seqlen): ms and TFLOP/s.  Failures give a row with `error`."""
    rows = []
    for d in hdims:
        for causal, spec, s, b, h, q, k, v in _cells(d, causals, seqlens, total_tokens, hidden, dtype):
            for impl in impls:
                row = dict(impl=impl, hdim=d, causal=causal, seqlen=s, batch=b, heads=h)
                try:
                    ms = _time_ms(forward_fn(impl, q, k, v, spec, 1 / math.sqrt(d), **ablation), warmup, iters)
                    row.update(ms=ms, tflops=_flops(b, h, s, d, causal) / (ms * 1e-3) / 1e12)
                except Exception as exc:  # keep the table going; report the reason in the row
                    row.update(ms=float("nan"), tflops=float("nan"), error=str(exc).splitlines()[0][:120])
                rows.append(row)
    return rows


# Each technique switched off at one tile (128 x 128, one CTA per tile, as the paper compares
# them); the persistent grid, the product's default at 8k (128 x 160 tiles, one CTA per tile:
# cuda_jit.launch_policy) and FA3's 128 x 176 beside.
ABLATIONS = {
    "full": dict(block_n=128, persistent=False),
    "no intra-WG overlap": dict(intra_wg=False, block_n=128, persistent=False),
    "no pingpong": dict(pingpong=False, block_n=128, persistent=False),
    "no warp specialization": dict(warp_spec=False, block_n=128, persistent=False),
    "full + persistent": dict(persistent=True, block_n=128),
    "full, 128x160 tile (default)": dict(block_n=160),
    "full, 128x176 tile": dict(block_n=176, persistent=False),
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


def _sdpa_fn(q, k, v, scale, backend: str, causal: bool = False):
    """SDPA restricted to one backend ("flash", "cudnn", "efficient", or "default": SDPA's own
    choice); GQA through enable_gqa (K/V not repeated)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gqa = q.shape[1] != k.shape[1]
    call = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal,  # noqa: E731
                                                  enable_gqa=gqa)
    if backend == "default":
        return call
    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def run():
        with sdpa_kernel([which]):
            return call()
    return run


def _timed_row(row, fn, warmup, iters, flops, kv_bytes):
    try:
        ms = _time_ms(fn, warmup, iters)
        row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, kv_gbs=kv_bytes / (ms * 1e-3) / 1e9)
    except Exception as exc:  # an unsupported backend gives a row with its reason
        row.update(ms=float("nan"), tflops=float("nan"), kv_gbs=float("nan"), error=str(exc).splitlines()[0][:120])
    return row


def gqa_decode_rows(batch=64, hk=8, groups=(4, 8), sqs=(1, 16), sks=(4096, 16384), ds=(128, 64),
                    dtype=torch.bfloat16, sdpa_backends=("flash", "cudnn", "efficient"), warmup=3,
                    iters=20) -> list[dict]:
    """Short queries over a long KV cache with GQA (decoding, speculative verification): the CUDA
    template with the group's heads packed into one tile (default), unpacked (one tile per query
    head), the Triton template, and SDPA's backends on the same tensors.  kv_gbs = the K/V bytes
    read once / time: the bound of this regime is HBM bandwidth (~3.35 TB/s on the H100)."""
    from ..ops import cuda_impl, triton_impl
    rows = []
    spec = _spec(False, dtype)
    for d, group, sq, sk in ((d, gr, sq, sk) for d in ds for gr in groups for sq in sqs for sk in sks):
        g = torch.Generator(device="cuda").manual_seed(sq * 7 + sk)
        q = torch.randn(batch, hk * group, sq, d, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(batch, hk, sk, d, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(batch, hk, sk, d, device="cuda", dtype=dtype, generator=g)
        scale = d ** -0.5
        flops = 4.0 * batch * hk * group * sq * sk * d
        kv_bytes = 2.0 * batch * hk * sk * d * q.element_size()
        fns = {}
        why = cuda_impl.supports(q, k, v, None, spec)
        if why is None:
            fns["cuda packed"] = lambda: cuda_impl.forward(q, k, v, None, None, None, None, scale, spec)
            fns["cuda unpacked"] = lambda: cuda_impl.forward(q, k, v, None, None, None, None, scale, spec,
                                                             pack_gqa=False)
        fns["triton"] = lambda: triton_impl.forward(q, k, v, None, None, None, None, scale, spec)
        for be in sdpa_backends:
            fns[f"sdpa {be}"] = _sdpa_fn(q, k, v, scale, be)
        for impl, fn in fns.items():
            row = dict(impl=impl, hdim=d, group=group, sq=sq, sk=sk, batch=batch, hk=hk)
            rows.append(_timed_row(row, fn, warmup, iters, flops, kv_bytes))
    return rows


def split_head_rows(seqlens=(2048, 8192), total_tokens=16384, heads=16, d=192, dv=128, causals=(False, True),
                    dtype=torch.bfloat16, sdpa_backends=("cudnn", "efficient", "flash"), warmup=3,
                    iters=10) -> list[dict]:
    """q/k head dim 192 with v head dim 128 (DeepSeek-style MLA prefill): the CUDA template next to
    SDPA's backends.  FLOPs: 2 * b * h * sq * sk * (d + dv), halved when causal."""
    from ..ops import cuda_impl
    rows = []
    for causal in causals:
        spec = _spec(causal, dtype)
        for s in seqlens:
            b = max(1, total_tokens // s)
            g = torch.Generator(device="cuda").manual_seed(s)
            q = torch.randn(b, heads, s, d, device="cuda", dtype=dtype, generator=g)
            k = torch.randn(b, heads, s, d, device="cuda", dtype=dtype, generator=g)
            v = torch.randn(b, heads, s, dv, device="cuda", dtype=dtype, generator=g)
            scale = d ** -0.5
            flops = 2.0 * b * heads * s * s * (d + dv) / (2 if causal else 1)
            fns = {"cuda": lambda: cuda_impl.forward(q, k, v, None, None, None, None, scale, spec)}
            for be in sdpa_backends:
                fns[f"sdpa {be}"] = _sdpa_fn(q, k, v, scale, be, causal=causal)
            for impl, fn in fns.items():
                row = dict(impl=impl, hdim=f"{d}/{dv}", causal=causal, seqlen=s, batch=b, heads=heads)
                rows.append(_timed_row(row, fn, warmup, iters, flops, 0.0))
    return rows


# Tile candidates per head dim (rows x keys, stages), one CTA per tile: the default first.
TILE_CANDIDATES = {
    64: {"192x128": {}, "128x128": dict(block_m=128)},
    128: {"128x128": dict(block_n=128, persistent=False), "128x128 s3": dict(stages=3, persistent=False),
          "128x160": dict(block_n=160, persistent=False), "128x176": dict(block_n=176, persistent=False)},
}


# Schedule and softmax variants at the default tiles (kernel "auto"'s choice per shape): one CTA
# per tile ("per-tile", where the default is the persistent grid), the persistent grid (with O
# staged apart from Q where it fits, the next tile's loads run under this tile's epilogue), and
# every n-th exponential on the FMA pipe (exp_poly), and the lazy O rescale (lazy_rescale).
SCHEDULE_CANDIDATES = {"default": {}, "per-tile": dict(persistent=False), "x4": dict(exp_poly=4),
                       "x3": dict(exp_poly=3), "persistent": dict(persistent=True),
                       "persistent x4": dict(persistent=True, exp_poly=4), "lazy": dict(lazy_rescale=True),
                       "eager rescale": dict(lazy_rescale=False),
                       "per-tile lazy": dict(persistent=False, lazy_rescale=True),
                       # K/V multicast to clusters of two CTAs on the default grid, and on each grid
                       "cluster": dict(cluster=True), "per-tile cluster": dict(persistent=False, cluster=True),
                       "persistent cluster": dict(persistent=True, cluster=True),
                       "no cluster": dict(cluster=False),
                       # the head dim's default key tile (128 at d128) on each grid, against the
                       # launch policy's wide tile
                       "n128": dict(block_n=128), "per-tile n128": dict(block_n=128, persistent=False),
                       "persistent n128": dict(block_n=128, persistent=True)}


def tile_rows(d: int, seqlens=(1024, 4096, 16384), causals=(False, True), rounds: int = 3,
              total_tokens=16384, hidden=2048, dtype=torch.float16, iters=10,
              against: str | None = None, candidates: dict | None = None) -> list[dict]:
    """The CUDA template's tile candidates for head dim d next to SDPA (cuDNN), interleaved: per
    (causal, seqlen) the variants are timed in turn, `rounds` times, and each keeps its median, so
    clock and thermal drift during the run falls on all of them alike (one variant after another
    read up to 7% apart between runs of the same kernel).  With `against` (an earlier kernel
    cache), each candidate is also timed on that build, as "<tile> (earlier)"."""
    from .other_build import interleaved
    rows = []
    variants = list((candidates or TILE_CANDIDATES[d]).items()) + [("sdpa", None)]
    for causal, spec, s, b, h, q, k, v in _cells(d, causals, seqlens, total_tokens, hidden, dtype):
        fns = {}
        for name, kw in variants:
            try:
                key = "sdpa" if kw is None else f"cuda {name}"  # interleaved() re-times "cuda*" on `against`
                fns[key] = forward_fn("sdpa" if kw is None else "cuda", q, k, v, spec, d ** -0.5, **(kw or {}))
            except Exception as exc:  # a variant that cannot run gets a row with its reason
                rows.append(dict(impl="cuda", tile=name, causal=causal, seqlen=s, ms=float("nan"),
                                 tflops=float("nan"), error=str(exc).splitlines()[0][:120]))
        try:
            med = interleaved(fns, against, rounds, lambda fn: _time_ms(fn, 3, iters))
        except Exception as exc:  # e.g. a candidate without an earlier build
            rows.append(dict(impl="cuda", tile="all", causal=causal, seqlen=s, ms=float("nan"),
                             tflops=float("nan"), error=str(exc).splitlines()[0][:120]))
            continue
        for name, ms in med.items():
            rows.append(dict(impl="sdpa" if name == "sdpa" else "cuda", tile=name.removeprefix("cuda "),
                             causal=causal, seqlen=s, ms=ms, tflops=_flops(b, h, s, d, causal) / (ms * 1e-3) / 1e12))
    return rows


def against_rows(against: str, hdims=(64, 128, 256), seqlens=(2048, 4096, 8192, 16384), causals=(False, True),
                 rounds: int = 3, total_tokens=16384, hidden=2048, dtype=torch.float16, iters=10) -> list[dict]:
    """This build of the CUDA template next to an earlier build (the kernel cache at `against`) and
    SDPA (cuDNN), interleaved as in tile_rows: per cell each is timed in turn, `rounds` times, and
    keeps its median.  A template change is judged by the two cuda rows of one cell."""
    from .other_build import interleaved
    rows = []
    for d in hdims:
        for causal, spec, s, b, h, q, k, v in _cells(d, causals, seqlens, total_tokens, hidden, dtype):
            fns = {"cuda": forward_fn("cuda", q, k, v, spec, d ** -0.5),
                   "sdpa": forward_fn("sdpa", q, k, v, spec, d ** -0.5)}
            try:
                med = interleaved(fns, against, rounds, lambda fn: _time_ms(fn, 3, iters))
            except Exception as exc:  # e.g. no earlier build of this instantiation
                rows.append(dict(impl="cuda", hdim=d, causal=causal, seqlen=s, ms=float("nan"),
                                 tflops=float("nan"), error=str(exc).splitlines()[0][:120]))
                continue
            for name, ms in med.items():
                rows.append(dict(impl=name, hdim=d, causal=causal, seqlen=s, ms=ms,
                                 tflops=_flops(b, h, s, d, causal) / (ms * 1e-3) / 1e12))
    return rows


def format_rows(rows, key_cols=("impl", "hdim", "causal", "seqlen", "batch", "heads"),
                values=("ms", "tflops")) -> str:
    cols = [c for c in key_cols if any(c in r for r in rows)] + list(values)
    lines = [" ".join(f"{c:>10}" for c in cols)]
    for r in rows:
        cells = []
        for c in cols:
            val = r.get(c, "")
            cells.append(f"{val:>10.3f}" if c == "ms" else f"{val:>10.1f}" if c in ("tflops", "kv_gbs")
                         else f"{str(val):>10}")
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
    from ..codegen.cuda_jit import SUPPORTED_HEAD_DIMS
    ap.add_argument("--hdims", type=int, nargs="+", default=[64, 128, 256], choices=SUPPORTED_HEAD_DIMS,
                    help="head dims of the forward grid (the template's)")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--decode", action="store_true",
                    help="only the GQA short-query rows (packed vs unpacked heads vs SDPA), bf16")
    ap.add_argument("--split", action="store_true", help="only the 192 / 128 head-dim rows vs SDPA, bf16")
    ap.add_argument("--tiles", type=int, choices=sorted(TILE_CANDIDATES), help="only this head dim's tile candidates vs SDPA")
    ap.add_argument("--against", metavar="CACHE",
                    help="only: this build vs the earlier build in kernel cache CACHE vs SDPA, interleaved "
                         "(with --tiles: every tile candidate on both builds)")
    ap.add_argument("--schedules", type=int, metavar="D",
                    help="only the schedule / softmax variants (SCHEDULE_CANDIDATES) at head dim D vs SDPA")
    ap.add_argument("--only", nargs="+", choices=sorted(SCHEDULE_CANDIDATES),
                    help="with --schedules: only these variants")
    ap.add_argument("--seqlens", type=int, nargs="+", help="with --tiles / --schedules: these sequence lengths")
    ap.add_argument("--causal", choices=["yes", "no"], help="with --tiles / --schedules: only these rows")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --tiles / --schedules: interleaved rounds per cell (medians); a 5%% noise floor at 3")
    ap.add_argument("--iters", type=int, default=10, help="with --tiles / --schedules: timed calls per round")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.iters < 1:
        ap.error(f"--rounds {args.rounds} / --iters {args.iters}: both must be >= 1")
    dtype = getattr(torch, args.dtype)
    causals = (False, True) if args.causal is None else (args.causal == "yes",)
    if args.schedules:
        print(f"d{args.schedules} schedule variants, b*s = 16k, hidden 2048, {args.dtype}"
              + (f", this build and the earlier one in {args.against}" if args.against else ""))
        cands = {n: kw for n, kw in SCHEDULE_CANDIDATES.items() if not args.only or n in args.only}
        rows = tile_rows(args.schedules, dtype=dtype, against=args.against, candidates=cands,
                         seqlens=tuple(args.seqlens or (2048, 4096, 8192, 16384)), causals=causals,
                         rounds=args.rounds, iters=args.iters)
        print(format_rows(rows, key_cols=("impl", "tile", "causal", "seqlen")))
        return
    if args.against and not args.tiles:
        print(f"this build vs {args.against} vs SDPA (interleaved medians), b*s = 16k, hidden 2048, {args.dtype}")
        print(format_rows(against_rows(args.against, dtype=dtype), key_cols=("impl", "hdim", "causal", "seqlen")))
        return
    if args.tiles:
        print(f"d{args.tiles} tiles (rows x keys), b*s = 16k, hidden 2048, {args.dtype}"
              + (f", this build and the earlier one in {args.against}" if args.against else ""))
        rows = tile_rows(args.tiles, dtype=dtype, against=args.against, seqlens=tuple(args.seqlens or (1024, 4096, 16384)),
                         causals=causals, rounds=args.rounds, iters=args.iters)
        print(format_rows(rows, key_cols=("impl", "tile", "causal", "seqlen")))
    if args.decode or args.split or args.tiles:
        if args.decode:
            print("GQA short queries over a KV cache (batch 64, 8 kv heads, bf16, non-causal)")
            print(format_rows(gqa_decode_rows(), key_cols=("impl", "hdim", "group", "sq", "sk"),
                              values=("ms", "tflops", "kv_gbs")))
        if args.split:
            print("q/k head dim 192, v head dim 128 (b*s = 16k, 16 heads, bf16)")
            print(format_rows(split_head_rows()))
        return
    seqlens = (512, 2048, 8192) if args.quick else SEQLENS
    rows = cuda_forward_rows(hdims=tuple(args.hdims), seqlens=seqlens, impls=tuple(args.impls), dtype=dtype)
    print("forward, b*s = 16k, hidden 2048,", args.dtype)
    print(format_rows(rows))
    if not args.no_ablation:
        print("\nablation, hdim 128, seqlen 8k, non-causal (paper: 661 / 582 no intra-WG / 570 no WS)")
        print(format_rows(ablation_rows(dtype=dtype), key_cols=("variant", "hdim", "seqlen")))


if __name__ == "__main__":
    main()
