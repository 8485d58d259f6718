"""Kernel benchmark: our Triton attention vs cuDNN SDPA, flash SDPA and FlexAttention.

Grid (FlashAttention-3 paper style): head dim 64/128/256, causal and not, seqlen 512..16k with
batch * seqlen = 16k tokens and hidden 2048 (heads = 2048 / hdim); forward and backward.
Timing: triton.testing.do_bench, median.  FLOPs: fwd 4*b*h*sq*sk*d (halved if causal),
bwd 2.5x fwd.  "ours" is triton_impl.forward / backward as the op calls them (no tile config, no
autotune), so its forward rows time the Gluon kernel where triton_impl.gluon_supports() accepts
the case (d128 and d256 here) and the tl-level kernel elsewhere (d64); its backward rows the
deterministic default (the Gluon turns from 4k keys, d128 causal from 1k; the tl kernels below).
"ours_atomic" is the backward with deterministic_backward=False (the Gluon kernel, atomic dQ).
"cuda" is the CUDA template's forward (cuda_impl.forward, kernel "auto"'s launch policy: tiles,
grid) where it builds; it has no backward of its own (the op runs Triton's), so its backward rows
read n/a.  `--ablation` adds the CUDA template's ablation table (bench.cuda_rows.ablation_rows).
Output: a table on stdout (progress on stderr), CSV and PNGs under --out.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys
import time

import torch

# "ours_atomic": our backward with deterministic_backward=False (dQ summed by fp32 atomics, the
# way cuDNN and FlashAttention sum it); its forward rows are the same kernel as "ours" and read n/a.
PROVIDERS = ("ours", "ours_atomic", "cuda", "cudnn", "flash", "flex")


@dataclasses.dataclass
class Row:
    hdim: int
    causal: bool
    seqlen: int
    batch: int
    heads: int
    pass_: str
    dtype: str
    tflops: dict


def grid(quick: bool):
    dims = (64, 128, 256)
    seqs = (1024, 4096, 16384) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    for d in dims:
        for causal in (False, True):
            for s in seqs:
                yield d, causal, s, max(1, 16384 // s), 2048 // d


def flops(b, h, s, d, causal, pass_):
    f = 4.0 * b * h * s * s * d
    if causal:
        f /= 2
    return f * (2.5 if pass_ == "bwd" else 1.0)


def _bench(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def _ours(q, k, v, causal, pass_, deterministic=None):
    from ..ops import triton_impl
    from ..spec import AttentionSpec
    spec = AttentionSpec(window_right=0 if causal else None, out_dtype=str(q.dtype).split(".")[-1],
                         deterministic_backward=deterministic)
    scale = q.shape[-1] ** -0.5
    if pass_ == "fwd":
        return lambda: triton_impl.forward(q, k, v, None, None, None, None, scale, spec)
    out, lse = triton_impl.forward(q, k, v, None, None, None, None, scale, spec)
    dout = torch.randn_like(out)
    return lambda: triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, scale, spec, False)


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel
    import torch.nn.functional as F

    def make(q, k, v, causal, pass_):
        def fwd():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if pass_ == "fwd":
            fwd()  # raises here if the backend cannot run this shape
            return fwd
        qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        dout = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)
    return make


_flex_compiled = None


def _flex(q, k, v, causal, pass_):
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _flex_compiled is None:
        # One compiled flex_attention serves the whole grid (head dims x lengths x masks x passes):
        # past Dynamo's default recompile limit (8 per code object) it silently ran eager, which
        # is what the first kernel grid measured (7-43 TFLOP/s).  Raise the limit for the bench.
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    S = q.shape[2]
    bm = None
    if causal:
        bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device=q.device)
    if pass_ == "fwd":
        return lambda: _flex_compiled(q, k, v, block_mask=bm)
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = _flex_compiled(qg, kg, vg, block_mask=bm)
    dout = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)


def _ours_atomic(q, k, v, causal, pass_):
    return _ours(q, k, v, causal, pass_, deterministic=False)


def _cuda(q, k, v, causal, pass_):
    """The CUDA template's forward as the op launches it.  supports() builds the instantiation the
    call needs (nvcc, first use only), so no compile lands inside the timing; without nvcc, the
    CUTLASS headers or sm_90 it raises with the reason and the row reads n/a."""
    from ..ops import cuda_impl
    from ..spec import AttentionSpec
    spec = AttentionSpec(window_right=0 if causal else None, out_dtype=str(q.dtype).split(".")[-1])
    why = cuda_impl.supports(q, k, v, None, spec)
    if why:
        raise RuntimeError(f"CUDA template: {why}")
    scale = q.shape[-1] ** -0.5
    return lambda: cuda_impl.forward(q, k, v, None, None, None, None, scale, spec)


BWD_ONLY = ("ours_atomic",)
FWD_ONLY = ("cuda",)


def _makers():
    from torch.nn.attention import SDPBackend
    return {"ours": _ours, "ours_atomic": _ours_atomic, "cuda": _cuda, "cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
            "flash": _sdpa(SDPBackend.FLASH_ATTENTION), "flex": _flex}


def run(quick=False, dtype="float16", providers=PROVIDERS, passes=("fwd", "bwd"), out_dir=None,
        budget_s=None):
    dt = getattr(torch, dtype)
    makers = _makers()
    cases = list(grid(quick))
    total = len(cases) * len(passes)
    rows, t0, n = [], time.time(), 0
    for d, causal, s, b, h in cases:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dt) for _ in range(3))
        for pass_ in passes:
            n += 1
            res = {}
            for prov in providers:
                if (prov in BWD_ONLY and pass_ == "fwd") or (prov in FWD_ONLY and pass_ == "bwd"):
                    res[prov] = float("nan")
                    continue
                if budget_s is not None and time.time() - t0 > budget_s and prov != "ours":
                    res[prov] = float("nan")  # out of time: keep measuring ours only
                    continue
                try:
                    fn = makers[prov](q, k, v, causal, pass_)
                    ms = _bench(fn)
                    res[prov] = flops(b, h, s, d, causal, pass_) / (ms * 1e-3) / 1e12
                except Exception as exc:  # a backend that cannot run this shape: n/a
                    print(f"  {prov} d{d} s{s} {pass_}: {type(exc).__name__}: {str(exc)[:100]}", file=sys.stderr)
                    res[prov] = float("nan")
                finally:
                    torch.cuda.empty_cache()
            rows.append(Row(d, causal, s, b, h, pass_, dtype, res))
            if out_dir:  # partial results survive a run cut short
                os.makedirs(out_dir, exist_ok=True)
                write_csv(rows, providers, os.path.join(out_dir, f"kernels_{dtype}.csv"))
            print(f"[{n}/{total}] {time.time() - t0:6.0f}s  d={d} causal={int(causal)} s={s} {pass_}: "
                  + " ".join(f"{p}={res[p]:.0f}" for p in providers), file=sys.stderr, flush=True)
        del q, k, v
    print(table(rows, providers))
    if out_dir:
        plot(rows, providers, out_dir, dtype)
    return rows


def table(rows, providers):
    # ratios to cuDNN: ours (the Triton implementation) and, where timed, the CUDA template
    ratios = [p for p in ("ours", "cuda") if p in providers and "cudnn" in providers]
    head = f"{'d':>4} {'causal':>6} {'seqlen':>6} {'b':>3} {'h':>3} {'pass':>4} " + \
        " ".join(f"{p:>7}" for p in providers) + "".join(f" {p + '/cudnn':>11}" for p in ratios)
    lines = ["TFLOP/s (median, do_bench)", head, "-" * len(head)]
    for r in rows:
        cudnn = r.tflops.get("cudnn", math.nan)
        lines.append(f"{r.hdim:>4} {int(r.causal):>6} {r.seqlen:>6} {r.batch:>3} {r.heads:>3} {r.pass_:>4} "
                     + " ".join(f"{r.tflops.get(p, math.nan):>7.1f}" for p in providers)
                     + "".join(f" {r.tflops.get(p, math.nan) / cudnn:>11.2f}" for p in ratios))
    return "\n".join(lines)


def write_csv(rows, providers, path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["hdim", "causal", "seqlen", "batch", "heads", "pass", "dtype"] + [f"{p}_tflops" for p in providers])
        for r in rows:
            w.writerow([r.hdim, int(r.causal), r.seqlen, r.batch, r.heads, r.pass_, r.dtype]
                       + [f"{r.tflops.get(p, math.nan):.2f}" for p in providers])


def plot(rows, providers, out_dir, dtype):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    keys = sorted({(r.hdim, r.causal, r.pass_) for r in rows})
    for d, causal, pass_ in keys:
        sel = [r for r in rows if (r.hdim, r.causal, r.pass_) == (d, causal, pass_)]
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in providers:
            ax.plot([r.seqlen for r in sel], [r.tflops.get(p, math.nan) for r in sel], marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("seqlen (batch*seqlen = 16k)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{pass_} hdim {d} {'causal' if causal else 'non-causal'} {dtype}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"kernels_{dtype}_{pass_}_d{d}_{'causal' if causal else 'full'}.png"))
        plt.close(fig)
