"""Dynamic shapes: one compiled graph serves several sequence lengths (no recompile), the attention
is rewritten in that graph, and every length matches eager."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fa3_inductor
from fa3_inductor import backend as fa3_backend_mod
from helpers import assert_close, fast_fa3, rewritten_sites, clear_reports, describe_reports

LENGTHS = (8, 11, 16)


class Plain(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v


class ArangeCausal(nn.Module):
    def forward(self, q, k, v):
        T = q.shape[-2]
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(T, device=q.device)[None, :]
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        return s.masked_fill(j > i, float("-inf")).softmax(-1) @ v


class TriuCausalAdditive(nn.Module):
    def forward(self, q, k, v):
        T = q.shape[-2]
        s = q @ k.transpose(-1, -2) * 0.3
        s = s + torch.full((T, T), torch.finfo(q.dtype).min).triu(1)
        return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class NanoGPTBuffer(nn.Module):
    def __init__(self, T=32):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, q, k, v):
        T = q.shape[-2]
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        s = s.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(s, dim=-1) @ v


class GQARepeat(nn.Module):
    def forward(self, q, k, v):
        b, hk, s, d = k.shape
        g = q.shape[1] // hk
        k = k[:, :, None].expand(b, hk, g, s, d).reshape(b, hk * g, s, d)
        v = v[:, :, None].expand(b, hk, g, s, d).reshape(b, hk * g, s, d)
        return (q @ k.transpose(2, 3) * 0.3).softmax(-1) @ v


class SdpaCausal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# name: (module, kv heads); queries have 4 heads, head dim 6 (no size coincides with a length)
MODELS = {"plain": (Plain, 4), "arange_causal": (ArangeCausal, 4), "triu_additive": (TriuCausalAdditive, 4),
          "nanogpt_buffer": (NanoGPTBuffer, 4), "gqa": (GQARepeat, 2), "sdpa_causal": (SdpaCausal, 4)}


def make(T, hk):
    g = torch.Generator().manual_seed(T)
    return (torch.randn(3, 4, T, 6, generator=g), torch.randn(3, hk, T, 6, generator=g),
            torch.randn(3, hk, T, 6, generator=g))


def counting(backend):
    calls = []

    def be(gm, ex, **kw):
        calls.append(gm)
        return backend(gm, ex, **kw)
    return be, calls


def run_lengths(m, hk, compile_fn, mark=False):
    clear_reports()
    outs = []
    for T in LENGTHS:
        q, k, v = (t.requires_grad_(True) for t in make(T, hk))
        if mark:
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 2)
        out = compile_fn(q, k, v)
        out.sum().backward()
        qe, ke, ve = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        ref = m(qe, ke, ve)
        ref.sum().backward()
        assert_close(out, ref, what=f"T={T} output")
        for a, b, n in ((q, qe, "dq"), (k, ke, "dk"), (v, ve, "dv")):
            assert_close(a.grad, b.grad, what=f"T={T} {n}")
        outs.append(out)
    return outs


@pytest.mark.parametrize("name", list(MODELS))
def test_dynamic_true_no_recompile(name):
    cls, hk = MODELS[name]
    m = cls()
    be, calls = counting(fast_fa3)
    with fa3_inductor.config.patch(force_rewrite=True, sdpa_rewrite="always"), \
            torch._dynamo.config.patch(error_on_recompile=True):
        run_lengths(m, hk, torch.compile(m, backend=be, dynamic=True))
    assert len(calls) == 1, f"{len(calls)} graphs compiled"
    assert len(rewritten_sites()) == 1, describe_reports()


@pytest.mark.parametrize("name", ["plain", "arange_causal", "nanogpt_buffer"])
def test_mark_dynamic_sequence(name):
    cls, hk = MODELS[name]
    m = cls()
    be, calls = counting(fast_fa3)
    with fa3_inductor.config.patch(force_rewrite=True):
        run_lengths(m, hk, torch.compile(m, backend=be), mark=True)
    assert len(calls) == 1, f"{len(calls)} graphs compiled"
    assert len(rewritten_sites()) == 1, describe_reports()


def test_automatic_dynamic_after_first_length():
    """Default torch.compile: the second length recompiles once as dynamic, the third reuses it."""
    m = ArangeCausal()
    be, calls = counting(fast_fa3)
    with fa3_inductor.config.patch(force_rewrite=True):
        run_lengths(m, 4, torch.compile(m, backend=be))
    assert len(calls) == 2, f"{len(calls)} graphs compiled"
    assert len(rewritten_sites()) == 2, describe_reports()


def test_dynamic_inductor_end_to_end():
    """Real Inductor with symbolic sequence length (fake impl of the op under SymInts)."""
    m = ArangeCausal()
    be, calls = counting(fa3_backend_mod.fa3_backend)
    with fa3_inductor.config.patch(force_rewrite=True), torch._dynamo.config.patch(error_on_recompile=True):
        run_lengths(m, 4, torch.compile(m, backend=be, dynamic=True))
    assert len(calls) == 1
    assert len(rewritten_sites()) == 1, describe_reports()


def test_dynamic_batch_and_padding_mask():
    class Pad(nn.Module):
        def forward(self, q, k, v, am):
            s = q @ k.transpose(-1, -2) * 0.3
            return s.masked_fill(am[:, None, None, :] == 0, float("-inf")).softmax(-1) @ v

    m = Pad()
    be, calls = counting(fast_fa3)
    c = torch.compile(m, backend=be, dynamic=True)
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True), torch._dynamo.config.patch(error_on_recompile=True):
        # Batch sizes never equal the head count (2): Dynamo's duck sizing would otherwise
        # guard on batch == heads from the first call, which has nothing to do with fa3.
        for bsz, T in ((3, 8), (4, 11), (5, 13)):
            g = torch.Generator().manual_seed(T)
            q, k, v = (torch.randn(bsz, 2, T, 6, generator=g) for _ in range(3))
            am = torch.ones(bsz, T, dtype=torch.long)
            am[0, -2:] = 0
            assert_close(c(q, k, v, am), m(q, k, v, am), what=f"B={bsz} T={T}")
    assert len(calls) == 1
    site = rewritten_sites()[0]
    assert site.spec.key_padding, site.spec
