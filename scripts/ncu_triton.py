"""One call of the Triton forward and backward (fp16, b*s = 16k, hidden 2048, default tiles) between
cudaProfilerStart/Stop, for ncu --profile-from-start off.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \
        python scripts/ncu_triton.py --d 128 [--causal] [--deterministic yes|no] [--bwd-only]

--deterministic: the backward's dQ mode (default: the config's); --bwd-only: only the backward
between the profiler marks (compare the deterministic and the atomic dQ of one shape).
"""
import argparse

import torch

from fa3_inductor.ops import triton_impl
from fa3_inductor.spec import AttentionSpec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--deterministic", choices=["yes", "no"], default=None)
    ap.add_argument("--bwd-only", action="store_true")
    a = ap.parse_args()
    b, h = 16384 // a.seqlen, 2048 // a.d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, a.seqlen, a.d, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    det = None if a.deterministic is None else a.deterministic == "yes"
    spec = AttentionSpec(window_right=0 if a.causal else None, deterministic_backward=det)
    scale = a.d ** -0.5
    for _ in range(2):   # compile + warm
        out, lse = triton_impl.forward(q, k, v, None, None, None, None, scale, spec)
        dout = torch.randn_like(out)
        triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, scale, spec, False)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    if not a.bwd_only:
        out, lse = triton_impl.forward(q, k, v, None, None, None, None, scale, spec)
    triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, scale, spec, False)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
