"""CUDA forward, causal: the longest-first tile order over all (batch, head) pairs at once (the
order before session 3) against groups of heads sized to keep their K/V in L2
(cuda_impl.lpt_group), with cuDNN from the same run.  fp16, b*s = 16k, hidden 2048."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from fa3_inductor.ops import cuda_impl
from fa3_inductor.spec import AttentionSpec

grouped = cuda_impl.lpt_group
spec = AttentionSpec(window_right=0)
for d in (64, 128, 256):
    for s in (512, 1024, 2048, 4096, 8192, 16384):
        b, h = 16384 // s, 2048 // d
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
        fl = 2.0 * b * h * s * s * d
        res = {}
        for name, fn in (("all heads", lambda B, Hq, *a: B * Hq), ("L2 groups", grouped)):
            cuda_impl.lpt_group = fn
            res[name] = fl / do_bench(lambda: cuda_impl.forward(q, k, v, None, None, None, None, d ** -0.5, spec)) / 1e9
        cuda_impl.lpt_group = grouped
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = fl / do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5)) / 1e9
        print(f"d{d:3d} s{s:5d} group {grouped(b, h, h, s, d, 2):3d}: all heads {res['all heads']:5.0f}  "
              f"L2 groups {res['L2 groups']:5.0f}  cuDNN {ref:5.0f}  ratio {res['L2 groups'] / ref:.2f} "
              f"(was {res['all heads'] / ref:.2f})", flush=True)
