"""Diagnostics on the H100: where nanoGPT's time goes under fa3 vs inductor (profiler top
kernels), and the Triton kernel on rows that see no key (causal + left padding)."""
import torch
import fa3_inductor
from fa3_inductor.bench.models import NanoGPT
from fa3_inductor.spec import AttentionSpec
from fa3_inductor.ops import triton_impl, dispatch
from fa3_inductor import reference

torch.manual_seed(0)
m = NanoGPT(T=4096).cuda().to(torch.bfloat16).eval()
x = torch.randn(2, 4096, 2048, device="cuda", dtype=torch.bfloat16)
for be in ("inductor", "fa3"):
    torch._dynamo.reset()
    f = torch.compile(m, backend=be)
    with torch.no_grad():
        for _ in range(3):
            f(x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                f(x)
            torch.cuda.synchronize()
    print(f"== {be}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))
q = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
v = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
kp = torch.ones(2, 300, dtype=torch.bool, device="cuda")
kp[0, :37] = False
spec = AttentionSpec(window_right=0, key_padding=True, masked_value="min_additive", out_dtype="bfloat16")
for name, impl in (("triton", triton_impl), ("reference", dispatch.implementation("reference"))):
    out, lse = impl.forward(q, k, v, None, kp, None, None, 0.125, spec)
    print(name, "nan rows", torch.isnan(out).any(-1).sum().item(), "lse -inf rows", torch.isneginf(lse).sum().item(),
          "lse nan", torch.isnan(lse).sum().item())
