"""Attention alone, forward (inference), at the model grid's shape (bf16, batch 2, 16 heads,
head dim 128, seqlen 4096): nanoGPT's masked_fill causal attention and HF Llama's eager
attention (GQA 4:1, in-graph additive causal mask, fp32 softmax), each under eager,
backend="inductor" and backend="fa3", timed with do_bench.  The issue's model-level target
(>= 5x Inductor at 4k, forward) is about this part of the step.

    python scripts/attn_level.py [--seqlen 4096]
"""
import argparse
import math

import torch
import torch.nn.functional as F
import triton.testing

import fa3_inductor  # noqa: F401  (registers backend="fa3")

B, H, HK, D = 2, 16, 4, 128


class NanoGPTAttention(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(s, s)).view(1, 1, s, s))

    def forward(self, q, k, v):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        return att @ v


class LlamaEagerAttention(torch.nn.Module):
    def forward(self, q, k, v):
        b, hk, s, d = k.shape
        n = q.shape[1] // hk
        k = k[:, :, None].expand(b, hk, n, s, d).reshape(b, hk * n, s, d)
        v = v[:, :, None].expand(b, hk, n, s, d).reshape(b, hk * n, s, d)
        i = torch.arange(s, device=q.device)[:, None]
        j = torch.arange(s, device=q.device)[None, :]
        mask = torch.where(j <= i, torch.tensor(0.0, dtype=q.dtype, device=q.device), torch.finfo(q.dtype).min)
        w = torch.matmul(q, k.transpose(2, 3)) * d ** -0.5 + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=4096)
    s = ap.parse_args().seqlen
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, s, D, device="cuda", dtype=dt, generator=g)
    kv_full = [torch.randn(B, H, s, D, device="cuda", dtype=dt, generator=g) for _ in range(2)]
    kv_gqa = [torch.randn(B, HK, s, D, device="cuda", dtype=dt, generator=g) for _ in range(2)]
    flops = 4.0 * B * H * s * s * D / 2     # causal
    print(f"attention forward, bf16, B={B} H={H} S={s} d={D}, causal FLOPs {flops:.3g}")
    for name, mod, kv in (("nanoGPT", NanoGPTAttention(s).cuda(), kv_full),
                          ("HF Llama eager (GQA 4:1)", LlamaEagerAttention(), kv_gqa)):
        times = {}
        ref = None
        for backend in ("eager", "inductor", "fa3"):
            torch._dynamo.reset()
            f = mod if backend == "eager" else torch.compile(mod, backend=backend)
            with torch.no_grad():
                out = f(q, *kv)
                ref = out if ref is None else ref
                err = (out.float() - ref.float()).abs().max().item()
                times[backend] = triton.testing.do_bench(lambda: f(q, *kv))
            print(f"  {name:26s} {backend:9s} {times[backend]:7.3f} ms {flops / times[backend] / 1e9:6.0f} TFLOP/s"
                  f"  max|out - eager| {err:.2e}", flush=True)
        print(f"  {name:26s} fa3 / inductor: {times['inductor'] / times['fa3']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
