"""Forms added after the last device run, through backend="fa3" on the H100 (our kernels, no
force_rewrite): MBart's 4-D view of bmm scores, ALiBi written in the graph, (1 - mask) *
finfo.min under its 0/1 guard, and a mask passed in as an input (structure speculated and
guarded).  Bar: error vs float64 at most 2x eager's in bf16 plus a small slack, outputs and
input gradients."""
import pytest
import torch

import fa3_inductor
from fa3_inductor import backend as fa3_backend_mod

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs an sm_90 GPU", allow_module_level=True)

import test_mask_inputs as mi  # noqa: E402  (tests/ is on sys.path via conftest)
import test_patterns as tp  # noqa: E402

B, H, S, D = 2, 8, 256, 64
DEVICE = "cuda"


def _inputs(seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g, device=DEVICE, dtype=torch.float64) for _ in range(3)]


def _padding():
    am = torch.ones(B, S, dtype=torch.long, device=DEVICE)
    am[0, :40] = 0
    am[1, -30:] = 0
    return am


def _hf_mask():
    i = torch.arange(S, device=DEVICE)[:, None]
    j = torch.arange(S, device=DEVICE)[None, :]
    keep = (j <= i)[None, None] & (_padding()[:, None, None, :] != 0)
    return torch.where(keep, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)


def _err(a, ref):
    live = torch.isfinite(ref)
    return (a.double() - ref)[live].abs().max().item()


CASES = {
    "mbart_view": (lambda: tp.sfdp24_causal_padding, lambda: (_padding(),)),
    "alibi_linear": (lambda: tp.AlibiAttention("relative", True, nh=H).to(DEVICE), lambda: ()),
    "alibi_abs": (lambda: tp.AlibiAttention("symmetric", False, nh=H).to(DEVICE), lambda: ()),
    "one_minus_mask": (lambda: tp.PaddingMask("additive_min"), lambda: (_padding(),)),
    "mask_input": (lambda: mi.attn_additive, lambda: (_hf_mask(),)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_form_through_kernels(name):
    make, extra = CASES[name]
    fn, rest = make(), extra()
    q64, k64, v64 = (x.requires_grad_(True) for x in _inputs())
    lo = [x.detach().bfloat16().requires_grad_(True) for x in (q64, k64, v64)]
    ea = [x.detach().bfloat16().requires_grad_(True) for x in (q64, k64, v64)]
    rest64 = tuple(r.double() if r.is_floating_point() else r for r in rest)
    fa3_backend_mod.REPORTS.clear()
    # the CPU suite's modules build index tensors with torch.arange(): make them CUDA tensors
    with fa3_inductor.config.patch(min_train_attention_flops=0), torch.device(DEVICE):
        ours = torch.compile(fn, backend="fa3")(*lo, *rest)
        eager = fn(*ea, *rest)
        ref = fn(q64, k64, v64, *rest64)
    rewritten = [s for r in fa3_backend_mod.REPORTS for s, done, _ in r.matched if done]
    assert len(rewritten) == 1, [(s.source, why) for r in fa3_backend_mod.REPORTS for s, _, why in r.matched]
    assert torch.equal(torch.isnan(ours), torch.isnan(eager))
    assert _err(ours, ref) <= 2 * _err(eager, ref) + 2e-2
    g = torch.randn_like(ref)
    ours.double().backward(g)
    eager.double().backward(g)
    ref.backward(g)
    for a, e, r in zip(lo, ea, (q64, k64, v64)):
        scale = r.grad.abs().max().item()
        assert _err(a.grad, r.grad) <= 2 * _err(e.grad, r.grad) + 2e-2 * scale


class _CausalAttention(torch.nn.Module):
    """nanoGPT-style: q @ k^T * scale, tril-masked softmax, @ v."""

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        n = q.shape[-2]
        keep = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
        return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("d,s,fp8,want", [(128, 2048, False, "cuda"), (64, 1024, False, "triton"),
                                          (128, 2048, True, "fp8 (cuda)")])
def test_explain_names_the_kernel_on_hopper(d, s, fp8, want):
    """explain()'s kernel column on the H100: the CUDA template for d128 causal, Triton for d64
    causal at 1k keys (ops/kernel_table.py), the CUDA FP8 kernel when fp8 is on."""
    q = torch.randn(1, 4, s, d, device=DEVICE, dtype=torch.bfloat16)
    with fa3_inductor.config.patch(fp8=fp8):
        rep = fa3_inductor.explain(_CausalAttention(), q, q, q)
    assert len(rep.matched) == 1 and rep.matched[0].rewritten_on_this_machine, rep
    assert rep.matched[0].kernel == want, rep
