"""Deterministic backward on the H100: the Gluon turns with 1 / 2 / 4 dQ chains next to the tl
kernels (the deterministic route below DETERMINISTIC_GLUON_MIN_SK), the Gluon atomic mode and
cuDNN, from one run.  fp16, b*s = 16k, hidden 2048 (the kernel grid's shapes); TFLOP/s with the
backward's 2.5x forward FLOPs, and each Gluon row's ratio to cuDNN.

    python scripts/bench_det_chains.py [--dims 64,128,256] [--seqs 1024,4096,16384] [--chains 1,2,4]
        [--budget 200]

Why chains (ops/gluon_bwd.deterministic_chains): with one chain CTA n adds its dQ tile after CTA
n - 1 for every query block, so a kv head's CTAs run as a pipeline that fills once; c chains
(key block n into buffer n % c, rank n // c) are c shorter pipelines, for c - 1 more fp32 dQ
buffers for the finish to sum (and, at d256, to zero).  Every configuration is also checked bit-identical over two runs.
"""
from __future__ import annotations

import argparse
import time

import torch

from fa3_inductor import config
from fa3_inductor.bench import kernels as kb
from fa3_inductor.ops import gluon_bwd, triton_impl
from fa3_inductor.spec import AttentionSpec


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=_ints, default=(64, 128, 256))
    ap.add_argument("--seqs", type=_ints, default=(1024, 4096, 16384))
    ap.add_argument("--chains", type=_ints, default=(1, 2, 4))
    ap.add_argument("--budget", type=float, default=200.0, help="seconds; later cells are skipped")
    args = ap.parse_args()
    t0 = time.time()
    from torch.nn.attention import SDPBackend
    cudnn = kb._sdpa(SDPBackend.CUDNN_ATTENTION)
    rows = []
    for d in args.dims:
        for causal in (False, True):
            for s in args.seqs:
                if time.time() - t0 > args.budget:
                    print(f"budget: skipped d{d} causal={int(causal)} s{s}", flush=True)
                    continue
                b, h = max(1, 16384 // s), 2048 // d
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
                spec = AttentionSpec(window_right=0 if causal else None)
                scale = d ** -0.5
                out, lse = triton_impl.forward(q, k, v, None, None, None, None, scale, spec)
                dout = torch.randn_like(out)
                fl = kb.flops(b, h, s, d, causal, "bwd")
                cell = {}

                def tf(fn):                  # the kernel grid's timing (bench.kernels._bench)
                    return fl / kb._bench(fn) / 1e9

                cell["cudnn"] = tf(cudnn(q, k, v, causal, "bwd"))
                with config.patch(deterministic_backward=True, gluon_backward=False):
                    cell["tl_det"] = tf(lambda: triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None,
                                                                     scale, spec, False))
                launch, *_ = gluon_bwd.prepare(dout, q, k, v, out, lse, scale, causal, False, deterministic=False)
                cell["atomic"] = tf(launch)
                if d in gluon_bwd.DETERMINISTIC_HEAD_DIMS:
                    for c in args.chains:
                        launch, dq, dk, dv = gluon_bwd.prepare(dout, q, k, v, out, lse, scale, causal, False,
                                                               deterministic=True, chains=c)
                        launch()
                        first = dq.clone()
                        cell[f"turns{c}"] = tf(launch)
                        if not torch.equal(first, dq):
                            print(f"NOT BIT-IDENTICAL: d{d} causal={int(causal)} s{s} chains={c}", flush=True)
                            cell[f"turns{c}"] = float("nan")
                rows.append((d, causal, s, cell))
                print(f"d{d:3d} c{int(causal)} s{s:5d} " + "  ".join(
                    f"{n} {x:5.0f}" for n, x in cell.items()), flush=True)
                torch.cuda.empty_cache()
    names = ["tl_det", "atomic"] + [f"turns{c}" for c in args.chains]
    print("\nratio to cuDNN (bwd, fp16, b*s = 16k)")
    print(f"{'d':>4} {'causal':>6} {'S':>6} {'cudnn TF':>9} " + " ".join(f"{n:>8}" for n in names))
    for d, causal, s, cell in rows:
        print(f"{d:4d} {int(causal):6d} {s:6d} {cell['cudnn']:9.0f} " + " ".join(
            f"{cell[n] / cell['cudnn']:8.2f}" if n in cell else f"{'-':>8}" for n in names))


if __name__ == "__main__":
    main()
