"""Device diagnostic: one Llama attention (B=2, S=2048, 8 heads / 2 kv heads, d=128, bf16, causal),
forward + backward, under backend="inductor" and "fa3" with the mask built in the graph, passed
in as an input (speculated structure + key padding), or kept dense; then the CUDA kernels of
the fa3 variants by time.  Explains whole-step differences in scripts/ddp_throughput.py."""
import torch
import triton.testing

import fa3_inductor
from fa3_inductor.backend import REPORTS

B, S, H, HK, D = 2, 2048, 8, 2, 128
dev, dt = "cuda", torch.bfloat16
MIN = torch.finfo(dt).min


def repeat_kv(x, n):
    b, hk, s, d = x.shape
    return x[:, :, None].expand(b, hk, n, s, d).reshape(b, hk * n, s, d)


def attn_mask_input(q, k, v, mask):
    k, v = repeat_kv(k, H // HK), repeat_kv(v, H // HK)
    s = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def attn_in_graph(q, k, v, am):
    i = torch.arange(S, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    keep = (j <= i)[None, None] & (am[:, None, None, :] != 0)
    mask = torch.where(keep, torch.tensor(0.0, dtype=q.dtype, device=q.device), MIN)
    return attn_mask_input(q, k, v, mask)


def main():
    torch.manual_seed(0)
    q = torch.randn(B, H, S, D, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, HK, S, D, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, HK, S, D, device=dev, dtype=dt, requires_grad=True)
    am = torch.ones(B, S, dtype=torch.long, device=dev)
    i = torch.arange(S, device=dev)[:, None]
    j = torch.arange(S, device=dev)[None, :]
    mask = torch.where((j <= i)[None, None].expand(B, 1, S, S), torch.tensor(0.0, dtype=dt, device=dev), MIN)
    do = torch.randn(B, H, S, D, device=dev, dtype=dt)
    flops = 4 * B * H * S * S * D * 0.5 * 3.5
    rows = []
    # float32 eager reference of outputs and input gradients (same inputs)
    ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref_out = attn_mask_input(*ref_in, mask.float())
    ref_out.backward(do.float())
    ref = [ref_out.detach()] + [t.grad for t in ref_in]

    every = {"min_train_attention_flops": 0}   # the size policy would leave this size to Inductor
    ro = "reduce-overhead"   # CUDA graphs: no host work per call
    variants = [("inductor", "mask input", attn_mask_input, mask, {}, None),
                ("fa3", "mask input (default policy)", attn_mask_input, mask, {}, None),
                ("fa3", "mask input (speculated)", attn_mask_input, mask, every, None),
                ("fa3", "mask input (speculate off)", attn_mask_input, mask, {"speculate_mask_inputs": False, **every}, None),
                ("fa3", "in graph causal+padding", attn_in_graph, am, every, None),
                ("fa3", "in graph, kernel=triton", attn_in_graph, am, {"kernel": "triton", **every}, None),
                ("inductor", "in graph, reduce-overhead", attn_in_graph, am, {}, ro),
                ("fa3", "in graph, reduce-overhead", attn_in_graph, am, every, ro),
                ("fa3", "mask input, reduce-overhead", attn_mask_input, mask, every, ro)]
    for backend, what, fn, m, cfg, mode in variants:
        torch._dynamo.reset()
        REPORTS.clear()
        with fa3_inductor.config.patch(**cfg):
            f = torch.compile(fn, backend=backend, mode=mode)

            def step():
                # grads are dropped each step: under CUDA graphs the previous step's grads are
                # graph outputs that the next replay overwrites (accumulating into them fails)
                for t in (q, k, v):
                    t.grad = None
                if mode:
                    torch.compiler.cudagraph_mark_step_begin()
                out = f(q, k, v, m)
                out.backward(do)
                return out
            try:
                step()
                out = step()
                err = [(a.float() - b).abs().max().item() for a, b in zip([out.detach(), q.grad, k.grad, v.grad], ref)]
            except Exception as exc:  # one variant failing must not hide the others' rows
                rows.append((backend, what, float("nan"), float("nan"), [f"failed: {str(exc)[:80]}"], [0, 0, 0, 0]))
                continue
            ms = triton.testing.do_bench(step, warmup=5, rep=40)
            spec = [s.spec.describe() if done else f"left: {why[:50]}" for r in REPORTS for s, done, why in r.matched]
            rows.append((backend, what, ms, flops / ms / 1e9, spec, err))
            if backend == "fa3" and what == "mask input (speculated)":
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                avg = prof.key_averages()
                print(f"--- kernels, fa3 {what} (3 steps)")
                print(avg.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
                # the layer is host-bound (docs/perf.md): where does the CPU time of a step go?
                print(f"--- host time, fa3 {what} (3 steps)")
                print(avg.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    print(f"\n{'backend':<9} {'variant':<28} {'ms fwd+bwd':>10} {'TFLOP/s':>8}  {'max err out/dq/dk/dv vs fp32':<34} spec")
    for b, w, ms, tf, spec, err in rows:
        e = "/".join(f"{x:.1e}" for x in err)
        print(f"{b:<9} {w:<28} {ms:>10.3f} {tf:>8.1f}  {e:<34} {spec}")


if __name__ == "__main__":
    main()
