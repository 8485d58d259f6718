"""The Triton forward with the scale folded into the exponent (FOLD_SCALE) against the unfolded
kernel and cuDNN, whatever head dim (triton_impl.fold_scale applies it up to d64 only), interleaved in one run (each timed in turn, three
rounds, medians), fp16, batch * seqlen = 16k, hidden 2048.

    python scripts/ab_triton_fold.py [--hdims 64 128 256] [--seqlens 2048 4096 8192 16384]
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from fa3_inductor.bench.cuda_rows import _cells, _flops, _sdpa_fn  # noqa: E402
from fa3_inductor.bench.timing import time_ms  # noqa: E402
from fa3_inductor.ops import triton_impl  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hdims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    rule = triton_impl.fold_scale
    print(f"{'d':>4} {'causal':>6} {'seqlen':>6} {'fold':>7} {'no fold':>7} {'cuDNN':>7} {'fold/nofold':>11} {'fold/cuDNN':>10}")
    for d in args.hdims:
        for causal, spec, s, b, h, q, k, v in _cells(d, (False, True), args.seqlens, 16384, 2048, torch.float16):
            scale = d ** -0.5
            fns = {"fold": (True, lambda: triton_impl.forward(q, k, v, None, None, None, None, scale, spec)),
                   "nofold": (False, lambda: triton_impl.forward(q, k, v, None, None, None, None, scale, spec)),
                   "cudnn": (True, _sdpa_fn(q, k, v, scale, "cudnn", causal=causal))}
            times = {}
            for _ in range(args.rounds):
                for name, (fold, fn) in fns.items():
                    triton_impl.fold_scale = lambda spec, scale, d_pad, f=fold: f
                    try:
                        times.setdefault(name, []).append(time_ms(fn, 3, 10))
                    finally:
                        triton_impl.fold_scale = rule
            tf = {n: _flops(b, h, s, d, causal) / (statistics.median(t) * 1e-3) / 1e12 for n, t in times.items()}
            print(f"{d:>4} {str(causal):>6} {s:>6} {tf['fold']:>7.0f} {tf['nofold']:>7.0f} {tf['cudnn']:>7.0f} "
                  f"{tf['fold'] / tf['nofold']:>11.3f} {tf['fold'] / tf['cudnn']:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
