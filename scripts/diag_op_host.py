"""Device diagnostic: where the host time of one fa3 attention call goes (cProfile of the op's
Python path), at the shape of the DDP Llama benchmark (B=2, S=2048, 8/2 heads, d=128, bf16,
causal + key padding, finfo.min mask semantics), forward + backward through the custom ops.

    python scripts/diag_op_host.py [--calls 50]
"""
import argparse
import cProfile
import pstats
import time

import torch

from fa3_inductor.ops import attention_op  # noqa: F401  (registers torch.ops.fa3)
from fa3_inductor.spec import AttentionSpec

B, S, H, HK, D = 2, 2048, 8, 2, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, S, D, device="cuda", dtype=dt, generator=g)
    k = torch.randn(B, HK, S, D, device="cuda", dtype=dt, generator=g)
    v = torch.randn(B, HK, S, D, device="cuda", dtype=dt, generator=g)
    kp = torch.ones(B, S, dtype=torch.bool, device="cuda")
    kp[0, :100] = False
    do = torch.randn(B, H, S, D, device="cuda", dtype=dt, generator=g)
    specs = {"causal": AttentionSpec(window_right=0, out_dtype="bfloat16"),
             "causal+padding, min_additive": AttentionSpec(window_right=0, key_padding=True,
                                                           masked_value="min_additive", out_dtype="bfloat16")}
    for name, spec in specs.items():
        js = spec.to_json()
        padding = kp if spec.key_padding else None

        def call():
            out, lse = torch.ops.fa3.attention_fwd(q, k, v, None, padding, None, None, D ** -0.5, js)
            return torch.ops.fa3.attention_bwd(do, q, k, v, out, lse, None, padding, None, None, D ** -0.5, js, False)
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.calls):
            call()
        host = (time.perf_counter() - t) / args.calls
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / args.calls
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        call()
        torch.cuda.synchronize()
        ev[0].record()
        for _ in range(args.calls):
            call()
        ev[1].record()
        torch.cuda.synchronize()
        print(f"== {name}: host {host * 1e6:.0f} us/call (fwd+bwd launch path), wall {wall * 1e6:.0f} us, "
              f"event-timed {ev[0].elapsed_time(ev[1]) * 1e3 / args.calls:.0f} us")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            call()
        prof.disable()
        torch.cuda.synchronize()
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(18)
        st.sort_stats("cumtime").print_stats(22)


if __name__ == "__main__":
    main()
