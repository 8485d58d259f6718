"""Backward TFLOP/s with deterministic dQ (separate dQ kernel) vs atomic dQ (inside the dK/dV
kernel, config.deterministic_backward = False), default tiles, fp16, b*s = 16k, hidden 2048."""
import torch
from triton.testing import do_bench

from fa3_inductor import config
from fa3_inductor.ops import triton_impl
from fa3_inductor.spec import AttentionSpec

for d in (64, 128, 256):
    for causal in (False, True):
        s = 4096
        b, h = 16384 // s, 2048 // d
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
        spec = AttentionSpec(window_right=0 if causal else None)
        out, lse = triton_impl.forward(q, k, v, None, None, None, None, d ** -0.5, spec)
        dout = torch.randn_like(out)
        fl = 2.5 * 4.0 * b * h * s * s * d / (2 if causal else 1)
        row = []
        for det in (True, False):
            with config.patch(deterministic_backward=det):
                ms = do_bench(lambda: triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None,
                                                           d ** -0.5, spec, False))
            row.append(fl / ms / 1e9)
        print(f"d{d:3d} causal={int(causal)} s{s}: bwd deterministic {row[0]:5.0f}  atomic dQ {row[1]:5.0f} TFLOP/s"
              f"  ({row[1] / row[0]:.2f}x)", flush=True)
