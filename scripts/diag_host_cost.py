"""Device diagnostic: host time per attention call, the Python path of the Triton implementation
(triton_impl.forward / backward) and of the custom ops (torch.ops.fa3.*), next to the kernel
time, for the short shapes where the host bounds the call (the 512 / 1k cells of the kernel
grid, small batches).

    python scripts/diag_host_cost.py [--calls 200] [--json out.json]

host: seconds of Python per call, timed over `calls` back-to-back calls without a sync (the
GPU queue absorbs them); wall: the same loop including the final sync, per call; kernel: CUDA
events around one call of the same loop, i.e. what the GPU spends when it is never starved.
Run it once per tree (PYTHONPATH) to compare builds in one device call.
"""
import argparse
import json
import time

import torch

from fa3_inductor.ops import attention_op, triton_impl  # noqa: F401  (registers torch.ops.fa3)
from fa3_inductor.spec import AttentionSpec

# (name, B, H, Hk, S, D, causal, key padding): the short cells of the kernel grid (b*s = 16k,
# hidden 2048) and small-batch Llama-like calls (the padded one takes the tl kernels)
CASES = [("d128 causal 1k", 16, 16, 16, 1024, 128, True, False),
         ("d128 nc 512", 32, 16, 16, 512, 128, False, False),
         ("d256 causal 512", 32, 8, 8, 512, 256, True, False),
         ("d64 causal 1k", 16, 32, 32, 1024, 64, True, False),
         ("llama b1 2k gqa", 1, 32, 8, 2048, 128, True, False),
         ("llama b2 1k padded", 2, 32, 8, 1024, 128, True, True)]


def _loop(fn, calls):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    fn()
    ev[1].record()
    torch.cuda.synchronize()
    return host * 1e6, wall * 1e6, ev[0].elapsed_time(ev[1]) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    rows = []
    for name, B, H, Hk, S, D, causal, padded in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H, S, D, device="cuda", dtype=torch.float16, generator=g)
        k = torch.randn(B, Hk, S, D, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn(B, Hk, S, D, device="cuda", dtype=torch.float16, generator=g)
        spec = AttentionSpec(window_right=0 if causal else None, key_padding=padded)
        kp = None
        if padded:
            kp = torch.ones(B, S, dtype=torch.bool, device="cuda")
            kp[0, : S // 8] = False
        js = spec.to_json()
        scale = D ** -0.5
        out, lse = triton_impl.forward(q, k, v, None, kp, None, None, scale, spec)
        dout = torch.randn_like(out)
        paths = {
            "impl fwd": lambda: triton_impl.forward(q, k, v, None, kp, None, None, scale, spec),
            "impl bwd": lambda: triton_impl.backward(dout, q, k, v, out, lse, None, kp, None, None, scale, spec,
                                                     False),
            "op fwd": lambda: torch.ops.fa3.attention_fwd(q, k, v, None, kp, None, None, scale, js),
            "op bwd": lambda: torch.ops.fa3.attention_bwd(dout, q, k, v, out, lse, None, kp, None, None, scale,
                                                          js, False),
        }
        for path, fn in paths.items():
            host, wall, kern = _loop(fn, args.calls)
            rows.append(dict(label=args.label, case=name, path=path, host_us=round(host, 1),
                             wall_us=round(wall, 1), kernel_us=round(kern, 1)))
            print(f"{args.label:>6} {name:<18} {path:<9} host {host:7.1f} us  wall {wall:7.1f} us  "
                  f"kernel {kern:7.1f} us", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
